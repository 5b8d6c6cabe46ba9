"""Starting the engine-core process, without importing torch or the engine (cheap for a front end to import).

`start(config)` spawns the fresh interpreter that runs `engine_core.main`; `MPClient` then binds the sockets the
core connects to (ZMQ queues until both ends are up). The CLI calls `start` before it imports the engine, so the
core's imports and model load overlap the front end's own imports and tokenizer load; `take(config)` hands that
process to the `MPClient` made for the same configuration.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Optional


class CoreProcess:
    def __init__(self, config):
        import logging

        self.dir = tempfile.mkdtemp(prefix="pageport-")
        self.in_addr, self.out_addr = f"ipc://{self.dir}/input", f"ipc://{self.dir}/output"
        self.config_bytes = pickle.dumps(config)
        self.started = time.time()
        # a fresh interpreter: fork is unsafe once OpenMP ran here, and multiprocessing's spawn would re-run
        # an unguarded __main__ script
        self.proc = subprocess.Popen([sys.executable, "-c", "from pageport.core.engine_core import main; main()"],
                                     stdin=subprocess.PIPE)
        level = logging.getLogger("pageport").getEffectiveLevel()
        self.proc.stdin.write(pickle.dumps((config, self.in_addr, self.out_addr, os.getpid(), level, self.started)))
        self.proc.stdin.close()


_early: Optional[CoreProcess] = None


def start_early(config) -> Optional[CoreProcess]:
    """Start the core for `config` now, where it will run in a process of its own (the default); None otherwise."""
    global _early
    if os.environ.get("PAGEPORT_ENGINE_INPROC", "0") not in ("", "0", "false") or config.data_parallel_size > 1:
        return None
    discard()
    _early = CoreProcess(config)
    return _early


def take(config) -> Optional[CoreProcess]:
    """The process `start_early` started for this same configuration (once), else None."""
    global _early
    early, _early = _early, None
    if early is not None and early.config_bytes != pickle.dumps(config):
        _stop(early)
        return None
    return early


def discard() -> None:
    global _early
    if _early is not None:
        _stop(_early)
        _early = None


def _stop(early: CoreProcess) -> None:
    import shutil

    early.proc.terminate()
    try:
        early.proc.wait(5)
    except subprocess.TimeoutExpired:
        early.proc.kill()
    shutil.rmtree(early.dir, ignore_errors=True)
