from pageport.core.kv_cache import KVCacheManager
from pageport.core.request import Request, RequestStatus
from pageport.core.sampling_params import SamplingParams
from pageport.core.scheduler import Scheduler


def make(num_blocks=50, block_size=4, max_seqs=8, budget=32, **kw):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, max_seqs, budget, max_model_len=1000, **kw), kv


def req(rid, n, priority=0, t=0.0):
    return Request(rid, list(range(100 * len(rid), 100 * len(rid) + n)), SamplingParams(), None,
                   priority=priority, arrival_time=t)


def run_step(sched):
    """Pretend the model ran: advance computed tokens and sample a token where due."""
    out = sched.schedule()
    for s in out.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_tokens
        if samples:
            s.request.append_token(7)
    return out


def test_token_budget_chunks_long_prompts():
    sched, _ = make(budget=16)
    a = req("a", 40)
    sched.add(a)
    sizes = [run_step(sched).scheduled[0].num_tokens for _ in range(3)]
    assert sizes == [16, 16, 8]
    assert a.num_output_tokens == 1
    assert run_step(sched).scheduled[0].num_tokens == 1  # decode


def test_running_first_then_waiting_within_budget_and_seq_limit():
    sched, _ = make(budget=20, max_seqs=2)
    a, b, c = req("a", 10), req("bb", 10), req("ccc", 10)
    for r in (a, b, c):
        sched.add(r)
    out = run_step(sched)
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("a", 10), ("bb", 10)]
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a", "bb"]  # max_num_seqs holds c back
    assert c.status == RequestStatus.WAITING


def test_preemption_by_recompute_frees_blocks_and_requeues_first():
    sched, kv = make(num_blocks=7, block_size=4, budget=64)  # 6 usable blocks
    a, b = req("a", 12), req("bb", 11)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 3 blocks, b: 3 blocks
    assert kv.pool.num_free == 0
    out = run_step(sched)  # a needs a 4th block: b (newest) is preempted
    assert out.preempted == [b] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and sched.waiting[0] is b
    assert sched.num_preemptions == 1
    assert [s.request for s in out.scheduled] == [a]
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    out = run_step(sched)  # b comes back: 12 tokens (prompt + one sampled), 2 full blocks cached
    assert out.scheduled[0].request is b and out.scheduled[0].num_tokens == 12 - 8


def test_priority_policy_orders_waiting_and_preempts_lowest_priority():
    sched, _ = make(budget=64, policy="priority")
    low, high = req("low", 4, priority=5, t=0), req("hi", 4, priority=0, t=1)
    sched.add(low)
    sched.add(high)
    assert sched.waiting == [high, low]


def test_finish_returns_every_block():
    sched, kv = make()
    rs = [req("x" * (i + 1), 9) for i in range(4)]
    for r in rs:
        sched.add(r)
    run_step(sched)
    for r in rs:
        sched.finish(r, RequestStatus.FINISHED_ABORTED)
    assert kv.pool.num_free == kv.pool.num_usable and not sched.has_unfinished()


def test_gated_sibling_waits_for_the_first_prefill():
    sched, kv = make(budget=64)
    a, b = req("a", 8), req("b", 8)
    b.prompt_token_ids = a.prompt_token_ids
    b.token_ids = list(a.token_ids)
    b.gate = a
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [s.request for s in out.scheduled] == [a]
    a.prefill_done = True
    out = run_step(sched)
    assert b in [s.request for s in out.scheduled]
    assert b.num_cached_tokens == 4  # the first full block came from a


def owned(rid, owner, n=4):
    r = Request(rid, list(range(n)), SamplingParams(max_tokens=100), None, owner=owner)
    return r


def test_a_seatless_owner_is_admitted_first_and_a_hog_gives_up_a_seat():
    sched, kv = make(max_seqs=4, budget=64)
    hog = [owned(f"h{i}", "big") for i in range(6)]
    for r in hog:
        sched.add(r)
    run_step(sched)
    assert [r.request_id for r in sched.running] == ["h0", "h1", "h2", "h3"]
    small = owned("s", "small")
    sched.add(small)
    out = run_step(sched)
    # every seat was taken and "big" held more than half: its newest running request went back to the queue,
    # and the seatless owner's request took the seat ahead of big's older waiting ones
    assert [r.request_id for r in out.preempted] == ["h3"]
    assert small in sched.running and len(sched.running) == 4
    assert [r.request_id for r in sched.waiting] == ["h3", "h4", "h5"]


def test_a_request_whose_pending_tokens_reach_max_tokens_is_not_scheduled():
    sched, _ = make()
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=2), None)
    sched.add(r)
    out = sched.schedule()  # prefill: samples the first token
    r.num_computed_tokens += out.scheduled[0].num_tokens
    r.num_pending = 1
    out = sched.schedule()  # decodes the pending token (its second and last)
    assert [s.num_tokens for s in out.scheduled] == [1] and out.scheduled[0].samples
    r.num_computed_tokens += 1
    r.num_pending = 2  # both in flight: nothing more to compute
    assert not sched.schedule().scheduled
