"""Tensor parallelism on the CPU over gloo: the `mp` executor's ranks give the greedy tokens of one process and of
Transformers; a dead worker fails the requests in flight instead of hanging; no process outlives its engine."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from pageport import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# mixed lengths: short and long prompts, a shared prefix (a prefix-cache hit), one longer than a block
PROMPTS = [[1, 5, 9, 13], list(range(7, 47)), [42], list(range(7, 27)) + [3, 3, 3], [200, 100, 50, 25, 12, 6, 3],
           list(range(100, 160, 2))]


def _make_llama(path, num_kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama whose 4 heads and 2 KV heads divide over 2 ranks, and Transformers' greedy tokens."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return str(path), _hf_greedy(_make_llama(path, 2))


@pytest.fixture(scope="module")
def tiny_mqa(tmp_path_factory):
    """One KV head for 2 ranks: each rank keeps a replica of it."""
    path = tmp_path_factory.mktemp("tiny-llama-mqa")
    return str(path), _hf_greedy(_make_llama(path, 1))


def _hf_greedy(model) -> list[list[int]]:
    """Argmax continuation by full forward passes (generate's min_new_tokens would mask EOS, which
    ignore_eos does not)."""
    outs = []
    with torch.inference_mode():
        for ids in PROMPTS:
            seq = list(ids)
            for _ in range(GREEDY.max_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(ids):])
    return outs


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _assert_gone(pids: set[int], timeout: float = 15.0) -> None:
    """None of `pids` is left running (a zombie awaiting its reaper counts as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes left behind: {alive}"
        time.sleep(0.2)


def _workers(llm) -> list[psutil.Process]:
    """The engine core's tensor-parallel worker processes."""
    core = psutil.Process(llm.engine.client.proc.pid)
    return [p for p in core.children() if "spawn_main" in " ".join(p.cmdline())]


def _generate(llm) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    assert all(o.error is None for o in outs)
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_matches_tp1_and_transformers(tiny):
    path, hf = tiny
    # a small step budget chunks the long prompts; few blocks force preemptions (the workers' mirrors restart)
    kw = dict(dtype="float32", max_num_batched_tokens=32, num_gpu_blocks_override=12, block_size=8)
    llm1 = LLM(path, **kw)
    one = _generate(llm1)
    llm1.engine.shutdown()
    before = _descendants()
    llm2 = LLM(path, tensor_parallel_size=2, **kw)
    workers = _workers(llm2)
    assert len(workers) == 1  # rank 0 is the engine core itself
    two = _generate(llm2)
    stats = llm2.engine.core_stats()
    assert stats.num_preemptions > 0
    assert two == one
    assert two == hf
    again = _generate(llm2)  # the requests' rows and mirrors were released and are made anew
    assert again == one
    spawned = _descendants() - before
    llm2.engine.shutdown()
    _assert_gone(spawned | {w.pid for w in workers})


def test_one_kv_head_is_replicated_on_both_ranks(tiny_mqa):
    path, hf = tiny_mqa
    llm = LLM(path, tensor_parallel_size=2, dtype="float32")
    try:
        assert _generate(llm) == hf
    finally:
        llm.engine.shutdown()


def test_each_rank_loads_its_shards(tiny_mqa):
    """In one process (no collectives while loading): rank r of 2 holds heads 2r, 2r+1 of q, the single KV head
    whole, its half of o_proj's input features, of the MLP and of the vocabulary."""
    from safetensors.torch import load_file

    from pageport.core.config import EngineConfig
    from pageport.models import layers, load_model
    from pageport.platforms import resolve_platform

    path, _ = tiny_mqa
    full = load_file(os.path.join(path, "model.safetensors"))
    pre = "model.layers.1."
    try:
        for rank in (0, 1):
            layers.set_tensor_parallel(rank, 2)
            cfg = EngineConfig(model=path, dtype="float32", device="cpu")
            platform = resolve_platform("cpu")
            cfg.resolve_dtype(platform.supported_dtypes)
            m = load_model(cfg, platform).model
            attn, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
            assert (attn.num_heads, attn.num_kv_heads, m.num_kv_heads) == (2, 1, 1)
            half = slice(32 * rank, 32 * (rank + 1))  # 2 heads of 16
            q, k, v = attn.qkv_proj.weight.split([32, 16, 16])
            assert torch.equal(q, full[pre + "self_attn.q_proj.weight"][half])
            assert torch.equal(k, full[pre + "self_attn.k_proj.weight"])  # replicated, not split
            assert torch.equal(v, full[pre + "self_attn.v_proj.weight"])
            assert torch.equal(attn.o_proj.weight, full[pre + "self_attn.o_proj.weight"][:, half])
            inter = slice(64 * rank, 64 * (rank + 1))
            gate, up = mlp.gate_up_proj.weight.split([64, 64])
            assert torch.equal(gate, full[pre + "mlp.gate_proj.weight"][inter])
            assert torch.equal(up, full[pre + "mlp.up_proj.weight"][inter])
            assert torch.equal(mlp.down_proj.weight, full[pre + "mlp.down_proj.weight"][:, inter])
            vocab = slice(128 * rank, 128 * (rank + 1))
            assert torch.equal(m.model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab])
            assert torch.equal(m.lm_head.weight, full["lm_head.weight"][vocab])
    finally:
        layers.set_tensor_parallel(0, 1)


