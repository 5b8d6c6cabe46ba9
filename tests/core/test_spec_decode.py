"""Speculative decoding pieces: the n-gram proposer, the config, the rejection sampler's distribution."""
import math

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.core.sampling_params import SamplingParams
from pageport.core.spec_decode import NgramProposer, SpeculativeConfig
from pageport.core.spec_decode.rejection import SpecRow, greedy_accept, rejection_sample_row, verify


def test_ngram_proposes_what_followed_the_suffix():
    p = NgramProposer(3, prompt_lookup_max=4, prompt_lookup_min=2)
    assert p.propose([1, 2, 3, 4, 5, 9, 9, 1, 2, 3]) == [4, 5, 9]  # suffix [1,2,3] seen at 0
    assert p.propose([1, 2, 3, 4, 5, 9, 9, 1, 2, 3], k=1) == [4]
    assert p.propose([5, 6, 7, 8]) == []  # no repeat
    assert p.propose([7, 1, 2, 3, 8, 8, 1, 2, 3, 6, 6, 6, 2, 3]) == [6, 6, 6]  # latest match with k tokens after it
    # the longest n wins: [4,1,2] matches at 5 (followed by 9) though [1,2] also matches at 0 (followed by 7)
    assert NgramProposer(1, 3, 2).propose([1, 2, 7, 0, 4, 1, 2, 9, 3, 4, 1, 2]) == [9]
    # n below prompt_lookup_min is never used
    assert NgramProposer(2, 4, 3).propose([1, 2, 5, 6, 1, 2]) == []
    # a short period: the earliest match has the longest tail
    assert NgramProposer(4, 2, 2).propose([1, 2, 1, 2, 1, 2]) == [1, 2, 1, 2]


def _scan(seq, k, lo, hi):
    """The rule by brute force: for n from hi down to lo, every earlier window equal to the suffix."""
    for n in range(min(hi, len(seq) - 1), lo - 1, -1):
        hits = [s for s in range(len(seq) - n) if seq[s:s + n] == seq[len(seq) - n:]]
        if hits:
            full = [s for s in hits if s + n + k <= len(seq)]
            start = (full[-1] if full else hits[0]) + n
            return seq[start:start + k]
    return []


@pytest.mark.parametrize("vocab", [2, 3, 8])
def test_ngram_index_grown_step_by_step_matches_a_full_scan(vocab):
    """The index a request keeps across steps (a short or a long prompt, hashed in bulk, then tokens appended 1..5
    at a time, k varying per call) proposes what a scan of the whole sequence does; small vocabularies make long
    runs and many overlapping matches."""
    g = torch.Generator().manual_seed(vocab)
    for lo, hi, k, prompt in ((2, 4, 4, 6), (1, 3, 2, 150), (3, 3, 5, 90), (2, 4, 4, 200)):
        p = NgramProposer(k, prompt_lookup_max=hi, prompt_lookup_min=lo)
        seq = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        index = p.new_index()
        for _ in range(60):
            kk = int(torch.randint(1, k + 1, (1,), generator=g))
            assert p.propose(seq, kk, index) == _scan(seq, kk, lo, hi), (seq, kk)
            seq += torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()


def test_speculative_config_keys():
    c = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert c.speculative_config == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3,
                                    "prompt_lookup_min": 2, "model": None, "quantization": None}
    assert EngineConfig().speculative_config is None
    # a draft model: vLLM's form names only the model (the method follows from it)
    d = SpeculativeConfig.parse({"model": "/ckpt/draft", "num_speculative_tokens": 4, "quantization": "int4",
                                 "draft_tensor_parallel_size": 1})
    assert (d.method, d.model, d.num_speculative_tokens, d.quantization) == ("draft_model", "/ckpt/draft", 4, "int4")
    assert SpeculativeConfig.parse({"method": "draft_model", "model": "m", "num_speculative_tokens": 2}).model == "m"
    e = SpeculativeConfig.parse({"method": "eagle", "model": "/ckpt/eagle", "num_speculative_tokens": 3})
    assert (e.method, e.model, e.num_speculative_tokens) == ("eagle", "/ckpt/eagle", 3)
    e3 = SpeculativeConfig.parse({"method": "eagle3", "model": "/ckpt/eagle3", "num_speculative_tokens": 2})
    assert (e3.method, e3.model, e3.num_speculative_tokens) == ("eagle3", "/ckpt/eagle3", 2)
    for bad in ('{"method": "eagle", "num_speculative_tokens": 2}', '{"method": "ngram"}', "{nope",
                '{"method": "eagle3", "num_speculative_tokens": 2}', '{"method": "mtp", "model": "m", '
                '"num_speculative_tokens": 2}',
                '{"method": "eagle", "model": "m", "num_speculative_tokens": 2, "quantization": "int4"}',
                '{"method": "draft_model", "num_speculative_tokens": 2}',
                '{"model": "m", "num_speculative_tokens": 2, "quantization": "int3"}',
                '{"model": "m", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}',
                '{"method": "ngram", "num_speculative_tokens": 2, "quantization": "int4"}',
                '{"method": "ngram", "num_speculative_tokens": 0}', '{"method": "ngram", "num_speculative_tokens": 2, '
                '"prompt_lookup_min": 5, "prompt_lookup_max": 3}', '{"method": "ngram", "num_speculative_tokens": 2, '
                '"bogus": 1}'):
        with pytest.raises(ValueError, match="speculative_config"):
            SpeculativeConfig.parse(bad)


