"""Paged attention over a ragged batch: plain torch (SDPA on gathered blocks), and the same with the decodes
through the C++ kernel (`native.py`), which reads K/V straight from their blocks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from pageport.kernels_cpu import native
from pageport.platforms import AttentionBackend, AttentionMetadata


@dataclass
class _Prefill:
    rows: slice  # query rows of this sequence
    seq_len: int
    fresh: bool  # no cached context: attend to this step's own k/v (no gather), plain causal
    slots: Optional[torch.Tensor] = None  # [seq_len] cache slots of the context, when not fresh


@dataclass
class CpuAttentionMetadata:
    """The step's metadata plus what every layer would otherwise recompute: gather indices and masks.

    Built once per step by `TorchPagedAttention.build_metadata`; masks depend on a layer's sliding window and
    are made on first use per window.
    """

    base: AttentionMetadata
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    num_decodes: int
    decode_rows: Optional[torch.Tensor]  # query rows of the decodes; None when every row is a decode
    decode_blocks: Optional[torch.Tensor]  # [B, n] the first n blocks of each decode's table (padding: block 0)
    decode_lens: Optional[torch.Tensor]  # [B, 1]
    decode_max_len: int  # the longest context; the gathered blocks hold n * block_size >= it positions
    decode_uniform: bool  # every decode has the same context length
    prefills: list[_Prefill]
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: Optional[int]) -> Optional[torch.Tensor]:
        """Boolean mask [B, 1, 1, L'] over the gathered positions, True = attend; None when the decodes
        all see their whole (equal) context, which the caller then slices to decode_max_len."""
        if self.decode_uniform and (not window or window >= self.decode_max_len):
            return None
        key = ("d", window)
        if key not in self._masks:
            pos = torch.arange(self.decode_blocks.shape[1] * self.base.block_size)[None, :]
            ok = pos < self.decode_lens
            if window:
                ok &= pos >= self.decode_lens - window
            self._masks[key] = ok[:, None, None, :]
        return self._masks[key]

    def prefill_bias(self, i: int, p: _Prefill, window: Optional[int], group: int) -> torch.Tensor:
        """Additive float32 mask [group * q_len, seq_len] (0 = attend, -inf = not), rows repeated per query head
        of a KV head."""
        key = ("b", i, window, group)
        if key not in self._masks:
            q_len = p.rows.stop - p.rows.start
            q_pos = torch.arange(p.seq_len - q_len, p.seq_len)[:, None]
            key_pos = torch.arange(p.seq_len)[None, :]
            ok = key_pos <= q_pos
            if window:
                ok &= key_pos > q_pos - window
            self._masks[key] = torch.zeros(ok.shape).masked_fill_(~ok, float("-inf")).repeat(group, 1)
        return self._masks[key]

    def prefill_mask(self, i: int, p: _Prefill, window: Optional[int]) -> Optional[torch.Tensor]:
        """Boolean [q_len, seq_len] causal(+window) mask; None for a fresh prefill without a window."""
        if p.fresh and not window:
            return None
        key = (i, window)
        if key not in self._masks:
            q_len = p.rows.stop - p.rows.start
            q_pos = torch.arange(p.seq_len - q_len, p.seq_len)[:, None]
            key_pos = torch.arange(p.seq_len)[None, :]
            mask = key_pos <= q_pos
            if window:
                mask &= key_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]


class TorchPagedAttention(AttentionBackend):
    """Cache layout [2, num_blocks, block_size, kv_heads, head_size].

    All single-token queries (decodes) go through one batched attention: the query heads that share a KV
    head are laid out as that head's query rows (no K/V repeat for GQA), with K/V gathered through
    precomputed slot indices. Prefill chunks go one sequence at a time: with no cached context straight
    on this step's k/v (causal SDPA, no gather), otherwise on the gathered context with a causal mask
    offset by it.
    """

    name = "torch-sdpa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.group = self.num_heads // self.num_kv_heads

    def build_metadata(self, md: AttentionMetadata) -> CpuAttentionMetadata:
        starts, lens, bs = md.query_start_loc_cpu, md.seq_lens_cpu, md.block_size
        n = md.num_seqs
        decodes = [i for i in range(n) if starts[i + 1] - starts[i] == 1]
        prefills = []
        for i in range(n):
            q_len = starts[i + 1] - starts[i]
            if q_len > 1:
                fresh = q_len == lens[i]
                slots = None
                if not fresh:
                    pos = torch.arange(lens[i])
                    slots = md.block_table[i, pos // bs].long() * bs + pos % bs
                prefills.append(_Prefill(slice(starts[i], starts[i + 1]), lens[i], fresh, slots))
        decode_blocks = decode_lens = decode_rows = None
        max_len, uniform = 0, True
        if decodes:
            d_lens = [lens[i] for i in decodes]
            max_len = max(d_lens)
            uniform = min(d_lens) == max_len
            idx = torch.tensor(decodes, dtype=torch.long) if len(decodes) != n else None
            table = md.block_table if idx is None else md.block_table[idx]
            # whole blocks: the tail of a last block and the table's padding (the null block, 0) are masked
            decode_blocks = table[:, : -(-max_len // bs)].long().contiguous()
            decode_lens = torch.tensor(d_lens, dtype=torch.long)[:, None]
            if len(decodes) != md.num_actual_tokens:
                decode_rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long)
        return CpuAttentionMetadata(md, md.slot_mapping[: md.num_actual_tokens], len(decodes), decode_rows,
                                    decode_blocks, decode_lens, max_len, uniform, prefills)

    def write_kv(self, k, v, kv_cache, slot_mapping):
        if kv_cache.dtype != k.dtype:  # an fp8 cache: scale 1.0, saturated at the format's range; copied as bytes
            lim = torch.finfo(kv_cache.dtype).max  # (index_copy_ has no fp8 kernel)
            k, v = (t.clamp(-lim, lim).to(kv_cache.dtype).view(torch.uint8) for t in (k, v))
            kv_cache = kv_cache.view(torch.uint8)
        kv_cache[0].view(-1, self.num_kv_heads, self.head_size).index_copy_(0, slot_mapping, k)
        kv_cache[1].view(-1, self.num_kv_heads, self.head_size).index_copy_(0, slot_mapping, v)

    def forward(self, q, k, v, kv_cache, md):
        if isinstance(md, AttentionMetadata):
            md = self.build_metadata(md)
        self.write_kv(k, v, kv_cache, md.slot_mapping)
        if md.num_decodes and md.decode_rows is None:  # decode-only step
            return self._decode(q, kv_cache, md)
        out = torch.empty_like(q)
        if md.num_decodes:
            out[md.decode_rows] = self._decode(q[md.decode_rows], kv_cache, md)
        for i, p in enumerate(md.prefills):
            out[p.rows] = self._prefill(q[p.rows], k[p.rows], v[p.rows], kv_cache, md, i, p)
        return out

    def _decode(self, q, kv_cache, md: CpuAttentionMetadata):
        """q [B, Hq, D] (one token per sequence) -> [B, Hq, D]."""
        b, hkv, d = q.shape[0], self.num_kv_heads, self.head_size
        blocks = md.decode_blocks.view(-1)  # gather whole blocks: index_select of rows, ~5x faster than cache[idx]
        k = kv_cache[0].index_select(0, blocks).view(b, -1, hkv, d).to(q.dtype)  # fp8 caches widen here
        v = kv_cache[1].index_select(0, blocks).view(b, -1, hkv, d).to(q.dtype)
        mask = md.decode_mask(self.sliding_window)
        if mask is None:
            k, v = k[:, : md.decode_max_len], v[:, : md.decode_max_len]
        qg = q.view(b, hkv, self.group, d)  # query heads h = kv * group + g share KV head kv
        if self.softcap is not None:  # SDPA has no soft-capping: the scores in float32 by hand
            scores = self._capped_scores(qg.float(), k.transpose(1, 2).float().transpose(-1, -2))
            if mask is not None:
                scores = scores.masked_fill_(~mask, float("-inf"))
            o = (scores.softmax(-1) @ v.transpose(1, 2).float()).to(q.dtype)
        else:
            o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               scale=self.scale)
        return o.reshape(b, self.num_heads, d)

    def _capped_scores(self, q: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
        """softcap * tanh(scale * q k^T / softcap) (Gemma 2), float32."""
        return torch.matmul(q, k_t).mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)

    # float32 scores [q heads, q_len, seq_len] up to this many elements per head go through plain matmuls:
    # ~1.8x faster than the CPU flash-attention kernel at these sizes (128-token prompt, 1 thread: 0.57 vs
    # 1.0 ms a layer), the same float32 accumulation; beyond it SDPA keeps the memory flat
    MATMUL_MAX_SCORES = 512 * 1024

    def _prefill(self, q, k_new, v_new, kv_cache, md: CpuAttentionMetadata, i: int, p: _Prefill):
        hkv, d = self.num_kv_heads, self.head_size
        if p.fresh:
            k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)
        else:
            k = kv_cache[0].view(-1, hkv, d).index_select(0, p.slots).transpose(0, 1).to(q.dtype)
            v = kv_cache[1].view(-1, hkv, d).index_select(0, p.slots).transpose(0, 1).to(q.dtype)
        q_len = q.shape[0]
        if q_len * p.seq_len <= self.MATMUL_MAX_SCORES or self.softcap is not None:
            # the query heads of one KV head as that head's rows: [Hkv, group * q_len, D], no K/V repeat
            qg = q.transpose(0, 1).float().reshape(hkv, self.group * q_len, d)
            bias = md.prefill_bias(i, p, self.sliding_window, self.group)
            if self.softcap is None:
                scores = torch.baddbmm(bias, qg, k.float().transpose(1, 2), alpha=self.scale)
            else:  # capped before the mask is added
                scores = self._capped_scores(qg, k.float().transpose(1, 2)).add_(bias)
            o = torch.bmm(scores.softmax(-1), v.float()).view(self.num_heads, q_len, d)
            return o.transpose(0, 1).to(q.dtype)
        mask = md.prefill_mask(i, p, self.sliding_window)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1)


class NativePagedAttention(TorchPagedAttention):
    """TorchPagedAttention with the decodes through the C++ kernel: no gathered copy of the context, one
    pass over each sequence's blocks per KV head (2 threads, batch 64, 144-token contexts, SmolLM2's 9/3 heads
    of 64, bf16: ~0.34 ms a layer against ~1.2 ms for gather + SDPA). Prefill chunks
    keep the torch path, and so do soft-capped decodes. Build the kernel (`native.load()`) before making one."""

    name = "cpu-native"

    def _decode(self, q, kv_cache, md: CpuAttentionMetadata):
        if self.softcap is not None or kv_cache.dtype != q.dtype:  # the C++ kernel: no soft-capping, no fp8
            return super()._decode(q, kv_cache, md)
        return native.paged_decode_attention(torch.empty_like(q), q.contiguous(), kv_cache[0], kv_cache[1],
                                             md.decode_blocks, md.decode_lens.view(-1), self.scale,
                                             self.sliding_window)