@pytest.mark.timeout(300)
def test_a_killed_worker_fails_the_requests(tiny):
    path, _ = tiny
    before = _descendants()
    llm = LLM(path, tensor_parallel_size=2, dtype="float32")
    (worker,) = _workers(llm)
    spawned = _descendants() - before
    assert _generate(llm)  # healthy first
    worker.send_signal(signal.SIGKILL)
    _assert_gone({worker.pid}, 10)
    t0 = time.monotonic()
    from pageport.core.client import EngineDeadError
    try:  # the core fails each request with the worker's death, or is already gone: an error either way
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        for o in outs:
            assert o.outputs[0].finish_reason == "error" and "rank 1" in o.error and "died" in o.error
    except EngineDeadError:
        pass
    assert time.monotonic() - t0 < 30  # no hang
    with pytest.raises(EngineDeadError):  # the core ended with its group; later calls say so at once
        llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False)
    llm.engine.shutdown()
    _assert_gone(spawned)


def test_startup_failure_leaves_no_process():
    """The default model's 9 heads do not divide over 2 ranks: a ValueError, and the worker is stopped."""
    before = _descendants()
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
        LLM(tensor_parallel_size=2, dtype="float32")
    _assert_gone(_descendants() - before)


@pytest.mark.slow
def test_tp3_default_model_matches_transformers(chat_prompts, hf_greedy):
    """SmolLM2-135M: 9 heads and 3 KV heads over 3 ranks."""
    from tests.e2e.conftest import NEW_TOKENS
    llm = LLM(dtype="float32", max_model_len=1024, tensor_parallel_size=3)
    try:
        assert len(_workers(llm)) == 2
        outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
        for i, (out, ref) in enumerate(zip(outs, hf_greedy)):
            assert out.outputs[0].token_ids == ref, f"prompt {i} diverged"
    finally:
        llm.engine.shutdown()


def test_executor_options():
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.cli import build_parser

    assert EngineConfig().distributed_executor_backend == "uni"
    assert EngineConfig(tensor_parallel_size=2).distributed_executor_backend == "mp"
    with pytest.raises(ValueError, match="one process"):
        EngineConfig(tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="tensor_parallel_size and pipeline_parallel_size must be >= 1, got 0 and 1"):
        EngineConfig(tensor_parallel_size=0)
    args = build_parser().parse_args(["serve", "/m", "-tp", "2", "--distributed-executor-backend", "mp"])
    cfg = EngineConfig.from_cli_args(args)
    assert (cfg.tensor_parallel_size, cfg.distributed_executor_backend) == (2, "mp")

    from pageport.core.executor import make_executor
    from pageport.core.executor.mp import check_parallel_options
    import builtins
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # without Ray installed: said at once, with what to install
        mp.setattr(builtins, "__import__", no_ray)
        with pytest.raises(ValueError, match=r"needs Ray: pip install 'pageport\[ray\]'"):
            make_executor(EngineConfig(tensor_parallel_size=2, distributed_executor_backend="ray"), None)
    with pytest.raises(ValueError, match="quantization is not supported with tensor_parallel_size 2"):
        check_parallel_options(EngineConfig(tensor_parallel_size=2, quantization="fp8"))


# the Ray executor, on a Ray instance of its own on loopback --------------------------------------------------------
def _ray_actor_pids() -> list[int]:
    """Live processes of this host that run a rank's Ray actor."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and "_RankActor" in " ".join(p.info["cmdline"] or []):
            pids.append(p.info["pid"])
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` on 127.0.0.1 (2 CPUs, no token: loopback only), RAY_ADDRESS pointing at it, `ray stop`
    after."""
    pytest.importorskip("ray")
    import shutil
    import subprocess
    import sys

    from tests.entrypoints.live_server import free_port
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a loopback instance of this test's own
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120, env=env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)


@pytest.mark.timeout(300)
def test_ray_executor_matches_tp1(tiny, ray_cluster):
    path, hf = tiny
    kw = dict(dtype="float32", max_num_batched_tokens=32, num_gpu_blocks_override=12, block_size=8)
    llm = LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **kw)
    try:
        assert len(_ray_actor_pids()) == 1  # rank 1; rank 0 is the engine core
        out = _generate(llm)
        assert llm.engine.core_stats().num_preemptions > 0
        assert out == hf
        assert _generate(llm) == hf
    finally:
        llm.engine.shutdown()
    _assert_gone(set(_ray_actor_pids()))  # the actor ended with its core


@pytest.mark.timeout(300)
def test_ray_killed_actor_fails_the_requests(tiny, ray_cluster):
    from pageport.core.client import EngineDeadError
    llm = LLM(tiny[0], tensor_parallel_size=2, distributed_executor_backend="ray", dtype="float32")
    try:
        assert _generate(llm)
        (pid,) = _ray_actor_pids()
        os.kill(pid, signal.SIGKILL)
        _assert_gone({pid}, 10)
        t0 = time.monotonic()
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
            for o in outs:
                assert o.outputs[0].finish_reason == "error" and "rank 1" in o.error, o.error
        except EngineDeadError:
            pass
        assert time.monotonic() - t0 < 60  # no hang
        with pytest.raises(EngineDeadError):
            llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False)
    finally:
        llm.engine.shutdown()
