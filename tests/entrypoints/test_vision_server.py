"""A vision-language model through the OpenAI server (tiny random LLaVA 1.5, openai client on loopback): image_url
parts as data: URLs and as http URLs (a local http.server) give the offline LLM's and Transformers' greedy tokens,
streaming too; an undecodable image, an unreachable URL and more images than --limit-mm-per-prompt are 400s in
OpenAI's error shape while a concurrent text request completes; image parts to a text-only model are 400s; the
Responses API's input_image parts; a tiny Qwen2-VL's chat image parts (its vision tokens, M-RoPE) against
Transformers."""
from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("PIL.Image")

from live_server import MODEL, ServerThread, free_port  # noqa: E402

from tests.models.tiny_vlm import data_url, hf_greedy_ids, image, make_tiny_llava, png_bytes  # noqa: E402
from tests.models.tiny_vlm import QWEN_IMAGE, hf_qwen2_vl_greedy, make_tiny_qwen2_vl  # noqa: E402

NAME = "tiny-llava"
N = 6


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava-server")
    model, tok, image_id = make_tiny_llava(d)
    return d, model, tok, image_id


@pytest.fixture(scope="module")
def vlm_server(vlm):
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    config = EngineConfig(model=str(vlm[0]), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24,
                          block_size=16, max_num_batched_tokens=24, num_threads=1,
                          limit_mm_per_prompt='{"image": 2}')
    engine = AsyncLLMEngine(LLMEngine(config))
    with ServerThread(build_app(engine, served_model_names=[NAME])) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        srv.aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield srv
    engine.shutdown()
    engine.engine.shutdown()


@pytest.fixture(scope="module")
def offline(vlm):
    from pageport import LLM

    return LLM(str(vlm[0]), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24, block_size=16,
               max_num_batched_tokens=24, num_threads=1, limit_mm_per_prompt={"image": 2})


@pytest.fixture(scope="module")
def image_host():
    """A local http.server: /a.png is image(5), anything else a 404."""
    body = png_bytes(image(5))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/a.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


def _conv(*urls, text="What is in the picture?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _chat_ids(client, conv, **kw) -> list[int]:
    r = client.chat.completions.create(model=NAME, messages=conv, max_tokens=N, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True}, **kw)
    return r.choices[0].token_ids


