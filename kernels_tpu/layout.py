"""The TPU KV-cache layout, shape buckets and step padding, in plain torch (no torch_xla, no jax).

Layout. One layer's cache is the layout of the Pallas ragged paged attention kernel (torch-xla's
``ragged_paged_attention``, JAX's ``ragged_paged_attention``):

    kv_cache[num_blocks, block_size, 2 * kv_heads_padded, head_size_padded]

K and V are interleaved along the head axis: combined head ``2h`` is K of KV head ``h``, ``2h + 1`` is
its V (the kernel reads ``[..., 0::2, :]`` and ``[..., 1::2, :]``). One token's K and V of every head are
one contiguous row, so writing a step's KV is a single scatter of [tokens, 2 * kv_heads, head_size].

Padding. The kernel needs ``head_size`` a multiple of 128 (TPU lanes) and the number of combined heads
"fully tileable" by XLA (``c / packing`` in 1, 2, 4, 8 or a multiple of 8; packing = 1 for float32,
2 for bfloat16/float16). SmolLM2-135M (9 heads, 3 KV heads, head_size 64) becomes 4 KV heads x 128:
padded K/V heads and dimensions are zeros, padded query heads are zeros and their output is dropped,
so the result equals unpadded attention. Every XLA path (TPU kernel or not) uses this same layout.

Steps. XLA compiles one program per input shape, so a step's ragged batch is padded to static shapes:
tokens to a token bucket, sequences to a fixed ``max_num_seqs`` rows, block tables to a fixed width
(``max_model_len / block_size``). Pad tokens write their K/V to the null block 0 (never handed to a
request) and attend to one key there, so they stay finite; their rows are zeroed after attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

HEAD_SIZE_ALIGNMENT = 128  # TPU lane width
_PACKINGS = (1, 2)  # float32; bfloat16 / float16 (the cache layout must not depend on the dtype)
MIN_TOKEN_BUCKET = 16
MIN_ROW_BUCKET = 8  # logits rows per step; TPU sublanes


# --- layout ----------------------------------------------------------------------------------------
def _fully_tiled(combined: int, packing: int) -> bool:
    if combined % packing:
        return False
    x = combined // packing
    return x in (1, 2, 4, 8) or x % 8 == 0


def padded_kv_heads(num_kv_heads: int) -> int:
    """Smallest KV-head count >= num_kv_heads whose 2x combined heads the kernel tiles in any dtype."""
    h = num_kv_heads
    while not all(_fully_tiled(2 * h, p) for p in _PACKINGS):
        h += 1
    return h


def padded_head_size(head_size: int) -> int:
    return -(-head_size // HEAD_SIZE_ALIGNMENT) * HEAD_SIZE_ALIGNMENT


@dataclass(frozen=True)
class KVLayout:
    """How one model's attention shape sits in the kernel's cache layout."""
    num_heads: int
    num_kv_heads: int
    head_size: int
    kv_heads_padded: int
    head_size_padded: int

    @classmethod
    def for_model(cls, num_heads: int, num_kv_heads: int, head_size: int) -> "KVLayout":
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        return cls(num_heads, num_kv_heads, head_size, padded_kv_heads(num_kv_heads), padded_head_size(head_size))

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_heads_padded(self) -> int:
        return self.kv_heads_padded * self.group

    @property
    def combined_heads(self) -> int:
        return 2 * self.kv_heads_padded

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
        return (num_blocks, block_size, self.combined_heads, self.head_size_padded)

    # tensors ------------------------------------------------------------------------------------
    def pad_q(self, q: torch.Tensor) -> torch.Tensor:
        """[T, Hq, D] -> [T, Hq_padded, D_padded] (query head j*group + i stays with KV head j)."""
        t = q.shape[0]
        q = q.reshape(t, self.num_kv_heads, self.group, self.head_size)
        q = torch.nn.functional.pad(q, (0, self.head_size_padded - self.head_size, 0, 0,
                                        0, self.kv_heads_padded - self.num_kv_heads))
        return q.reshape(t, self.num_heads_padded, self.head_size_padded)

    def unpad_out(self, out: torch.Tensor) -> torch.Tensor:
        """[T, Hq_padded, D_padded] -> [T, Hq, D]."""
        t = out.shape[0]
        out = out.reshape(t, self.kv_heads_padded, self.group, self.head_size_padded)
        return out[:, :self.num_kv_heads, :, :self.head_size].reshape(t, self.num_heads, self.head_size)

    def pack_kv(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [T, Hkv, D] -> interleaved rows [T, 2 * Hkv_padded, D_padded]."""
        pad = (0, self.head_size_padded - self.head_size, 0, self.kv_heads_padded - self.num_kv_heads)
        k = torch.nn.functional.pad(k, pad)
        v = torch.nn.functional.pad(v, pad)
        return torch.stack((k, v), dim=2).reshape(k.shape[0], self.combined_heads, self.head_size_padded)

    def unpack_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpadded K and V caches, each [num_blocks, block_size, Hkv, D] (views)."""
        k = kv_cache[:, :, 0::2, :][:, :, :self.num_kv_heads, :self.head_size]
        v = kv_cache[:, :, 1::2, :][:, :, :self.num_kv_heads, :self.head_size]
        return k, v

    def heads_major(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pages as [Hkv, num_blocks, block_size, D]: the layout of the decode-only Pallas
        ``paged_attention`` kernels (JAX's TPU and GPU ones, torch-xla's ``paged_attention``)."""
        k, v = self.unpack_cache(kv_cache)
        return k.permute(2, 0, 1, 3).contiguous(), v.permute(2, 0, 1, 3).contiguous()


