"""Paged attention through Intel Extension for PyTorch (x86 CPUs): ipex.llm.modules.PagedAttention.

IPEX's kernels read a head-major cache, [num_blocks, num_kv_heads, block_size, head_size] per K
and V (whatever its docstrings say), and do no shape checking of their own: a cache in the
torch backend's token-major layout, a wrong dtype or a non-contiguous tensor crashes the
process (segfault) instead of raising. Every call here is preceded by `_check`, which raises
ValueError first.

The IPEX wheel pins one torch minor (IPEX 2.8 -> torch 2.8); `ipex_status()` says whether the
installed pair matches, without importing IPEX, and the import itself is attempted only when
the backend is built.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform as _pyplatform
from typing import Optional

import torch

from pageport.platforms import AttentionBackend, AttentionMetadata

IPEX_DTYPES = (torch.float32, torch.bfloat16)


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2] if x.isdigit())


def ipex_status() -> Optional[str]:
    """None when IPEX is installed for this torch on an x86-64 CPU, else why not. Cheap: no import."""
    if _pyplatform.machine().lower() not in ("x86_64", "amd64"):
        return f"IPEX runs on x86-64 only (this is {_pyplatform.machine()})"
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return "intel-extension-for-pytorch is not installed (pip install 'pageport[ipex]', in a torch-2.8 venv)"
    try:
        version = importlib.metadata.version("intel-extension-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "intel-extension-for-pytorch has no package metadata"
    if _minor(version) != _minor(torch.__version__):
        return f"intel-extension-for-pytorch {version} needs torch {'.'.join(map(str, _minor(version)))}.x, " \
               f"this is torch {torch.__version__}"
    return None


@functools.cache
def load_ipex():
    """The ipex.llm.modules.PagedAttention class (imports IPEX: seconds, once)."""
    import intel_extension_for_pytorch as ipex  # noqa: F401  (registers the ops)
    return ipex.llm.modules.PagedAttention


class IpexPagedAttention(AttentionBackend):
    """Cache layout [2, num_blocks, num_kv_heads, block_size, head_size].

    Decode-only steps (every sequence one query token) run single_query_cached_kv_attention;
    steps with a prefill chunk run flash_attn_varlen_func over the whole ragged batch (it takes
    per-sequence query and key lengths and a block table, causal from the bottom right, so
    chunks after cached context and decodes mixed in are both handled).
    """

    name = "ipex-paged"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.ops = load_ipex()
        group = self.num_heads // self.num_kv_heads
        self.head_mapping = torch.arange(self.num_kv_heads, dtype=torch.int32).repeat_interleave(group)
        self.window = int(self.sliding_window) if self.sliding_window else -1
        self.softcap_arg = float(self.softcap) if self.softcap else -1.0

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, num_kv_heads, block_size, head_size)

    # The guard against IPEX's segfaults ------------------------------------------------------
    def _check_cache(self, kv_cache: torch.Tensor, block_size: int) -> None:
        want = (2, kv_cache.shape[1], self.num_kv_heads, block_size, self.head_size) if kv_cache.dim() == 5 else None
        if want is None or tuple(kv_cache.shape) != want:
            raise ValueError(f"ipex-paged: kv_cache must be [2, num_blocks, num_kv_heads={self.num_kv_heads}, "
                             f"block_size={block_size}, head_size={self.head_size}] (IPEX's head-major layout), "
                             f"got {tuple(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("ipex-paged: kv_cache must be contiguous")
        if kv_cache.dtype not in IPEX_DTYPES:
            raise ValueError(f"ipex-paged: cache dtype {kv_cache.dtype} not supported (float32, bfloat16); "
                             "set PAGEPORT_CPU_ATTENTION=torch")

    def _check_tokens(self, name: str, x: torch.Tensor, heads: int, n: int, dtype: torch.dtype) -> None:
        if x.shape != (n, heads, self.head_size) or x.dtype != dtype or not x.is_contiguous():
            raise ValueError(f"ipex-paged: {name} must be contiguous [{n}, {heads}, {self.head_size}] {dtype}, "
                             f"got {tuple(x.shape)} {x.dtype} contiguous={x.is_contiguous()}")

    def _check_metadata(self, md: AttentionMetadata, num_blocks: int) -> None:
        if md.block_table.dtype != torch.int32 or md.seq_lens.dtype != torch.int32 \
                or md.query_start_loc.dtype != torch.int32:
            raise ValueError("ipex-paged: block_table, seq_lens and query_start_loc must be int32")
        if md.block_table.dim() != 2 or md.block_table.shape[0] < md.num_seqs:
            raise ValueError(f"ipex-paged: block_table must be [num_seqs, max_blocks], got {tuple(md.block_table.shape)}")
        need = -(-md.max_seq_len // md.block_size)
        if md.block_table.shape[1] < need:
            raise ValueError(f"ipex-paged: block_table has {md.block_table.shape[1]} columns, "
                             f"max_seq_len {md.max_seq_len} needs {need}")
        if md.num_seqs and int(md.block_table[:md.num_seqs, :need].max()) >= num_blocks:
            raise ValueError("ipex-paged: block_table refers to a block past the cache")

    # AttentionBackend -------------------------------------------------------------------------
    def write_kv(self, k, v, kv_cache, slot_mapping):
        n = k.shape[0]
        if n == 0:
            return
        self._check_tokens("k", k, self.num_kv_heads, n, kv_cache.dtype)
        self._check_tokens("v", v, self.num_kv_heads, n, kv_cache.dtype)
        num_slots = kv_cache.shape[1] * kv_cache.shape[3]
        if slot_mapping.shape != (n,) or slot_mapping.dtype != torch.int64:
            raise ValueError(f"ipex-paged: slot_mapping must be int64 [{n}], got {tuple(slot_mapping.shape)} "
                             f"{slot_mapping.dtype}")
        if int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= num_slots:
            raise ValueError(f"ipex-paged: slot out of range [0, {num_slots})")
        self.ops.reshape_and_cache(k, v, kv_cache[0], kv_cache[1], slot_mapping)

    def forward(self, q, k, v, kv_cache, md: AttentionMetadata):
        n = md.num_actual_tokens
        self._check_cache(kv_cache, md.block_size)
        q, k, v = q[:n].contiguous(), k[:n].contiguous(), v[:n].contiguous()
        self._check_tokens("q", q, self.num_heads, n, kv_cache.dtype)
        self._check_metadata(md, kv_cache.shape[1])
        self.write_kv(k, v, kv_cache, md.slot_mapping[:n].contiguous())
        out = torch.empty_like(q)
        if n == 0:
            return out
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        block_table = md.block_table[:md.num_seqs].contiguous()
        seq_lens = md.seq_lens[:md.num_seqs].contiguous()
        if md.max_query_len == 1:  # decodes only: one query row per sequence, in order
            self.ops.single_query_cached_kv_attention(
                out, q, key_cache, value_cache, self.head_mapping, self.scale, block_table, seq_lens,
                md.block_size, md.max_seq_len, None, self.window, 1.0, 1.0, self.softcap_arg)
            return out
        cu_kv = torch.zeros(md.num_seqs + 1, dtype=torch.int32)
        torch.cumsum(seq_lens, 0, out=cu_kv[1:])
        self.ops.flash_attn_varlen_func(
            out, q, key_cache, value_cache, md.query_start_loc[:md.num_seqs + 1].contiguous(), cu_kv,
            md.max_query_len, md.max_seq_len, self.scale, True, block_table, None,
            self.window - 1 if self.window > 0 else -1, 0 if self.window > 0 else -1,
            "auto", 1.0, 1.0, self.softcap_arg)
        return out
