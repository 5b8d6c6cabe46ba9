"""Multi-head latent attention: the platform's paged latent attention with the absorbed up-projections against
plain float64 attention on the expanded keys and values (K = [W_UK c | k_pe], V = W_UV c per head), on one
ragged step with decodes of unequal length, a fresh prefill and a prefill on cached context."""
from __future__ import annotations

import pytest
import torch

from pageport.platforms import Platform

from .helpers import make_metadata

H, L, R, DN, DV = 4, 16, 8, 12, 10  # heads, latent, rope part, nope part, value head


def _expanded_reference(q_nope, q_pe, latents, k_pes, w_uk, w_uv, seqs, scale):
    """float64 MHA over the expanded K/V of each sequence's latents, causal by absolute position."""
    out, row = [], 0
    for s, (cached, new, _) in enumerate(seqs):
        c, kp = latents[s].double(), k_pes[s].double()  # [S, L], [S, R]
        k = torch.cat([torch.einsum("hnl,sl->shn", w_uk.double(), c), kp[:, None].expand(-1, H, -1)], -1)
        v = torch.einsum("hvl,sl->shv", w_uv.double(), c)
        for p in range(cached, cached + new):
            q = torch.cat([q_nope[row], q_pe[row]], -1).double()  # [H, DN + R]
            probs = (torch.einsum("hd,shd->hs", q, k[:p + 1]) * scale).softmax(-1)
            out.append(torch.einsum("hs,shv->hv", probs, v[:p + 1]))
            row += 1
    return torch.stack(out)


# (cached, new, blocks) per sequence
MIXED = [(8, 1, [3, 7, 1]), (0, 6, [2, 9]), (5, 4, [4, 5, 6]), (12, 1, [10, 11, 12, 8])]  # decode, fresh and
# cached-context prefills, decode
DECODES = [(8, 1, [3, 7, 1]), (2, 1, [2]), (12, 1, [10, 11, 12, 8])]  # decode-only (the CUDA-graph step's path)


@pytest.mark.parametrize("seqs", [MIXED, DECODES], ids=["mixed", "decode-only"])
def test_absorbed_paged_mla_matches_expanded_float64(seqs):
    g = torch.Generator().manual_seed(0)
    bs, scale = 4, (DN + R) ** -0.5 * 1.3
    attn = Platform().mla_attention_backend(H, L, R, scale)
    md, _ = make_metadata(seqs, bs)
    lens = [c + n for c, n, _ in seqs]
    latents = [torch.randn(n, L, generator=g) for n in lens]
    k_pes = [torch.randn(n, R, generator=g) for n in lens]
    cache = torch.zeros(attn.kv_cache_shape(13, bs, 1, L + R))
    assert cache.shape == (13, bs, 1, L + R)
    for s, (cached, _, blocks) in enumerate(seqs):  # the context cached earlier
        for p in range(cached):
            cache[blocks[p // bs], p % bs, 0] = torch.cat([latents[s][p], k_pes[s][p]])
    t = md.num_actual_tokens
    q_nope, q_pe = torch.randn(t, H, DN, generator=g), torch.randn(t, H, R, generator=g)
    w_uk, w_uv = torch.randn(H, DN, L, generator=g) * 0.3, torch.randn(H, DV, L, generator=g) * 0.3
    new = torch.cat([torch.cat([latents[s][c:], k_pes[s][c:]], -1) for s, (c, _, _) in enumerate(seqs)])

    q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)  # absorbed, as the model does it
    out_lat = attn.forward(torch.cat([q_lat, q_pe], -1), new[:, None], None, cache, attn.build_metadata(md))
    out = torch.einsum("thl,hvl->thv", out_lat, w_uv)

    ref = _expanded_reference(q_nope, q_pe, latents, k_pes, w_uk, w_uv, seqs, scale)
    assert out.shape == (t, H, DV) and ref.abs().max() > 0.5
    assert (out.double() - ref).abs().max().item() < 1e-5
    # this step's latents landed in their slots
    for s, (cached, n, blocks) in enumerate(seqs):
        p = cached + n - 1
        assert torch.equal(cache[blocks[p // bs], p % bs, 0], torch.cat([latents[s][p], k_pes[s][p]]))
