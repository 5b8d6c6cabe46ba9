"""Sampler: processing order and formulas, masks, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from pageport.core.request import Request
from pageport.core.sampler import (Sampler, apply_logit_bias, apply_min_p, apply_penalties, apply_top_k_top_p,
                                   prompt_logprobs, random_sample, token_counts)
from pageport.core.sampling_params import SamplingParams

EOS = 0


def make_request(params: SamplingParams, prompt=(5, 6, 7), output=(), rid="r", eos=EOS) -> Request:
    req = Request(rid, list(prompt), params, eos_token_id=eos)
    for t in output:
        req.append_token(t)
    return req


def logits_from_probs(probs, rows=1) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log().expand(rows, -1).contiguous()


def kept(mask_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(mask_row)).flatten().tolist())


sampler = Sampler()


# --------------------------------------------------------------------------- greedy and logprobs
def test_greedy_is_argmax_and_chosen_logprob():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    # rows 1 and 3 ask for logprobs: they get the chosen token's logprob; the others skip the normaliser
    reqs = [make_request(SamplingParams(temperature=0.0, logprobs=0 if i % 2 else None), rid=str(i))
            for i in range(4)]
    out = sampler(logits, reqs)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.token_ids.tolist()):
        assert out.chosen_logprobs[i] == (pytest.approx(ref[i, t].item(), abs=1e-5) if i % 2 else 0.0)
    assert out.logprobs[0] is None and out.logprobs[2] is None
    assert list(out.logprobs[1]) == [out.token_ids.tolist()[1]]


def test_greedy_with_half_precision_logits():
    torch.manual_seed(1)
    logits = torch.randn(3, 40).to(torch.bfloat16)
    reqs = [make_request(SamplingParams(temperature=0.0, logprobs=2), rid=str(i)) for i in range(3)]
    out = sampler(logits, reqs)
    assert out.token_ids.tolist() == logits.float().argmax(-1).tolist()
    ref = torch.log_softmax(logits.float(), -1)
    for i, t in enumerate(out.token_ids.tolist()):
        assert out.logprobs[i][t].logprob == pytest.approx(ref[i, t].item(), abs=1e-5)


def test_logprobs_ranks_and_values_from_raw_logits():
    torch.manual_seed(2)
    logits = torch.randn(3, 30) * 3
    # row 0: greedy with 3 logprobs; row 1: no logprobs; row 2: random, strong penalties, 5 logprobs
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.5, top_k=4, logprobs=5, logit_bias={1: 3.0}, seed=3,
                             repetition_penalty=1.7, frequency_penalty=1.0)]
    reqs = [make_request(p, output=(1, 2, 2), rid=str(i)) for i, p in enumerate(params)]
    out = sampler(logits, reqs)
    ref = torch.log_softmax(logits, -1)  # raw: no bias, penalties or temperature
    assert out.logprobs[1] is None
    for i, k in ((0, 3), (2, 5)):
        d = out.logprobs[i]
        chosen = out.token_ids.tolist()[i]
        order = ref[i].argsort(descending=True).tolist()
        expected_ids = set(order[:k]) | {chosen}
        assert set(d) == expected_ids
        for tok, lp in d.items():
            assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
            assert lp.rank == order.index(tok) + 1
            assert lp.decoded_token is None
        assert out.chosen_logprobs[i] == pytest.approx(ref[i, chosen].item(), abs=1e-5)
    assert out.token_ids.tolist()[0] == order_first(ref[0])


def order_first(row):
    return int(row.argmax())


def test_logprobs_zero_gives_chosen_only_with_rank():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    req = make_request(SamplingParams(temperature=0.0, logprobs=0, logit_bias={2: 10.0}))
    out = sampler(logits, [req])
    assert out.token_ids.tolist() == [2]  # the bias changes the choice...
    d = out.logprobs[0]
    assert list(d) == [2]
    assert d[2].rank == 3  # ...but rank and value come from the raw logits
    assert d[2].logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item(), abs=1e-6)


def test_prompt_logprobs():
    torch.manual_seed(3)
    logits = torch.randn(5, 20)
    nxt = torch.tensor([3, 0, 19, 7, 7])
    res = prompt_logprobs(logits, nxt, 2)
    ref = torch.log_softmax(logits, -1)
    assert len(res) == 5
    for i, d in enumerate(res):
        order = ref[i].argsort(descending=True).tolist()
        assert set(d) == {int(nxt[i])} | set(order[:2])
        for tok, lp in d.items():
            assert lp.logprob == pytest.approx(ref[i, tok].item(), abs=1e-5)
            assert lp.rank == order.index(tok) + 1
    res0 = prompt_logprobs(logits, nxt, 0)
    assert [list(d) for d in res0] == [[t] for t in nxt.tolist()]
    assert prompt_logprobs(logits[:0], nxt[:0], 3) == []


# --------------------------------------------------------------------------- seeds
def run_steps(req: Request, batch_others: list[Request], position: int, steps: int, vocab=1000, seed=0):
    """Sample `steps` tokens for req, placed at `position` among the others, fresh random logits per step
    for the others (the request's own logits are the same every run)."""
    gen = torch.Generator().manual_seed(1234)
    noise = torch.Generator().manual_seed(seed)
    toks = []
    for _ in range(steps):
        own = torch.randn(1, vocab, generator=gen)
        others = torch.randn(len(batch_others), vocab, generator=noise)
        logits = torch.cat([others[:position], own, others[position:]])
        reqs = batch_others[:position] + [req] + batch_others[position:]
        out = sampler(logits, reqs)
        tok = out.token_ids.tolist()[position]
        toks.append(tok)
        req.append_token(tok)
        for r, t in zip(reqs, out.token_ids.tolist()):
            if r is not req:
                r.append_token(t)
    return toks


def test_seeded_reproduces_in_any_batch():
    p = SamplingParams(temperature=1.0, seed=42)
    alone = run_steps(make_request(p), [], 0, 12)
    others = [make_request(SamplingParams(temperature=0.8), rid="a"),
              make_request(SamplingParams(temperature=0.0), rid="b"),
              make_request(SamplingParams(temperature=1.2, seed=7, top_p=0.9), rid="c")]
    mixed = run_steps(make_request(p), others, 2, 12, seed=5)
    others2 = [make_request(SamplingParams(temperature=0.7, presence_penalty=0.5), rid=str(i)) for i in range(5)]
    mixed2 = run_steps(make_request(p), others2, 4, 12, seed=9)
    assert alone == mixed == mixed2
    assert len(set(alone)) > 6  # really random, not a constant


def test_different_seeds_differ_and_generator_is_lazy():
    reqs = [make_request(SamplingParams(temperature=1.0, seed=s), rid=str(s)) for s in (1, 2)]
    assert all(r.generator is None for r in reqs)
    a = run_steps(reqs[0], [], 0, 10)
    b = run_steps(reqs[1], [], 0, 10)
    assert a != b
    assert all(isinstance(r.generator, torch.Generator) for r in reqs)


def test_unseeded_rows_are_independent():
    logits = torch.zeros(8, 1000)
    reqs = [make_request(SamplingParams(temperature=1.0), rid=str(i)) for i in range(8)]
    toks = sampler(logits, reqs).token_ids.tolist()
    assert len(set(toks)) > 4


# --------------------------------------------------------------------------- distributions
def draw_many(probs, params: SamplingParams, rows=20000) -> torch.Tensor:
    torch.manual_seed(11)
    logits = logits_from_probs(probs, rows)
    p = params.clone(seed=None)
    reqs = [make_request(p, rid=str(i)) for i in range(rows)]
    toks = torch.tensor(sampler(logits, reqs).token_ids.tolist())
    return torch.bincount(toks, minlength=len(probs)).float() / rows


def test_random_draw_follows_distribution():
    probs = [0.1, 0.2, 0.3, 0.4]
    freq = draw_many(probs, SamplingParams(temperature=1.0))
    assert torch.allclose(freq, torch.tensor(probs), atol=0.015)


def test_random_draw_never_picks_a_zero_probability_token():
    # zeros at both ends and inside, a large vocabulary (the CDF's float32 rounding), and uniforms at 0 and
    # just below 1 (the extremes that could run past the last token or stop on a zero one)
    probs = torch.zeros(4, 50000)
    probs[0, 7] = 1.0
    probs[1, -2] = 1.0
    probs[2, 1:-1] = torch.rand(49998)
    probs[2, 100:200] = 0
    probs[3, [3, 40000]] = torch.tensor([0.25, 0.75])
    probs /= probs.sum(-1, keepdim=True)
    for u in (0.0, 1.0 - 2 ** -24):
        gens = {i: torch.Generator() for i in range(4)}
        real_rand = torch.rand
        torch.rand = lambda *a, **k: torch.full(a if a and isinstance(a[0], int) else (1,), u)
        try:
            toks = random_sample(probs.clone(), gens)
        finally:
            torch.rand = real_rand
        assert (probs.gather(1, toks[:, None]) > 0).all(), (u, toks)
    toks = torch.stack([random_sample(probs.clone(), {}) for _ in range(200)])
    assert (probs.gather(1, toks.t()) > 0).all()


def test_temperature_sharpens():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    freq = draw_many(probs.tolist(), SamplingParams(temperature=0.5))
    expected = probs ** 2 / (probs ** 2).sum()
    assert torch.allclose(freq, expected, atol=0.015)


PROBS = [0.05, 0.30, 0.02, 0.25, 0.15, 0.10, 0.08, 0.05]  # most likely first: 1, 3, 4, 5, 6, 0 / 7, 2


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(top_k=3), {1, 3, 4}),
    (SamplingParams(top_k=1), {1}),
    (SamplingParams(top_p=0.6), {1, 3, 4}),  # mass ahead of token 4 is 0.55 < 0.6; ahead of 5 is 0.70
    (SamplingParams(top_p=0.5), {1, 3}),
    (SamplingParams(top_p=0.01), {1}),
    (SamplingParams(min_p=0.55), {1, 3}),  # threshold 0.165
    (SamplingParams(min_p=0.3), {1, 3, 4, 5}),  # threshold 0.09
    (SamplingParams(top_k=4, top_p=0.7), {1, 3, 4}),  # top-p over the renormalised top-4 (sum 0.80)
    (SamplingParams(min_p=0.2, top_k=5, top_p=0.9), {1, 3, 4, 5}),
])
def test_filters_keep_exactly_the_right_set(params, expected):
    freq = draw_many(PROBS, params)
    assert set(torch.nonzero(freq).flatten().tolist()) == expected
    # and within the kept set the draw is proportional to the (renormalised) probabilities
    p = torch.tensor(PROBS)
    keep = torch.zeros(len(PROBS), dtype=torch.bool)
    keep[list(expected)] = True
    ref = torch.where(keep, p, 0.0)
    assert torch.allclose(freq, ref / ref.sum(), atol=0.02)


