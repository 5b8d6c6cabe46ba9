"""Speculative decoding (n-gram) on the default model: greedy output identical to plain decoding, in a mixed
batch with chunked prefill and with sampled requests beside, and acceptance counted on a predictable prompt."""
import pytest

from pageport import LLM, SamplingParams

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
PASSAGE = ("The committee met on Tuesday to review the budget. It approved funds for the library, the park "
           "and the new bus line, and asked for a report by June. ")


@pytest.fixture(scope="module")
def spec_llm():
    # a small step budget: the long prompts are prefilled in chunks while other rows decode with proposals
    return LLM(dtype="float32", max_model_len=1024, max_num_batched_tokens=64, speculative_config=SPEC)


def _core_stats(llm):
    import types

    import msgspec
    llm.engine.client.call("stats")
    return types.SimpleNamespace(**msgspec.structs.asdict(llm.engine.client.last_stats))  # a copy


def test_greedy_identical_in_a_mixed_batch_with_chunked_prefill(llm, spec_llm):
    prompts = ["Repeat exactly: " + PASSAGE * 2, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "Hello, my name is",
               "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"]
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (40, 23, 17, 30)]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    before = _core_stats(spec_llm)
    # a sampled request in the same batch (no equality expected for it, only that it runs)
    outs = spec_llm.generate(prompts + ["Once upon a time"],
                             params + [SamplingParams(temperature=0.8, max_tokens=12, seed=3)])
    got = [o.outputs[0].token_ids for o in outs[:4]]
    assert got == ref
    assert [len(t) for t in got] == [len(t) for t in ref]
    assert len(outs[4].outputs[0].token_ids) == 12
    after = _core_stats(spec_llm)
    assert after.spec_num_drafts > before.spec_num_drafts
    assert after.spec_num_accepted_tokens > before.spec_num_accepted_tokens  # the repeated passage is predictable


def test_stop_token_and_max_tokens_exact_with_several_tokens_a_step(llm, spec_llm):
    prompt = "Repeat exactly: " + PASSAGE * 2
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0].token_ids
    stop = ref[9]  # a token in the middle of what a step emits
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop])
    want = llm.generate([prompt], params)[0].outputs[0]
    got = spec_llm.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
    for m in (1, 2, 5, 11):
        out = spec_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=m))[0].outputs[0]
        assert out.token_ids == ref[:m] and out.finish_reason == "length"


def test_acceptance_counted_on_a_predictable_prompt(spec_llm):
    """The prompt repeats a token sequence; the model continues it, so (nearly) every proposal is accepted:
    the counters must agree with each other and with the emitted tokens."""
    seq = " alpha beta gamma delta epsilon zeta eta theta iota kappa"
    prompt = "Continue the pattern:" + seq * 6
    before = _core_stats(spec_llm)
    out = spec_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=41))[0].outputs[0]
    after = _core_stats(spec_llm)
    drafts = after.spec_num_drafts - before.spec_num_drafts
    draft_tokens = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    emitted = after.spec_num_emitted_tokens - before.spec_num_emitted_tokens
    assert len(out.token_ids) == 41
    # proposals never reach past max_tokens, so no verified token is cut: each step emits accepted + 1
    assert emitted == accepted + drafts and accepted <= draft_tokens
    # the first token comes from the prefill; nearly all later ones from verifying steps
    assert 41 - 4 <= emitted <= 40
    assert accepted / draft_tokens > 0.8, (accepted, draft_tokens)
    assert drafts <= 41 // 3  # at least ~4 tokens a verifying step on average


def test_constrained_rows_speculate_and_keep_their_output(llm, spec_llm):
    """json_schema rows get proposals too: each verified position under its grammar's mask (a proposal the grammar
    refuses is turned down there). Greedy output equal to plain constrained decoding and valid; a sampled
    constrained row's output valid."""
    import json

    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from pageport.core.sampling_params import StructuredOutputsParams
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "population": {"type": "integer"}},
              "required": ["city", "country", "population"], "additionalProperties": False}
    record = '{"city": "Paris", "country": "France", "population": 2100000}'
    prompts = [f"Repeat this JSON exactly: {record}\n", f"Here is a record: {record}\nThe same record again:"]
    greedy = SamplingParams(temperature=0, max_tokens=48, structured_outputs=StructuredOutputsParams(json=schema))
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    before = _core_stats(spec_llm)
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=48,
                             structured_outputs=StructuredOutputsParams(json=schema))
    outs = spec_llm.generate(prompts + prompts[:1], [greedy, greedy, sampled])
    assert [o.outputs[0].token_ids for o in outs[:2]] == ref
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)
    after = _core_stats(spec_llm)
    assert after.spec_num_drafts > before.spec_num_drafts
    assert after.spec_num_accepted_tokens > before.spec_num_accepted_tokens
