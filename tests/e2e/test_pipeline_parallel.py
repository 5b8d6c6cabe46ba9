"""Pipeline parallelism on the CPU over gloo: two stages of contiguous layers give the greedy tokens of one process
and of Transformers (mixed batch, chunked prefill, preemption), each stage holds only its layers and their KV cache,
and a dead stage fails the requests instead of hanging."""
from __future__ import annotations

import signal
import time

import pytest
import torch

from pageport import LLM, SamplingParams
from tests.e2e.test_tensor_parallel import (GREEDY, PROMPTS, _assert_gone, _descendants, _generate, _hf_greedy,
                                            _make_llama, _workers)

KW = dict(dtype="float32", max_num_batched_tokens=32, num_gpu_blocks_override=12, block_size=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-pp")
    return str(path), _hf_greedy(_make_llama(path, 2))


def test_pp2_matches_transformers(tiny):
    path, hf = tiny
    before = _descendants()
    llm = LLM(path, pipeline_parallel_size=2, **KW)
    try:
        assert len(_workers(llm)) == 1  # stage 0 is the engine core itself
        assert _generate(llm) == hf
        assert llm.engine.core_stats().num_preemptions > 0  # the mirrors restart their block lists
        assert _generate(llm) == hf
    finally:
        spawned = _descendants() - before
        llm.engine.shutdown()
    _assert_gone(spawned)


def test_tp2_inside_pp2_matches_transformers(tiny):
    """Four ranks: two stages of two tensor-parallel ranks each (each stage all-reduces in its own group, each
    rank talks to its peer in the next stage), micro-batches in flight."""
    path, hf = tiny
    before = _descendants()
    llm = LLM(path, pipeline_parallel_size=2, tensor_parallel_size=2, **KW)
    try:
        assert len(_workers(llm)) == 3
        assert _generate(llm) == hf
        assert llm.engine.core_stats().num_preemptions > 0
    finally:
        spawned = _descendants() - before
        llm.engine.shutdown()
    _assert_gone(spawned)


def test_micro_batches_overlap_the_stages(tiny):
    """The core keeps a step per stage in flight, each with requests of its own, and the tokens stay exactly
    those of Transformers; a request finished while its step is in flight gets nothing more."""
    import pickle

    from pageport.core.config import EngineConfig
    from pageport.core.engine_core import CoreRequest, EngineCore

    path, hf = tiny
    core = EngineCore(EngineConfig(model=path, pipeline_parallel_size=2, **KW))
    workers = {w.proc.pid for w in core.executor.workers}
    try:
        params = pickle.dumps(GREEDY)
        for i, p in enumerate(PROMPTS):
            core.add_request(CoreRequest(str(i), p, params))
        core.add_request(CoreRequest("aborted", PROMPTS[1], params))
        launch, overlapping = core.executor.execute_model, []

        def watched(sched, kv, prev=None):  # a launch while another step is in flight: the stages overlap
            if core._flight:
                ((_, earlier),) = core._flight
                assert not {s.request for s in sched.scheduled} & set(earlier)  # one micro-batch at a time
                overlapping.append([r.request_id for r in earlier])
            return launch(sched, kv, prev)
        core.executor.execute_model = watched
        tokens, aborted = {}, False
        while core.has_work():
            for out in core.step():
                assert out.error is None and not (aborted and out.request_id == "aborted")
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            r = core.requests.get("aborted")
            if r is not None and core._flight and r in core._flight[0][1] and len(tokens.get("aborted", ())) > 2:
                core.abort(["aborted"])  # while its step is in flight
                aborted = True
        assert aborted and len(overlapping) > 5
        assert [tokens[str(i)] for i in range(len(PROMPTS))] == hf
        assert core.kv.pool.num_free == core.kv.pool.num_usable  # every block back
    finally:
        core.shutdown()
    _assert_gone(workers)


def test_each_stage_holds_its_layers(tiny):
    """In one process (nothing is sent while loading): stage 0 of 2 has layer 0, the embedding and the LM head;
    stage 1 has layer 1 and the final norm; each loads exactly the checkpoint's tensors for them."""
    from safetensors.torch import load_file

    from pageport.core.config import EngineConfig
    from pageport.models import layers, load_model
    from pageport.platforms import resolve_platform

    path, _ = tiny
    full = load_file(f"{path}/model.safetensors")
    try:
        for stage in (0, 1):
            layers.set_pipeline_parallel(stage, 2)
            cfg = EngineConfig(model=path, dtype="float32", device="cpu")
            platform = resolve_platform("cpu")
            cfg.resolve_dtype(platform.supported_dtypes)
            m = load_model(cfg, platform).model
            assert list(m.layer_range) == [stage]
            other = m.model.layers[1 - stage]
            assert isinstance(other, torch.nn.Identity)
            mine = m.model.layers[stage]
            assert torch.equal(mine.mlp.down_proj.weight, full[f"model.layers.{stage}.mlp.down_proj.weight"])
            assert (m.model.embed_tokens is None, m.lm_head is None) == (stage == 1, stage == 1)
            if stage == 0:
                assert torch.equal(m.lm_head.weight, full["lm_head.weight"])
            names = {n for n, _ in m.named_parameters()}
            assert not any(n.startswith(f"model.layers.{1 - stage}.") for n in names)
    finally:
        layers.set_pipeline_parallel(0, 1)


def test_stage_kv_cache_is_its_own_layers(tiny):
    from pageport.models.layers import stage_layers
    assert [list(stage_layers(30, s, 2)) for s in (0, 1)] == [list(range(15)), list(range(15, 30))]
    assert [len(stage_layers(7, s, 3)) for s in range(3)] == [2, 2, 3]  # the remainder on the last stages
    with pytest.raises(ValueError, match="cannot be split"):
        stage_layers(2, 0, 3)
    # stage 0's LM head worth 8 layers (the default model's 49152 x 576 against 3.5M a layer): 11 + 19
    assert [len(stage_layers(30, s, 2, 8.0)) for s in (0, 1)] == [11, 19]
    assert [len(stage_layers(30, s, 3, 8.0)) for s in range(3)] == [5, 12, 13]
    assert [len(stage_layers(2, s, 2, 8.0)) for s in (0, 1)] == [1, 1]  # every stage keeps a layer
    llm1 = LLM(tiny[0], dtype="float32")
    blocks1 = llm1.engine.core_stats().kv_usable_blocks
    llm1.engine.shutdown()
    llm2 = LLM(tiny[0], dtype="float32", pipeline_parallel_size=2)
    try:  # half the layers per stage: twice the blocks in the same KV budget
        assert llm2.engine.core_stats().kv_usable_blocks >= 2 * blocks1 - 2
    finally:
        llm2.engine.shutdown()


@pytest.mark.timeout(300)
def test_a_killed_stage_fails_the_requests(tiny):
    from pageport.core.client import EngineDeadError
    before = _descendants()
    llm = LLM(tiny[0], pipeline_parallel_size=2, dtype="float32")
    (worker,) = _workers(llm)
    spawned = _descendants() - before
    assert _generate(llm)
    worker.send_signal(signal.SIGKILL)
    _assert_gone({worker.pid}, 10)
    t0 = time.monotonic()
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        for o in outs:
            assert o.outputs[0].finish_reason == "error" and "pipeline worker rank 1" in o.error, o.error
    except EngineDeadError:
        pass
    assert time.monotonic() - t0 < 30
    llm.engine.shutdown()
    _assert_gone(spawned)


def test_pp2_default_model_matches_transformers(chat_prompts, hf_greedy):
    """SmolLM2-135M: 30 layers, 15 a stage."""
    from tests.e2e.conftest import NEW_TOKENS
    llm = LLM(dtype="float32", max_model_len=1024, pipeline_parallel_size=2)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
        for i, (out, ref) in enumerate(zip(outs, hf_greedy)):
            assert out.outputs[0].token_ids == ref, f"prompt {i} diverged"
    finally:
        llm.engine.shutdown()


def test_layer_partition_from_the_environment(monkeypatch):
    from pageport.models.layers import PP_PARTITION_ENV, stage_layers
    monkeypatch.setenv(PP_PARTITION_ENV, "4,26")
    assert [stage_layers(30, s, 2, 8.0) for s in (0, 1)] == [range(0, 4), range(4, 30)]
    for bad in ("4,25", "30,0", "10,10,10"):
        monkeypatch.setenv(PP_PARTITION_ENV, bad)
        with pytest.raises(ValueError, match="must give 2 positive layer counts that sum to 30"):
            stage_layers(30, 0, 2)


def test_pipeline_options():
    from pageport.core.config import EngineConfig
    from pageport.core.executor.mp import check_parallel_options
    from pageport.entrypoints.cli import build_parser

    cfg = EngineConfig.from_cli_args(build_parser().parse_args(["serve", "/m", "-pp", "2"]))
    assert (cfg.pipeline_parallel_size, cfg.world_size, cfg.distributed_executor_backend) == (2, 2, "mp")
    assert EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=3).world_size == 6
    with pytest.raises(ValueError, match="speculative_config is not supported with pipeline_parallel_size 2"):
        check_parallel_options(EngineConfig(pipeline_parallel_size=2, speculative_config={"method": "ngram",
                                                                                        "num_speculative_tokens": 2}))
    cfg = EngineConfig(pipeline_parallel_size=2)
    check_parallel_options(cfg)
    assert cfg.enforce_eager  # a graph would hold the whole forward pass
