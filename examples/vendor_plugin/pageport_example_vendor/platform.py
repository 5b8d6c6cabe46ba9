from __future__ import annotations

import torch

from pageport.platforms import AttentionBackend, AttentionMetadata, Platform


class RefCpuPlatform(Platform):
    name = "refcpu"
    device_type = "cpu"
    priority = 1  # never chosen by --device auto over the built-in CPU platform
    supported_dtypes = (torch.float32, torch.bfloat16)

    def device_name(self) -> str:
        return "reference CPU device (example vendor plugin)"

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.kv_cache_memory_bytes is None:
            config.kv_cache_memory_bytes = 1 << 30

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        return ReferenceAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)


class ReferenceAttention(AttentionBackend):
    """One query token at a time, an explicit float32 softmax. Slow and obviously right."""

    name = "reference"

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_size):
        return (num_blocks, 2, num_kv_heads, block_size, head_size)

    def write_kv(self, k, v, kv_cache, slot_mapping):
        block_size = kv_cache.shape[3]
        for t, slot in enumerate(slot_mapping.tolist()):
            if slot < 0:
                continue
            b, off = divmod(slot, block_size)
            kv_cache[b, 0, :, off] = k[t]
            kv_cache[b, 1, :, off] = v[t]

    def forward(self, q, k, v, kv_cache, md: AttentionMetadata):
        self.write_kv(k, v, kv_cache, md.slot_mapping[: md.num_actual_tokens])
        group = self.num_heads // self.num_kv_heads
        block_size = kv_cache.shape[3]
        out = torch.empty_like(q)
        for i in range(md.num_seqs):
            start, end = md.query_start_loc_cpu[i], md.query_start_loc_cpu[i + 1]
            seq_len = md.seq_lens_cpu[i]
            blocks = md.block_table[i, : -(-seq_len // block_size)].long()
            keys = kv_cache[blocks, 0].permute(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.head_size)
            values = kv_cache[blocks, 1].permute(0, 2, 1, 3).reshape(-1, self.num_kv_heads, self.head_size)
            for t in range(start, end):
                pos = seq_len - (end - t)  # absolute position of this query token
                lo = 0 if not self.sliding_window else max(0, pos - self.sliding_window + 1)
                kk = keys[lo:pos + 1].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
                vv = values[lo:pos + 1].float().repeat_interleave(group, dim=1)
                scores = torch.einsum("hd,lhd->hl", q[t].float(), kk) * self.scale
                out[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), vv).to(q.dtype)
        return out
