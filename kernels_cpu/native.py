"""C++ CPU kernels, compiled on first use for the machine they run on (torch.utils.cpp_extension).

`csrc/paged_attention.cpp` registers `torch.ops.pageport_cpu.paged_decode_attention`. The build needs a C++
compiler and ninja (`pip install 'pageport[cpu]'` brings ninja); it takes ~10 s once and is cached by
torch under ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR). `-march=native` (`-mcpu=native` on POWER) is safe
because the library is built where it runs.
"""
from __future__ import annotations

import functools
import logging
import platform
import shutil
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
FLAGS = ["-O3", "-mcpu=native" if platform.machine().startswith("ppc") else "-march=native", "-fopenmp",
         # let the compiler vectorize float sums (reassociation), nothing that changes inf/NaN handling
         "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


def native_status() -> Optional[str]:
    """None when the kernels can be built here, else why not. Cheap: nothing is compiled."""
    from torch.utils import cpp_extension
    if not SOURCE.is_file():
        return f"{SOURCE.name} is missing from the installed package"
    compiler = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") else "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) to build the CPU kernels"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install 'pageport[cpu]')"
    return None


@functools.cache
def load() -> Optional[str]:
    """Build (or load the cached build of) the kernels once per process; None on success, else why not."""
    why = native_status()
    if why is not None:
        return why
    from torch.utils import cpp_extension
    try:
        cpp_extension.load(name="pageport_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # a broken toolchain must not stop the engine: the torch kernels remain
        logger.warning("building the C++ CPU kernels failed, using the torch ones: %s", e)
        return f"building the C++ kernels failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def paged_decode_attention(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           window: Optional[int]) -> torch.Tensor:
    """out [B, Hq, D] = softmax(q k^T * scale) v over each sequence's first seq_lens[b] cached positions (the
    last `window` of them with a sliding window); caches [num_blocks, block_size, Hkv, D], block_table int64
    [B, n], seq_lens int64 [B]. `load()` must have succeeded."""
    torch.ops.pageport_cpu.paged_decode_attention(out, q, k_cache, v_cache, block_table, seq_lens, scale,
                                                  window or 0)
    return out
