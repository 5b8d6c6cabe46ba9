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


def test_speculative_config_keys():
    c = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}')
    assert c.speculative_config == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3,
                                    "prompt_lookup_min": 2}
    assert EngineConfig().speculative_config is None
    for bad in ('{"method": "eagle", "num_speculative_tokens": 2}', '{"method": "ngram"}', "{nope",
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
