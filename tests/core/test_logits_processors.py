"""vLLM's batch-level logits-processor interface: a processor keeping per-row state follows its requests through
additions, removals and reorders of the batch, driven by LogitsProcessors from each step's request order."""
from __future__ import annotations

import random

import pytest
import torch

from pageport.core.logits_processors import (BatchUpdate, LogitsProcessor, LogitsProcessors,
                                             MoveDirectionality)
from pageport.core.sampling_params import SamplingParams

VOCAB = 50


class ForceToken(LogitsProcessor):
    """vLLM's example shape: rows whose request set extra_args["target_token"] can only produce it."""

    def __init__(self, config, device, is_pin_memory):
        self.targets: dict[int, int] = {}
        self.updates: list = []

    @classmethod
    def validate_params(cls, params):
        t = (params.extra_args or {}).get("target_token")
        if t is not None and not isinstance(t, int):
            raise ValueError("target_token must be an int")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, update):
        self.updates.append(update)
        if update is None:
            return
        for i in update.removed:
            self.targets.pop(i, None)
        for i, params, _, _ in update.added:
            self.targets.pop(i, None)
            t = (params.extra_args or {}).get("target_token")
            if t is not None:
                self.targets[i] = t
        for a, b, kind in update.moved:
            ta, tb = self.targets.pop(a, None), self.targets.pop(b, None)
            if ta is not None:
                self.targets[b] = ta
            if kind is MoveDirectionality.SWAP and tb is not None:
                self.targets[a] = tb

    def apply(self, logits):
        for row, t in self.targets.items():
            keep = logits[row, t].clone()
            logits[row] = float("-inf")
            logits[row, t] = keep
        return logits


def _check(lp: LogitsProcessors, batch: list[str], target: dict):
    logits = lp.apply(torch.randn(len(batch), VOCAB))
    for row, r in enumerate(batch):
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        if target.get(r) is None:
            assert len(finite) == VOCAB, (r, row)
        else:
            assert finite == [target[r]], (r, row, finite)


def test_state_follows_requests_through_random_batches():
    rng = random.Random(0)
    lp = LogitsProcessors([ForceToken])
    target, params, outputs = {}, {}, {}
    live: list[str] = []
    for step in range(300):
        for r in list(live):  # some finish
            if rng.random() < 0.15:
                live.remove(r)
        for _ in range(rng.randint(0, 3)):  # some arrive
            r = f"r{step}-{_}"
            target[r] = rng.choice([None, rng.randrange(VOCAB)])
            params[r] = SamplingParams(extra_args=None if target[r] is None else {"target_token": target[r]})
            outputs[r] = []
            live.append(r)
        if rng.random() < 0.3:
            rng.shuffle(live)  # the scheduler reorders rows
        lp.step(live, params, {}, outputs)
        assert lp.rows == live
        _check(lp, live, target)


def test_updates_name_rows_as_vllm_does():
    lp = LogitsProcessors([ForceToken])
    p = SamplingParams()
    out = {"a": [], "b": [], "c": [], "d": []}
    params = dict.fromkeys(out, p)
    lp.step(["a", "b", "c"], params, {}, out)
    proc = lp.processors[0]
    first = proc.updates[-1]
    assert first.batch_size == 3 and [i for i, *_ in first.added] == [0, 1, 2] and not first.removed
    lp.step(["a", "b", "c"], params, {}, out)
    assert proc.updates[-1] is None  # nothing changed
    lp.step(["c", "d"], params, {}, out)  # a, b leave; d arrives in the first free row; c moves down
    u = proc.updates[-1]
    assert u.removed == [0, 1] and [i for i, *_ in u.added] == [0]
    assert u.moved == [(2, 0, MoveDirectionality.SWAP), (2, 1, MoveDirectionality.UNIDIRECTIONAL)]
    assert lp.rows == ["c", "d"] and isinstance(u, BatchUpdate)


def test_validate_params():
    lp = LogitsProcessors([ForceToken])
    lp.validate(SamplingParams(extra_args={"target_token": 3}))
    with pytest.raises(ValueError, match="target_token"):
        lp.validate(SamplingParams(extra_args={"target_token": "x"}))
