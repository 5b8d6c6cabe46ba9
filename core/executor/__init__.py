"""Executors: where the model runs, and how the engine core drives it.

The engine core calls the same few methods whatever the backend, so one code path serves them all:

    executor.loaded, executor.runner    the model and model runner of rank 0 (in the core process)
    profile_num_blocks() -> int          KV-cache blocks that every rank can hold
    allocate_kv_cache(num_blocks)
    execute_model(sched, kv, prev) -> StepOutput   one step; rank 0's sampled ids
    release(request_id)                  the request left the running set
    shutdown()

`uni` (`UniExecutor`): the model runner in the core process, as with one device. `mp`
(`core/executor/mp.py`): a group of `world_size` processes (tensor-parallel ranks or pipeline stages) over
torch.distributed with the platform's `dist_backend` (gloo on the CPU); the core process is rank 0 and spawns a
worker per further rank. `ray` (`core/executor/ray.py`): the same group, its ranks beyond 0 Ray actors (one host
or a cluster). Data parallelism is above the executors: N engine cores, each with its own group
(`core/dp_client.py`).
"""
from __future__ import annotations

import logging
from typing import Optional

from pageport.core.config import EngineConfig

logger = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
    """A rank other than this one failed or died: the step cannot complete, nor can any later one."""


def _cpu_threads(config: EngineConfig) -> int:
    """Torch threads for each rank on the CPU: the host's cores shared by every rank of every core (unless set)."""
    import os
    ranks = config.world_size * config.data_parallel_size
    if config.num_threads:
        return config.num_threads
    if ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        return max(1, len(os.sched_getaffinity(0)) // ranks)
    return 0  # torch's own choice


def world_layout(config: EngineConfig, platform) -> list[dict]:
    """Every rank of every engine core and where it runs: data-parallel core d's rank r takes device
    d * world_size + r (world_size: tensor x pipeline ranks); on the CPU all share the host's cores."""
    tp, world = config.tensor_parallel_size, config.world_size
    cpu = platform.device.type == "cpu"
    count = None if cpu else platform.device_count()
    rows = []
    for core in range(config.data_parallel_size):
        for rank in range(world):
            index = core * world + rank
            row = {"core": core, "rank": rank, "stage": rank // tp, "tp_rank": rank % tp,
                   "process": "engine core" if rank == 0 else
                   ("Ray actor" if config.distributed_executor_backend == "ray" else "worker")}
            if cpu:
                row["device"] = "cpu"
                row["threads"] = _cpu_threads(config) or None
            else:
                row["device"] = f"{platform.device.type}:{index}" if index < count else None
            rows.append(row)
    return rows


def format_world(config: EngineConfig, platform) -> str:
    """The world layout as `pageport platforms` prints it."""
    rows = world_layout(config, platform)
    head = (f"world on {platform.name}: {config.data_parallel_size} engine core(s) x {config.pipeline_parallel_size} "
            f"pipeline stage(s) x {config.tensor_parallel_size} tensor-parallel rank(s) = {len(rows)} process(es); "
            f"executor {config.distributed_executor_backend}" +
            (f", {platform.dist_backend}" if config.world_size > 1 else ""))
    lines = [head, "CORE  RANK  STAGE  TP  PROCESS      DEVICE"]
    for r in rows:
        where = r["device"] or "missing"
        if r["device"] == "cpu":
            where = f"cpu, {r['threads']} threads" if r["threads"] else "cpu, torch's threads"
        lines.append(f"{r['core']:<5} {r['rank']:<5} {r['stage']:<6} {r['tp_rank']:<3} {r['process']:<12} {where}")
    missing = sum(r["device"] is None for r in rows)
    if missing:
        lines.append(f"{missing} rank(s) lack a device: {len(rows)} needed, {platform.device_count()} visible")
    return "\n".join(lines)


def place_rank(config: EngineConfig, platform, rank: int = 0) -> None:
    """Put this process on its device (see world_layout); on the CPU, set its share of the host's cores."""
    import torch
    if platform.device.type == "cpu":
        threads = _cpu_threads(config)
        if threads and not config.num_threads:  # an explicit num_threads is applied by the platform itself
            torch.set_num_threads(threads)
        return
    world = config.world_size
    index = config.data_parallel_rank * world + rank
    count = platform.device_count()
    if index >= count:
        raise ValueError(f"data-parallel rank {config.data_parallel_rank}, rank {rank} needs "
                         f"{platform.name} device {index}, but {count} are visible "
                         f"(data_parallel_size x world_size = {config.data_parallel_size * world})")
    platform.set_device(index)


def build_runner(config: EngineConfig, platform):
    """Load the model (this rank's shards) and make its runner; fills config.max_model_len and the step's token
    budget. The same in the core process and in every worker, so all ranks agree on both."""
    from pageport.core.model_runner import ModelRunner
    from pageport.models import load_model

    loaded = load_model(config, platform)
    if getattr(config, "enable_lora", False):  # adapter slots on every projection, before profiling and graphs
        from pageport.models.lora import enable_lora
        enable_lora(loaded.model, config.max_loras, config.max_lora_rank, platform.ops)
    if config.max_num_batched_tokens is None:
        budget = platform.default_max_num_batched_tokens
        config.max_num_batched_tokens = budget if config.enable_chunked_prefill else max(budget, config.max_model_len)
    runner = ModelRunner(config, platform, loaded.model)
    if config.pipeline_parallel_size > 1:
        from pageport.models.layers import get_pipeline_parallel, get_tensor_parallel
        (stage, size), (tp_rank, tp) = get_pipeline_parallel(), get_tensor_parallel()
        runner.pipeline = PipelineLink(stage, size, loaded.hf_config.hidden_size, config.dtype, platform.device,
                                       tp_rank, tp)
    return loaded, runner


class PipelineLink:
    """A pipeline stage's point-to-point link. Stage 0 runs its layers, sends (hidden, residual) on and receives
    the last stage's final hidden states, which it turns into logits and samples; stage s > 0 receives from s - 1
    and sends to s + 1, the last one back to stage 0. Every stage builds the same step metadata from the same
    scheduler output, so the shapes need no message of their own. With tensor parallelism inside the stages
    (global rank = stage x tp + tensor-parallel rank) each rank talks to the rank of the same tensor-parallel
    index in the next stage: the hidden states are whole on every rank of a stage after its all-reduce."""

    def __init__(self, stage: int, size: int, hidden_size: int, dtype, device, tp_rank: int = 0, tp: int = 1):
        self.stage, self.size = stage, size
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.prev = (stage - 1) * tp + tp_rank
        self.next = (stage + 1) * tp + tp_rank
        self.first, self.last = tp_rank, (size - 1) * tp + tp_rank

    def _empty(self, *shape):
        import torch
        return torch.empty(*shape, self.hidden_size, dtype=self.dtype, device=self.device)

    def run(self, model, input_ids, positions, kv_caches, attn_metadata):
        """Run this stage's layers on the step. Stage 0 sends (hidden, residual) on without waiting and returns
        the step in flight, whose `wait()` gives the last stage's final hidden states; so stage 0 can launch the
        next micro-batch while later stages work on this one. A later stage returns None once it passed its part
        on. Point-to-point messages between two ranks arrive in order, so the steps need no tags."""
        import torch
        import torch.distributed as dist
        n = input_ids.shape[0]
        if self.stage == 0:
            hidden, residual = model(input_ids, positions, kv_caches, attn_metadata)
            outgoing = torch.stack((hidden, residual))
            final = self._empty(n)
            return _InFlight(dist.isend(outgoing, self.next), dist.irecv(final, self.last), outgoing, final)
        incoming = self._empty(2, n)
        dist.recv(incoming, self.prev)
        out = model(input_ids, positions, kv_caches, attn_metadata, intermediate=(incoming[0], incoming[1]))
        if self.stage == self.size - 1:
            dist.send(out.contiguous(), self.first)
        else:
            dist.send(torch.stack(out), self.next)
        return None


class _InFlight:
    """Stage 0's micro-batch between its send and the last stage's answer (the buffers live until both end)."""

    def __init__(self, send, recv, outgoing, final):
        self.send, self.recv, self.outgoing, self.final = send, recv, outgoing, final

    def wait(self):
        self.recv.wait()
        self.send.wait()
        return self.final


class UniExecutor:
    """One process: the runner lives in the engine core."""

    world_size = 1

    def __init__(self, config: EngineConfig, platform, built=None):
        self.config, self.platform = config, platform
        # built: (loaded, runner) a core made itself (the pooling core's runner)
        self.loaded, self.runner = built or build_runner(config, platform)

    def layout(self) -> str:
        """The world layout, for the start-up log."""
        return f"1 process ({self.platform.name})"

    def profile_num_blocks(self) -> int:
        return self.runner.profile_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute_model(self, sched, kv, prev=None):
        return self.runner.execute(sched, kv, prev)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, platform) -> UniExecutor:
    """The executor `config.distributed_executor_backend` names (EngineConfig settles auto: mp when
    tensor_parallel_size x pipeline_parallel_size > 1)."""
    backend: Optional[str] = config.distributed_executor_backend or "uni"
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'pageport[ray]' (or use "
                             "'mp' on one host)") from None
        from pageport.core.executor.ray import RayExecutor
        return RayExecutor(config, platform)
    if backend == "mp":
        from pageport.core.executor.mp import MultiprocExecutor
        return MultiprocExecutor(config, platform)
    return UniExecutor(config, platform)