def test_mask_functions_directly():
    base = logits_from_probs(PROBS, 3)
    k = torch.tensor([2, 8, 5])
    out = apply_top_k_top_p(base.clone(), k, None, max_k=5)
    assert kept(out[0]) == {1, 3} and kept(out[1]) == set(range(8)) and kept(out[2]) == {1, 3, 4, 5, 6}
    # kept logits are untouched
    assert torch.equal(out[0, [1, 3]], base[0, [1, 3]])
    p = torch.tensor([0.6, 1.0, 0.3])
    out = apply_top_k_top_p(base.clone(), None, p)
    assert kept(out[0]) == {1, 3, 4} and kept(out[1]) == set(range(8)) and kept(out[2]) == {1}
    assert torch.equal(out[0, [1, 3, 4]], base[0, [1, 3, 4]])
    out = apply_top_k_top_p(base.clone(), k, p)
    assert kept(out[0]) == {1, 3} and kept(out[1]) == set(range(8)) and kept(out[2]) == {1}
    out = apply_min_p(base.clone(), torch.tensor([0.3, 0.0, 0.9]))
    assert kept(out[0]) == {1, 3, 4, 5} and kept(out[1]) == set(range(8)) and kept(out[2]) == {1}


def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2]), None, max_k=2)
    assert kept(out[0]) == {1, 2, 3}


