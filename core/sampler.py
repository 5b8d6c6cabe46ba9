"""Batched sampling on the logits' device.

Order (as in vLLM): logprobs from the raw logits in float32 (log_softmax) before any processing; then
allowed_token_ids and bad_words (`structured_output.token_masks`); the engine's custom logits processors
(`Sampler.logits_processors`, vLLM's batch-level interface; argmax-invariant ones skipped when every row is
greedy); logit bias; min_tokens (stop tokens masked); penalties (repetition over prompt + output, frequency,
presence); temperature; min_p; top-k; top-p; then the draw: argmax for greedy requests
(temperature < 1e-5), otherwise argmax(probs / Exponential(1) noise), which needs no host sync. Requests
with a seed draw their noise from their own ``torch.Generator`` (``request.generator``, created lazily on
the logits' device), so they reproduce whatever else is in the batch; unseeded requests share one draw.

Each step runs only when some request in the batch needs it; the host is synchronised once, at the end,
to hand the results back as Python lists.

The masking steps are plain functions on a [B, V] float tensor (``apply_min_p``, ``apply_top_k_top_p``,
``apply_penalties``...) so they can be tested and reused on their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pageport.core.outputs import Logprob
from pageport.core.request import Request
from pageport.core.structured_output.token_masks import apply_token_rules, has_token_rules

_NEG_INF = float("-inf")


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64 on the logits' device: no host sync until someone reads them
    # per request: None unless params.logprobs is not None; then the chosen token plus the top-`logprobs`
    # tokens, each Logprob(logprob, rank) with rank 1 = most likely (decoded_token filled by the detokenizer)
    logprobs: list[Optional[dict[int, Logprob]]]
    chosen_logprobs: list[float]  # logprob of the chosen token (raw logits) where logprobs were asked, else 0


# ---------------------------------------------------------------------------------------------------
# processing steps: each works in place on a float32 [B, V] tensor and returns it
# ---------------------------------------------------------------------------------------------------
def apply_logit_bias(logits: torch.Tensor, biases: Sequence[Optional[dict[int, float]]]) -> torch.Tensor:
    """Add each row's {token id: bias}. Token ids outside the vocabulary are ignored."""
    vocab_size = logits.shape[-1]
    rows, cols, vals = [], [], []
    for i, bias in enumerate(biases):
        if bias:
            for tok, val in bias.items():
                if 0 <= tok < vocab_size:
                    rows.append(i)
                    cols.append(tok)
                    vals.append(val)
    if rows:
        dev = logits.device
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def apply_token_mask(logits: torch.Tensor, banned: Sequence[Optional[Sequence[int]]]) -> torch.Tensor:
    """Set the listed token ids of each row to -inf (used for min_tokens: the stop tokens)."""
    vocab_size = logits.shape[-1]
    rows, cols = [], []
    for i, toks in enumerate(banned):
        if toks:
            for tok in toks:
                if 0 <= tok < vocab_size:
                    rows.append(i)
                    cols.append(tok)
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = _NEG_INF
    return logits


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] int32 counts of each token in each row's list: scatter_add over the padded lists (the padding
    id is vocab_size, counted in an extra column that is dropped)."""
    batch = len(token_lists)
    max_len = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(batch, vocab_size + 1, dtype=torch.int32, device=device)
    if max_len:
        padded = np.full((batch, max_len), vocab_size, dtype=np.int64)  # numpy: ~7x faster than nested lists
        for i, t in enumerate(token_lists):
            if len(t):
                padded[i, :len(t)] = t
        ids = torch.from_numpy(padded).to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_token_ids: Sequence[Sequence[int]],
                    output_token_ids: Sequence[Sequence[int]], presence_penalties: torch.Tensor,
                    frequency_penalties: torch.Tensor, repetition_penalties: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties. Repetition r over the tokens seen in prompt + output: positive logits / r, others * r.
    Frequency f: subtract f * (count in the output). Presence p: subtract p if the token is in the output.
    Penalty tensors are [B] on the logits' device."""
    vocab_size = logits.shape[-1]
    out_counts = token_counts(output_token_ids, vocab_size, logits.device)
    out_mask = out_counts > 0
    prompt_mask = token_counts(prompt_token_ids, vocab_size, logits.device) > 0
    rep = repetition_penalties.to(logits.dtype).unsqueeze(1).expand_as(logits)
    seen = prompt_mask | out_mask
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits -= frequency_penalties.to(logits.dtype).unsqueeze(1) * out_counts.to(logits.dtype)
    logits -= presence_penalties.to(logits.dtype).unsqueeze(1) * out_mask.to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    return logits.div_(temperatures.to(logits.dtype).unsqueeze(1))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * (the top probability)."""
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < min_p.to(probs.dtype).unsqueeze(1) * top, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, k: Optional[torch.Tensor], p: Optional[torch.Tensor],
                      max_k: Optional[int] = None) -> torch.Tensor:
    """Top-k then top-p (nucleus over what top-k kept). k: [B] long, vocab size (or more) = off; p: [B],
    1.0 = off. Either may be None (off for the whole batch). Ties with the k-th logit are kept.
    Top-p keeps a token when the probability of the tokens strictly ahead of it is < p.
    max_k: the largest k < V in the batch, known on the host (avoids a device sync for top-k only)."""
    if p is None:
        if k is None:
            return logits
        return _apply_top_k_only(logits, k, max_k)
    vocab_size = logits.shape[-1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kk = k.to(torch.long).clamp(1, vocab_size)
        kth = logits_sort.gather(1, (vocab_size - kk).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < kth, _NEG_INF)
    probs_sum = logits_sort.softmax(dim=-1).cumsum_(dim=-1)
    top_p_mask = probs_sum <= 1 - p.to(probs_sum.dtype).unsqueeze(1)
    top_p_mask[:, -1] = False  # always keep the most likely token
    logits_sort.masked_fill_(top_p_mask, _NEG_INF)
    return logits.scatter_(-1, logits_idx, logits_sort)


def _apply_top_k_only(logits: torch.Tensor, k: torch.Tensor, max_k: Optional[int]) -> torch.Tensor:
    vocab_size = logits.shape[-1]
    k = k.to(torch.long)
    off = k >= vocab_size
    k = k.masked_fill(off, 1).clamp_(min=1)
    if max_k is None:
        max_k = int(k.max())  # host sync; callers that know it pass max_k
    max_k = max(1, min(max_k, vocab_size))
    kth = logits.topk(max_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth.masked_fill_(off.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < kth, _NEG_INF)


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """An exact draw from each row of probs by inverting its CDF with one uniform per row, without a host
    sync. Rows listed in ``generators`` (row index -> generator) take their uniform from their own generator.

    One uniform per row instead of one exponential per vocabulary entry (the argmax(probs / q) trick): CPU
    random number generation is serial, ~68 ms for 64 x 49152 exponentials against ~2 ms for cumsum +
    searchsorted. The uniform is scaled by the row's total, so float rounding in the cumsum can neither run
    past the last token nor pick a zero-probability one (right=True finds the first entry whose CDF exceeds u).
    """
    u = torch.rand(probs.shape[0], 1, device=probs.device)
    for i, gen in generators.items():
        u[i] = torch.rand(1, generator=gen, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    u.mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(probs.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------------
def _logprob_dicts(logprobs: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]
                   ) -> list[dict[int, Logprob]]:
    """logprobs [n, V] (already normalised), token_ids [n] -> per row {token: Logprob} with the given token
    (rank = number of tokens at least as likely, as in vLLM) and the row's top-k (rank = position)."""
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs >= token_lp).sum(dim=-1)
    ks = [logprobs.shape[-1] if k < 0 else k for k in ks]  # -1: the whole vocabulary
    max_k = max(ks, default=0)
    if max_k > 0:
        top_lp, top_ids = logprobs.topk(min(max_k, logprobs.shape[-1]), dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    token_ids_l, token_lp_l, ranks_l = token_ids.tolist(), token_lp.squeeze(1).tolist(), ranks.tolist()
    out = []
    for i, k in enumerate(ks):
        d = {token_ids_l[i]: Logprob(token_lp_l[i], ranks_l[i])}
        for j in range(min(k, max_k)):
            d[top_ids[i][j]] = Logprob(top_lp[i][j], j + 1)
        out.append(d)
    return out


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor, k: int) -> list[dict[int, Logprob]]:
    """Logits at prompt positions [n, V] and the prompt token that follows each position [n] -> per position
    {token: Logprob} with the actual next token and the top-k, ranks included (rank 1 = most likely)."""
    if logits.shape[0] == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    next_token_ids = next_token_ids.to(device=lp.device, dtype=torch.long)
    return _logprob_dicts(lp, next_token_ids, [k] * lp.shape[0])


