"""Speculative decoding with a draft model on the default model: greedy output identical to plain decoding in a mixed
batch with chunked prefill, under preemption, for a good draft (the target's own weights in the CPU's int4) and a bad
one (random weights: nearly every proposal is turned down); acceptance counted; a draft with another vocabulary is
refused."""
import types

import msgspec
import pytest

from pageport import LLM, SamplingParams
from pageport.models.loader import default_model_path

pytestmark = pytest.mark.slow

PASSAGE = ("The committee met on Tuesday to review the budget. It approved funds for the library, the park "
           "and the new bus line, and asked for a report by June. ")
PROMPTS = ["Repeat exactly: " + PASSAGE * 2, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "Hello, my name is",
           "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"]
PARAMS = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 23, 17, 30)]


def _stats(llm):
    llm.engine.client.call("stats")
    return types.SimpleNamespace(**msgspec.structs.asdict(llm.engine.client.last_stats))


def _tiny_llama(folder, vocab_size=49152, seed=0):
    """A 2-layer random Llama with the default model's vocabulary size, saved as safetensors."""
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="module")
def reference(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def int4_draft():
    # a small step budget: the long prompts are prefilled in chunks while other rows verify proposals
    return LLM(dtype="float32", max_model_len=1024, max_num_batched_tokens=64,
               speculative_config={"model": str(default_model_path()), "quantization": "int4",
                                   "num_speculative_tokens": 4})


def test_int4_draft_greedy_identical_in_a_mixed_batch(int4_draft, reference):
    before = _stats(int4_draft)
    outs = int4_draft.generate(PROMPTS + ["Once upon a time"],
                               PARAMS + [SamplingParams(temperature=0.8, max_tokens=12, seed=3)])
    assert [o.outputs[0].token_ids for o in outs[:4]] == reference
    assert len(outs[4].outputs[0].token_ids) == 12  # a sampled row verified beside them
    after = _stats(int4_draft)
    drafts = after.spec_num_drafts - before.spec_num_drafts
    draft_tokens = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    emitted = after.spec_num_emitted_tokens - before.spec_num_emitted_tokens
    assert drafts > 0 and accepted <= draft_tokens and emitted <= accepted + drafts
    assert accepted / draft_tokens > 0.6, (accepted, draft_tokens)  # the target's own weights: mostly agree
    # every output token but each request's first came from a verifying step or a plain step
    assert emitted <= sum(len(o.outputs[0].token_ids) - 1 for o in outs)


def test_int4_draft_constrained_rows_keep_their_output(int4_draft, llm):
    """A draft drafts without the grammar; its proposals are verified under the grammar's masks: greedy
    json_schema output equal to plain constrained decoding, sampled output valid."""
    import json

    pytest.importorskip("xgrammar")
    from pageport.core.sampling_params import StructuredOutputsParams
    so = StructuredOutputsParams(json={"type": "object", "properties": {"name": {"type": "string"},
                                                                        "age": {"type": "integer"}},
                                       "required": ["name", "age"], "additionalProperties": False})
    prompts = ["Describe Ann, who is 31, as JSON:", "Give a person as JSON:"]
    greedy = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    before = _stats(int4_draft)
    outs = int4_draft.generate(prompts + prompts[:1], [greedy, greedy, SamplingParams(
        temperature=0.8, seed=2, max_tokens=40, structured_outputs=so)])
    assert [o.outputs[0].token_ids for o in outs[:2]] == ref
    for o in outs:
        assert set(json.loads(o.outputs[0].text)) == {"name", "age"}
    assert _stats(int4_draft).spec_num_accepted_tokens > before.spec_num_accepted_tokens


def test_int4_draft_stop_token_and_max_tokens_exact(int4_draft, reference):
    stop = reference[0][9]
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop])
    got = int4_draft.generate([PROMPTS[0]], params)[0].outputs[0]
    k = reference[0].index(stop)
    assert got.token_ids == reference[0][:k + 1] and got.finish_reason == "stop"
    for m in (1, 2, 5, 11):
        out = int4_draft.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=m))[0].outputs[0]
        assert out.token_ids == reference[0][:m] and out.finish_reason == "length"


def test_int4_draft_sampled_rows_run_and_seeds_repeat(int4_draft):
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=11)
    a = int4_draft.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    b = int4_draft.generate([PROMPTS[0]], p)[0].outputs[0].token_ids
    assert len(a) == 24 and a == b  # the draft draws from its own seeded stream


def test_random_draft_greedy_identical_under_preemption(tmp_path_factory, reference):
    """A draft that is nearly always wrong, and a KV cache so small that requests are preempted and recomputed
    (both models' KV live in the same blocks): the output is still the target's."""
    folder = _tiny_llama(tmp_path_factory.mktemp("draft"))
    llm = LLM(dtype="float32", max_model_len=256, max_num_batched_tokens=48, num_gpu_blocks_override=14,
              speculative_config={"model": folder, "num_speculative_tokens": 3})
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == reference
    s = _stats(llm)
    assert s.num_preemptions > 0 and s.spec_num_drafts > 0
    assert s.spec_num_accepted_tokens < s.spec_num_draft_tokens  # rejections happened


def test_proposals_that_never_pay_are_switched_off(tmp_path, llm):
    """A random draft over a long output: after a few steps with nothing accepted the engine decodes plainly for a
    pause, tries again, pauses longer; the output stays the target's."""
    folder = _tiny_llama(tmp_path / "draft", seed=1)
    spec = LLM(dtype="float32", max_model_len=512, speculative_config={"model": folder, "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0, max_tokens=220, ignore_eos=True)
    want = llm.generate([PROMPTS[2]], params)[0].outputs[0].token_ids
    assert spec.generate([PROMPTS[2]], params)[0].outputs[0].token_ids == want
    s = _stats(spec)
    # speculating: 4 steps, off 64, 4 more, off 128, 4 more (an accidental acceptance: a window of 16): far fewer
    # verifying steps than tokens
    assert 12 <= s.spec_num_drafts <= 48, s.spec_num_drafts


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    folder = _tiny_llama(tmp_path / "other", vocab_size=1000)
    import transformers
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(1000))
    tok.save_pretrained(folder)
    with pytest.raises(Exception, match="vocabulary"):
        LLM(dtype="float32", max_model_len=256, speculative_config={"model": folder, "num_speculative_tokens": 2})


def _word_tokenizer(n):
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))


class _NoGraphs:
    """Stands in for a platform's decode graphs: every pass falls back to eager, but the draft takes its path for
    graph platforms (round 0 in one-token passes)."""
    calls = 0

    def run(self, input_ids, positions, md):
        type(self).calls += md.max_query_len == 1
        return None


def test_one_token_passes_of_graph_platforms_keep_greedy_output(monkeypatch, reference):
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    llm = LLM(dtype="float32", max_model_len=1024, speculative_config={
        "model": str(default_model_path()), "quantization": "int4", "num_speculative_tokens": 3})
    llm.engine.core.drafter.runner.graphs = _NoGraphs()
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
    assert _NoGraphs.calls > 0
