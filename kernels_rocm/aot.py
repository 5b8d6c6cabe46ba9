"""Compile the shared Triton kernels for an AMD GPU without one (ahead of time).

Triton's wheel carries its AMD compiler (LLVM AMDGPU backend, lld), so the paged-attention
kernel can be compiled here down to a gfx942 / gfx90a / gfx1100 code object with the launch
options a tuning picks. That proves the kernel and the AMD options compile, and the code object
tells register use, spills and LDS (shared memory) per launch; it does not run anything.

Usage: python -m pageport.kernels_rocm.aot [--arch gfx942 ...] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
       torch.int64: "i64"}


def record_launch(tuning, *, decode: bool, head_size=128, num_heads=32, num_kv_heads=8, block_size=16,
                  dtype=torch.bfloat16):
    """Run paged_attention's host side with the kernel replaced by a recorder: the exact launch
    (args, constexprs, options) the engine would make for a model of this shape."""
    from pageport.kernels_cuda import paged_attention as pa
    seqs, q_len, ctx = (4, 1, 1000) if decode else (2, 100, 50)
    seq_len = ctx + q_len
    blocks = seqs * -(-seq_len // block_size)
    q = torch.zeros(seqs * q_len, num_heads, head_size, dtype=dtype)
    kc = torch.zeros(blocks, block_size, num_kv_heads, head_size, dtype=dtype)
    cfg = pa.default_config(group=num_heads // num_kv_heads, head_size=head_size, max_query_len=q_len,
                            num_seqs=seqs, num_kv_heads=num_kv_heads, max_seq_len=seq_len,
                            device=torch.device("cpu"), num_splits=1, tuning=tuning)
    rec = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                rec.update(args=args, kwargs=kwargs, grid=grid)
            return launch
    real = pa._paged_attention_kernel
    pa._paged_attention_kernel = Recorder()
    try:
        pa.paged_attention(q, kc, kc, torch.empty_like(q),
                           torch.arange(0, seqs * q_len + 1, q_len, dtype=torch.int32),
                           torch.full((seqs,), seq_len, dtype=torch.int32),
                           torch.arange(blocks, dtype=torch.int32).view(seqs, -1),
                           max_query_len=q_len, max_seq_len=seq_len, scale=head_size ** -0.5, config=cfg)
    finally:
        pa._paged_attention_kernel = real
    return real, rec, cfg


def compile_for(arch: str, warp_size: int, tuning, decode: bool, **shape) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel, rec, cfg = record_launch(tuning, decode=decode, **shape)
    names = kernel.arg_names
    kwargs = dict(rec["kwargs"])
    values = dict(zip(names, rec["args"]))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    constexprs = {p.name: values[p.name] for p in kernel.params if p.is_constexpr}
    signature = {}
    for n in names:
        v = values[n]
        if n in constexprs:
            signature[n] = "constexpr"
        elif isinstance(v, torch.Tensor):
            signature[n] = "*" + _DT[v.dtype]
        elif isinstance(v, bool):
            signature[n] = "i1"
        elif isinstance(v, int):
            signature[n] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[n] = "fp32"
    t0 = time.time()
    k = triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs),
                       target=GPUTarget("hip", arch, warp_size), options=options)
    asm = k.asm["amdgcn"]

    def meta(key):
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else None
    return {"arch": arch, "tuning": tuning.name, "launch": "decode" if decode else "unified",
            "config": {"block_m": cfg.block_m, "tile_n": cfg.tile_n, "num_warps": cfg.num_warps,
                       "num_stages": cfg.num_stages, **dict(cfg.extra)},
            "shape": {"head_size": shape.get("head_size", 128), "dtype": str(shape.get("dtype", torch.bfloat16))},
            "vgpr": meta("vgpr_count"), "agpr": meta("agpr_count"), "sgpr": meta("sgpr_count"),
            "vgpr_spill": meta("vgpr_spill_count"), "sgpr_spill": meta("sgpr_spill_count"),
            "scratch_bytes": meta("private_segment_fixed_size"), "lds_bytes": k.metadata.shared,
            "hsaco_bytes": len(k.asm["hsaco"]), "compile_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    from pageport.kernels_rocm import tuning as tn
    p = argparse.ArgumentParser(prog="python -m pageport.kernels_rocm.aot")
    p.add_argument("--arch", nargs="+", default=["gfx942", "gfx90a", "gfx1100"])
    p.add_argument("--head-size", nargs="+", type=int, default=[128])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for arch in args.arch:
        for hs in args.head_size:
            for decode in (True, False):
                r = compile_for(arch, tn.warp_size(arch), tn.tuning_for(arch), decode, head_size=hs)
                print(json.dumps(r), flush=True)
                rows.append(r)
    if args.out:
        import triton
        with open(args.out, "w") as f:
            json.dump({"what": "AOT compile of the shared paged-attention kernel for AMD targets (no GPU; "
                               "nothing executed)", "triton": triton.__version__, "torch": torch.__version__,
                       "runs": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
