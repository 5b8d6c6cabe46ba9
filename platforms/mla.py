"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents, in plain torch: the default every
platform inherits (`Platform.mla_attention_backend`); a platform with an MLA kernel overrides it.

The cache holds one vector per token and layer: the normed KV latent c [L] followed by the roped shared key part
k_pe [R], laid out [num_blocks, block_size, 1, L + R]. The model absorbs the key up-projection into the query
(q_lat = W_UK^T q_nope) and the value up-projection into the output (W_UV o_lat), so attention runs on the latents
alone: scores = [q_lat | q_pe] . [c | k_pe] * scale, output = softmax(scores) . c, per query head.

Decodes go through one batched gather of each sequence's blocks with a length mask built from device tensors
(CUDA-graph safe); prefill chunks one sequence at a time, causal by absolute position.
"""
from __future__ import annotations

import torch

from pageport.platforms.interface import AttentionBackend, AttentionMetadata


class TorchMLAAttention(AttentionBackend):
    name = "torch-mla"

    def __init__(self, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float):
        super().__init__(num_heads, 1, kv_lora_rank + rope_dim, scale)
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple:
        return (num_blocks, block_size, 1, self.head_size)

    def write_kv(self, k: torch.Tensor, v, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k: the latents [T, 1, L + R]; v unused. Padding rows (slot -1) write into the null block 0."""
        kv_cache.view(-1, self.head_size).index_copy_(0, slot_mapping.clamp(min=0), k.reshape(-1, self.head_size))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        """q [T, H, L + R] (absorbed), k [T, 1, L + R] this step's latents -> [T, H, L]."""
        n = md.num_actual_tokens
        self.write_kv(k[:n], None, kv_cache, md.slot_mapping[:n])
        out = q.new_zeros(q.shape[0], self.num_heads, self.kv_lora_rank)
        starts = md.query_start_loc_cpu
        decodes = [i for i in range(md.num_seqs) if starts[i + 1] - starts[i] == 1]
        if decodes:
            max_len = max(md.seq_lens_cpu[i] for i in decodes)
            if len(decodes) == md.num_seqs == n:  # decode-only (a captured graph's step): slices, no new tensors
                out[:n] = self._decode(q[:n], kv_cache, md, slice(0, n), max_len)
            else:
                rows = torch.tensor([starts[i] for i in decodes], device=q.device)
                idx = torch.tensor(decodes, device=q.device)
                out[rows] = self._decode(q[rows], kv_cache, md, idx, max_len)
        flat = kv_cache.view(-1, self.head_size)
        for i in range(md.num_seqs):
            s, e = starts[i], starts[i + 1]
            if e - s > 1:
                out[s:e] = self._prefill(q[s:e], flat, md, i)
        return out

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [..., H, L+R], kv [..., S, L+R], visible bool broadcastable to scores [..., H, S] -> [..., H, L]."""
        scores = torch.matmul(q.float(), kv.float().transpose(-1, -2)) * self.scale
        probs = scores.masked_fill_(~visible, float("-inf")).softmax(-1)
        return torch.matmul(probs, kv[..., :self.kv_lora_rank].float()).to(q.dtype)

    def _decode(self, q, kv_cache, md, idx, max_len: int):
        bs = md.block_size
        blocks = md.block_table[idx, :-(-max_len // bs)].long()  # [B, n]
        kv = kv_cache[blocks].view(blocks.shape[0], -1, self.head_size)  # [B, n * bs, L + R]
        visible = torch.arange(kv.shape[1], device=q.device)[None, :] < md.seq_lens[idx].long()[:, None]
        return self._attend(q, kv, visible[:, None, :])  # [B, n * bs] -> per head

    def _prefill(self, q, flat, md, i: int):
        seq_len, q_len, bs = md.seq_lens_cpu[i], q.shape[0], md.block_size
        pos = torch.arange(seq_len, device=q.device)
        kv = flat.index_select(0, md.block_table[i, pos // bs].long() * bs + pos % bs)  # [S, L + R]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        visible = pos[None, :] <= q_pos[:, None]  # [Q, S]
        return self._attend(q, kv, visible[:, None, :])
