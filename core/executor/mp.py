"""The `mp` executor: a tensor-parallel group of processes on one host.

The engine core's process is rank 0: it keeps the scheduler, the sampler and everything that reads request state
on the host (grammars, logits processors), and its `StepOutput` is the one the core reads, exactly as with `uni`.
It spawns one worker process per further rank. Every rank builds the platform, joins a torch.distributed group
(the platform's `dist_backend`, gloo on the CPU; a file store in a temporary folder, so no port is needed), loads
only its shards of the checkpoint (`models/layers.py` narrows each full tensor to the rank's slice), and owns a
model runner and a KV cache of the same number of blocks.

Each step the core sends every worker what changed since the last one (`_StepDelta`): new requests, the tokens and
KV blocks the scheduled ones gained, the requests that left. A worker keeps mirror `Request`s from these and runs
the same `ModelRunner.execute`, so the collectives inside the model (the all-reduce after each row-parallel
linear, the all-gather of the vocabulary-parallel LM head) line up across ranks. Workers compute logits but do not
sample: rank 0's sampled ids are the step's.

Failures: a worker that raises reports its traceback over its pipe and exits; one that dies closes its sockets, so
the collective rank 0 waits in raises; either way `execute_model` raises `ExecutorError` naming the rank, and the
core fails every request in flight with it. A worker whose core is gone exits (parent-death signal, and a
check of its parent every second while idle); `shutdown` stops and reaps them all.
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import pickle
import shutil
import tempfile
import time
import traceback
import weakref
from typing import Optional

import torch

from pageport.core.config import EngineConfig
from pageport.core.executor import ExecutorError, UniExecutor, build_runner, place_rank
from pageport.core.model_runner import PendingStep

logger = logging.getLogger(__name__)

# seconds a collective may wait for the other ranks (a rank that is alive but stuck), and for a worker's start
DIST_TIMEOUT_S = float(os.environ.get("PAGEPORT_DIST_TIMEOUT", "300"))
START_TIMEOUT_S = float(os.environ.get("PAGEPORT_WORKER_START_TIMEOUT", "600"))


def check_parallel_options(config: EngineConfig) -> None:
    """Options whose code paths are not split over ranks (or not tested so) are refused at world size > 1."""
    what = (f"pipeline_parallel_size {config.pipeline_parallel_size}" if config.pipeline_parallel_size > 1
            else f"tensor_parallel_size {config.tensor_parallel_size}")
    refused = [("quantization", config.quantization), ("speculative_config", config.speculative_config),
               ("limit_mm_per_prompt", config.limit_mm_per_prompt),
               ("enable_lora", getattr(config, "enable_lora", False))]
    for name, value in refused:
        if value:
            raise ValueError(f"{name} is not supported with {what} yet")
    if config.pipeline_parallel_size > 1 and not config.enforce_eager:
        logger.info("pipeline parallelism: no graphs (each stage runs eagerly)")
        config.enforce_eager = True  # a captured graph would hold the whole model's forward pass


def check_model(model: torch.nn.Module, config: EngineConfig) -> None:
    """Tensor and pipeline parallelism are built and tested for the dense Llama family (models/llama.py)."""
    from pageport.models.llama import LlamaForCausalLM, LlamaModel
    from pageport.models.moe import FusedMoE
    what = (f"pipeline_parallel_size {config.pipeline_parallel_size}" if config.pipeline_parallel_size > 1
            else f"tensor_parallel_size {config.tensor_parallel_size}")
    if not isinstance(model, LlamaForCausalLM) or getattr(model, "supports_multimodal", False) or (
            config.pipeline_parallel_size > 1 and type(model.model) is not LlamaModel):
        raise ValueError(f"{what} is supported for the Llama family's dense decoders only, "
                         f"not {type(model).__name__}")
    if any(isinstance(m, FusedMoE) for m in model.modules()):
        raise ValueError(f"{what} is not supported for mixture-of-experts models yet")


def _init_rank(config: EngineConfig, platform, rank: int, world: int, store: str) -> None:
    """Join the group and tell the model layers this rank's place in it (before the model is built)."""
    from pageport.models.layers import set_pipeline_parallel, set_tensor_parallel
    torch.distributed.init_process_group(platform.dist_backend, init_method=store, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    stage, tp_rank = divmod(rank, tp)  # a stage's tensor-parallel ranks are neighbours
    group = None
    if pp > 1:
        set_pipeline_parallel(stage, pp)
        if tp > 1:  # each stage's own group for its all-reduces (every rank makes every group, in order)
            groups = [torch.distributed.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
            group = groups[stage]
    set_tensor_parallel(tp_rank, tp, lambda x: platform.all_reduce(x, group), group)


class _Block:
    """What the runner reads of a KV block (`kv.req_blocks[rid][i].block_id`)."""
    __slots__ = ("block_id",)

    def __init__(self, block_id: int):
        self.block_id = block_id


class _BlockView:
    """A worker's stand-in for the KV-cache manager: each request's blocks, as the core sent them."""

    def __init__(self):
        self.req_blocks: dict[str, list[_Block]] = {}


class _Worker:
    def __init__(self, rank: int, proc, conn):
        self.rank, self.proc, self.conn = rank, proc, conn


class MultiprocExecutor(UniExecutor):
    def __init__(self, config: EngineConfig, platform):
        import multiprocessing

        check_parallel_options(config)
        self.world_size = world = config.world_size
        self.kind = "pipeline" if config.pipeline_parallel_size > 1 else "tensor-parallel"
        self._dir = tempfile.mkdtemp(prefix="pageport-tp-")
        store = f"file://{self._dir}/store"
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: fork is unsafe once OpenMP ran here
        self.workers: list[_Worker] = []
        self._failed: Optional[str] = None
        self._sent: dict[str, list[int]] = {}  # request id -> [tokens, blocks] the workers have of it
        self._released: list[str] = []
        level = logging.getLogger("pageport").getEffectiveLevel()
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, self._dir)
        try:
            for rank in range(1, world):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(config, rank, world, store, child_end, os.getpid(),
                                                              level),
                                   name=f"pageport-tp{rank}", daemon=True)
                proc.start()
                child_end.close()
                self.workers.append(_Worker(rank, proc, parent_end))
            for w in self.workers:  # each built its platform: joining the group cannot wait on a dead rank now
                self._expect(w, "hello", START_TIMEOUT_S)
            _init_rank(config, platform, 0, world, store)
            super().__init__(config, platform)
            check_model(self.loaded.model, config)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s: %s", "pipeline parallelism" if config.pipeline_parallel_size > 1 else
                    "tensor parallelism", self.layout())

    def layout(self) -> str:
        pids = ", ".join(f"rank {w.rank} pid {w.proc.pid}" for w in self.workers)
        return (f"{self.world_size} ranks over {self.platform.dist_backend} ({self.platform.name}): rank 0 in the "
                f"engine core (pid {os.getpid()}), {pids}")

    # start-up ------------------------------------------------------------------------------------------------
    def _expect(self, w: _Worker, tag: str, timeout: float):
        """The worker's next message, which must be `tag`; ExecutorError if it fails, dies or stays silent."""
        deadline = time.monotonic() + timeout
        while True:
            if w.conn.poll(0.2):
                try:
                    msg = w.conn.recv()
                except EOFError:
                    raise self._dead(w) from None
                if msg[0] == "error":
                    raise ExecutorError(f"{self.kind} rank {w.rank} failed: {msg[1]}")
                if msg[0] == tag:
                    return msg
            elif not w.proc.is_alive():
                raise self._dead(w)
            elif time.monotonic() > deadline:
                raise ExecutorError(f"{self.kind} rank {w.rank} did not report {tag!r} in {timeout:.0f} s")

    def _dead(self, w: _Worker) -> ExecutorError:
        w.proc.join(1)
        code = w.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return ExecutorError(f"{self.kind} worker rank {w.rank} (pid {w.proc.pid}) died ({how})")

    def profile_num_blocks(self) -> int:
        mine = self.runner.profile_num_blocks()
        theirs = [self._expect(w, "blocks", START_TIMEOUT_S)[1] for w in self.workers]
        return min([mine, *theirs])  # every rank must hold every block the scheduler hands out

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send(("allocate", num_blocks))
        self.runner.allocate_kv_cache(num_blocks)
        for w in self.workers:
            self._expect(w, "ready", START_TIMEOUT_S)

    # steps -----------------------------------------------------------------------------------------------------
    def _finish_stage0(self) -> None:
        """Tell stage 0's tensor-parallel workers to end their oldest step in flight (its LM head is a collective:
        they must end the steps in rank 0's order, between the same launches)."""
        data = pickle.dumps(("finish",))
        for w in self.workers[:self.config.tensor_parallel_size - 1]:
            try:
                w.conn.send_bytes(data)
            except (BrokenPipeError, ConnectionError, OSError):
                raise self._failure(None) from None

    def _send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.workers:
            try:
                w.conn.send_bytes(data)
            except (BrokenPipeError, ConnectionError, OSError):
                raise self._failure(None) from None

    def _delta(self, sched, kv) -> tuple:
        """What the workers need to mirror this step: per scheduled request (id, (prompt length, params, eos) the
        first time, tokens it gained, whether its block list restarts, block ids it gained, computed tokens,
        tokens this step, samples, proposals), and the ids released since the last step."""
        entries = []
        for s in sched.scheduled:
            r = s.request
            rid = r.request_id
            sent = self._sent.get(rid)
            head = None
            if sent is None:
                sent = self._sent[rid] = [0, 0]
                head = (r.num_prompt_tokens, r.params, r.eos_token_id)
            toks = r.token_ids[sent[0]:] if len(r.token_ids) > sent[0] else []
            blocks = kv.req_blocks[rid]
            reset = len(blocks) < sent[1]
            new_blocks = [b.block_id for b in (blocks if reset else blocks[sent[1]:])]
            sent[0], sent[1] = len(r.token_ids), len(blocks)
            entries.append((rid, head, toks, reset, new_blocks, r.num_computed_tokens, s.num_tokens, s.samples,
                            list(s.spec_token_ids)))
        released, self._released = self._released, []
        return ("step", released, entries)

    def execute_model(self, sched, kv, prev=None):
        if self._failed is not None:
            raise ExecutorError(self._failed)
        for w in self.workers:
            if not w.proc.is_alive() or w.conn.poll():  # died, or reported a failure, since the last step
                raise self._failure(None)
        self._send(self._delta(sched, kv))
        return self._run(sched, kv, prev)

    def _run(self, sched, kv, prev):
        """Rank 0's part of the step. A broken collective, now or when a pipelined step ends, is reported as the
        failure of the rank that caused it."""
        try:
            out = self.runner.execute(sched, kv, prev)
        except Exception as e:  # noqa: BLE001 - a collective broke: find out which rank and why
            raise self._failure(e) from e
        if isinstance(out, PendingStep):
            finish = out.result

            def guarded():
                try:
                    self._finish_stage0()  # stage 0's other tensor-parallel ranks end it with rank 0
                    return finish()
                except Exception as e:  # noqa: BLE001 - as above
                    raise self._failure(e) from e
            out = PendingStep(guarded)
        return out

    def _failure(self, exc: Optional[BaseException]) -> ExecutorError:
        """The error that ends the group: the worker that failed (waiting briefly for it to show), else `exc`."""
        deadline = time.monotonic() + 5
        reason = None
        while reason is None and time.monotonic() < deadline:
            for w in self.workers:
                if w.conn.poll():
                    try:
                        msg = w.conn.recv()
                        if msg[0] == "error":
                            reason = f"{self.kind} rank {w.rank} failed: {msg[1]}"
                            break
                    except (EOFError, OSError):
                        pass
                if not w.proc.is_alive():
                    reason = str(self._dead(w))
                    break
            else:
                time.sleep(0.05)
        if reason is None:
            reason = f"{self.kind} step failed: {type(exc).__name__}: {exc}"
        self._failed = reason
        logger.error("%s", reason)
        return ExecutorError(reason)

    def release(self, request_id: str) -> None:
        self.runner.release(request_id)
        if self._sent.pop(request_id, None) is not None:
            self._released.append(request_id)

    def shutdown(self) -> None:
        self._finalizer()
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group: nothing left to tidy
                pass