def _transformers(vlm, conv_text: str, images) -> list[int]:
    from transformers import CLIPImageProcessor

    d, model, tok, image_id = vlm
    text = tok.apply_chat_template([{"role": "user", "content": conv_text}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(image_id) == len(images)
    px = CLIPImageProcessor.from_pretrained(d)(images=images, return_tensors="pt")["pixel_values"]
    return hf_greedy_ids(model, ids, image_id, 16, px, N)


def test_chat_data_url_matches_offline_and_transformers(vlm, vlm_server, offline):
    from pageport import SamplingParams

    a, b = image(1), image(2, (50, 50))
    one, two = _conv(data_url(a)), _conv(data_url(a), data_url(b), text="Compare them.")
    got_one, got_two = _chat_ids(vlm_server.client, one), _chat_ids(vlm_server.client, two)
    sp = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    off = offline.chat([one, two], sp, use_tqdm=False)
    assert got_one == off[0].outputs[0].token_ids == _transformers(vlm, "<image>\nWhat is in the picture?", [a])
    assert got_two == off[1].outputs[0].token_ids == _transformers(vlm, "<image>\n<image>\nCompare them.", [a, b])
    assert got_one != _chat_ids(vlm_server.client, _conv(data_url(image(7))))  # the image steers the output

    # streaming: the same text as the whole response
    full = vlm_server.client.chat.completions.create(model=NAME, messages=one, max_tokens=N, temperature=0,
                                                     extra_body={"ignore_eos": True})
    chunks = list(vlm_server.client.chat.completions.create(model=NAME, messages=one, max_tokens=N, temperature=0,
                                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert full.usage.prompt_tokens > 16  # the placeholder is expanded to the image's 16 features

    import re

    import httpx
    metrics = httpx.get(vlm_server.url + "/metrics").text  # the encoder cache's lookups and hits are exported
    counts = {k: float(v) for k, v in re.findall(r"^pageport:(mm_cache_\w+)_total\{[^}]*\} (\S+)$", metrics, re.M)}
    assert counts["mm_cache_queries"] >= 1 and 0 <= counts["mm_cache_hits"] <= counts["mm_cache_queries"]


def test_chat_http_url_is_fetched(vlm_server, offline, image_host):
    from pageport import SamplingParams

    by_url = _chat_ids(vlm_server.client, _conv(image_host + "/a.png"))
    assert by_url == _chat_ids(vlm_server.client, _conv(data_url(image(5))))
    # offline LLM.chat fetches through the same code
    sp = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    assert offline.chat(_conv(image_host + "/a.png"), sp, use_tqdm=False)[0].outputs[0].token_ids == by_url
    with pytest.raises(openai.BadRequestError) as e:
        _chat_ids(vlm_server.client, _conv(image_host + "/missing.png"))
    assert "HTTP 404" in _error(e.value)["message"]


def _error(e) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error" and e.status_code == 400
    return body["error"]


def test_bad_images_are_400s_while_text_completes(vlm_server):
    import base64

    not_png = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    good = data_url(image(3))
    bad = [_conv(not_png), _conv("http://127.0.0.1:9/x.png"), _conv(good, good, good)]

    async def run():
        c = vlm_server.aclient
        text = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story."}],
                                         max_tokens=N, temperature=0, extra_body={"ignore_eos": True})
        calls = [c.chat.completions.create(model=NAME, messages=m, max_tokens=N, temperature=0) for m in bad]
        return await asyncio.gather(text, *calls, return_exceptions=True)

    text, undecodable, unreachable, too_many = asyncio.run(run())
    assert not isinstance(text, BaseException), text
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == N
    for e in (undecodable, unreachable, too_many):
        assert isinstance(e, openai.BadRequestError), e
    assert "not a decodable image" in _error(undecodable)["message"]
    msg = _error(unreachable)["message"]
    assert "127.0.0.1:9/x.png" in msg and "could not be fetched" in msg
    msg = _error(too_many)["message"]
    assert "At most 2 image(s)" in msg and "--limit-mm-per-prompt" in msg
    # and the server goes on with images
    assert len(_chat_ids(vlm_server.client, _conv(good))) == N


def test_offline_limit_and_unreachable_url(offline):
    from pageport import SamplingParams
    from pageport.core.config import EngineConfig

    sp = SamplingParams(temperature=0, max_tokens=2)
    im = image(4)
    with pytest.raises(ValueError, match=r"At most 2 image\(s\)"):
        offline.generate({"prompt": "<image> <image> <image> hi", "multi_modal_data": {"image": [im, im, im]}}, sp,
                         use_tqdm=False)
    with pytest.raises(ValueError, match="could not be fetched"):
        offline.chat(_conv("http://127.0.0.1:9/x.png"), sp, use_tqdm=False)
    for bad in ('{"image": -1}', '{"picture": 1}', "[1]", "{not json"):
        with pytest.raises(ValueError, match="limit_mm_per_prompt"):
            EngineConfig(limit_mm_per_prompt=bad)
    assert EngineConfig(limit_mm_per_prompt={"image": {"count": 3}}).limit_mm_per_prompt == {"image": 3}
    assert offline.generate({"prompt": "<image> hi", "multi_modal_data": {"image": im}}, sp, use_tqdm=False)


def test_serve_flag_parses():
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "/m", "--limit-mm-per-prompt", '{"image": 3}'])
    assert EngineConfig.from_cli_args(args).limit_mm_per_prompt == {"image": 3}


def test_image_parts_to_text_model_are_400(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=_conv(data_url(image(1))), max_tokens=2)
    err = _error(e.value)
    assert "takes no images" in err["message"] and "vision tower" in err["message"] and err["param"] == "messages"


def test_responses_input_image(vlm_server):
    import httpx

    url = data_url(image(1))
    chat = vlm_server.client.chat.completions.create(model=NAME, messages=_conv(url), max_tokens=N, temperature=0)
    r = httpx.post(vlm_server.url + "/v1/responses", json={
        "model": NAME, "max_output_tokens": N, "temperature": 0,
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                               {"type": "input_text", "text": "What is in the picture?"}]}]},
        timeout=60)
    assert r.status_code == 200, r.text
    texts = [c["text"] for o in r.json()["output"] if o["type"] == "message" for c in o["content"]]
    assert chat.choices[0].message.content and "".join(texts) == chat.choices[0].message.content


def test_fetch_size_limit_and_timeout(image_host):
    import socket

    from pageport.models.multimodal.inputs import fetch_url

    assert fetch_url(image_host + "/a.png") == png_bytes(image(5))
    with pytest.raises(ValueError, match="limit of 100"):
        fetch_url(image_host + "/a.png", max_bytes=100)
    with socket.socket() as s:  # listens, never answers: the read times out
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        with pytest.raises(ValueError, match=r"could not be fetched \(timeout 0.5 s\)"):
            fetch_url(f"http://127.0.0.1:{s.getsockname()[1]}/x.png", timeout=0.5)


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    d = tmp_path_factory.mktemp("qwen2-vl-server")
    model, tok, image_id = make_tiny_qwen2_vl(d)
    config = EngineConfig(model=str(d), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24,
                          block_size=16, max_num_batched_tokens=32, num_threads=1)
    engine = AsyncLLMEngine(LLMEngine(config))
    with ServerThread(build_app(engine, served_model_names=["tiny-qwen2-vl"])) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield srv, d, model, tok, image_id
    engine.shutdown()
    engine.engine.shutdown()


def test_qwen2_vl_chat_image_parts(qwen_server):
    """Two image parts become Qwen2-VL's vision start, image and end tokens each; the tokens are Transformers'."""
    from transformers import AutoImageProcessor

    srv, d, model, tok, image_id = qwen_server
    a, b = image(1), image(2, (18, 55))
    r = srv.client.chat.completions.create(model="tiny-qwen2-vl", messages=_conv(data_url(a), data_url(b),
                                                                                 text="Compare them."),
                                           max_tokens=N, temperature=0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
    text = tok.apply_chat_template([{"role": "user", "content": f"{QWEN_IMAGE}\n{QWEN_IMAGE}\nCompare them."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    proc = AutoImageProcessor.from_pretrained(d)
    assert r.choices[0].token_ids == hf_qwen2_vl_greedy(model, image_id, proc, ids, [a, b], N)
    assert r.usage.prompt_tokens == len(ids) - 2 + sum(int(g.prod()) // 4 for g in
                                                        proc(images=[a, b], return_tensors="pt")["image_grid_thw"])
