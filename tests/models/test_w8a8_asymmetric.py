"""INT8 W8A8 with asymmetric dynamic per-token activations (in-run `w8a8`, compressed-tensors `symmetric: false`):
each token is quantized around its midpoint and the offset added back through the weight's row sums.
Tolerances: the CPU kernels and the torch reference against a float64 definition, 1e-5 of the output's max
(int32 accumulation is exact; float32 scales); a compressed-tensors checkpoint against Transformers on it, 10 % of
the logits' range as for the symmetric checkpoint (compressed-tensors rounds an integer zero point, scale
(max - min) / 255, pageport keeps the midpoint in float, scale (max - min) / 254)."""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_cpu.ops import CpuOps
from pageport.models.quantization.methods import _row_sums, asymmetric_linear, quantize_weight_w8a8
from pageport.platforms.ops import Ops

from .quant_checkpoints import compressed_tensors_checkpoint
from .test_quantization import IDS, _hf, _load, _logits


def _reference(x, q, s, bias):
    xd = x.double()
    mid = (xd.amax(-1, keepdim=True) + xd.amin(-1, keepdim=True)) / 2
    xs = (xd - mid).abs().amax(-1, keepdim=True) / 127
    xq = ((xd - mid) / xs).round().clamp(-127, 127)
    return (xq * xs + mid) @ (q.double() * s.double()[:, None]).t() + bias.double()


@pytest.mark.parametrize("ops", [CpuOps(), Ops()], ids=["cpu", "torch"])
def test_asymmetric_linear_matches_float64(ops):
    g = torch.Generator().manual_seed(0)
    # skewed tokens (a large common offset, as after SiLU * up or a norm with an outlier channel)
    x = torch.randn(9, 96, generator=g) + torch.linspace(-4, 6, 9)[:, None]
    w, bias = torch.randn(40, 96, generator=g) * 0.05, torch.randn(40, generator=g)
    q, s = quantize_weight_w8a8(w, torch.int8)
    y = asymmetric_linear(ops, x, q, s, _row_sums(q, s), bias)
    ref = _reference(x, q, s, bias)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the reason for it: on such tokens it is closer to the unquantized product than symmetric quantization
    exact = x.double() @ (q.double() * s.double()[:, None]).t() + bias.double()
    sym = ops.scaled_linear(x, q, s, bias=bias).double()
    assert (y.double() - exact).abs().mean() < 0.75 * (sym - exact).abs().mean()


def test_compressed_tensors_asymmetric_activations(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "W8A8", IDS, activations_symmetric=False)
    with torch.no_grad():
        ref = _hf(tmp_path)(IDS).logits[0]
    model = _load(tmp_path, cpu_platform)
    method = model.model.layers[1].self_attn.qkv_proj.quant_method
    assert method.scheme.asymmetric_input and method.scheme.weight_dtype == torch.int8
    ours = _logits(model)
    assert (ours - ref).abs().max() <= 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