# --- buckets ------------------------------------------------------------------------------------------
def buckets(max_size: int, minimum: int) -> list[int]:
    """Powers of two from `minimum` up to and including `max_size` (which ends the list as it is)."""
    if max_size < 1:
        raise ValueError(f"bucket limit must be >= 1, got {max_size}")
    out, b = [], minimum
    while b < max_size:
        out.append(b)
        b *= 2
    out.append(max_size)
    return out


def pick_bucket(n: int, sizes: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= n, or None when n exceeds the largest."""
    for b in sizes:
        if n <= b:
            return b
    return None


# --- one step, padded ------------------------------------------------------------------------------------
@dataclass
class PaddedStep:
    """A step's attention inputs at static shapes [T] tokens, [S] sequences, [S, W] block table.

    The kernel's arguments (kv_lens, page_indices, cu_q_lens, num_seqs) and, for the XLA-native
    attention, each token's sequence and position. Pad tokens: sequence 0, position 0, slot 0."""
    slot_mapping: torch.Tensor  # [T] int64
    token_seq: torch.Tensor  # [T] int32
    token_pos: torch.Tensor  # [T] int32
    token_valid: torch.Tensor  # [T] bool
    kv_lens: torch.Tensor  # [S] int32 (0 for pad sequences)
    page_indices: torch.Tensor  # [S, W] int32
    cu_q_lens: torch.Tensor  # [S + 1] int32 (flat after the last real sequence)
    num_seqs: torch.Tensor  # [1] int32
    num_actual_tokens: int = 0

    def to(self, device) -> "PaddedStep":
        return PaddedStep(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                             for f in fields(self)})


def pad_step(query_start_loc: Sequence[int], seq_lens: Sequence[int], block_table: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int, num_tokens: int, num_seqs: int,
             width: int) -> PaddedStep:
    """Pad one ragged step (CPU tensors/lists, as AttentionMetadata holds them) to static shapes."""
    n_seqs = len(seq_lens)
    n = query_start_loc[-1]
    if n > num_tokens or n_seqs > num_seqs:
        raise ValueError(f"step of {n} tokens / {n_seqs} sequences does not fit {num_tokens} / {num_seqs}")
    if n_seqs and max(seq_lens) > width * block_size:
        raise ValueError(f"a sequence of {max(seq_lens)} tokens exceeds the block table width {width} "
                         f"x block size {block_size}")
    slots = torch.zeros(num_tokens, dtype=torch.int64)
    slots[:n] = slot_mapping[:n].to(torch.int64)
    token_seq = torch.zeros(num_tokens, dtype=torch.int32)
    token_pos = torch.zeros(num_tokens, dtype=torch.int32)
    valid = torch.zeros(num_tokens, dtype=torch.bool)
    valid[:n] = True
    for i in range(n_seqs):
        a, b = query_start_loc[i], query_start_loc[i + 1]
        token_seq[a:b] = i
        token_pos[a:b] = torch.arange(seq_lens[i] - (b - a), seq_lens[i], dtype=torch.int32)
    kv_lens = torch.zeros(num_seqs, dtype=torch.int32)
    kv_lens[:n_seqs] = torch.as_tensor(list(seq_lens), dtype=torch.int32)
    pages = torch.zeros(num_seqs, width, dtype=torch.int32)
    cols = min(width, block_table.shape[1]) if block_table.dim() == 2 else 0
    if n_seqs and cols:
        pages[:n_seqs, :cols] = block_table[:n_seqs, :cols].to(torch.int32)
    cu = torch.full((num_seqs + 1,), n, dtype=torch.int32)
    cu[:n_seqs + 1] = torch.as_tensor(list(query_start_loc), dtype=torch.int32)
    return PaddedStep(slots, token_seq, token_pos, valid, kv_lens, pages, cu,
                      torch.tensor([n_seqs], dtype=torch.int32), n)


