"""Asynchronous scheduling (step N+1 launched before step N's ids reach the host) changes no token: greedy
parity with Transformers in a mixed batch with chunked prefill and preemption, and exact lengths and stops."""
import pytest

from pageport import LLM, SamplingParams
from tests.e2e.conftest import NEW_TOKENS

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def free(llm) -> bool:
    s = llm.engine.core_stats()
    return s.kv_free_blocks == s.kv_usable_blocks


@pytest.fixture(scope="module")
def async_llm():
    return LLM(dtype="float32", max_model_len=1024, async_scheduling=True)


def test_async_and_sync_agree_with_chunks_and_preemption(chat_prompts, hf_greedy):
    runs = {}
    for mode in (True, False):
        llm = LLM(dtype="float32", async_scheduling=mode, num_gpu_blocks_override=16, block_size=16,
                  max_num_batched_tokens=40, max_num_seqs=6)
        outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts], GREEDY)
        stats = llm.engine.core_stats()
        assert stats.num_preemptions > 0 and stats.kv_free_blocks == stats.kv_usable_blocks
        runs[mode] = [o.outputs[0].token_ids for o in outs]
        llm.engine.shutdown()
    assert runs[True] == runs[False] == hf_greedy


def test_lengths_and_stops_are_exact(async_llm):
    llm = async_llm
    prompts = ["1, 2, 3, 4, 5,", "Tell me about the sea.", "hi"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [7, 7, 7]
    base = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    tok = base.token_ids[3]
    first = base.token_ids.index(tok)
    out = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    m = first + 2
    out = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[tok],
                                                  min_tokens=m))[0].outputs[0]
    assert len(out.token_ids) >= m and tok not in out.token_ids[:m]  # no stop before min_tokens
    assert (out.finish_reason == "stop") == (out.token_ids[-1] == tok) and tok not in out.token_ids[:-1]
    stop_at = base.text[4:7]
    out = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=20, stop=[stop_at]))[0].outputs[0]
    assert out.text == base.text[:base.text.index(stop_at)] and out.finish_reason == "stop"
    assert free(llm)


def test_seeded_sampling_is_the_same_with_async_on(async_llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=12)
    sync = LLM(dtype="float32", max_model_len=1024, async_scheduling=False)
    a = async_llm.generate(["Once upon a time", "The weather"], p)
    b = sync.generate(["Once upon a time", "The weather"], p)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    sync.engine.shutdown()


def test_grammar_rows_overlap_and_change_no_token(async_llm):
    """Constrained rows ride the asynchronous path (their masks take the previous step's token while the next
    forward pass runs): JSON-schema and choice outputs equal the synchronous engine's, valid, beside free rows
    that equal their own unconstrained run."""
    import json

    from pageport import StructuredOutputsParams

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    prompts = ["Describe a pilot as JSON.", "Tell me about the sea.", "Pick a colour.", "1, 2, 3,"]
    params = [SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0, max_tokens=16),
              SamplingParams(temperature=0, max_tokens=10,
                             structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue"])),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    sync = LLM(dtype="float32", max_model_len=1024, async_scheduling=False)
    a = async_llm.generate(prompts, params)
    b = sync.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    obj = json.loads(a[0].outputs[0].text)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    assert a[2].outputs[0].text in ("red", "green", "blue")
    alone = async_llm.generate([prompts[1], prompts[3]], [params[1], params[3]])
    assert [o.outputs[0].token_ids for o in alone] == [a[1].outputs[0].token_ids, a[3].outputs[0].token_ids]
    assert free(async_llm)
