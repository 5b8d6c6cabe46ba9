"""TritonPagedAttention: the CUDA platform's AttentionBackend."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

import torch

from pageport.platforms import AttentionBackend, AttentionMetadata


@dataclass
class TritonAttentionMetadata:
    """The step's metadata plus what the backend derives from it once per step: the launch
    configuration (decode/split-KV or unified) and split-KV buffers shared by every layer."""
    md: AttentionMetadata
    config: object  # paged_attention.LaunchConfig
    workspace: dict = field(default_factory=dict)
    fp8_config: object = None  # the launch over an fp8 cache (wider decode tiles), made on first use


class TritonPagedAttention(AttentionBackend):
    """Cache layout: the default [2, num_blocks, block_size, num_kv_heads, head_size].

    One token of one KV head is head_size contiguous elements (128-512 bytes), so the kernel's
    (key tile x head) loads are whole coalesced rows; a head-major block layout would only make
    each tile one contiguous span, which Triton's pointer loads don't need. Keeping the CPU
    backend's layout also lets tools and tests read either cache the same way.

    Each step picks one of two launches of the same kernel (paged_attention.py):
    decode batches (every sequence <= BLOCK_Q query tokens, i.e. max_query_len == 1 in
    practice) run one program per (sequence, KV head), split over the context when that leaves
    the GPU under-filled; anything with a prefill chunk runs the unified ragged launch.
    """

    name = "triton-paged"

    def __init__(self, *args, tuning=None, **kwargs):
        """tuning: a paged_attention.LaunchTuning (the platform's launch choices; CUDA's when None).
        The ROCm and XPU platforms run this same backend with their own tuning."""
        super().__init__(*args, **kwargs)
        self.tuning = tuning
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    def build_metadata(self, metadata: AttentionMetadata) -> TritonAttentionMetadata:
        from pageport.kernels_cuda.paged_attention import CUDA_TUNING, default_config
        config = default_config(group=self.num_heads // self.num_kv_heads, head_size=self.head_size,
                                max_query_len=metadata.max_query_len, num_seqs=metadata.num_seqs,
                                num_kv_heads=self.num_kv_heads, max_seq_len=metadata.max_seq_len,
                                device=metadata.seq_lens.device, tuning=self.tuning or CUDA_TUNING)
        return TritonAttentionMetadata(metadata, config)

    def _config(self, tmd: TritonAttentionMetadata, kv_dtype: torch.dtype):
        from pageport.kernels_cuda.paged_attention import CUDA_TUNING
        if not tmd.config.decode or kv_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return tmd.config
        if tmd.fp8_config is None:
            t = self.tuning or CUDA_TUNING
            tile = t.decode_fp8_tile_n if self.head_size <= 128 else max(16, t.decode_fp8_tile_n // 2)
            tmd.fp8_config = replace(tmd.config, tile_n=tile)
        return tmd.fp8_config

    def write_kv(self, k, v, kv_cache, slot_mapping):
        from pageport.kernels_cuda.kv_cache import reshape_and_cache
        reshape_and_cache(k, v, kv_cache[0], kv_cache[1], slot_mapping)

    def forward(self, q, k, v, kv_cache, metadata: Union[AttentionMetadata, TritonAttentionMetadata]):
        from pageport.kernels_cuda.paged_attention import paged_attention
        tmd = metadata if isinstance(metadata, TritonAttentionMetadata) else self.build_metadata(metadata)
        md = tmd.md
        n = md.num_actual_tokens
        if kv_cache.shape[2] != md.block_size:
            raise ValueError(f"kv_cache block size {kv_cache.shape[2]} != metadata block size {md.block_size}")
        self.write_kv(k[:n], v[:n], kv_cache, md.slot_mapping[:n])
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged_attention(q[:n], kv_cache[0], kv_cache[1], out[:n], md.query_start_loc, md.seq_lens,
                        md.block_table, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
                        scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
                        config=self._config(tmd, kv_cache.dtype), workspace=tmd.workspace)
        return out
