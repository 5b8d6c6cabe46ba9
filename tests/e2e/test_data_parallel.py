"""Data parallelism on the CPU: two engine-core processes behind one front end give the tokens of one core (and of
Transformers), share the requests, keep a prompt's prefix where it is cached, fail cleanly when one dies, and serve
the OpenAI server; the router's choices on their own."""
from __future__ import annotations

import signal
import time

import pytest

from pageport import LLM, SamplingParams
from pageport.core.dp_client import Router
from pageport.core.engine_core import CoreRequest
from tests.e2e.test_tensor_parallel import (GREEDY, PROMPTS, _assert_gone, _descendants, _generate, _hf_greedy,
                                            _make_llama)

KW = dict(dtype="float32", max_num_batched_tokens=32, num_gpu_blocks_override=24, block_size=8, num_threads=1)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, n=2, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-dp")
    return str(path), _hf_greedy(_make_llama(path, 2))


@pytest.fixture(scope="module")
def one_core(tiny):
    """One core's greedy and seeded-sampled tokens, and its summed counters."""
    llm = LLM(tiny[0], **KW)
    try:
        greedy = _generate(llm)
        sampled = [[c.token_ids for c in o.outputs]
                   for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SEEDED, use_tqdm=False)]
        return greedy, sampled, llm.engine.core_stats()
    finally:
        llm.engine.shutdown()


def _core_stats(engine):
    """Each core's own counters."""
    import msgspec

    from pageport.core.engine_core import CoreStats
    engine = getattr(engine, "engine", engine)  # an LLM or an AsyncLLMEngine
    return [msgspec.convert(c.call("stats"), CoreStats) for c in engine.client.clients]


def test_dp2_matches_one_core_and_shares_the_work(tiny, one_core):
    path, hf = tiny
    greedy, sampled, stats1 = one_core
    before = _descendants()
    llm = LLM(path, data_parallel_size=2, **KW)
    try:
        assert len(llm.engine.client.clients) == 2
        assert _generate(llm) == greedy == hf
        per_core = _core_stats(llm)
        assert all(s.prompt_tokens > 0 for s in per_core), "one core got no request"
        total = llm.engine.core_stats()
        assert total.prompt_tokens == sum(s.prompt_tokens for s in per_core)
        assert total.generation_tokens == len(PROMPTS) * GREEDY.max_tokens
        assert total.kv_usable_blocks == 2 * stats1.kv_usable_blocks
        # seeded sampling (n=2: the siblings share a core) is the same wherever a request runs
        got = [[c.token_ids for c in o.outputs]
               for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SEEDED, use_tqdm=False)]
        assert got == sampled
        assert llm.engine.client.router.load == [0, 0] and not llm.engine.client.router.owner
    finally:
        spawned = _descendants() - before
        llm.engine.shutdown()
    assert len(spawned) >= 2
    _assert_gone(spawned)


def test_a_prompt_goes_where_its_prefix_is_cached(tiny):
    """X and Y run side by side, one on each core; then Y's prefix alone, with both cores idle: the least-loaded
    rule would send it to core 0, the prefix sends it to Y's core, where its blocks are a cache hit."""
    x, y = list(range(10, 40)), list(range(100, 130))
    llm = LLM(tiny[0], data_parallel_size=2, **KW)
    try:
        llm.generate([{"prompt_token_ids": x}, {"prompt_token_ids": y}], GREEDY, use_tqdm=False)
        hits0 = [s.prefix_cache_hits for s in _core_stats(llm)]
        llm.generate([{"prompt_token_ids": y[:24] + [7, 7]}], GREEDY, use_tqdm=False)
        hits = [s.prefix_cache_hits - h for s, h in zip(_core_stats(llm), hits0)]
        assert hits[0] == 0 and hits[1] >= 16, hits  # Y went to core 1 (the second of the first two)
    finally:
        llm.engine.shutdown()


@pytest.mark.timeout(300)
def test_a_killed_core_fails_the_requests(tiny):
    from pageport.core.client import EngineDeadError
    before = _descendants()
    llm = LLM(tiny[0], data_parallel_size=2, **KW)
    spawned = _descendants() - before
    assert _generate(llm)
    llm.engine.client.clients[1].proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="exited"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert time.monotonic() - t0 < 30  # no hang
    assert not llm.engine.client.is_alive()
    llm.engine.shutdown()
    _assert_gone(spawned)  # the surviving core is stopped too


def test_openai_server_over_two_cores(tiny, one_core):
    openai = pytest.importorskip("openai")
    from tests.entrypoints.live_server import ServerThread

    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    path, _ = tiny
    greedy = one_core[0]
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model=path, data_parallel_size=2, **KW)))
    try:
        with ServerThread(build_app(engine, served_model_names=["tiny"])) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=GREEDY.max_tokens,
                                          temperature=0.0, extra_body={"ignore_eos": True, "return_token_ids": True})
            assert [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)] == greedy
            stream = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=GREEDY.max_tokens,
                                               temperature=0.0, stream=True,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
            assert [t for chunk in stream for t in (chunk.choices[0].token_ids or [])] == greedy[1]
            assert all(s.prompt_tokens > 0 for s in _core_stats(engine))
    finally:
        engine.shutdown()
        engine.engine.shutdown()


