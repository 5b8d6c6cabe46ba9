"""Engine behaviour on the default model: prefix caching, n > 1, aborts, bad input, stops."""
import pytest

from pageport import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def all_blocks_free(llm):
    stats = llm.engine.core_stats()
    return stats.kv_free_blocks == stats.kv_usable_blocks


def test_prefix_cache_hits_and_output_equals_caching_off(llm):
    from pageport import LLM
    prefix = "You are a helpful assistant. " * 12
    prompts = [prefix + "Say hello.", prefix + "Say goodbye."]
    first = llm.generate(prompts[0], GREEDY)[0]
    hits_before = llm.engine.core_stats().prefix_cache_hits
    second = llm.generate(prompts[1], GREEDY)[0]
    assert second.num_cached_tokens >= 64
    assert llm.engine.core_stats().prefix_cache_hits - hits_before == second.num_cached_tokens
    off = LLM(dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    ref = off.generate(prompts, GREEDY)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == [r.outputs[0].token_ids for r in ref]
    assert ref[1].num_cached_tokens == 0
    assert all_blocks_free(llm) and all_blocks_free(off)


def test_n_children_share_the_prompt_blocks():
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    engine = LLMEngine(EngineConfig(dtype="float32", max_model_len=1024), multiprocess=False)  # to see its blocks
    prompt = "Count from one to ten: " * 6
    gid = engine.add_request("fan", prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=6))
    shared_seen = False
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        ids = [engine.core.kv.req_blocks.get(f"{gid}.{i}") for i in range(4)]
        if all(ids):
            first = ids[0][0]
            shared_seen |= all(b[0] is first for b in ids) and first.ref_cnt >= 4
    assert shared_seen
    final = [o for o in outs if o.finished][0]
    assert len(final.outputs) == 4 and [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1  # different seeds, different samples
    pool = engine.core.kv.pool
    assert pool.num_free == pool.num_usable


def test_seeded_sampling_reproduces(llm):
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=123, max_tokens=10)
    a = llm.generate(["Once upon a time", "The weather"], p)
    b = llm.generate(["Unrelated prompt first", "Once upon a time"], p)
    assert a[0].outputs[0].token_ids == b[1].outputs[0].token_ids


def test_abort_returns_every_block(llm):
    engine = llm.engine
    engine.add_request("x", "Tell me everything about the ocean.", SamplingParams(max_tokens=200))
    engine.add_request("y", "And the sky.", SamplingParams(max_tokens=200))
    for _ in range(3):
        engine.step()
    engine.abort_request(["x", "y"])
    outs = engine.step()
    assert {o.request_id for o in outs} == {"x", "y"}
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished_requests() and all_blocks_free(llm)


def test_stop_strings_and_stop_reasons(llm):
    base = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert base.finish_reason in ("length", "stop")
    stop_at = base.text[3:6]
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.text == base.text[:base.text.index(stop_at)]
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[stop_at],
                                                         include_stop_str_in_output=True))[0].outputs[0]
    assert out.text.endswith(stop_at)
    tok = base.token_ids[2]
    out = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20,
                                                         stop_token_ids=[tok]))[0].outputs[0]
    assert out.stop_reason == tok and out.token_ids[-1] == tok and len(out.token_ids) <= 3


def test_ignore_eos_and_min_tokens_reach_the_length(llm):
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], p)[0].outputs[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=30, min_tokens=30))
    assert len(out[0].outputs[0].token_ids) == 30


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                                   prompt_logprobs=1))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 3
    for tid, pos in zip(comp.token_ids, comp.logprobs):
        assert tid in pos and pos[tid].rank == 1  # greedy picks the top token
        assert len(pos) == 2 and all(lp.decoded_token is not None for lp in pos.values())
    assert comp.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(comp.token_ids, comp.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, len(out.prompt_token_ids)))


def test_bad_input_is_rejected_and_does_not_disturb_others(llm):
    engine = llm.engine
    engine.add_request("good", "Hello there", SamplingParams(temperature=0, max_tokens=5))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad1", "", SamplingParams())
    with pytest.raises(ValueError, match=r"2000 tokens.*max_model_len is 1024"):
        engine.add_request("bad2", [1] * 2000, SamplingParams())
    with pytest.raises(ValueError, match="out of the vocabulary"):
        engine.add_request("bad3", [1, 10 ** 7], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["good"]
    assert all_blocks_free(llm)


def test_beam_search_keeps_the_best_beams(llm):
    from pageport.core.llm import BeamSearchParams
    res = llm.beam_search(["The capital of France is"], BeamSearchParams(beam_width=3, max_tokens=4))[0]
    assert len(res.sequences) == 3
    scores = [s.cum_logprob for s in res.sequences]
    greedy = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=0))[0]
    assert max(scores) >= greedy.outputs[0].cumulative_logprob - 1e-4  # beam search is never worse than greedy


def test_fp8_kv_cache_holds_twice_the_tokens():
    """--kv-cache-dtype fp8: the same KV memory holds twice the blocks (one byte per element instead of two), and
    the engine serves from it; greedy text stays close to the bf16 cache's (fp8 rounds K/V: not bit-equal)."""
    from pageport import LLM
    budget = 64 << 20
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=budget, kv_cache_dtype=kv)
        out = llm.generate(["The capital of France is", "One, two, three,"],
                           SamplingParams(temperature=0, max_tokens=8))
        runs[kv] = (llm.engine.core_stats().kv_usable_blocks, [o.outputs[0].token_ids for o in out])
        assert all_blocks_free(llm)
        del llm
    (bf16_blocks, bf16_ids), (fp8_blocks, fp8_ids) = runs["auto"], runs["fp8"]
    assert abs(fp8_blocks - 2 * bf16_blocks) <= 2, (bf16_blocks, fp8_blocks)
    assert [ids[0] for ids in fp8_ids] == [ids[0] for ids in bf16_ids]  # the first token comes from the prefill
