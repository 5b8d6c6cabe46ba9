"""The pooling routes: POST /v1/embeddings (OpenAI's), /pooling, /classify, /score and /v1/score, /rerank,
/v1/rerank and /v2/rerank (Jina's and Cohere's shape), as vLLM serves them.

Every input becomes one pooling request of the same engine (batched by its scheduler with whatever else runs); a
request's inputs are added all at once, all or nothing, as one owner. Strings are tokenized on the server's tokenizer
thread. A pooling route on a generation model, or a generation route on a pooling model, is a 400 that says which
runner the model has.
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field

from pageport.core.async_engine import EngineDeadError, RequestFailedError
from pageport.core.pooling import PoolingParams
from pageport.core.pooling_engine import pair_prompt, score_pairs
from pageport.entrypoints.openai.errors import APIError, bad_request
from pageport.entrypoints.openai.protocol import OpenAIBaseModel
from pageport.entrypoints.openai.serving import OpenAIServing, engine_dead_error

TokenIds = list[int]
EmbeddingInput = Union[str, list[str], TokenIds, list[TokenIds]]


# request bodies -------------------------------------------------------------------------------------------------
class _PoolingBase(OpenAIBaseModel):
    model: Optional[str] = None
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(None, description="keep only the last k tokens (-1: "
                                                                    "max_model_len)")
    priority: int = 0
    request_id: Optional[str] = None


class EmbeddingRequest(_PoolingBase):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, description="Matryoshka size (models trained for it)")
    normalize: Optional[bool] = None
    add_special_tokens: bool = True


class PoolingRequest(EmbeddingRequest):
    task: Optional[Literal["embed", "classify", "score", "token_embed", "token_classify"]] = None


class ClassificationRequest(_PoolingBase):
    input: EmbeddingInput
    add_special_tokens: bool = True
    use_activation: Optional[bool] = None


class ScoreRequest(_PoolingBase):
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    use_activation: Optional[bool] = None


class RerankRequest(_PoolingBase):
    query: str
    documents: list[str]
    top_n: Optional[int] = Field(None, description="return the n most relevant (default: all)")
    return_documents: bool = True
    max_tokens_per_doc: Optional[int] = None  # Cohere's name; each document is cut to this many tokens
    use_activation: Optional[bool] = None


# the logic ------------------------------------------------------------------------------------------------------
def pooling_info(engine) -> Optional[dict]:
    """The pooling model's facts (tasks, pooler, labels) from the engine core; None for a generation model."""
    client = getattr(getattr(engine, "engine", None), "client", None)
    info = getattr(client, "info", None)
    return info.get("pooling") if isinstance(info, dict) else None


def refuse_generation(engine) -> None:
    """A generation route on a pooling model: a 400 naming the routes it does serve."""
    info = pooling_info(engine)
    if info is not None:
        raise bad_request(f"this model runs the pooling runner (tasks: {', '.join(info['tasks'])}): it does not "
                          "generate text; use /v1/embeddings, /pooling, /classify, /score or /rerank",
                          "model", "unsupported_model_task")


def _usage(n: int) -> dict:
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}


