"""The multi-LoRA Triton kernels (tokens sorted by slot, grouped shrink and expand GEMMs) against a float64
reference, on fresh inputs: tokens of several adapters and of none mixed in any order, ranks and widths that are
not powers of two, a fused projection's block-diagonal B. Under TRITON_INTERPRET=1 (conftest) on the CPU, in
fp32 and fp16 (the interpreter's bf16 `tl.dot` is wrong); the `gpu` test runs bf16 on a CUDA device.

Tolerances (max abs error, outputs of std ~1): fp32 1e-4 (IEEE dot, float32 accumulation); fp16 1e-2 (fp16
inputs, the rank-space activations rounded to fp16 before the expand GEMM); bf16 on the GPU 3e-2."""
import pytest
import torch

from pageport.kernels_cuda.lora import lora_apply, lora_prepare
from pageport.kernels_cuda.ops import TritonOps

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(t, k, n, r, slots, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g, dtype=torch.float64)
    y = torch.randn(t, n, generator=g, dtype=torch.float64)
    a = torch.randn(slots, r, k, generator=g, dtype=torch.float64) / k ** 0.5
    b = torch.randn(slots, n, r, generator=g, dtype=torch.float64) / r ** 0.5
    a[0].zero_()
    b[0].zero_()
    index = torch.randint(0, slots, (t,), generator=g)
    ref = y.clone()
    for i in range(t):
        s = int(index[i])
        ref[i] += b[s] @ (a[s] @ x[i])
    cast = [v.to(dtype).to(device) for v in (x, y, a, b)]
    return (*cast, index.to(device), ref)


@pytest.mark.parametrize("t,k,n,r,slots", [(1, 64, 48, 16, 2), (37, 96, 80, 24, 4), (130, 64, 200, 48, 9),
                                           (600, 32, 40, 8, 3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_lora_apply_matches_float64(t, k, n, r, slots, dtype, tol, device):
    x, y, a, b, index, ref = _case(t, k, n, r, slots, seed=t + n, dtype=dtype, device=device)
    base = y.clone()
    out = lora_apply(y, x, a, b, lora_prepare(index, slots))
    assert out.data_ptr() == y.data_ptr()  # in place
    assert (out.double().cpu() - ref).abs().max() < tol
    untouched = index == 0
    assert torch.equal(out[untouched], base[untouched])  # rows without an adapter: not even rounded


def test_prepare_groups_tokens_by_slot(device):
    index = torch.tensor([2, 0, 1, 2, 2, 0, 1], device=device)
    order, starts, counts = lora_prepare(index, 4)
    assert counts.tolist() == [2, 2, 3, 0] and starts.tolist() == [0, 2, 4, 7]
    for s in range(4):
        run = order[starts[s]:starts[s] + counts[s]].long()
        assert (index[run] == s).all()
    assert counts.sum() == len(index)


def test_ops_entry_matches_torch_reference(device):
    """TritonOps.lora_apply (prepared once per index, for every layer) equals the torch default of Ops."""
    from pageport.platforms.ops import Ops
    x, y, a, b, index, _ = _case(29, 64, 72, 16, 3, seed=5, dtype=torch.float32, device=device)
    ops = TritonOps()
    slots = sorted(set(index.tolist()) - {0})
    ours = ops.lora_apply(y.clone(), x, a, b, index, slots)
    again = ops.lora_apply(y.clone(), x * 2, a, b, index, slots)  # same index: the sort is reused
    ref = Ops().lora_apply(y.clone(), x, a, b, index, slots)
    assert (ours - ref).abs().max() < 1e-4
    assert (again - Ops().lora_apply(y.clone(), x * 2, a, b, index, slots)).abs().max() < 1e-4


@gpu
@pytest.mark.gpu
def test_lora_apply_bf16_on_gpu():
    for t, k, n, r, slots in [(256, 2048, 3072, 48, 9), (2048, 2048, 8192, 32, 3), (7, 2048, 2048, 16, 2)]:
        x, y, a, b, index, ref = _case(t, k, n, r, slots, seed=t, dtype=torch.bfloat16, device="cuda")
        out = lora_apply(y, x, a, b, lora_prepare(index, slots))
        assert (out.double().cpu() - ref).abs().max() < 3e-2 * max(1.0, ref.abs().max().item() / 4)
