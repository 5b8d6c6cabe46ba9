"""`pageport generate` starts the engine core before it imports the engine, and hands that same process to the
engine (one core process, not two); a configuration the early core was not started for gets a fresh one."""
import pytest

from pageport.core import core_process
from pageport.core.config import EngineConfig


@pytest.fixture
def spawned(monkeypatch):
    made = []
    real = core_process.CoreProcess.__init__

    def counting(self, config):
        made.append(config)
        real(self, config)

    monkeypatch.setattr(core_process.CoreProcess, "__init__", counting)
    return made


def test_generate_uses_the_core_it_started_early(spawned, capsys, default_tokenizer):
    from pageport.entrypoints.cli import main

    assert main(["generate", "--max-tokens", "4", "--max-model-len", "256", "--kv-cache-memory-bytes",
                 str(64 << 20), "Hello"]) == 0
    assert len(spawned) == 1  # the early one was taken
    assert core_process._early is None
    text = capsys.readouterr().out.strip()
    assert text  # the greedy continuation of "Hello"


def test_a_different_configuration_is_not_given_the_early_core(spawned):
    early = core_process.start_early(EngineConfig(max_model_len=256))
    assert early is not None and len(spawned) == 1
    assert core_process.take(EngineConfig(max_model_len=512)) is None
    assert early.proc.wait(10) is not None  # stopped, not left running
    assert core_process.take(EngineConfig(max_model_len=256)) is None  # taken once at most


def test_no_early_core_in_process(monkeypatch, spawned):
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    assert core_process.start_early(EngineConfig()) is None and not spawned
