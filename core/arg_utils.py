"""vLLM's argument side, without loading any engine (so `pageport serve --help` stays light): EngineArgs /
AsyncEngineArgs, FlexibleArgumentParser, `--config FILE.yaml`, the closest known flag for an unknown one, Hub
ids resolved from the local Hugging Face cache (never downloaded), and sampling defaults from the model's
generation_config.json."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from pageport.core.config import EngineConfig
from pageport.core.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
# options that only say where the model and its defaults come from
_SOURCE_FIELDS = ("download_dir", "revision", "tokenizer_revision", "generation_config",
                  "override_generation_config", "tokenizer_mode")


def closest(name: str, choices) -> str:
    """ ' (did you mean X?)' for the nearest of `choices`, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# the model's source -------------------------------------------------------------------------------------------
def resolve_hub_model(model: Optional[str], download_dir: Optional[str] = None,
                      revision: Optional[str] = None) -> Optional[str]:
    """A local path for `model`: itself when it exists, else the snapshot of Hub id `org/name` in the local
    Hugging Face cache ($HF_HOME, or `download_dir`). Nothing is downloaded; FileNotFoundError when absent."""
    if model is None or Path(model).expanduser().exists():
        return model
    parts = model.split("/")
    if len(parts) != 2 or not all(parts) or model.startswith((".", "~")):
        return model  # a path that does not exist: the loader says so
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError
    except ImportError:  # pragma: no cover - transformers depends on it
        return model
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True)
    except HFValidationError as e:
        raise FileNotFoundError(f"model {model!r} is neither a local path nor a Hub id: {e}") from None
    except Exception:  # noqa: BLE001 - every "not in the cache" error of huggingface_hub
        where = download_dir or os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
        rev = f" at revision {revision}" if revision else ""
        raise FileNotFoundError(f"model {model!r}{rev} is not in the local Hugging Face cache ({where}); pageport "
                                "never downloads: copy the model there, or give a local folder or .gguf file") \
            from None


def default_sampling_params(model: Optional[str], generation_config: str = "auto",
                            overrides: Optional[dict] = None) -> SamplingParams:
    """SamplingParams from the model's generation_config.json ("auto": the model's folder; "vllm" or "pageport":
    none; else a folder holding one), with `overrides` on top; SamplingParams() when there is none."""
    fields = _generation_defaults(model, generation_config)
    fields.update(overrides or {})
    unknown = set(fields) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise ValueError(f"override_generation_config: unknown sampling fields {', '.join(sorted(unknown))}")
    return SamplingParams(**fields)


_GEN_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def _generation_defaults(model: Optional[str], generation_config: str) -> dict[str, Any]:
    if generation_config in ("vllm", "pageport"):
        return {}
    if generation_config == "auto":
        if model is None:
            return {}
        folder = Path(model).expanduser()
        folder = folder if folder.is_dir() else folder.parent
    else:
        folder = Path(generation_config).expanduser()
    path = folder / "generation_config.json"
    if not path.is_file():
        if generation_config not in ("auto",):
            raise FileNotFoundError(f"no generation_config.json in {folder} (--generation-config)")
        return {}
    raw = json.loads(path.read_text())
    out = {ours: raw[theirs] for theirs, ours in _GEN_KEYS.items() if raw.get(theirs) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


# EngineArgs ---------------------------------------------------------------------------------------------------
class EngineArgs:
    """vLLM's EngineArgs: keyword arguments (EngineConfig's fields, plus the model-source options download_dir,
    revision, generation_config…), `add_cli_args(parser)` and `from_cli_args(args)`."""

    def __init__(self, model: Optional[str] = None, **kwargs):
        unknown = [k for k in kwargs if k not in _CONFIG_FIELDS and k not in _SOURCE_FIELDS]
        if unknown:
            k = unknown[0]
            raise TypeError(f"{type(self).__name__} got an unknown option {k!r}"
                            f"{closest(k, sorted(_CONFIG_FIELDS | set(_SOURCE_FIELDS)))}")
        self.model = model
        self.source = {k: kwargs.pop(k) for k in list(kwargs) if k in _SOURCE_FIELDS}
        self.kwargs = kwargs

    def __getattr__(self, name):
        kwargs, source = self.__dict__.get("kwargs", {}), self.__dict__.get("source", {})
        if name in kwargs:
            return kwargs[name]
        if name in source:
            return source[name]
        if name in _CONFIG_FIELDS:
            return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)
        raise AttributeError(name)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        EngineConfig.add_cli_args(parser, model_positional=False)
        add_source_args(parser)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        values = {k: getattr(args, k) for k in _CONFIG_FIELDS | set(_SOURCE_FIELDS) if hasattr(args, k)}
        return cls(**values)

    def create_engine_config(self) -> EngineConfig:
        model = resolve_hub_model(self.model, self.source.get("download_dir"), self.source.get("revision"))
        check_tokenizer_mode(self.source.get("tokenizer_mode"))
        return EngineConfig(model=model, **self.kwargs)


