"""The IPEX test tier: runs only where intel-extension-for-pytorch imports with this torch
(scripts/ipex_check.sh runs it in the torch-2.8 venv .venv-ipex); skipped elsewhere.
Kernel outputs against the float64 reference, the shape guard, and greedy tokens on the default
model equal to the torch CPU path."""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_cpu.ipex_attention import ipex_status

if ipex_status() is not None:
    pytest.skip(f"IPEX tier: {ipex_status()}", allow_module_level=True)

from pageport.kernels_cpu.ipex_attention import IpexPagedAttention  # noqa: E402
from pageport.kernels_cpu.platform import CpuPlatform  # noqa: E402
from pageport.plugins.conformance import DEFAULT_CASES, Case, build_metadata, check_attention  # noqa: E402

pytestmark = pytest.mark.ipex
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
CASES = DEFAULT_CASES + [Case([5, 40, 17], [1, 1, 1]), Case([30, 40, 17], [1, 1, 1], sliding_window=8),
                         Case([0, 100], [33, 1], num_heads=9, num_kv_heads=3, block_size=32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ipex_kernels_match_reference(dtype, case):
    p = CpuPlatform(attention="ipex")
    assert p.attention_kernel()[0] == "ipex-paged"
    assert p.attention_backend(8, 2, 64, 0.125).name == "ipex-paged"
    err = check_attention(p, CASES[case], dtype, seed=case)
    assert err <= TOL[dtype], err


def test_wrong_layout_raises_instead_of_segfaulting():
    be = IpexPagedAttention(8, 2, 64, 0.125)
    case = Case([5], [1])
    md = build_metadata(case, [[1]], "cpu")
    q, k = torch.randn(1, 8, 64), torch.randn(1, 2, 64)
    token_major = torch.zeros(2, 4, 16, 2, 64)  # the torch backend's [2, blocks, block_size, heads, dim]
    with pytest.raises(ValueError, match="head-major"):
        be.forward(q, k, k, token_major, md)
    good = torch.zeros(be.kv_cache_shape(4, 16, 2, 64))
    with pytest.raises(ValueError, match="float32"):
        be.forward(q, k.double(), k.double(), good, md)
    with pytest.raises(ValueError, match="past the cache"):
        be.forward(q, k, k, good, build_metadata(case, [[7]], "cpu"))
    with pytest.raises(ValueError, match="cache dtype"):
        be.forward(q.half(), k.half(), k.half(), good.half(), md)


def test_greedy_tokens_equal_torch_path(monkeypatch):
    pytest.importorskip("gguf")
    from pageport import LLM, SamplingParams
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,", "Once upon a time"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for mode in ("torch", "ipex"):
        monkeypatch.setenv("PAGEPORT_CPU_ATTENTION", mode)
        llm = LLM(dtype="float32", max_model_len=512, device="cpu")
        assert llm.engine.attention_backend == ("ipex-paged" if mode == "ipex" else "torch-sdpa")
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        del llm
    assert outs["ipex"] == outs["torch"]
