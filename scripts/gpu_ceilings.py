"""The two ceilings of this GPU, measured: bf16 matmul FLOP/s and device copy bytes/s (read + write)."""
import json
import sys

import torch
from triton.testing import do_bench

n = 8192
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
tflops = 2 * n ** 3 / ms / 1e9
src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
dst = torch.empty_like(src)
ms_copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
bw = 2 * src.numel() / ms_copy / 1e9  # GB/s, read + write
res = {"device": torch.cuda.get_device_name(), "bf16_matmul_tflops": tflops, "copy_gbps": bw,
       "torch": torch.__version__}
print(json.dumps(res))
if len(sys.argv) > 1:
    open(sys.argv[1], "w").write(json.dumps(res, indent=2) + "\n")