class AsyncEngineArgs(EngineArgs):
    pass


def add_source_args(parser) -> None:
    """The options that say where the model comes from (shared by EngineArgs and `pageport serve`)."""
    g = parser
    g.add_argument("--download-dir", default=None, help="Hugging Face cache folder to find Hub ids in "
                                                        "(default: $HF_HOME/hub); nothing is downloaded")
    g.add_argument("--revision", default=None, help="the Hub revision (branch, tag or commit) in the cache")
    g.add_argument("--tokenizer-revision", default=None, help="accepted for vLLM's sake; the tokenizer comes from "
                                                              "the model's revision")
    g.add_argument("--tokenizer-mode", default="auto", help="auto or hf (transformers' tokenizer); slow, mistral "
                                                            "and custom are not supported")
    g.add_argument("--generation-config", default="auto",
                   help="default sampling from the model's generation_config.json (auto), none (vllm), or a folder")
    g.add_argument("--override-generation-config", type=json.loads, default=None,
                   help='JSON of sampling defaults over the generation config, e.g. \'{"temperature": 0.5}\'')


def check_tokenizer_mode(mode: Optional[str]) -> None:
    if mode not in (None, "auto", "hf"):
        raise ValueError(f"--tokenizer-mode {mode} is not supported: pageport uses transformers' tokenizer "
                         "(auto or hf)")


# argument parsing ------------------------------------------------------------------------------------------------------
class FlexibleArgumentParser(argparse.ArgumentParser):
    """argparse as vLLM's scripts use it: `--max_model_len` as well as `--max-model-len`, `--config FILE.yaml`
    for any flags, and an unknown flag answered with the closest known one."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(expand_config_file(self, normalize_flags(args)), namespace)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(unknown_flag_message(self, extra))
        return ns


def normalize_flags(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            flag, eq, value = a.partition("=")
            a = flag.replace("_", "-") + eq + value
        out.append(a)
    return out


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings]


def unknown_flag_message(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    flag = next((a.split("=")[0] for a in extra if a.startswith("-")), None)
    if flag is None:
        return f"unrecognized arguments: {' '.join(extra)}"
    return f"unknown flag {flag}{closest(flag, known_flags(parser))}"


def expand_config_file(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """`--config FILE` (YAML: flag names without dashes -> values) becomes those flags, placed before the
    command line's own so that these win."""
    if "--config" not in args and not any(a.startswith("--config=") for a in args):
        return args
    out, files, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        else:
            out.append(a)
        i += 1
    import yaml

    known = set(known_flags(parser))
    from_files: list[str] = []
    for path in files:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            parser.error(f"--config {path}: {e.strerror}")
        except yaml.YAMLError as e:
            parser.error(f"--config {path} is not valid YAML: {e}")
        if not isinstance(data, dict):
            parser.error(f"--config {path} must map flag names to values")
        for key, value in data.items():
            flag = "--" + str(key).replace("_", "-")
            if flag not in known:
                parser.error(f"--config {path}: unknown option {key!r}{closest(flag, known)}")
            if value is True:
                from_files.append(flag)
            elif value is False:
                if "--no-" + flag[2:] in known:
                    from_files.append("--no-" + flag[2:])
            elif isinstance(value, list):
                from_files += [flag] + [str(v) for v in value]
            elif isinstance(value, dict):
                from_files += [flag, json.dumps(value)]
            else:
                from_files += [flag, str(value)]
    return from_files + out


