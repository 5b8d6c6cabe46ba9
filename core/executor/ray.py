"""The `ray` executor: the tensor-parallel ranks beyond 0 are Ray actors, on this host or across a Ray cluster.

Rank 0 stays in the engine core, as with `mp`: it keeps the scheduler and samples. Ranks 1.. are actors in a
placement group of one bundle per rank (bundle 0, rank 0's own device, on the core's node; on GPUs an actor holds
it, so Ray gives no other rank that GPU). The group joins torch.distributed over TCP at rank 0's address, so the
ranks may live on different hosts. Each step the core puts the same delta as the mp executor into Ray's object
store once, and every actor runs `WorkerRank.step` on it; the collectives line up as with processes.

`ray.init()` joins the cluster that RAY_ADDRESS names, or one started on this host with `ray start`; without one
it starts a local instance, which ends with the core. The actors belong to the core: they end with it.

Failures: an actor that raises or dies resolves its pending call with the error; the core looks before every step,
and when a collective breaks it waits briefly for the call that failed, so the error names the rank.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Optional

import torch

from pageport.core.config import EngineConfig
from pageport.core.executor import ExecutorError, UniExecutor
from pageport.core.executor.mp import (START_TIMEOUT_S, MultiprocExecutor, WorkerRank, _init_rank, check_model,
                                       check_parallel_options)

logger = logging.getLogger(__name__)


class _RankActor:
    """A Ray actor around one `WorkerRank`."""

    def __init__(self, config: EngineConfig, rank: int, level: int):
        import ray
        logging.basicConfig(format=f"%(levelname)s %(asctime)s [tp rank {rank}] %(name)s: %(message)s")
        logging.getLogger("pageport").setLevel(level)
        gpus = ray.get_gpu_ids()
        self.worker = WorkerRank(config, rank, 0 if gpus else None)  # Ray shows the actor its own GPU only

    def where(self) -> tuple[str, int]:
        import ray
        return ray.util.get_node_ip_address(), os.getpid()

    def start(self, world: int, store: str) -> int:
        return self.worker.start(world, store)

    def allocate(self, num_blocks: int) -> None:
        self.worker.allocate(num_blocks)

    def step(self, msg: tuple) -> None:
        self.worker.step(msg)

    def finish(self) -> None:
        self.worker.finish()


class _DeviceHolder:
    """Holds bundle 0's GPU for rank 0 (which is not an actor) and says which one it is."""

    def gpu(self) -> str:
        import ray
        return str(ray.get_gpu_ids()[0])


