"""Decoder models under the pooling runner: the default model (SmolLM2-135M, its GGUF) as an embedder equals
Transformers' hidden states of the same file (float32), alone and in mixed batches; a tiny random
LlamaForSequenceClassification equals Transformers' scores."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEFAULT_GGUF, default_model_dir

PROMPTS = ["The capital of France is", "hi", "Paged attention keeps the KV cache in fixed-size blocks, so a "
           "sequence's memory grows one block at a time and nothing is reserved up front.", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def embedder():
    from pageport import LLM
    default_model_dir()  # skips when the default model is not installed
    llm = LLM(runner="pooling", dtype="float32", max_model_len=256, num_threads=1)
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def hf_hidden(embedder):
    """Transformers' last hidden states (after the final norm) of each prompt's token ids."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF, dtype=torch.float32).eval()
    tok = embedder.get_tokenizer()
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p)
            out.append((ids, model(torch.tensor([ids])).last_hidden_state[0]))
    return out


def test_default_model_embeds_as_transformers(embedder, hf_hidden):
    cfg = embedder.engine.config
    assert (cfg.runner, cfg.convert) == ("pooling", "embed")
    info = embedder.engine.client.info["pooling"]
    assert info["pooler"]["pooling_type"] == "LAST" and info["pooler"]["normalize"]
    outs = embedder.embed(PROMPTS, use_tqdm=False)
    for (ids, h), o in zip(hf_hidden, outs):
        assert o.prompt_token_ids == ids
        ref = F.normalize(h[-1], dim=0)
        got = torch.tensor(o.outputs.embedding)
        assert F.cosine_similarity(got, ref, dim=0) >= 0.9999
        assert torch.allclose(got, ref, atol=1e-4)
    # every token's state (any pooling is a function of these), unnormalised
    from pageport import PoolingParams
    tokens = embedder.encode(PROMPTS, PoolingParams(normalize=False), pooling_task="token_embed", use_tqdm=False)
    for (ids, h), o in zip(hf_hidden, tokens):
        assert o.outputs.data.shape == h.shape
        assert torch.allclose(o.outputs.data, h, atol=1e-3, rtol=1e-4), (o.outputs.data - h).abs().max()
        last = embedder.encode({"prompt_token_ids": ids}, PoolingParams(normalize=False), use_tqdm=False)
        assert torch.allclose(last[0].outputs.data, h[-1], atol=1e-3, rtol=1e-4)


def test_mixed_batch_equals_alone(embedder):
    alone = [torch.tensor(embedder.embed(p, use_tqdm=False)[0].outputs.embedding) for p in PROMPTS]
    mixed = PROMPTS * 3  # several requests of each length in one step, over scattered KV blocks
    together = embedder.embed(mixed, use_tqdm=False)
    for i, o in enumerate(together):
        assert torch.allclose(torch.tensor(o.outputs.embedding), alone[i % len(PROMPTS)], atol=1e-5)


def test_generation_refused_on_a_pooling_model(embedder):
    with pytest.raises(ValueError, match="does not generate"):
        embedder.generate("hi")


def test_decoder_sequence_classifier(tmp_path, monkeypatch):
    """--convert classify on the Llama family reads the checkpoint's `score` head (LlamaForSequenceClassification)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pageport import LLM
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=3,
                      pad_token_id=0)
    hf = LlamaForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_threads=1, block_size=4)
    assert (llm.engine.config.runner, llm.engine.config.convert) == ("pooling", "classify")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (3, 17, 9)]
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    with torch.inference_mode():
        for p, o in zip(prompts, outs):
            ref = hf(torch.tensor([p])).logits[0].softmax(-1)
            assert torch.allclose(torch.tensor(o.outputs.probs), ref, atol=1e-5)