# --------------------------------------------------------------------------- penalties, bias, min_tokens
def test_token_counts():
    c = token_counts([[1, 1, 3], [], [0]], 5, torch.device("cpu"))
    assert c.tolist() == [[0, 2, 0, 1, 0], [0] * 5, [1, 0, 0, 0, 0]]


def test_penalties_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompts = [[0, 1], [0]]
    outputs = [[1, 2, 2, 5, 2], []]
    r, f, p = 1.5, 0.4, 0.7
    out = apply_penalties(logits.clone(), prompts, outputs, torch.tensor([p, 0.0]), torch.tensor([f, 0.0]),
                          torch.tensor([r, 2.0]))
    counts = {1: 1, 2: 3, 5: 1}
    exp = logits[0].tolist()
    for t in range(6):
        if t in (0, 1) or t in counts:  # seen in prompt or output: repetition
            exp[t] = exp[t] / r if exp[t] > 0 else exp[t] * r
        if t in counts:
            exp[t] -= f * counts[t] + p
    assert out[0].tolist() == pytest.approx(exp)
    exp1 = logits[1].tolist()
    exp1[0] = 2.0 / 2.0  # only the prompt token; no output, so no frequency/presence
    assert out[1].tolist() == pytest.approx(exp1)


def test_penalties_change_greedy_choice_in_sampler():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0]])
    reqs = [make_request(SamplingParams(temperature=0.0, frequency_penalty=1.0), output=(1, 1), rid="f"),
            make_request(SamplingParams(temperature=0.0), output=(1, 1), rid="plain"),
            make_request(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(1,), rid="rep")]
    assert sampler(logits, reqs).token_ids.tolist() == [2, 1, 2]  # 5-2=3 < 4; untouched; 5/2=2.5 < 4


