"""LoRA in the engine core, on a tiny random Llama with PEFT adapters (float32, in process so that the core's
state can be read): more adapters than slots in one batch still give each row PEFT's greedy tokens, the
scheduler never runs more adapters than slots, an adapter unloaded mid-request serves that request to its end
and is read again by a later one."""
import pytest

pytest.importorskip("peft")

from pageport.core.config import EngineConfig  # noqa: E402
from pageport.core.engine import LLMEngine  # noqa: E402
from pageport.core.lora import LoRARequest  # noqa: E402
from pageport.core.sampling_params import SamplingParams  # noqa: E402
from tests.models.tiny_lora import ALL, greedy, make_adapter, make_tiny_llama  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    hf = make_tiny_llama(base)
    refs = {0: hf}
    loras = {}
    for i, (r, targets) in enumerate([(8, None), (4, ["k_proj", "up_proj"]), (2, ["o_proj", "down_proj"])], 1):
        folder = tmp_path_factory.mktemp(f"lora{i}")
        refs[i] = make_adapter(base, folder, r, targets or ALL, seed=i)
        loras[i] = LoRARequest(f"a{i}", i, str(folder))
    return base, refs, loras


def _engine(base, **kw):
    cfg = EngineConfig(model=str(base), dtype="float32", enable_lora=True, max_lora_rank=8, max_num_seqs=8,
                       kv_cache_memory_bytes=1 << 22, block_size=8, num_threads=1, **kw)
    return LLMEngine(cfg, multiprocess=False)


def _run(engine, ids: dict, every_step=None) -> dict:
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.engine_request_id] = list(o.outputs[0].token_ids)
        if every_step is not None:
            every_step()
    return {k: out[v] for k, v in ids.items()}


def test_more_adapters_than_slots(tiny):
    base, refs, loras = tiny
    engine = _engine(base, max_loras=1, max_cpu_loras=2)
    core = engine.core
    seen = []

    def watch():
        seen.append({r.lora_id for r in core.scheduler.running if r.lora_id})

    prompts = [[3, 9, 27, 81 % 128], [5, 7, 11], [100, 2, 64, 1, 8], [42, 42, 17]]
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    ids = {}
    for k, p in enumerate(prompts):
        for lid in (0, 1, 2, 3):
            ids[(k, lid)] = engine.add_request(None, p, params, lora_request=loras.get(lid))
    got = _run(engine, ids, watch)
    for (k, lid), toks in got.items():
        assert toks == greedy(refs[lid], prompts[k], N), (k, lid)
    assert len({tuple(got[(0, lid)]) for lid in range(4)}) == 4  # every adapter changes the output
    assert max(len(s) for s in seen) == 1  # one slot: one adapter in the running set at a time
    assert core.loras.num_loads >= 3  # and the slot was rewritten as adapters took turns
    assert len(core.loras.host) <= 2  # max_cpu_loras


def test_unload_mid_request_and_reload(tiny):
    base, refs, loras = tiny
    engine = _engine(base, max_loras=2)
    core = engine.core
    params = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    p = [7, 1, 2, 3, 4]
    rid = engine.add_request(None, p, params, lora_request=loras[1])
    engine.step()
    engine.step()
    assert engine.has_unfinished_requests()
    assert engine.remove_lora(1)
    assert 1 not in engine.list_loras()
    assert 1 in core.loras.host  # still used: dropped once its request ends
    got = _run(engine, {"a": rid})["a"]
    assert got == greedy(refs[1], p, N)
    assert 1 not in core.loras.host and 1 not in core.loras.slot_of
    assert not engine.remove_lora(1)  # gone already
    # loaded again by the next request that names it
    rid = engine.add_request(None, p, params, lora_request=loras[1])
    assert _run(engine, {"a": rid})["a"] == got
    # and a request without LoRA on a LoRA engine is the base model's
    rid = engine.add_request(None, p, params)
    assert _run(engine, {"a": rid})["a"] == greedy(refs[0], p, N)


def test_lora_off_refuses_adapters(tiny):
    base, _, loras = tiny
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", kv_cache_memory_bytes=1 << 22, block_size=8,
                                    num_threads=1), multiprocess=False)
    with pytest.raises(ValueError, match="enable_lora"):
        engine.add_request(None, [1, 2, 3], SamplingParams(max_tokens=2), lora_request=loras[1])
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig(model=str(base), enable_lora=True, max_loras=2, max_cpu_loras=1)