def _stop_workers(workers: list[_Worker], folder: str) -> None:
    for w in workers:
        try:
            w.conn.send_bytes(pickle.dumps(("stop",)))
        except Exception:  # noqa: BLE001 - already gone
            pass
    for w in workers:
        w.proc.join(5)
        if w.proc.is_alive():
            w.proc.terminate()
            w.proc.join(3)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(1)
        w.conn.close()
    shutil.rmtree(folder, ignore_errors=True)


# the worker process ---------------------------------------------------------------------------------------------
class _LogitsOnly:
    """A worker's sampler: the logits are computed on every rank (the LM head's all-gather), sampled on rank 0."""
    logits_processors = None

    def __call__(self, logits: torch.Tensor, requests):
        from pageport.core.sampler import SamplerOutput
        n = len(requests)
        return SamplerOutput(torch.zeros(n, dtype=torch.long, device=logits.device), [None] * n, [0.0] * n)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the engine core dies, however it dies."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere the idle loop's parent check remains
        pass


def _recv(conn, parent_pid: int):
    while not conn.poll(1.0):
        if os.getppid() != parent_pid:  # the core is gone
            os._exit(0)
    return pickle.loads(conn.recv_bytes())


class WorkerRank:
    """A rank other than 0: its platform, runner and KV cache, and mirror `Request`s made from the core's
    deltas. The `mp` executor drives it over a pipe (`_worker_main`), the `ray` one through a Ray actor's calls;
    the steps are the same."""

    def __init__(self, config: EngineConfig, rank: int, device_index: Optional[int] = None):
        from pageport.platforms import resolve_platform
        self.config, self.rank = config, rank
        self.platform = platform = resolve_platform(config.device)
        config.resolve_dtype(platform.supported_dtypes)
        platform.check_config(config)
        if device_index is None:
            place_rank(config, platform, rank)
        else:  # a device another scheduler (Ray) assigned
            platform.set_device(device_index)
        platform.seed(config.seed)
        self.runner = None
        self.kv, self.reqs = _BlockView(), {}
        self.flight = collections.deque()  # pipeline stage 0, tensor-parallel rank > 0: its steps in flight

    def start(self, world: int, store: str) -> int:
        """Join the group, load this rank's shards; the KV blocks this rank can hold."""
        _init_rank(self.config, self.platform, self.rank, world, store)
        _, self.runner = build_runner(self.config, self.platform)
        self.runner.sampler = _LogitsOnly()
        return self.runner.profile_num_blocks()

    def allocate(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def step(self, msg: tuple) -> None:
        """Mirror what changed (`MultiprocExecutor._delta`) and run the same step as rank 0."""
        from pageport.core.request import Request
        from pageport.core.scheduler import ScheduledRequest, SchedulerOutput

        _, released, entries = msg
        kv, reqs = self.kv, self.reqs
        for rid in released:
            self.runner.release(rid)
            reqs.pop(rid, None)
            kv.req_blocks.pop(rid, None)
        scheduled = []
        for rid, head, toks, reset, new_blocks, computed, n, samples, spec in entries:
            r = reqs.get(rid)
            if r is None:
                num_prompt, params, eos = head
                r = reqs[rid] = Request(rid, toks[:num_prompt], params, eos)
                r.token_ids = list(toks)
                kv.req_blocks[rid] = []
            elif toks:
                r.token_ids += toks
            blocks = kv.req_blocks[rid]
            if reset:
                blocks.clear()
            blocks += [_Block(b) for b in new_blocks]
            r.num_computed_tokens = computed
            scheduled.append(ScheduledRequest(r, n, samples, spec))
        out = self.runner.execute(SchedulerOutput(scheduled), self.kv)
        if isinstance(out, PendingStep):
            self.flight.append(out)

    def finish(self) -> None:
        """End the oldest step in flight (rank 0 ends its own at the same point)."""
        self.flight.popleft().result()


def _worker_main(config: EngineConfig, rank: int, world: int, store: str, conn, parent_pid: int, level: int) -> None:
    import signal
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's to handle
    logging.basicConfig(format=f"%(levelname)s %(asctime)s [tp rank {rank}] %(name)s: %(message)s")
    logging.getLogger("pageport").setLevel(level)
    try:
        worker = WorkerRank(config, rank)
        conn.send(("hello",))
        conn.send(("blocks", worker.start(world, store)))
        msg = _recv(conn, parent_pid)
        if msg[0] != "allocate":
            os._exit(0)
        worker.allocate(msg[1])
        conn.send(("ready",))
        while True:
            msg = _recv(conn, parent_pid)
            if msg[0] == "step":
                worker.step(msg)
            elif msg[0] == "finish":
                worker.finish()
            else:
                break
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which fails the requests with it
        logging.getLogger(__name__).error("rank %d failed:\n%s", rank, traceback.format_exc())
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001 - the core is gone too
            pass
        os._exit(1)
    os._exit(0)
