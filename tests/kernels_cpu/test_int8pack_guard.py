"""torch's weight-only int8 CPU kernel (`aten._weight_int8pack_mm`) reads out of bounds when the input size is not a
multiple of 16 (segfault from 2 rows on, garbage at 1 row; probed on an AVX-512 Xeon with torch 2.13). pageport keeps
those layers dense. The kernel calls run in a child interpreter so that a crash fails the test instead of ending
pytest. Tolerances: a guarded layer is exactly the dense matmul; a kernel-backed one is within 1e-2 of the output's
max of a float64 reference of the same int8 codes (bf16 activations, bf16 scales)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from pageport import LLM, SamplingParams

_CHILD = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from pageport.kernels_cpu.ops import CpuOps
    from pageport.kernels_cpu.quant import WeightOnlyLinearMethod, quantize_int8
    from pageport.platforms.quant_ops import pack_codes
    torch.manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w, requires_grad=False)

    for k in (8, 24, 40, 72, 16, 48, 576):
        guarded = k % 16 != 0
        w = (torch.randn(40, k) * 0.05).bfloat16()
        for rows in (1, 2, 16):
            x = torch.randn(rows, k).bfloat16()
            layer = Layer(w.clone())
            method = WeightOnlyLinearMethod("int8")
            took = method.process(layer)
            assert took != guarded, (k, took)
            if guarded:  # left dense: set_linear_method does not hand it the method
                assert "qweight" not in layer._buffers, k
            else:
                y = method.apply(layer, x)
                q, s = quantize_int8(w)
                ref = x.double() @ (q.double() * s.bfloat16().double()[:, None]).t()
                assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max(), (k, rows)
            # W8A16 per channel (compressed-tensors / gguf Q8_0-style codes) through the CPU ops
            scale = w.float().abs().amax(1, keepdim=True) / 127
            codes = (torch.round(w.float() / scale) + 128).clamp(0, 255).int()
            prepared = CpuOps().wna16_prepare(pack_codes(codes, 8), scale.bfloat16(), None, k, 8)
            assert ("int8pack" in prepared) != guarded, k
            ref = x.double() @ ((codes.double() - 128) * scale.bfloat16().double()).t()
            y = CpuOps().wna16_linear(x, prepared)
            assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max(), (k, rows, "w8a16")
    print("checked")
""")


def test_int8_kernel_guarded_for_input_sizes_it_breaks_on():
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "checked" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_int8_engine_on_a_tiny_model_survives(tmp_path):
    """quantization="int8" on a model of hidden size 24: the engine core used to die in the first step of >= 2 rows.
    Every linear's input size (24, 40) is guarded, so the tokens equal the dense bf16 engine's."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(0, 128, (n,), generator=g).tolist()} for n in (3, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for q in ("int8", None):
        llm = LLM(model=str(tmp_path), dtype="bfloat16", max_model_len=64, quantization=q)
        tokens[q] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert all(len(t) == 8 for t in tokens["int8"])
    assert tokens["int8"] == tokens[None]