def _encode(vec: torch.Tensor, encoding_format: str):
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(vec.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()
    return vec.tolist()


class PoolingServing:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.engine = serving.engine

    @property
    def info(self) -> Optional[dict]:
        return pooling_info(self.engine)

    def _need(self, *tasks: str) -> dict:
        info = self.info
        if info is None:
            raise bad_request("this model runs the generate runner: it does not embed, classify or score (start the "
                              "server with --runner pooling)", "model", "unsupported_model_task")
        if not any(t in info["tasks"] for t in tasks):
            raise bad_request(f"this model serves {', '.join(info['tasks'])}, not {' or '.join(tasks)}", "model",
                              "unsupported_model_task")
        return info

    # inputs ----------------------------------------------------------------------------------------------------
    async def _prompts(self, value, param: str, add_special_tokens: bool = True) -> list[dict]:
        s = self.serving
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            items = [value]  # one prompt of token ids
        elif isinstance(value, list):
            items = list(value)
        else:
            raise bad_request(f"{param} must be a string, a list of strings or token ids", param)
        if not items:
            raise bad_request(f"{param} is empty: give at least one input", param)
        s.check_fanout(len(items), 1)
        texts = [x for x in items if isinstance(x, str)]
        s.check_prompt_chars(sum(len(x) for x in texts), param)
        if texts:
            tok = s._need_tokenizer()
            encoded = iter(await s.in_tokenizer_thread(
                lambda: [tok.encode(t, add_special_tokens=add_special_tokens) for t in texts]))
        prompts = []
        for x in items:
            if isinstance(x, str):
                prompts.append({"prompt": x, "prompt_token_ids": next(encoded)})
            else:
                if not x:
                    raise bad_request(f"{param} holds an empty list of token ids", param)
                prompts.append({"prompt": None, "prompt_token_ids": s.check_token_ids(x, param)})
        return prompts

    async def _run(self, prompts: list[dict], params: PoolingParams, kind: str, req, arrival: float) -> list:
        """Add every input's request at once (all or nothing) and wait for their outputs, in order."""
        self.serving.check_model(req.model)
        base = f"{kind}-{uuid.uuid4().hex}"
        ids = [base] if len(prompts) == 1 else [f"{base}-{i}" for i in range(len(prompts))]
        results = await asyncio.gather(
            *[self.engine.add_request(p, params, rid, priority=req.priority, arrival_time=arrival, owner=base)
              for p, rid in zip(prompts, ids)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    r.abort()
            self._raise(errors[0])
        streams = list(results)
        try:
            outs = await asyncio.gather(*[self._final(st) for st in streams])
        except BaseException as e:
            for st in streams:
                st.abort()
            self._raise(e)
        return outs

    @staticmethod
    async def _final(stream):
        last = None
        async for out in stream:
            last = out
        return last

    @staticmethod
    def _raise(err: BaseException):
        if isinstance(err, EngineDeadError):
            raise engine_dead_error() from err
        if isinstance(err, (ValueError, TypeError, RequestFailedError)):
            msg = str(err)
            code = "context_length_exceeded" if "max_model_len" in msg else "invalid_value"
            raise bad_request(msg, None, code) from None
        raise err

    def _head(self, kind: str, req) -> dict:
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.serving.check_model(req.model)}

    # routes ------------------------------------------------------------------------------------------------------
    async def create_embedding(self, req: EmbeddingRequest, arrival: float) -> dict:
        self._need("embed")
        params = self._params(PoolingParams, task="embed", dimensions=req.dimensions, normalize=req.normalize,
                              truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = await self._prompts(req.input, "input", req.add_special_tokens)
        outs = await self._run(prompts, params, "embd", req, arrival)
        data = [{"index": i, "object": "embedding", "embedding": _encode(o.outputs.data, req.encoding_format)}
                for i, o in enumerate(outs)]
        return {**self._head("embd", req), "data": data, "usage": _usage(sum(len(o.prompt_token_ids) for o in outs))}

    async def create_pooling(self, req: PoolingRequest, arrival: float) -> dict:
        info = self._need("embed", "classify", "token_embed", "token_classify")
        task = req.task or info["tasks"][0]
        self._need(task)
        params = self._params(PoolingParams, task=task, dimensions=req.dimensions, normalize=req.normalize,
                              truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = await self._prompts(req.input, "input", req.add_special_tokens)
        outs = await self._run(prompts, params, "pool", req, arrival)
        data = [{"index": i, "object": "pooling", "data": _encode(o.outputs.data, req.encoding_format)}
                for i, o in enumerate(outs)]
        return {**self._head("pool", req), "data": data, "usage": _usage(sum(len(o.prompt_token_ids) for o in outs))}

    async def create_classify(self, req: ClassificationRequest, arrival: float) -> dict:
        info = self._need("classify")
        params = self._params(PoolingParams, task="classify", use_activation=req.use_activation,
                              truncate_prompt_tokens=req.truncate_prompt_tokens)
        prompts = await self._prompts(req.input, "input", req.add_special_tokens)
        outs = await self._run(prompts, params, "classify", req, arrival)
        labels = info.get("id2label") or {}
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.data.tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels.get(best, str(best)), "probs": probs, "num_classes": len(probs)})
        return {**self._head("classify", req), "data": data,
                "usage": _usage(sum(len(o.prompt_token_ids) for o in outs))}

    async def _scores(self, pairs: list[tuple[str, str]], req, arrival: float) -> tuple[list[float], int]:
        """Each pair's relevance (a cross-encoder's score, or the cosine of two embeddings) and the tokens used."""
        info = self._need("score", "embed")
        s = self.serving
        tok = s._need_tokenizer()
        s.check_fanout(len(pairs), 1)
        s.check_prompt_chars(sum(len(a) + len(b) for a, b in pairs), "documents")
        if "score" in info["tasks"]:
            params = self._params(PoolingParams, task="score", use_activation=req.use_activation)
            prompts = await s.in_tokenizer_thread(
                lambda: [pair_prompt(tok, a, b, s.max_model_len, req.truncate_prompt_tokens) for a, b in pairs])
            outs = await self._run(prompts, params, "score", req, arrival)
            return ([float(o.outputs.data.reshape(-1)[0]) for o in outs],
                    sum(len(o.prompt_token_ids) for o in outs))
        texts = list(dict.fromkeys([a for a, _ in pairs] + [b for _, b in pairs]))
        params = self._params(PoolingParams, task="embed", truncate_prompt_tokens=req.truncate_prompt_tokens)
        outs = await self._run(await self._prompts(texts, "documents"), params, "score", req, arrival)
        vec = {t: o.outputs.data for t, o in zip(texts, outs)}
        return ([float(F.cosine_similarity(vec[a], vec[b], dim=0)) for a, b in pairs],
                sum(len(o.prompt_token_ids) for o in outs))

    async def create_score(self, req: ScoreRequest, arrival: float) -> dict:
        try:
            pairs = score_pairs(req.text_1, req.text_2)
        except ValueError as e:
            raise bad_request(str(e), "text_2") from None
        scores, tokens = await self._scores(pairs, req, arrival)
        data = [{"index": i, "object": "score", "score": v} for i, v in enumerate(scores)]
        return {**self._head("score", req), "data": data, "usage": _usage(tokens)}

    async def create_rerank(self, req: RerankRequest, arrival: float) -> dict:
        if not req.documents:
            raise bad_request("documents is empty: give at least one", "documents")
        if req.top_n is not None and req.top_n < 1:
            raise bad_request(f"top_n must be >= 1, got {req.top_n}", "top_n")
        docs = req.documents
        if req.max_tokens_per_doc is not None:
            if req.max_tokens_per_doc < 1:
                raise bad_request("max_tokens_per_doc must be >= 1", "max_tokens_per_doc")
            tok = self.serving._need_tokenizer()
            docs = await self.serving.in_tokenizer_thread(lambda: [tok.decode(
                tok.encode(d, add_special_tokens=False)[:req.max_tokens_per_doc]) for d in req.documents])
        scores, tokens = await self._scores([(req.query, d) for d in docs], req, arrival)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or len(scores)]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": req.documents[i]}} if req.return_documents else {})} for i in order]
        head = self._head("rerank", req)
        return {"id": head["id"], "model": head["model"], "usage": {"total_tokens": tokens}, "results": results}

    @staticmethod
    def _params(cls, **fields):
        try:
            return cls(**fields)
        except ValueError as e:
            raise bad_request(str(e)) from None


def register_pooling_routes(app, serving: OpenAIServing, alive, unless_disconnected, errors: dict) -> PoolingServing:
    """Add the pooling routes to `app` (build_app's helpers: `alive()` raises 503s, `unless_disconnected(raw, coro)`
    cancels the work of a client that left)."""
    from fastapi import Request

    pooling = PoolingServing(serving)

    def route(paths: list[str], body_type, handler):
        async def endpoint(body, raw: Request):
            alive()
            return await unless_disconnected(raw, handler(body, time.monotonic()))
        # the body's model for FastAPI (string annotations would be looked up in this module's globals)
        endpoint.__annotations__ = {"body": body_type, "raw": Request}
        for path in paths:
            app.post(path, response_model=None, responses=errors, name=f"{handler.__name__}{path}")(endpoint)

    route(["/v1/embeddings"], EmbeddingRequest, pooling.create_embedding)
    route(["/pooling"], PoolingRequest, pooling.create_pooling)
    route(["/classify"], ClassificationRequest, pooling.create_classify)
    route(["/score", "/v1/score"], ScoreRequest, pooling.create_score)
    route(["/rerank", "/v1/rerank", "/v2/rerank"], RerankRequest, pooling.create_rerank)
    return pooling