def test_logit_bias():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    out = apply_logit_bias(logits.clone(), [{0: 5.0, 2: -1.0, 99: 1.0}, None])
    assert out.tolist() == [[5.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
    reqs = [make_request(SamplingParams(temperature=0.0, logit_bias={0: 2.5}), rid="a"),
            make_request(SamplingParams(temperature=0.0), rid="b")]
    assert sampler(logits, reqs).token_ids.tolist() == [0, 2]
    # a -inf bias bans a token even for random sampling
    banned = make_request(SamplingParams(temperature=1.0, logit_bias={2: float("-inf"), 1: float("-inf")}))
    assert sampler(logits[:1], [banned]).token_ids.tolist() == [0]


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 1.0, 8.0, 2.0]])  # EOS=0 best, stop id 2 next
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2])
    assert sampler(logits, [make_request(p, output=(3,))]).token_ids.tolist() == [3]
    assert sampler(logits, [make_request(p, output=(3, 3))]).token_ids.tolist() == [3]
    assert sampler(logits, [make_request(p, output=(3, 3, 3))]).token_ids.tolist() == [0]  # min_tokens reached
    # random sampling cannot pick them either
    pr = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[2])
    rows = 200
    reqs = [make_request(pr, rid=str(i)) for i in range(rows)]
    toks = sampler(logits.expand(rows, -1).contiguous(), reqs).token_ids.tolist()
    assert set(toks) <= {1, 3}
    # with ignore_eos, EOS is not a stop token and is not blocked
    pi = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, [make_request(pi)]).token_ids.tolist() == [0]


def test_mixed_batch_greedy_rows_unaffected_by_random_steps():
    torch.manual_seed(4)
    logits = torch.randn(6, 64)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=3),
              SamplingParams(temperature=0.0, top_k=2, top_p=0.1),  # greedy: filters irrelevant
              SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1, seed=3),
              SamplingParams(temperature=0.0, presence_penalty=2.0),
              SamplingParams(temperature=2.0)]
    top = logits.argmax(-1)
    reqs = [make_request(pr, output=(int(top[4]),) if i == 4 else (), rid=str(i)) for i, pr in enumerate(params)]
    out = sampler(logits, reqs)
    assert out.token_ids.tolist()[0] == top[0] and out.token_ids.tolist()[2] == top[2]
    pen = logits[4].clone()
    pen[top[4]] -= 2.0
    assert out.token_ids.tolist()[4] == int(pen.argmax())
    assert out.token_ids.tolist()[1] in logits[1].topk(3).indices.tolist()
    assert all(math.isfinite(x) for x in out.chosen_logprobs)


def test_top_p_exact_boundary():
    # the kept set is the smallest whose mass reaches p: {0} has exactly 0.5 (powers of two: no rounding)
    logits = logits_from_probs([0.5, 0.25, 0.25], 3)
    out = apply_top_k_top_p(logits.clone(), None, torch.tensor([0.5, 0.75, 1e-9]))
    assert kept(out[0]) == {0}
    assert len(kept(out[1])) == 2 and 0 in kept(out[1])
    assert kept(out[2]) == {0}  # a tiny p (1 - p rounds to 1) still keeps the most likely token


def test_input_logits_not_modified():
    torch.manual_seed(5)
    logits = torch.randn(3, 16)
    before = logits.clone()
    reqs = [make_request(SamplingParams(temperature=0.7, top_k=3, top_p=0.8, min_p=0.1, logit_bias={1: 2.0},
                                        repetition_penalty=1.3, presence_penalty=0.5, logprobs=2), rid=str(i))
            for i in range(2)]
    reqs.append(make_request(SamplingParams(temperature=0.0, min_tokens=2, frequency_penalty=1.0), rid="g"))
    sampler(logits, reqs)
    assert torch.equal(logits, before)
