"""Request isolation through the default path (the engine core in its own process): ids are the engine's own,
a request's failure is its own, seats are shared fairly, and a dead core fails every request clearly."""
import os
import signal
import time

import pytest

from pageport import SamplingParams
from pageport.core.client import EngineDeadError
from pageport.core.engine_core import CoreRequest

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def free(engine) -> bool:
    s = engine.core_stats()
    return s.kv_free_blocks == s.kv_usable_blocks


def run(engine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    return outs


def test_colliding_client_ids_share_nothing(llm):
    """Client ids are labels: `ID` with n=2 next to requests named like its children, and a duplicate `ID`,
    each get exactly what they get alone; nothing wrong lands in the prefix cache."""
    engine = llm.engine
    prompts = ["Tell me about the moon.", "Name three fruits.", "Describe a cat.", "What is rust?"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    two = SamplingParams(n=2, temperature=0, max_tokens=8)
    gids = [engine.add_request("ID", prompts[0], two),
            engine.add_request("ID#0", prompts[1], GREEDY),
            engine.add_request("ID#1", prompts[2], GREEDY),
            engine.add_request("ID", prompts[3], GREEDY)]
    assert len(set(gids)) == 4  # internal ids are unique whatever the labels
    outs = {o.engine_request_id: o for o in run(engine)}
    assert [outs[g].request_id for g in gids] == ["ID", "ID#0", "ID#1", "ID"]
    assert [c.token_ids for c in outs[gids[0]].outputs] == [alone[0], alone[0]]
    assert [outs[g].outputs[0].token_ids for g in gids[1:]] == alone[1:]
    # a later unrelated run (prefix cache on) is unharmed
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == alone
    assert free(engine)


def test_abort_by_label_reaches_every_request_with_it(llm):
    engine = llm.engine
    a = engine.add_request("same", "One story please.", SamplingParams(max_tokens=200))
    b = engine.add_request("same", "Another story.", SamplingParams(max_tokens=200))
    keep = engine.add_request("other", "Count to three.", GREEDY)
    engine.step()
    engine.abort_request("same")
    outs = {o.engine_request_id: o for o in run(engine)}
    assert outs[a].outputs[0].finish_reason == outs[b].outputs[0].finish_reason == "abort"
    assert outs[keep].outputs[0].finish_reason in ("length", "stop")
    assert free(engine)


def test_seed_range_is_checked_and_childrens_seeds_never_overflow(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="seed must be in"):
        engine.add_request(None, "x", SamplingParams(n=2, max_tokens=2, seed=18446744073709551615))
    top = SamplingParams(n=2, temperature=1.0, max_tokens=3, seed=(1 << 63) - 1)  # child 1 wraps to -2**63
    out = llm.generate("x", top)[0]
    assert [len(c.token_ids) for c in out.outputs] == [3, 3]
    assert llm.generate("x", top)[0].outputs[1].token_ids == out.outputs[1].token_ids  # reproducible
    assert free(engine)


def test_a_request_the_core_rejects_touches_no_other(llm):
    """A request whose seed only the core finds bad (sent past the front end's checks) ends with an error
    output; the request beside it finishes normally and the core goes on."""
    import pickle
    engine = llm.engine
    good = engine.add_request("good", "Hello there", GREEDY)
    bad = SamplingParams(temperature=1.0, max_tokens=4)
    bad.seed = 1 << 70
    engine.client.add([CoreRequest("rogue", [1, 2, 3], pickle.dumps(bad), engine.eos_token_id)])
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert [o.outputs[0].finish_reason for o in seen if o.finished] == ["length"]
    assert engine.client.is_alive()
    assert llm.generate("Hello there", GREEDY)[0].outputs[0].token_ids == \
        [o for o in seen if o.engine_request_id == good][-1].outputs[0].token_ids
    assert free(engine)


def test_a_failure_in_one_requests_text_fails_it_alone(llm):
    engine = llm.engine
    victim = engine.add_request("victim", "Write a poem.", SamplingParams(temperature=0, max_tokens=30))
    other = engine.add_request("other", "Write a poem.", SamplingParams(temperature=0, max_tokens=30))

    def broken(*_):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    engine.requests[victim].detokenizer.update = broken
    outs = {o.engine_request_id: o for o in run(engine)}
    assert outs[victim].outputs[0].finish_reason == "error" and "detokenization failed" in outs[victim].error
    assert outs[other].outputs[0].finish_reason == "length" and len(outs[other].outputs[0].token_ids) == 30
    assert free(engine)


def test_one_owners_fan_out_does_not_starve_another():
    """Eight long sequences of one owner fill every seat; a small request of another owner still gets a seat
    at once (the owner above its fair share gives one up) and finishes long before them."""
    from pageport import LLM
    llm = LLM(dtype="float32", max_model_len=512, max_num_seqs=4)
    engine = llm.engine
    big = engine.add_request("big", "Tell me a long story.", SamplingParams(n=8, temperature=0, max_tokens=60,
                                                                             ignore_eos=True))
    for _ in range(3):
        engine.step()
    small = engine.add_request("small", "Hi", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    steps, done, final = 0, {}, {}
    while engine.has_unfinished_requests():
        steps += 1
        for o in engine.step():
            if o.finished:
                done[o.engine_request_id], final[o.engine_request_id] = steps, o
    assert done[small] < 12 < done[big]
    assert [len(c.token_ids) for c in final[big].outputs] == [60] * 8  # preempted ones lost nothing
    assert free(engine)
    engine.shutdown()


def test_killed_core_fails_pending_requests_clearly():
    from pageport import LLM
    llm = LLM(dtype="float32", max_model_len=512)
    engine = llm.engine
    engine.add_request("a", "Tell me a story.", SamplingParams(max_tokens=200))
    engine.step()
    os.kill(engine.client.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="engine core process exited"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - t0 < 2
    with pytest.raises(EngineDeadError):
        engine.add_request("b", "x", GREEDY)
    engine.shutdown()
    assert not engine.client.is_alive()


def test_a_grammar_the_core_cannot_register_fails_that_request_alone(monkeypatch):
    """The grammar manager raising for one request (here: forced) ends that request with an error output; the
    request beside it and the core go on."""
    from pageport import LLM
    from pageport.core.sampling_params import StructuredOutputsParams
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")  # to make the manager fail inside the core
    llm = LLM(dtype="float32", max_model_len=256)
    engine = llm.engine

    def broken(*_):
        raise RuntimeError("grammar backend failure")
    engine.core.grammars.add_request = broken
    bad = engine.add_request("bad", "Hi", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"])))
    good = engine.add_request("good", "Hello there", GREEDY)
    outs = {o.engine_request_id: o for o in run(engine)}
    assert outs[bad].outputs[0].finish_reason == "error" and "grammar backend failure" in outs[bad].error
    assert outs[good].outputs[0].finish_reason in ("length", "stop")
    pool = engine.core.kv.pool
    assert pool.num_free == pool.num_usable
