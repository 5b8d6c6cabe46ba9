"""The fused-MoE Triton kernel (tokens sorted by expert, grouped GEMM) against a float64 reference.

On the CPU it runs under TRITON_INTERPRET=1 (set by conftest) in fp32 and fp16 at small shapes (the
interpreter's bf16 `tl.dot` is wrong); the `gpu`-marked tests run it in bf16 at Mixtral / Qwen3-30B-A3B
shapes on a CUDA device.

Tolerances (max abs error over outputs of std ~0.3-1): fp32 1e-4 (IEEE dot, float32 accumulation);
fp16 2e-2 (fp16 inputs and fp16 storage of the intermediate activations); bf16 on the GPU 6e-2 relative to
the output's max.
"""
import pytest
import torch

from pageport.kernels_cuda.fused_moe import fused_moe, moe_align_block_size
from pageport.models.moe import fused_moe_reference, select_experts
from pageport.platforms.ops import Ops

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(t, h, i, e, k, dtype, device, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) * scale / h ** 0.5 * 3
    w2 = torch.randn(e, h, i, generator=g) * scale / i ** 0.5 * 3
    logits = torch.randn(t, e, generator=g)
    weights, ids = select_experts(logits, k, renormalize=True)
    return [a.to(device) for a in (x.to(dtype), w13.to(dtype), w2.to(dtype))] + [weights.to(device), ids.to(device)]


def test_align_block_size_sorts_and_pads():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [3, 2]])  # expert 0: 2 pairs, 1: 1, 2: 4, 3: 1
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, 4, 5)
    n = ids.numel()
    assert int(num_padded) == 4 * 4  # 4 non-empty experts, one block each
    flat = ids.reshape(-1)
    for b in range(int(num_padded) // 4):
        block = sorted_ids[b * 4:(b + 1) * 4]
        real = block[block < n]
        assert len(real) and (flat[real.long()] == expert_ids[b]).all()
        assert real.tolist() == sorted(real.tolist())  # stable: token order kept within an expert
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))  # every pair exactly once


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (5, 8, 2), (19, 4, 3)])
def test_fused_moe_matches_float64(device, dtype, atol, t, e, k):
    if device == "cpu" and dtype == torch.float16 and t > 5:
        pytest.skip("one fp16 shape is enough in the (slow) interpreter")
    x, w13, w2, w, ids = _inputs(t, 32, 48, e, k, dtype, device, seed=t * 100 + e)
    ref = fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu())
    assert ref.std() > 0.1
    out = fused_moe(x, w13, w2, w, ids, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2,
                                                     num_warps=4, num_stages=2))
    assert out.dtype == dtype and out.shape == x.shape
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= atol, f"max |err| {err:.2e} > {atol}"


def test_fused_moe_default_config_and_unused_experts(device):
    """The shape-picked launch, with experts that get no token (their blocks never run)."""
    x, w13, w2, w, ids = _inputs(3, 32, 16, 8, 2, torch.float32, device, seed=7)
    ref = fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), w.cpu(), ids.cpu())
    assert len(ids.unique()) < 8
    out = fused_moe(x, w13, w2, w, ids)
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-4


def test_torch_default_matches_float64():
    """The platform-neutral Ops.fused_moe (the CPU path) against the same reference."""
    x, w13, w2, w, ids = _inputs(23, 32, 48, 6, 2, torch.float32, "cpu", seed=3)
    ref = fused_moe_reference(x, w13, w2, w, ids)
    out = Ops().fused_moe(x, w13, w2, w, ids)
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [
    # (tokens, hidden, intermediate, experts, top_k): Mixtral-8x7B, Qwen3-30B-A3B; decode and prefill sizes
    (4, 4096, 14336, 8, 2), (512, 4096, 14336, 8, 2), (8, 2048, 768, 128, 8), (1024, 2048, 768, 128, 8)])
def test_gpu_bf16_real_shapes(shape):
    t, h, i, e, k = shape
    x, w13, w2, w, ids = _inputs(t, h, i, e, k, torch.bfloat16, "cuda", seed=11, scale=1.0)
    ref = Ops().fused_moe(x.double(), w13.double(), w2.double(), w.double(), ids)  # float64 per-expert loop
    out = fused_moe(x, w13, w2, w, ids)
    err = (out.double() - ref).abs().max().item()
    assert err <= 6e-2 * ref.abs().max().item(), f"max |err| {err:.3e} vs max |ref| {ref.abs().max().item():.3e}"