def test_greedy_accept_longest_matching_prefix_plus_one():
    assert greedy_accept([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert greedy_accept([5, 6, 7, 8], [5, 9, 7]) == [5, 6]  # correction at the first mismatch
    assert greedy_accept([5, 6, 7, 8], [1, 6, 7]) == [5]


class _Req:
    def __init__(self, params):
        self.params, self.generator = params, None


def _chi2_sf(x, dof):  # survival function of chi-square via the regularised gamma (no scipy needed)
    return 1.0 - torch.special.gammainc(torch.tensor(dof / 2, dtype=torch.float64),
                                        torch.tensor(x / 2, dtype=torch.float64)).item()


def test_rejection_sampling_keeps_the_target_distribution():
    """Chi-square goodness of fit (significance 0.001, fixed seed) of the first and second emitted tokens
    against the target's p_0 and p_1 (given the first was the proposal), over 20000 draws."""
    torch.manual_seed(0)
    V, N = 6, 20000
    p0 = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
    p1 = torch.tensor([0.05, 0.05, 0.40, 0.30, 0.10, 0.10])
    p2 = torch.full((V,), 1 / V)
    probs = torch.stack([p0, p1, p2])
    draft = [1, 2]
    gen = torch.Generator().manual_seed(1234)
    first = torch.zeros(V)
    second = torch.zeros(V)
    for _ in range(N):
        toks = rejection_sample_row(probs, draft, gen)
        first[toks[0]] += 1
        if toks[0] == draft[0]:
            assert len(toks) >= 2
            second[toks[1]] += 1
        else:
            assert len(toks) == 1
    for counts, p in ((first, p0), (second, p1)):
        exp = p * counts.sum()
        stat = float(((counts - exp) ** 2 / exp).sum())
        assert _chi2_sf(stat, V - 1) > 1e-3, (counts, exp, stat)
    # acceptance of the first proposal happens with probability p0[1]
    assert abs(second.sum() / N - 0.25) < 0.02


def test_rejection_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    """A draft model's proposals: each draw takes d_1 ~ q_0 and d_2 ~ q_1 afresh, as the draft does. The first
    emitted token must follow p_0 and, after an accepted d_1 = a, the second p_1 (chi-square, significance 0.001,
    20000 draws); acceptance of d_1 has probability sum_x min(p_0(x), q_0(x))."""
    V, N = 6, 20000
    p0 = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
    p1 = torch.tensor([0.05, 0.05, 0.40, 0.30, 0.10, 0.10])
    probs = torch.stack([p0, p1, torch.full((V,), 1 / V)])
    q0 = torch.tensor([0.05, 0.50, 0.05, 0.20, 0.15, 0.05])  # a draft that is wrong in places
    q1 = torch.tensor([0.30, 0.00, 0.30, 0.10, 0.20, 0.10])
    qs = torch.stack([q0, q1])
    gen = torch.Generator().manual_seed(99)
    first, second = torch.zeros(V), torch.zeros(V)
    accepted = 0
    for _ in range(N):
        draft = [int(torch.multinomial(q0, 1, generator=gen)), int(torch.multinomial(q1, 1, generator=gen))]
        toks = rejection_sample_row(probs, draft, gen, qs)
        first[toks[0]] += 1
        if len(toks) >= 2:
            accepted += 1
            if toks[0] == 1:  # condition on one first token: the second must follow p_1 (which p_1 is in the test)
                second[toks[1]] += 1
    for counts, p in ((first, p0), (second, p1)):
        exp = p * counts.sum()
        stat = float(((counts - exp) ** 2 / exp).sum())
        assert _chi2_sf(stat, V - 1) > 1e-3, (counts, exp, stat)
    assert abs(accepted / N - float(torch.minimum(p0, q0).sum())) < 0.02
    # a draft equal to the target is always accepted
    always = rejection_sample_row(probs, [1, 2], gen, probs[:2].clone())
    assert always[:2] == [1, 2] and len(always) == 3


def test_rejection_sampling_detects_a_wrong_distribution():
    """The same test fails for a sampler that ignores the proposal (it draws p_0 with the draft removed)."""
    torch.manual_seed(0)
    p0 = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.07, 0.03])
    q = p0.clone()
    q[1] = 0
    draws = torch.multinomial(q / q.sum(), 20000, replacement=True)
    counts = torch.bincount(draws, minlength=6).float()
    exp = p0 * 20000
    assert _chi2_sf(float(((counts - exp) ** 2 / exp).sum()), 5) < 1e-3


def test_verify_mixes_greedy_and_sampled_rows_with_temperature():
    torch.manual_seed(0)
    logits = torch.randn(7, 10)
    greedy = _Req(SamplingParams(temperature=0))
    am = logits.argmax(-1).tolist()
    sampled = _Req(SamplingParams(temperature=0.5, top_k=3, seed=7))
    rows = [SpecRow(greedy, [am[0], am[1] + 1 if am[1] < 9 else 0], 0),
            SpecRow(sampled, [1, 2, 3], 3)]
    out = verify(logits, rows)
    assert out[0] == [am[0], am[1]]
    toks = out[1]
    assert 1 <= len(toks) <= 4 and toks[:len(toks) - 1] == [1, 2, 3][:len(toks) - 1]
    top3 = [set(logits[3 + i].topk(3).indices.tolist()) for i in range(4)]
    assert toks[-1] in top3[len(toks) - 1]  # top-k applied to the drawn token