# --- the float64 reference, in this layout ------------------------------------------------------------------
def reference_ragged_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, kv_lens: torch.Tensor,
                                     page_indices: torch.Tensor, cu_q_lens: torch.Tensor, num_seqs: int,
                                     scale: float, sliding_window: Optional[int] = None,
                                     soft_cap: Optional[float] = None) -> torch.Tensor:
    """The kernel's contract in float64, one sequence at a time: q [T, Hq, D] against the interleaved
    cache [blocks, block_size, 2 * Hkv, D]; rows past cu_q_lens[num_seqs] are zero."""
    q, kv_cache = q.double().cpu(), kv_cache.double().cpu()
    kv_lens, page_indices, cu_q_lens = kv_lens.cpu(), page_indices.cpu(), cu_q_lens.cpu()
    num_kv_heads, d = kv_cache.shape[2] // 2, kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros_like(q)
    for i in range(int(num_seqs)):
        a, b, kv_len = int(cu_q_lens[i]), int(cu_q_lens[i + 1]), int(kv_lens[i])
        pages = kv_cache[page_indices[i].long()].reshape(-1, 2 * num_kv_heads, d)[:kv_len]
        k = pages[:, 0::2].repeat_interleave(group, 1)
        v = pages[:, 1::2].repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b], k) * scale
        if soft_cap is not None:
            s = soft_cap * torch.tanh(s / soft_cap)
        q_pos = torch.arange(kv_len - (b - a), kv_len)[:, None]
        k_pos = torch.arange(kv_len)[None, :]
        allowed = k_pos <= q_pos
        if sliding_window:
            allowed &= k_pos > q_pos - sliding_window
        out[a:b] = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return out


def xla_native_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, step: PaddedStep, scale: float,
                               group: int, sliding_window: Optional[int] = None,
                               soft_cap: Optional[float] = None) -> torch.Tensor:
    """Paged attention at static shapes, in plain torch ops (what XLA compiles where the Pallas kernel
    cannot run). q [T, Hq, D] (padded heads) -> [T, Hq, D].

    Every token scores against the keys of all S x W x block_size slots of the step's block table and
    masks out other sequences and future positions: O(T x S x max_model_len) work, fine for the CPU
    tests and small configurations, not a substitute for the TPU kernel at serving sizes."""
    t, hq, d = q.shape
    _, block_size, combined, _ = kv_cache.shape
    hkv = combined // 2
    s, w = step.page_indices.shape
    ctx = s * w * block_size
    pages = kv_cache.index_select(0, step.page_indices.reshape(-1).long()).reshape(ctx, combined, d)
    k, v = pages[:, 0::2], pages[:, 1::2]  # [ctx, Hkv, D]
    qg = q.reshape(t, hkv, group, d)
    scores = torch.einsum("thgd,khd->thgk", qg.float(), k.float()) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    key = torch.arange(ctx, device=q.device)
    key_seq = (key // (w * block_size)).to(torch.int32)
    key_pos = (key % (w * block_size)).to(torch.int32)
    allowed = (key_seq[None, :] == step.token_seq[:, None]) & (key_pos[None, :] <= step.token_pos[:, None])
    if sliding_window:
        allowed &= key_pos[None, :] > step.token_pos[:, None] - sliding_window
    scores = scores.masked_fill(~allowed[:, None, None, :], torch.finfo(torch.float32).min)
    probs = scores.softmax(-1)
    out = torch.einsum("thgk,khd->thgd", probs, v.float()).to(q.dtype)
    return out.reshape(t, hq, d)


def num_table_columns(max_model_len: int, block_size: int) -> int:
    return math.ceil(max_model_len / block_size)