# ---------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------
class Sampler:
    """``Sampler()(logits [B, V], requests)``: row i of the logits belongs to requests[i]."""

    # the engine's custom processors (core.logits_processors.LogitsProcessors), set by the engine core; they
    # are told every sampling step's batch, in row order
    logits_processors = None

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (logits.shape, len(requests))
        batch, vocab_size = logits.shape
        device = logits.device
        if batch == 0:
            return SamplerOutput(torch.zeros(0, dtype=torch.long, device=device), [], [])
        params = [r.params for r in requests]

        raw = logits.float()  # may be `logits` itself: never written to

        # what this batch needs
        greedy = [p.greedy for p in params]
        need_bias = any(p.logit_bias for p in params)
        min_tok = [r.stop_token_ids if (r.params.min_tokens
                                        and r.num_output_tokens + r.num_pending < r.params.min_tokens)
                   else None for r in requests]
        need_min_tok = any(min_tok)
        need_pen = any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
                       for p in params)
        need_rules = any(has_token_rules(p) for p in params)
        procs = self.logits_processors
        if procs is not None:
            procs.step_requests(requests)  # every step: processors follow the batch even when not applied
            need_procs = procs.active(all(greedy))
        else:
            need_procs = False

        if all(greedy) and not (need_bias or need_min_tok or need_pen or need_rules or need_procs):
            token_ids = raw.argmax(dim=-1)  # fast path
        else:
            work = raw.clone()
            if need_rules:
                apply_token_rules(work, requests)
            if need_procs:
                work = procs.apply(work, all(greedy))
            if need_bias:
                work = apply_logit_bias(work, [p.logit_bias for p in params])
            if need_min_tok:
                work = apply_token_mask(work, min_tok)
            if need_pen:
                work = self._penalties(work, requests)
            token_ids = self._draw(work, requests, greedy)

        # logprobs (and the chosen token's, for cumulative_logprob) only for the requests that asked: the
        # log-normaliser over the vocabulary is a pass over every logit (~2.5 ms at 64 x 49152 on a CPU)
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs: list[Optional[dict[int, Logprob]]] = [None] * batch
        chosen = [0.0] * batch
        if lp_rows:
            idx = None if len(lp_rows) == batch else torch.tensor(lp_rows, device=device)
            sub = raw if idx is None else raw[idx]
            ids = token_ids if idx is None else token_ids[idx]
            lp = sub - torch.logsumexp(sub, dim=-1, keepdim=True)
            dicts = _logprob_dicts(lp, ids, [params[i].logprobs for i in lp_rows])
            for i, d, c in zip(lp_rows, dicts, lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()):
                logprobs[i], chosen[i] = d, c

        return SamplerOutput(token_ids, logprobs, chosen)

    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _penalties(work: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests)
                if r.params.repetition_penalty != 1.0 or r.params.frequency_penalty != 0.0
                or r.params.presence_penalty != 0.0]
        sel = [requests[i] for i in rows]
        dev = work.device
        pres = torch.tensor([r.params.presence_penalty for r in sel], dtype=torch.float32, device=dev)
        freq = torch.tensor([r.params.frequency_penalty for r in sel], dtype=torch.float32, device=dev)
        rep = torch.tensor([r.params.repetition_penalty for r in sel], dtype=torch.float32, device=dev)
        # the prompt only matters for the repetition penalty
        prompts = [r.prompt_token_ids if r.params.repetition_penalty != 1.0 else () for r in sel]
        outputs = [r.output_token_ids for r in sel]
        if len(rows) == len(requests):
            return apply_penalties(work, prompts, outputs, pres, freq, rep)
        idx = torch.tensor(rows, device=dev)
        work[idx] = apply_penalties(work[idx], prompts, outputs, pres, freq, rep)
        return work

    @staticmethod
    def _draw(work: torch.Tensor, requests: list[Request], greedy: list[bool]) -> torch.Tensor:
        batch, vocab_size = work.shape
        dev = work.device
        rand_rows = [i for i, g in enumerate(greedy) if not g]
        if not rand_rows:
            return work.argmax(dim=-1)
        all_rand = len(rand_rows) == batch
        if all_rand:
            sub = work
        else:
            rand_idx = torch.tensor(rand_rows, device=dev)
            sub = work[rand_idx]
        sel = [requests[i].params for i in rand_rows]

        temps = [p.temperature for p in sel]
        if any(t != 1.0 for t in temps):
            sub = apply_temperature(sub, torch.tensor(temps, dtype=torch.float32, device=dev))
        if any(p.min_p > 0.0 for p in sel):
            sub = apply_min_p(sub, torch.tensor([p.min_p for p in sel], dtype=torch.float32, device=dev))
        ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in sel]
        k = p_ = None
        if any(kv < vocab_size for kv in ks):
            k = torch.tensor(ks, dtype=torch.long, device=dev)
        if any(p.top_p < 1.0 for p in sel):
            p_ = torch.tensor([p.top_p for p in sel], dtype=torch.float32, device=dev)
        if k is not None or p_ is not None:
            max_k = max((kv for kv in ks if kv < vocab_size), default=1)
            sub = apply_top_k_top_p(sub, k, p_, max_k=max_k)

        generators: dict[int, torch.Generator] = {}
        for j, i in enumerate(rand_rows):
            req = requests[i]
            if req.params.seed is not None:
                if req.generator is None:  # created once, then its state advances step by step
                    gen = torch.Generator(device=dev)
                    gen.manual_seed(req.params.seed)
                    req.generator = gen
                generators[j] = req.generator
        sampled = random_sample(sub.softmax(dim=-1), generators)

        if all_rand:
            return sampled
        out = work.argmax(dim=-1)  # greedy rows (their values are unchanged by the steps above)
        out[rand_idx] = sampled
        return out
