"""XlaPagedAttention: the TPU/XLA platforms' AttentionBackend, in the Pallas kernel's cache layout."""
from __future__ import annotations

from typing import Union

import torch

from pageport.kernels_tpu.layout import (KVLayout, PaddedStep, pad_step, xla_native_paged_attention)
from pageport.platforms import AttentionBackend, AttentionMetadata


class XlaPagedAttention(AttentionBackend):
    """Cache layout [num_blocks, block_size, 2 * kv_heads_padded, head_size_padded], K/V interleaved
    (see layout.py): what torch-xla's Pallas ``ragged_paged_attention`` reads.

    ``use_kernel=True`` (on a TPU) calls that kernel; otherwise the same step runs as an XLA-native
    gather + masked softmax (``layout.xla_native_paged_attention``), so the CPU tests exercise the
    layout, the KV writes and the padding that the TPU runs. Metadata is a ``PaddedStep`` at static
    shapes; a plain AttentionMetadata is padded to its own sizes (eager use, the conformance kit).
    """

    name = "xla-ragged-paged"

    def __init__(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None, *,
                 use_kernel: bool = False):
        super().__init__(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        if softcap is not None and softcap == 0:
            raise ValueError("softcap must not be 0")
        self.layout = KVLayout.for_model(num_heads, num_kv_heads, head_size)
        self.use_kernel = use_kernel

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_size):
        if (num_kv_heads, head_size) != (self.num_kv_heads, self.head_size):
            raise ValueError(f"backend built for {self.num_kv_heads} KV heads x {self.head_size}, "
                             f"asked for {num_kv_heads} x {head_size}")
        return self.layout.cache_shape(num_blocks, block_size)

    def build_metadata(self, metadata: AttentionMetadata) -> PaddedStep:
        """Eager use: pad nothing beyond the step itself (T = its token rows, S = its sequences)."""
        if isinstance(metadata, PaddedStep):
            return metadata
        device = metadata.seq_lens.device
        step = pad_step(metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.block_table.cpu(),
                        metadata.slot_mapping.cpu(), metadata.block_size,
                        num_tokens=metadata.slot_mapping.shape[0], num_seqs=metadata.num_seqs,
                        width=metadata.block_table.shape[1])
        return step.to(device)

    def write_kv(self, k, v, kv_cache, slot_mapping):
        kv = self.layout.pack_kv(k, v).to(kv_cache.dtype)
        # in place on the cache tensor itself, not through a view: torch-xla then aliases the cache's
        # buffer with the step's output (an update through a view copies all of it, every step)
        block_size = kv_cache.shape[1]
        kv_cache.index_put_((slot_mapping // block_size, slot_mapping % block_size), kv)

    def forward(self, q, k, v, kv_cache, metadata: Union[AttentionMetadata, PaddedStep]):
        step = self.build_metadata(metadata)
        t = q.shape[0]
        if step.slot_mapping.shape[0] != t:
            raise ValueError(f"{t} query rows but metadata for {step.slot_mapping.shape[0]} tokens")
        self.write_kv(k, v, kv_cache, step.slot_mapping)
        qp = self.layout.pad_q(q)
        if self.use_kernel:
            out = self._kernel(qp, kv_cache, step)
        else:
            out = xla_native_paged_attention(qp, kv_cache, step, self.scale, self.layout.group,
                                             self.sliding_window, self.softcap)
        # pad rows: whatever the kernel left there becomes 0 (no NaN ever reaches the cache)
        out = torch.where(step.token_valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return self.layout.unpad_out(out)

    def _kernel(self, qp: torch.Tensor, kv_cache: torch.Tensor, step: PaddedStep) -> torch.Tensor:
        from torch_xla.experimental.custom_kernel import ragged_paged_attention
        return ragged_paged_attention(qp, kv_cache, step.kv_lens, step.page_indices, step.cu_q_lens,
                                      step.num_seqs, sm_scale=self.scale, sliding_window=self.sliding_window,
                                      soft_cap=self.softcap, use_kernel=True)


def reference_kernel_call(backend: XlaPagedAttention, q: torch.Tensor, kv_cache: torch.Tensor,
                          step: PaddedStep, use_kernel: bool = False) -> torch.Tensor:
    """torch-xla's own ``ragged_paged_attention`` on a padded step (``use_kernel=False``: its eager
    non-kernel version, which reads the arguments exactly as the kernel does). Output [T, Hq, D]."""
    from torch_xla.experimental.custom_kernel import ragged_paged_attention
    out = ragged_paged_attention(backend.layout.pad_q(q), kv_cache, step.kv_lens, step.page_indices,
                                 step.cu_q_lens, step.num_seqs, sm_scale=backend.scale,
                                 sliding_window=backend.sliding_window, soft_cap=backend.softcap,
                                 use_kernel=use_kernel)
    return backend.layout.unpad_out(out)
