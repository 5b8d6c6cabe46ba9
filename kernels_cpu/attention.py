"""Paged attention over a ragged batch in plain torch (SDPA on gathered blocks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pageport.platforms import AttentionBackend, AttentionMetadata


class TorchPagedAttention(AttentionBackend):
    """Cache layout [2, num_blocks, block_size, kv_heads, head_size].

    All single-token queries (decodes) go through one padded SDPA call; prefill chunks
    go one sequence at a time with a causal mask offset by the cached context.
    """

    name = "torch-sdpa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softcap is not None:
            raise ValueError("the torch paged attention backend does not support logit soft-capping")

    def write_kv(self, k, v, kv_cache, slot_mapping):
        kv_cache[0].view(-1, self.num_kv_heads, self.head_size).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, self.num_kv_heads, self.head_size).index_copy_(0, slot_mapping, v)

    def forward(self, q, k, v, kv_cache, md: AttentionMetadata):
        self.write_kv(k, v, kv_cache, md.slot_mapping[: md.num_actual_tokens])
        out = torch.empty_like(q)
        starts, lens = md.query_start_loc_cpu, md.seq_lens_cpu
        decodes = [i for i in range(md.num_seqs) if starts[i + 1] - starts[i] == 1]
        if decodes:
            self._decode(q, kv_cache, md, decodes, out)
        for i in range(md.num_seqs):
            q_len = starts[i + 1] - starts[i]
            if q_len > 1:
                rows = slice(starts[i], starts[i + 1])
                out[rows] = self._prefill(q[rows], kv_cache, md.block_table[i], lens[i], md.block_size)
        return out

    def _gather(self, kv_cache, blocks: torch.Tensor, length: int):
        """K, V of a block list as [..., kv_heads, length, head_size]."""
        k = kv_cache[0][blocks].flatten(-4, -3)[..., :length, :, :]
        v = kv_cache[1][blocks].flatten(-4, -3)[..., :length, :, :]
        return k.transpose(-3, -2), v.transpose(-3, -2)

    def _decode(self, q, kv_cache, md, seqs, out):
        lens = [md.seq_lens_cpu[i] for i in seqs]
        max_len = max(lens)
        n_blocks = -(-max_len // md.block_size)
        idx = torch.tensor(seqs, dtype=torch.long)
        rows = torch.tensor([md.query_start_loc_cpu[i] for i in seqs], dtype=torch.long)
        k, v = self._gather(kv_cache, md.block_table[idx, :n_blocks].long(), max_len)  # [B, Hkv, L, D]
        key_pos = torch.arange(max_len)
        seq_len = torch.tensor(lens)[:, None]
        mask = key_pos[None, :] < seq_len
        if self.sliding_window:
            mask &= key_pos[None, :] >= seq_len - self.sliding_window
        o = F.scaled_dot_product_attention(q[rows].unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                           scale=self.scale, enable_gqa=True)
        out[rows] = o.squeeze(2)

    def _prefill(self, q, kv_cache, block_row, seq_len: int, block_size: int):
        q_len = q.shape[0]
        k, v = self._gather(kv_cache, block_row[: -(-seq_len // block_size)].long(), seq_len)
        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        mask = key_pos <= q_pos
        if self.sliding_window:
            mask &= key_pos > q_pos - self.sliding_window
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=True)
        return o.transpose(0, 1)
