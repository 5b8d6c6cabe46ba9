"""The pooling pieces without a model: parameters, the pooler configuration from sentence-transformers' files, the
runner/convert flags, Matryoshka rules, score pairing and the pooling math."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pageport.core.config import EngineConfig
from pageport.core.pooling import (PoolerConfig, PoolingParams, check_dimensions, classification_activation,
                                   finish_embedding, pool, read_sentence_transformers_pooling, resolve_pooler_config,
                                   tensor_from_bytes, tensor_to_bytes)
from pageport.core.pooling_engine import score_pairs


def _st_folder(tmp_path, modules, pooling=None):
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return tmp_path


TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


@pytest.mark.parametrize("mode, expected", [("pooling_mode_mean_tokens", "MEAN"), ("pooling_mode_cls_token", "CLS"),
                                            ("pooling_mode_lasttoken", "LAST"), ("mean", "MEAN"), ("cls", "CLS"),
                                            ("lasttoken", "LAST")])
def test_sentence_transformers_pooling_modes(tmp_path, mode, expected):
    """Both ways sentence-transformers writes the mode: a flag each (before 6) or `pooling_mode` by name."""
    cfg = {mode: True} if mode.startswith("pooling_mode_") else {"pooling_mode": mode}
    folder = _st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE], {"word_embedding_dimension": 8, **cfg})
    assert read_sentence_transformers_pooling(folder) == {"pooling_type": expected, "normalize": True, "dense": []}
    cfg = resolve_pooler_config(object(), folder, "CLS")
    assert (cfg.pooling_type, cfg.normalize, cfg.source) == (expected, True, "sentence-transformers")


def test_sentence_transformers_without_normalize_and_unsupported_modules(tmp_path):
    folder = _st_folder(tmp_path, [TRANSFORMER, POOLING], {"pooling_mode_mean_tokens": True})
    assert read_sentence_transformers_pooling(folder) == {"pooling_type": "MEAN", "normalize": False, "dense": []}
    dense = dict(POOLING, type="sentence_transformers.models.Dense", path="2_Dense")
    _st_folder(tmp_path, [TRANSFORMER, POOLING, dense])
    assert read_sentence_transformers_pooling(folder)["dense"] == [str(tmp_path / "2_Dense")]
    _st_folder(tmp_path, [TRANSFORMER, POOLING, NORMALIZE, dense])  # a projection after normalising
    with pytest.raises(ValueError, match="Dense module at that place"):
        read_sentence_transformers_pooling(folder)
    _st_folder(tmp_path, [TRANSFORMER, POOLING, dict(POOLING, type="sentence_transformers.models.LayerNorm")])
    with pytest.raises(ValueError, match="LayerNorm"):
        read_sentence_transformers_pooling(folder)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    _st_folder(tmp_path, [TRANSFORMER, POOLING])
    with pytest.raises(ValueError, match="MAX"):
        read_sentence_transformers_pooling(folder)
    assert read_sentence_transformers_pooling(tmp_path / "1_Pooling") is None  # no modules.json: the default


def test_pooler_config_defaults_and_overrides(tmp_path):
    class Hf:
        matryoshka_dimensions = [64, 128]
    cfg = resolve_pooler_config(Hf(), tmp_path, "LAST")
    assert (cfg.pooling_type, cfg.normalize, cfg.is_matryoshka) == ("LAST", True, True)
    cfg = resolve_pooler_config(object(), None, "CLS", '{"pooling_type": "mean", "normalize": false}')
    assert (cfg.pooling_type, cfg.normalize) == ("MEAN", False)
    with pytest.raises(ValueError, match="unknown field"):
        resolve_pooler_config(object(), None, "CLS", '{"pooling": "MEAN"}')
    with pytest.raises(ValueError, match="pooling_type"):
        resolve_pooler_config(object(), None, "CLS", '{"pooling_type": "MAX"}')


def test_matryoshka_rules():
    check_dimensions(None, PoolerConfig(), 384)
    with pytest.raises(ValueError, match="Matryoshka"):
        check_dimensions(64, PoolerConfig(), 384)
    check_dimensions(64, PoolerConfig(is_matryoshka=True), 384)
    with pytest.raises(ValueError, match="larger than the embedding size"):
        check_dimensions(512, PoolerConfig(is_matryoshka=True), 384)
    with pytest.raises(ValueError, match="trained for"):
        check_dimensions(100, PoolerConfig(is_matryoshka=True, matryoshka_dimensions=[64, 128]), 384)


def test_pooling_params_validation():
    for bad in ({"task": "generate"}, {"dimensions": 0}, {"dimensions": True}, {"truncate_prompt_tokens": 0}):
        with pytest.raises(ValueError):
            PoolingParams(**bad)
    assert PoolingParams(truncate_prompt_tokens=-1).clone(task="embed").task == "embed"


def test_runner_flags():
    assert (EngineConfig(task="embed").runner, EngineConfig(task="embed").convert) == ("pooling", "embed")
    assert EngineConfig(task="score").convert == "classify"
    assert EngineConfig(task="generate").runner == "generate"
    with pytest.raises(ValueError, match="unknown task"):
        EngineConfig(task="transcribe")
    with pytest.raises(ValueError, match="runner='pooling'"):
        EngineConfig(runner="generate", convert="embed")


def test_resolve_runner_from_the_architecture(tmp_path):
    from pageport.core.pooling_core import resolve_runner

    def folder(arch):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
        return str(d)

    cases = [("BertModel", "auto", "pooling", "embed"), ("BertForSequenceClassification", "auto", "pooling", "classify"),
             ("XLMRobertaModel", "auto", "pooling", "embed"), ("LlamaForCausalLM", "auto", "generate", "auto"),
             ("Qwen2ForSequenceClassification", "auto", "pooling", "classify")]
    for arch, runner, want_runner, want_convert in cases:
        cfg = EngineConfig(model=folder(arch), runner=runner)
        resolve_runner(cfg)
        assert (cfg.runner, cfg.convert) == (want_runner, want_convert), arch
    cfg = EngineConfig(model=str(tmp_path / "LlamaForCausalLM"), runner="pooling")
    resolve_runner(cfg)
    assert cfg.convert == "embed"  # a decoder as an embedder
    with pytest.raises(ValueError, match="encoder model"):
        resolve_runner(EngineConfig(model=str(tmp_path / "BertModel"), runner="generate"))
    with pytest.raises(ValueError, match="no classification head"):
        resolve_runner(EngineConfig(model=str(tmp_path / "BertModel"), runner="pooling", convert="classify"))


def test_pooling_math():
    h = torch.randn(5, 8)
    assert torch.equal(pool(h, "CLS"), h[0]) and torch.equal(pool(h, "LAST"), h[-1])
    assert torch.allclose(pool(h, "MEAN"), h.mean(0)) and torch.equal(pool(h, "ALL"), h)
    v = finish_embedding(h[0], PoolingParams(dimensions=4), PoolerConfig(normalize=True))
    assert torch.allclose(v, F.normalize(h[0, :4], dim=0))
    assert torch.equal(finish_embedding(h[0], PoolingParams(normalize=False), PoolerConfig()), h[0])
    logits = torch.randn(3)
    assert torch.allclose(classification_activation(logits, PoolingParams()), logits.softmax(-1))
    assert torch.allclose(classification_activation(logits[:1], PoolingParams()), torch.sigmoid(logits[:1]))
    assert torch.equal(classification_activation(logits, PoolingParams(use_activation=False)), logits)
    raw, shape = tensor_to_bytes(h)
    assert torch.equal(tensor_from_bytes(raw, shape), h)


def test_score_pairs():
    assert score_pairs("q", "d") == [("q", "d")]
    assert score_pairs("q", ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert score_pairs(["q"], ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert score_pairs(["q", "r"], ["a", "b"]) == [("q", "a"), ("r", "b")]
    with pytest.raises(ValueError, match="N with N"):
        score_pairs(["q", "r"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one"):
        score_pairs([], ["a"])