# the router alone ---------------------------------------------------------------------------------------------
def _req(rid, tokens, gate=None, lora=None):
    return CoreRequest(rid, list(tokens), b"", gate=gate, lora=lora)


def test_router_balances_load_and_keeps_prefixes():
    r = Router(size=2, block_size=4, slack=2)
    assert [r.route(_req(f"s{i}", [i])) for i in range(4)] == [0, 1, 0, 1]  # short prompts: load alone
    shared = [9, 9, 9, 9, 1]
    assert r.route(_req("a", shared)) == 0
    # the same first block stays on core 0 until core 0 is more than `slack` ahead of core 1
    assert [r.route(_req(f"p{i}", shared[:4] + [i])) for i in range(3)] == [0, 0, 1]
    assert r.load == [5, 3]
    assert r.route(_req("p3", shared[:4] + [5])) == 1  # the prefix now lives on core 1 as well: it stays there
    # another adapter or cache salt: another cache key
    keys = {r._prefix_key(_req("k", shared)), r._prefix_key(_req("k", shared, lora=["x", 3, "/x"])),
            r._prefix_key(CoreRequest("k", shared, b"", cache_salt="s"))}
    assert len(keys) == 3
    assert r.route(_req("child", [1, 2], gate="p3")) == 1  # an n > 1 child follows its sibling
    assert r.done("p3") == 1 and r.done("p3") is None
    for rid in list(r.owner):
        r.done(rid)
    assert r.load == [0, 0]


def test_data_parallel_options():
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.cli import build_parser

    cfg = EngineConfig.from_cli_args(build_parser().parse_args(["serve", "/m", "-dp", "2"]))
    assert (cfg.data_parallel_size, cfg.data_parallel_rank) == (2, 0)
    with pytest.raises(SystemExit):  # set by the front end for each core, not a flag
        build_parser().parse_args(["serve", "/m", "--data-parallel-rank", "1"])
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        EngineConfig(data_parallel_size=0)
    from pageport.core.client import make_client
    with pytest.raises(ValueError, match="no in-process mode"):
        make_client(EngineConfig(data_parallel_size=2), multiprocess=False)


# the world layout ---------------------------------------------------------------------------------------------
class _FakeGPUs:
    """A platform with `count` devices, recording the one a rank takes."""
    name, dist_backend = "cuda", "nccl"

    def __init__(self, count):
        import torch
        self.device, self.count, self.taken = torch.device("cuda"), count, []

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.taken.append(index)


def test_each_rank_of_each_core_takes_its_own_device():
    from pageport.core.config import EngineConfig
    from pageport.core.executor import format_world, place_rank, world_layout

    gpus = _FakeGPUs(3)
    cfg = EngineConfig(tensor_parallel_size=2, data_parallel_size=2)
    assert [(r["core"], r["rank"], r["tp_rank"], r["device"]) for r in world_layout(cfg, gpus)] == [
        (0, 0, 0, "cuda:0"), (0, 1, 1, "cuda:1"), (1, 0, 0, "cuda:2"), (1, 1, 1, None)]
    assert "1 rank(s) lack a device: 4 needed, 3 visible" in format_world(cfg, gpus)
    cfg.data_parallel_rank = 1
    place_rank(cfg, gpus, 0)
    assert gpus.taken == [2]
    with pytest.raises(ValueError, match="data-parallel rank 1, rank 1 needs cuda device 3, but 3 are visible"):
        place_rank(cfg, gpus, 1)
    pp = EngineConfig(pipeline_parallel_size=2, distributed_executor_backend="ray")
    assert [(r["stage"], r["process"], r["device"]) for r in world_layout(pp, _FakeGPUs(2))] == [
        (0, "engine core", "cuda:0"), (1, "Ray actor", "cuda:1")]


def test_platforms_command_prints_the_world(capsys, monkeypatch):
    from pageport.entrypoints.cli import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert main(["platforms", "--device", "cpu", "-tp", "2", "-dp", "2"]) == 0
    out = capsys.readouterr().out
    assert "world on cpu: 2 engine core(s) x 1 pipeline stage(s) x 2 tensor-parallel rank(s) = 4 process(es); " \
           "executor mp, gloo" in out
    rows = [line.split() for line in out.splitlines() if line.endswith("2 threads")]  # 8 cores / 4 ranks
    assert [(r[0], r[1], r[4]) for r in rows] == [("0", "0", "engine"), ("0", "1", "worker"), ("1", "0", "engine"),
                                                  ("1", "1", "worker")]
