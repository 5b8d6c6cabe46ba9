"""LoRA adapters on the server: `--lora-modules` at start-up, each adapter a model name of its own (listed in
/v1/models with the base model as its parent, chosen by a request's `model`), and, when
$VLLM_ALLOW_RUNTIME_LORA_UPDATING (or $PAGEPORT_ALLOW_RUNTIME_LORA_UPDATING) is true, POST /v1/load_lora_adapter
and /v1/unload_lora_adapter while requests run. A bad adapter is a 400 and touches no other request; an adapter
unloaded mid-request serves that request to its end."""
from __future__ import annotations

import itertools
import json
import os
from typing import Optional

from pydantic import BaseModel

from pageport.core.lora import LoRARequest
from pageport.entrypoints.openai.errors import APIError, bad_request

RUNTIME_UPDATES_ENV = ("PAGEPORT_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: Optional[int] = None


def parse_lora_modules(values: Optional[list[str]]) -> list[tuple[str, str, Optional[str]]]:
    """--lora-modules: `name=path` or JSON `{"name": ..., "path": ..., "base_model_name": ...}`, each."""
    out = []
    for v in values or ():
        if v.lstrip().startswith("{"):
            try:
                d = json.loads(v)
                out.append((d["name"], d["path"], d.get("base_model_name")))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--lora-modules {v!r}: a JSON module needs \"name\" and \"path\"") from None
        else:
            name, sep, path = v.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {v!r}: give name=path (or a JSON object)")
            out.append((name, path, None))
    return out


def runtime_updates_allowed() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in RUNTIME_UPDATES_ENV)


class LoRAModels:
    """The adapters this server answers to, by model name."""

    def __init__(self, engine, base_names: list[str]):
        self.engine, self.base_names = engine, base_names
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def _check(self, name: str) -> None:
        if not getattr(self.engine.config, "enable_lora", False):
            raise bad_request("this server runs without LoRA adapters (start it with --enable-lora)", "lora_name")
        if name in self.by_name or name in self.base_names:
            raise bad_request(f"the model name {name!r} is taken (a LoRA adapter of that name is loaded, or it is "
                              "the base model's)", "lora_name")

    def add_at_start(self, name: str, path: str, base: Optional[str] = None) -> None:
        """An adapter of --lora-modules, before the server takes requests (ValueError if it is bad)."""
        self._check(name)
        req = LoRARequest(name, next(self._ids), path, base)
        self.engine.run_in_engine(lambda e, r: e.add_lora(r), req).result()
        self.by_name[name] = req

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        self._check(body.lora_name)
        if not body.lora_path:
            raise bad_request("lora_path is empty", "lora_path")
        req = LoRARequest(body.lora_name, next(self._ids), body.lora_path)
        try:
            await self.engine.add_lora(req)
        except ValueError as e:
            raise bad_request(str(e), "lora_path") from None
        self.by_name[body.lora_name] = req
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        req = self.by_name.get(body.lora_name)
        if req is None or (body.lora_int_id is not None and body.lora_int_id != req.lora_int_id):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name",
                           "model_not_found")
        del self.by_name[body.lora_name]  # new requests no longer find it; running ones finish with it
        await self.engine.remove_lora(req.lora_int_id)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def cards(self, created: int, max_model_len: int) -> list[dict]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "pageport", "root": r.lora_path,
                 "parent": r.base_model_name or self.base_names[0], "max_model_len": max_model_len,
                 "permission": []} for name, r in self.by_name.items()]


def register_lora_routes(app, loras: LoRAModels, errors: dict) -> None:
    from fastapi.responses import PlainTextResponse

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=errors)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        return await loras.load(body)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=errors)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        return await loras.unload(body)
