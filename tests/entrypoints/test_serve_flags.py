"""The `pageport serve` flags vLLM users type: parsed under vLLM's names, honoured (API keys, CORS, root path,
TLS, Unix socket, docs, chat template, generation config, parsers), or refused with one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from live_server import free_port

from pageport.entrypoints.cli import build_parser, main
from pageport.entrypoints.serve import UNSUPPORTED, check_serve_args

FAKE = Path(__file__).with_name("fake_engine.py")


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_vllm_spellings():
    a = parse("--model", "/m", "-tp", "1", "-q", "int8", "--max_model_len", "128", "--api-key", "a", "b",
              "--api-key", "c", "--served-model-name", "x", "y", "--disable-log-requests", "--disable-log-stats",
              "--max-log-len", "50", "--tokenizer-mode", "auto", "--generation-config", "vllm")
    assert (a.model_flag, a.tensor_parallel_size, a.quantization, a.max_model_len, a.api_key, a.served_model_name) == (
        "/m", 1, "int8", 128, ["a", "b", "c"], ["x", "y"])


def _engine_flags() -> set[str]:
    import argparse

    from pageport.core.config import EngineConfig
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_args(p)
    return {s for a in p._actions for s in a.option_strings}


@pytest.mark.parametrize("flag, aliases, value", [u for u in UNSUPPORTED if u[0] not in _engine_flags()])
def test_unsupported_flags_are_refused_by_name(flag, aliases, value, capsys):
    argv = [flag] if value is False else [flag, "2"]
    rc = main(["serve", "some-model-path", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"pageport: error: {flag} is not supported by pageport yet"


def test_values_pageport_honours_are_accepted(tmp_path):
    a = parse(str(tmp_path), "--kv-cache-dtype", "auto", "--response-role", "assistant")
    check_serve_args(a)
    assert a.model == str(tmp_path)  # never taken for the flag's value, nor the other way round


@pytest.mark.parametrize("argv, message", [
    (["--max-model-length", "9"], "unknown flag --max-model-length (did you mean --max-model-len?)"),
    (["--tensor-paralel-size", "1"], "did you mean --tensor-parallel-size?"),
    (["-q", "int9"], "invalid choice: 'int9'"),
])
def test_unknown_flags_name_the_closest(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["a", "--model", "b"], "two models given"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral is not supported"),
    (["--structured-outputs-config", '{"backend": "outlines"}'], "backend 'outlines' is not built into"),
    (["--guided-decoding-backend", "xgrammer"], "(did you mean xgrammar?)"),
    (["--enable-auto-tool-choice"], "needs --tool-call-parser"),
    (["--tool-call-parser", "hermez"], "unknown tool-call parser 'hermez'"),
    (["--reasoning-parser", "r1"], "unknown reasoning parser 'r1'"),
    (["--ssl-keyfile", "k.pem"], "go together"),
    (["org/not-cached", "--download-dir", "/nonexistent"], "not in the local Hugging Face cache (/nonexistent)"),
])
def test_bad_combinations_are_one_line(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("pageport: error:")


def test_config_file(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /models/x\nport: 9100\nmax_model_len: 256\nserved_model_name: [a, b]\n"
                   "enable_auto_tool_choice: true\ntool_call_parser: hermes\n")
    a = parse("--config", str(cfg), "--port", "9200")
    assert (a.model_flag, a.port, a.max_model_len, a.served_model_name, a.enable_auto_tool_choice,
            a.tool_call_parser) == ("/models/x", 9200, 256, ["a", "b"], True, "hermes")
    (tmp_path / "bad.yaml").write_text("max_model_length: 3\n")
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path / "bad.yaml"))


def test_chat_template_and_generation_config(tmp_path):
    from pageport.entrypoints.openai.api_server import serving_options

    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_k": 7, "max_new_tokens": 99}')
    o = serving_options(parse(str(tmp_path), "--chat-template", str(tmp_path / "t.jinja"),
                              "--override-generation-config", '{"top_p": 0.5}', "--reasoning-parser", "qwen3"))
    assert o.chat_template == "{{ messages[0].content }}" and o.reasoning_parser == "qwen3"
    assert o.default_sampling == {"temperature": 0.3, "top_k": 7, "top_p": 0.5, "max_tokens": 99}
    assert serving_options(parse(str(tmp_path), "--generation-config", "vllm")).default_sampling == {}
    o = serving_options(parse("--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"))
    assert o.chat_template.startswith("{% for")
    with pytest.raises(FileNotFoundError, match="no such file"):
        serving_options(parse("--chat-template", "missing.jinja"))


class FakeServe:
    """`pageport serve` over the fake engine, in a subprocess."""

    def __init__(self, *flags, env=None, uds=None, scheme="http"):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.uds = uds
        self.proc = subprocess.Popen([sys.executable, str(FAKE), str(self.port), *flags],
                                     env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def client(self, **kw) -> httpx.Client:
        if self.uds:
            return httpx.Client(transport=httpx.HTTPTransport(uds=self.uds), base_url="http://localhost", **kw)
        return httpx.Client(base_url=self.url, **kw)

    def __enter__(self):
        deadline = time.monotonic() + 60
        with self.client(verify=False) as c:
            while True:
                assert self.proc.poll() is None, self.proc.stdout.read()
                try:
                    if c.get("/health", timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_keys_cors_root_path_and_docs():
    flags = ["--api-key", "k1", "k2", "--allowed-origins", '["https://app.example"]', "--root-path", "/api",
             "--disable-fastapi-docs"]
    with FakeServe(*flags, env={"PAGEPORT_API_KEY": "", "VLLM_API_KEY": ""}) as srv, srv.client() as c:
        assert c.get("/v1/models").status_code == 401
        for key in ("k1", "k2"):
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        pre = c.options("/v1/completions", headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == "https://app.example"
        other = c.options("/v1/completions", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        assert c.get("/openapi.json", headers={"Authorization": "Bearer k1"}).status_code == 404
        r = c.post("/v1/completions", headers={"Authorization": "Bearer k1"},
                   json={"prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "tt"


def test_vllm_api_key_env():
    with FakeServe(env={"PAGEPORT_API_KEY": "", "VLLM_API_KEY": "v"}) as srv, srv.client() as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer v"}).status_code == 200


def test_unix_socket(tmp_path):
    sock = str(tmp_path / "s.sock")
    with FakeServe("--uds", sock, uds=sock) as srv, srv.client() as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "fake"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_tls(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    with FakeServe("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), scheme="https") as srv:
        with srv.client(verify=str(cert)) as c:
            assert c.get("/v1/models").status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{srv.port}/v1/models", timeout=2)
