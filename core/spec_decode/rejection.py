"""Verifying proposals: the target's logits at every proposed position decide which tokens are kept.

A request with k proposed tokens d_1..d_k is run with 1 + k query tokens; the logits at those positions
give the target's distributions p_0..p_k (p_i: the next token after the context and d_1..d_i).

- Greedy rows: a_i = argmax p_i. The longest prefix with d_{i+1} == a_i is accepted and a_j at the first
  mismatch (or a_k when all match: the bonus token) ends the step, so the output is exactly what decoding
  one token a step gives.
- Sampled rows: standard rejection sampling with the draft distribution q_i: d_{i+1} is accepted with
  probability min(1, p_i(d)/q_i(d)); on the first rejection a token is drawn from the normalised
  max(p_i - q_i, 0); when all k are accepted a bonus token is drawn from p_k. Each emitted token then has
  exactly the target's distribution given the ones before it. For n-gram proposals q_i is a point mass at
  d_{i+1}: acceptance has probability p_i(d) and a rejection draws from p_i with d_{i+1} removed.

p_i is the distribution the sampler would draw from (temperature, min_p, top-k, top-p, in its order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from pageport.core.sampler import apply_min_p, apply_temperature, apply_top_k_top_p, random_sample


@dataclass
class SpecRow:
    """One request's proposals: its logits are rows offset .. offset + len(draft) of the step's logits;
    draft_probs [len(draft), V]: the distributions a draft model drew them from (None: point masses)."""
    request: object
    draft: list[int]
    offset: int
    draft_probs: Optional[torch.Tensor] = None


def processed_probs(logits: torch.Tensor, params: Sequence) -> torch.Tensor:
    """Row i of logits [T, V] (float32, not written to) -> the probabilities the sampler draws row i from
    under params[i] (SamplingParams of a non-greedy request)."""
    vocab_size = logits.shape[-1]
    dev = logits.device
    work = logits.clone()
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        work = apply_temperature(work, torch.tensor(temps, dtype=torch.float32, device=dev))
    if any(p.min_p > 0.0 for p in params):
        work = apply_min_p(work, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev))
    ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    k = p_ = None
    if any(kv < vocab_size for kv in ks):
        k = torch.tensor(ks, dtype=torch.long, device=dev)
    if any(p.top_p < 1.0 for p in params):
        p_ = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    if k is not None or p_ is not None:
        work = apply_top_k_top_p(work, k, p_, max_k=max((kv for kv in ks if kv < vocab_size), default=1))
    return work.softmax(dim=-1)


def greedy_accept(target_argmax: Sequence[int], draft: Sequence[int]) -> list[int]:
    """target_argmax [k + 1] and draft [k] -> the emitted tokens (accepted prefix + correction/bonus)."""
    j = 0
    while j < len(draft) and draft[j] == target_argmax[j]:
        j += 1
    return list(target_argmax[:j + 1])


def rejection_sample_row(probs: torch.Tensor, draft: Sequence[int], generator: Optional[torch.Generator] = None,
                         draft_probs: Optional[torch.Tensor] = None) -> list[int]:
    """probs [k + 1, V]: the target's distributions at the proposed positions; draft [k] drawn from draft_probs
    [k, V] (None: point masses). Returns the emitted tokens: the accepted proposals, then one drawn token."""
    k = len(draft)
    dev = probs.device
    if k:
        u = torch.rand(k, generator=generator, device=dev)
        at = (torch.arange(k, device=dev), torch.tensor(draft, device=dev))
        p_draft = probs[at]
        if draft_probs is not None:  # accept with probability min(1, p/q): u * q < p
            u = u * draft_probs[at]
        rejected = (u >= p_draft).tolist()
        j = rejected.index(True) if True in rejected else k
    else:
        j = 0
    if j < k:
        if draft_probs is None:
            q = probs[j].clone()
            q[draft[j]] = 0.0  # max(p - onehot(d), 0), renormalised by the draw below
        else:
            q = (probs[j] - draft_probs[j].to(probs.dtype)).clamp_min_(0.0)
        if not bool(q.sum() > 0):  # p <= q everywhere, so p == q: a rejection had probability 0
            q = probs[j]
    else:
        q = probs[k]
    gens = {0: generator} if generator is not None else {}
    tok = int(random_sample(q.unsqueeze(0), gens)[0])
    return list(draft[:j]) + [tok]


def verify(logits: torch.Tensor, rows: Sequence[SpecRow]) -> list[list[int]]:
    """The emitted tokens of each row. logits: float32 [T, V] holding every row's 1 + k positions."""
    out: list[Optional[list[int]]] = [None] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.request.params.greedy]
    if greedy:
        idx = torch.tensor([rows[i].offset + p for i in greedy for p in range(len(rows[i].draft) + 1)],
                           device=logits.device)
        am = logits[idx].argmax(dim=-1).tolist()
        pos = 0
        for i in greedy:
            n = len(rows[i].draft) + 1
            out[i] = greedy_accept(am[pos:pos + n], rows[i].draft)
            pos += n
    sampled = [i for i, r in enumerate(rows) if not r.request.params.greedy]
    if sampled:
        idx, params = [], []
        for i in sampled:
            n = len(rows[i].draft) + 1
            idx += range(rows[i].offset, rows[i].offset + n)
            params += [rows[i].request.params] * n
        probs = processed_probs(logits[torch.tensor(idx, device=logits.device)], params)
        pos = 0
        for i in sampled:
            r = rows[i]
            n = len(r.draft) + 1
            req = r.request
            gen = None
            if req.params.seed is not None:
                if req.generator is None:
                    req.generator = torch.Generator(device=logits.device)
                    req.generator.manual_seed(req.params.seed)
                gen = req.generator
            out[i] = rejection_sample_row(probs[pos:pos + n], r.draft, gen, r.draft_probs)
            pos += n
    return out  # type: ignore[return-value]
