"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through our loader vs transformers, float32.

Both sides dequantize the same file, so the weights are identical; only the arithmetic differs
(paged SDPA vs transformers' attention, fused projections).
"""
import time

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.models import default_model_path, load_model
from pageport.models.gguf_loader import open_gguf

from .helpers import PagedRunner

# Logits of this model are O(10) (|max| ~ 20-30); float32 summation-order noise over 30 layers
# stays ~1e-5..1e-4. 2e-3 absolute leaves margin and still catches any real error (a wrong rope
# permutation or a missing weight moves logits by whole units).
ATOL = 2e-3
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("pageport-cache")
    mp.setenv("PAGEPORT_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def converted(gguf_cache):
    """transformers' own GGUF -> config/tokenizer conversion (cold: this also writes the cache)."""
    gg = open_gguf(default_model_path())
    assert not gg.cached
    return gg


@pytest.fixture(scope="module")
def ours(converted, cpu_platform):
    t0 = time.perf_counter()
    loaded = load_model(EngineConfig(dtype=torch.float32), cpu_platform)
    print(f"\ndefault model load with the cached conversion: {time.perf_counter() - t0:.1f} s")
    return loaded


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _chat_ids(tok):
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def test_default_model_facts(ours):
    assert ours.load_format == "gguf"
    assert ours.source == str(default_model_path())
    cfg = ours.hf_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight  # tied: no output.weight in the file
    assert sum(p.numel() for p in ours.model.parameters()) == 134_515_008


def test_cache_is_used_and_faithful(converted, ours, gguf_cache):
    """load_model read the cached conversion; it equals transformers' direct GGUF conversion."""
    warm = open_gguf(default_model_path())
    assert warm.cached and any(gguf_cache.rglob("gguf_tensors.json"))
    assert warm.arch == converted.arch == "llama" and warm.tensors == converted.tensors
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "rope_parameters", "rms_norm_eps", "tie_word_embeddings",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim")
    assert {k: getattr(warm.hf_config, k) for k in keys} == {k: getattr(converted.hf_config, k) for k in keys}
    ref_tok = converted.tokenizer  # AutoTokenizer.from_pretrained(folder, gguf_file=...)
    texts = ["Hello, world!", "  leading spaces\tand tabs\n\nnewlines", "Ünïcödé — 日本語 🙂🚀",
             "def f(x):\n    return x**2", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert ours.tokenizer.encode(t) == ref_tok.encode(t), t
    assert _chat_ids(ours.tokenizer) == _chat_ids(ref_tok)
    assert ours.tokenizer.eos_token_id == ref_tok.eos_token_id == 2


def test_logits_and_greedy_match_transformers(ours, converted, reference):
    ref_tok, ref_model, warm = converted.tokenizer, reference, ours
    ids = _chat_ids(ref_tok)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    t1 = time.perf_counter()
    runner = PagedRunner(warm.model, num_blocks=16, block_size=16)
    (logits,) = runner.step([("p", ids)])
    t2 = time.perf_counter()
    diff = (logits - ref).abs().max().item()
    print(f"\nprefill {len(ids)} tokens: transformers {t1 - t0:.2f} s, ours {t2 - t1:.2f} s; max |diff| {diff:.1e}")
    assert diff <= ATOL, f"max |logit diff| {diff:.2e} > {ATOL} over {len(ids)} positions"
    assert torch.equal(logits.argmax(-1), ref.argmax(-1)), "greedy argmax differs at some prompt position"

    # greedy decode through the paged KV cache, token for token against transformers' generate
    n_new = 8
    out = [int(logits[-1].argmax())]
    for _ in range(n_new - 1):
        (step,) = runner.step([("p", out[-1:])])
        out.append(int(step[-1].argmax()))
    with torch.no_grad():
        gen = ref_model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                                 pad_token_id=ref_tok.pad_token_id)[0, len(ids):].tolist()
    assert out == gen, (ref_tok.decode(out), ref_tok.decode(gen))


def test_second_load_reads_the_cached_weights(ours, converted, cpu_platform):
    """The first load_model wrote the dequantized weights into the entry; the next one reads them (no
    dequantization) and builds the same parameters, bit for bit. The tokenizer it names loads lazily, as the
    class AutoTokenizer gives."""
    from pageport.models import gguf_loader

    hits = gguf_loader.weight_cache_stats["hits"]
    again = load_model(EngineConfig(dtype=torch.float32), cpu_platform)
    assert gguf_loader.weight_cache_stats["hits"] == hits + 1
    assert type(again.hf_config).__name__ == "PlainConfig"
    assert again.for_front_end()[0] is None and again.tokenizer_dir is not None  # not loaded yet
    assert type(again.tokenizer) is type(converted.tokenizer)
    a, b = dict(ours.model.named_parameters()), dict(again.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
