"""The front end of pooling models: requests into the engine (`add_pooling_request`), their vectors out
(`pooling_output`), and the offline API's `embed` / `classify` / `score` / `encode` / `reward` (`PoolingAPI`, which
`LLM` inherits), with vLLM's names and output types.

A pooling request travels like a generation request (same ids, owners, priorities, abort, the same core link);
its `PoolingParams` ride in the request's params and its output is one `PoolingRequestOutput`.
"""
from __future__ import annotations

import pickle
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pageport.core.detokenizer import IncrementalDetokenizer
from pageport.core.engine_core import CoreRequest
from pageport.core.outputs import RequestOutput
from pageport.core.pooling import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolerConfig, PoolingOutput,
                                   PoolingParams, PoolingRequestOutput, ScoringOutput, ScoringRequestOutput,
                                   check_dimensions)
from pageport.core.request import Request, RequestStatus
from pageport.core.sampling_params import SamplingParams

_NO_SAMPLING = SamplingParams(max_tokens=1, detokenize=False)


def pooling_info(engine) -> Optional[dict]:
    """What the core said about its pooling model (tasks, pooler, sizes, labels); None for a generation model."""
    return engine.client.info.get("pooling")


def prepare_pooling_prompt(engine, prompt, params: PoolingParams) -> tuple[Optional[str], list[int], PoolingParams]:
    """Tokenize, truncate and check one pooling prompt against the model; ValueError when it does not fit."""
    info = pooling_info(engine)
    if info is None:
        raise ValueError("this model runs the generate runner, which does not embed, classify or score: start it "
                         "with runner='pooling' (--runner pooling)")
    token_types = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
    text, token_ids = engine.tokenize(prompt)
    if token_types is not None and len(token_types) != len(token_ids):
        raise ValueError(f"token_type_ids has {len(token_types)} entries for {len(token_ids)} prompt tokens")
    max_len = engine.config.max_model_len
    k = params.truncate_prompt_tokens
    if k is not None:
        k = max_len if k == -1 else k
        if k > max_len:
            raise ValueError(f"truncate_prompt_tokens={k} is more than max_model_len={max_len}")
        token_ids = token_ids[-k:]  # vLLM keeps the end of the prompt
        token_types = token_types[-k:] if token_types is not None else None
    if not token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = next((t for t in token_ids if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of the vocabulary [0, {engine.vocab_size})")
    if len(token_ids) > max_len:
        raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is {max_len} "
                         f"(truncate_prompt_tokens keeps the last ones)")
    task = params.task or info["tasks"][0]
    if task not in info["tasks"]:
        raise ValueError(f"task {task!r} is not served by this model (it serves {', '.join(info['tasks'])})")
    check_dimensions(params.dimensions, PoolerConfig(**info["pooler"]), info["embedding_size"])
    return text, token_ids, params.clone(task=task, token_type_ids=list(token_types) if token_types else None,
                                         truncate_prompt_tokens=None)


def add_pooling_request(engine, request_id: Optional[str], prompt, params, priority: int = 0,
                        arrival_time: Optional[float] = None, owner: Optional[str] = None) -> str:
    """LLMEngine.add_request for a pooling model (or PoolingParams): queue it, return its internal id."""
    _refuse_sampling(params)
    text, token_ids, params = prepare_pooling_prompt(engine, prompt, params)
    core_request = _register(engine, request_id, text, token_ids, params, priority, arrival_time, owner)
    engine.client.add([core_request])
    return core_request.request_id


def add_pooling_requests(engine, items: Sequence[tuple[Optional[str], object, PoolingParams]],
                         priority: int = 0) -> list[str]:
    """Queue many (label, prompt, params) at once: all are checked before any is queued, and they reach the core in
    one message, so its first step already sees a full batch."""
    for _, _, params in items:
        _refuse_sampling(params)
    prepared = [(label, *prepare_pooling_prompt(engine, prompt, params)) for label, prompt, params in items]
    arrival = time.monotonic()
    core_requests = [_register(engine, label, text, ids, params, priority, arrival, None)
                     for label, text, ids, params in prepared]
    engine.client.add(core_requests)
    return [r.request_id for r in core_requests]


def _refuse_sampling(params) -> None:
    if not isinstance(params, PoolingParams):
        raise ValueError("this is a pooling model (runner='pooling'): it embeds, classifies and scores, it does not "
                         "generate text; use LLM.embed / classify / score / encode, or the server's /v1/embeddings, "
                         "/classify, /score and /rerank routes")


def _register(engine, request_id, text, token_ids, params, priority, arrival_time, owner) -> CoreRequest:
    """The request's records in the front end (as LLMEngine.add_request keeps them); returns what the core gets."""
    from pageport.core.engine import _Group

    gid = str(next(engine._ids))
    label = gid if request_id is None else str(request_id)
    arrival = time.monotonic() if arrival_time is None else arrival_time
    owner = gid if owner is None else f"o:{owner}"
    child = Request(gid, token_ids, _NO_SAMPLING, None, text, priority, arrival, None, owner)
    child.pooling_params = params
    child.pooled = None
    child.detokenizer = IncrementalDetokenizer(None, _NO_SAMPLING, token_ids)
    group = _Group(gid, label, text, token_ids, [child])
    engine.groups[gid] = group
    engine._labels.setdefault(label, set()).add(gid)
    child.group = group
    child.status = RequestStatus.WAITING
    engine.requests[gid] = child
    return CoreRequest(gid, token_ids, pickle.dumps(params), None, arrival, priority, None, owner)


def pooling_output(out: RequestOutput, req: Request) -> PoolingRequestOutput:
    """The engine's RequestOutput of a pooling request, as the PoolingRequestOutput vLLM returns."""
    data = req.pooled if req.pooled is not None else torch.empty(0)
    return PoolingRequestOutput(out.request_id, PoolingOutput(data), out.prompt_token_ids, out.finished, out.prompt,
                                out.error, out.metrics, out.engine_request_id, out.num_cached_tokens)


# pairs for scoring -----------------------------------------------------------------------------------------
def score_pairs(data_1, data_2) -> list[tuple]:
    """vLLM's pairing: one with one, one with each of N, or N with N (element-wise)."""
    one_1, one_2 = not isinstance(data_1, (list, tuple)), not isinstance(data_2, (list, tuple))
    d1 = [data_1] if one_1 else list(data_1)
    d2 = [data_2] if one_2 else list(data_2)
    if not d1 or not d2:
        raise ValueError("score needs at least one text on each side")
    if len(d1) == 1:
        d1 = d1 * len(d2)
    if len(d1) != len(d2):
        raise ValueError(f"score pairs one text with N, or N with N; got {len(d1)} and {len(d2)}")
    return list(zip(d1, d2))


def pair_prompt(tokenizer, text_1, text_2, max_len: int, truncate: Optional[int]) -> dict:
    """A cross-encoder's input: the pair through the tokenizer (its separators and segment ids)."""
    if tokenizer is None:
        raise ValueError("scoring text pairs needs the model's tokenizer")
    limit = truncate if truncate not in (None, -1) else max_len if truncate == -1 else None
    enc = tokenizer(text_1, text_2, truncation="longest_first" if limit else False, max_length=limit)
    prompt = {"prompt": None, "prompt_token_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        prompt["token_type_ids"] = list(enc["token_type_ids"])
    return prompt


class PoolingAPI:
    """The offline pooling methods of `LLM` (vLLM's signatures). `self.engine` is the LLMEngine."""

    def _pool(self, prompts, params: Union[PoolingParams, Sequence[PoolingParams]], use_tqdm: bool,
              what: str) -> list[PoolingRequestOutput]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = [params] * len(prompts) if isinstance(params, PoolingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} pooling params")
        # longest first, as sentence-transformers batches: each step's sequences are of similar length, so little
        # of the attention is padding (the outputs come back in the prompts' order)
        prepared = [prepare_pooling_prompt(self.engine, prompt, p) for prompt, p in zip(prompts, plist)]
        order = sorted(range(len(prompts)), key=lambda i: -len(prepared[i][1]))
        items = [(f"{what}-{next(self._ids)}", {"prompt": prepared[i][0], "prompt_token_ids": prepared[i][1],
                                                "token_type_ids": prepared[i][2].token_type_ids}, prepared[i][2])
                 for i in order]
        sorted_ids = add_pooling_requests(self.engine, items)
        ids = [None] * len(prompts)
        for i, rid in zip(order, sorted_ids):
            ids[i] = rid
        done: dict[str, PoolingRequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc=f"Processed prompts ({what})", disable=not use_tqdm or len(ids) < 2,
                   dynamic_ncols=True)
        while len(done) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.engine_request_id in wanted:
                    done[out.engine_request_id] = out
                    bar.update(1)
        bar.close()
        outs = [done[i] for i in ids]
        failed = next((o for o in outs if o.error is not None), None)
        if failed is not None:
            raise ValueError(f"request {failed.request_id} failed: {failed.error}")
        return outs

    @staticmethod
    def _params(pooling_params, task: str, truncate_prompt_tokens: Optional[int]):
        if pooling_params is None:
            pooling_params = PoolingParams()
        plist = [pooling_params] if isinstance(pooling_params, PoolingParams) else list(pooling_params)
        changes = {"task": task}
        if truncate_prompt_tokens is not None:
            changes["truncate_prompt_tokens"] = truncate_prompt_tokens
        out = [p.clone(**changes) for p in plist]
        return out[0] if isinstance(pooling_params, PoolingParams) else out

    def encode(self, prompts, pooling_params=None, *, use_tqdm: bool = True, pooling_task: Optional[str] = None,
               truncate_prompt_tokens: Optional[int] = None) -> list[PoolingRequestOutput]:
        """The raw pooled output of each prompt (`pooling_task`: embed, classify, score, token_embed,
        token_classify; default: the model's first task)."""
        if pooling_params is None:
            pooling_params = PoolingParams()
        if pooling_task is None and isinstance(pooling_params, PoolingParams):
            pooling_task = pooling_params.task
        if pooling_task is None:
            pooling_task = pooling_info(self.engine)["tasks"][0] if pooling_info(self.engine) else "embed"
        return self._pool(prompts, self._params(pooling_params, pooling_task, truncate_prompt_tokens), use_tqdm,
                          "encode")

    def embed(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
              pooling_params=None) -> list[EmbeddingRequestOutput]:
        outs = self._pool(prompts, self._params(pooling_params, "embed", truncate_prompt_tokens), use_tqdm, "embed")
        return [EmbeddingRequestOutput.from_base(o) for o in outs]

    def classify(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
                 pooling_params=None) -> list[ClassificationRequestOutput]:
        outs = self._pool(prompts, self._params(pooling_params, "classify", truncate_prompt_tokens), use_tqdm,
                          "classify")
        return [ClassificationRequestOutput.from_base(o) for o in outs]

    def reward(self, prompts, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
               pooling_params=None) -> list[PoolingRequestOutput]:
        """Per-token scores of a reward model (--convert reward)."""
        return self._pool(prompts, self._params(pooling_params, "token_classify", truncate_prompt_tokens), use_tqdm,
                          "reward")

    def score(self, data_1, data_2, /, *, truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = True,
              pooling_params: Optional[PoolingParams] = None) -> list[ScoringRequestOutput]:
        """Relevance of each (data_1, data_2) pair: a cross-encoder's score of the pair, or for an embedding model
        the cosine similarity of the two embeddings."""
        pairs = score_pairs(data_1, data_2)
        info = pooling_info(self.engine)
        if info is None:
            raise ValueError("score needs a pooling model (runner='pooling')")
        if "score" in info["tasks"]:
            tok, max_len = self.engine.tokenizer, self.engine.config.max_model_len
            prompts = [pair_prompt(tok, a, b, max_len, truncate_prompt_tokens) for a, b in pairs]
            params = self._params(pooling_params, "score", None)
            outs = self._pool(prompts, params, use_tqdm, "score")
            return [ScoringRequestOutput.from_base(o) for o in outs]
        if "embed" not in info["tasks"]:
            raise ValueError(f"this model serves {', '.join(info['tasks'])}: it cannot score pairs")
        texts = list(dict.fromkeys([a for a, _ in pairs] + [b for _, b in pairs]))
        embs = self._pool(texts, self._params(pooling_params, "embed", truncate_prompt_tokens), use_tqdm, "score")
        vec = {t: o.outputs.data for t, o in zip(texts, embs)}
        out = []
        for i, (a, b) in enumerate(pairs):
            cos = F.cosine_similarity(vec[a], vec[b], dim=0)
            out.append(ScoringRequestOutput(f"score-{i}", ScoringOutput(float(cos)),
                                            embs[texts.index(a)].prompt_token_ids + embs[texts.index(b)].prompt_token_ids))
        return out