class RayExecutor(MultiprocExecutor):
    def __init__(self, config: EngineConfig, platform):  # noqa: D107 - the mp executor's start-up over Ray
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        check_parallel_options(config)
        self.config, self.platform = config, platform
        self.world_size = world = config.world_size
        self.kind = "pipeline" if config.pipeline_parallel_size > 1 else "tensor-parallel"
        self._failed: Optional[str] = None
        self._sent: dict[str, list[int]] = {}
        self._released: list[str] = []
        self._pending: list[tuple[int, object]] = []  # (rank, ObjectRef) of calls not yet seen to finish
        self.actors: list = []
        self._where: list[tuple[str, int]] = []
        self._pg = self._holder = None
        self._own_ray = not ray.is_initialized()
        try:
            if self._own_ray:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            gpu = platform.device.type != "cpu"
            unit = {"GPU": 1.0} if gpu else {"CPU": 1.0}
            here = ray.util.get_node_ip_address()
            bundles = [dict(unit) for _ in range(world)]
            bundles[0][f"node:{here}"] = 0.001  # rank 0's device is the core's
            self._pg = placement_group(bundles, strategy="PACK")
            ray.get(self._pg.ready(), timeout=START_TIMEOUT_S)

            def on(bundle: int):
                return PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=bundle)

            if gpu:
                self._holder = ray.remote(_DeviceHolder).options(num_cpus=0, num_gpus=1,
                                                                 scheduling_strategy=on(0)).remote()
                self._set_rank0_device(ray.get(self._holder.gpu.remote(), timeout=START_TIMEOUT_S))
            # the actors take rank 0's threads (Ray would give each one thread)
            env = {"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}}
            level = logging.getLogger("pageport").getEffectiveLevel()
            actor = ray.remote(_RankActor)
            for rank in range(1, world):
                self.actors.append(actor.options(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
                                                 scheduling_strategy=on(rank), runtime_env=env)
                                   .remote(config, rank, level))
            self._where = self._get([(r, a.where.remote()) for r, a in enumerate(self.actors, 1)], START_TIMEOUT_S)
            store = f"tcp://{here}:{_free_port()}"
            self._starts = [(r, a.start.remote(world, store)) for r, a in enumerate(self.actors, 1)]
            _init_rank(config, platform, 0, world, store)
            UniExecutor.__init__(self, config, platform)
            check_model(self.loaded.model, config)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s over Ray: %s", self.kind, self.layout())

    def _set_rank0_device(self, gpu_id: str) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        self.platform.set_device(ids.index(gpu_id) if ids and gpu_id in ids else int(gpu_id))

    def layout(self) -> str:
        actors = ", ".join(f"rank {r} on {ip} pid {pid}" for r, (ip, pid) in enumerate(self._where, 1))
        return (f"{self.world_size} ranks over {self.platform.dist_backend} ({self.platform.name}): rank 0 in the "
                f"engine core (pid {os.getpid()}), Ray actors {actors}")

    # calls -----------------------------------------------------------------------------------------------------
    def _get(self, calls: list[tuple[int, object]], timeout: Optional[float] = None) -> list:
        """The calls' results; ExecutorError naming the rank whose call failed (or whose actor died)."""
        import ray
        results = []
        for rank, ref in calls:
            try:
                results.append(ray.get(ref, timeout=timeout))
            except ray.exceptions.GetTimeoutError:
                raise ExecutorError(f"{self.kind} rank {rank} (Ray actor) did not answer in {timeout:.0f} s") \
                    from None
            except ray.exceptions.RayError as e:
                raise ExecutorError(f"{self.kind} rank {rank} (Ray actor) failed: {_reason(e)}") from None
        return results

    def _reap(self, timeout: float) -> None:
        """Forget the step calls that finished; ExecutorError for one that failed."""
        import ray
        if not self._pending:
            return
        refs = [ref for _, ref in self._pending]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(done)
        finished = [(r, ref) for r, ref in self._pending if ref in done]
        self._pending = [(r, ref) for r, ref in self._pending if ref not in done]
        self._get(finished)

    def profile_num_blocks(self) -> int:
        mine = self.runner.profile_num_blocks()
        return min([mine, *self._get(self._starts, START_TIMEOUT_S)])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        calls = [(r, a.allocate.remote(num_blocks)) for r, a in enumerate(self.actors, 1)]
        self.runner.allocate_kv_cache(num_blocks)
        self._get(calls, START_TIMEOUT_S)

    def execute_model(self, sched, kv, prev=None):
        import ray
        if self._failed is not None:
            raise ExecutorError(self._failed)
        try:
            self._reap(0)
        except ExecutorError as e:
            self._failed = str(e)
            raise
        delta = ray.put(self._delta(sched, kv))
        self._pending += [(r, a.step.remote(delta)) for r, a in enumerate(self.actors, 1)]
        return self._run(sched, kv, prev)

    def _finish_stage0(self) -> None:
        self._pending += [(r, a.finish.remote()) for r, a in enumerate(self.actors, 1)
                          if r < self.config.tensor_parallel_size]

    def _failure(self, exc: Optional[BaseException]) -> ExecutorError:
        try:
            self._reap(5)
            reason = f"{self.kind} step failed: {type(exc).__name__}: {exc}"
        except ExecutorError as e:
            reason = str(e)
        self._failed = reason
        logger.error("%s", reason)
        return ExecutorError(reason)

    def shutdown(self) -> None:
        try:
            import ray
        except ImportError:
            return
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group: nothing left to tidy
                pass
        if not ray.is_initialized():
            return
        for a in [*self.actors, *([self._holder] if self._holder is not None else [])]:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors, self._holder = [], None
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001 - the cluster is gone
                pass
            self._pg = None
        if self._own_ray:
            ray.shutdown()


def _reason(e: BaseException) -> str:
    """A Ray error's cause in one line (a task error carries the actor's own exception)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
