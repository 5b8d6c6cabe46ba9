"""The new architectures through the engine (`LLM`, paged KV cache, continuous batching): tiny random models of
each, four prompts of mixed length in one call, 12 greedy tokens each, equal to Transformers' greedy choice.

Transformers is checked teacher-forced (one full forward over prompt + our tokens must pick each of them): with
a window shorter than the context, its cached `generate` for Gemma 3 can differ from its own full forward, which
is the definition the model tests compare logits against.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pageport import LLM, SamplingParams

from .test_llama import CASES, _perturb

ARCHS = ["mixtral", "qwen2-moe", "gemma2-softcap", "gemma3", "deepseek-v2-lite", "deepseek-v3"]


def _check(name, tmp_path, **engine):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CASES[name](), attn_implementation="eager").eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), dtype="float32", max_model_len=64, **engine)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        tokens = list(o.outputs[0].token_ids)
        with torch.no_grad():
            picks = hf(torch.tensor([p + tokens])).logits[0, len(p) - 1:-1].argmax(-1).tolist()
        assert len(tokens) == 12 and picks == tokens, f"{name}, prompt of {len(p)}"


@pytest.mark.parametrize("name", ARCHS)
def test_llm_greedy_matches_transformers(name, tmp_path):
    _check(name, tmp_path, block_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("name", ARCHS)
def test_llm_greedy_matches_transformers_on_cuda(name, tmp_path):
    """The Triton attention (soft-capping, windows), the fused-MoE kernel, MLA's torch default and CUDA graphs."""
    _check(name, tmp_path, block_size=16, device="cuda")
