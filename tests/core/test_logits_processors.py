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


# the engine's side: classes by name across the process boundary, live output lists, the sampler, the front end
def test_processor_refs_load_by_name_or_from_a_file(tmp_path):
    from pageport.core.logits_processors import ProcessorRef, processor_ref, processor_refs

    ref = processor_ref(ForceToken)
    assert ref.qualname == "ForceToken" and ref.load() is ForceToken
    assert processor_ref(f"{ForceToken.__module__}:ForceToken").load() is ForceToken
    assert processor_ref(f"{ForceToken.__module__}.ForceToken").load() is ForceToken
    assert processor_refs(None) is None
    # a script's class: loaded from its file under another name, its __main__ block not run
    script = tmp_path / "my_script.py"
    script.write_text("import pageport.core.logits_processors as lp\n"
                      "class Mine(lp.LogitsProcessor):\n"
                      "    def apply(self, logits): return logits\n"
                      "    def is_argmax_invariant(self): return True\n"
                      "    def update_state(self, update): pass\n"
                      "if __name__ == '__main__':\n"
                      "    raise SystemExit('the script ran')\n")
    cls = ProcessorRef("__main__", "Mine", str(script)).load()
    assert cls.__name__ == "Mine" and cls.__module__.startswith("_pageport_lp_")
    assert ProcessorRef("no_such_module_here", "Mine", str(script)).load() is cls  # the name fails: the file
    for bad, match in [(object, "not a logits processor class"), ("nomodule", "not 'module:Class'"), (3, "entries")]:
        with pytest.raises(ValueError, match=f"logits_processors.*{match}"):
            processor_ref(bad)


class _Req:
    def __init__(self, rid, prompt, params):
        self.request_id, self.params = rid, params
        self.prompt_token_ids, self.token_ids = list(prompt), list(prompt)
        self.num_prompt_tokens = len(prompt)


def test_step_requests_hands_processors_live_output_lists():
    lp = LogitsProcessors([ForceToken])
    a, b = _Req("a", [1, 2], SamplingParams()), _Req("b", [3], SamplingParams())
    lp.step_requests([a, b])
    held = {i: out for i, _, _, out in lp.processors[0].updates[-1].added}
    a.token_ids += [7]
    b.token_ids += [8, 9]
    lp.step_requests([b, a])  # reordered: a swap, and the same lists, grown
    assert held == {0: [7], 1: [8, 9]}
    lp.step_requests([b])
    assert set(lp._outputs) == {"b"}  # a left the batch: its list is dropped


def test_sampler_applies_rules_and_processors_after_raw_logprobs():
    from pageport.core.request import Request
    from pageport.core.sampler import Sampler

    sampler = Sampler()
    sampler.logits_processors = LogitsProcessors([ForceToken])
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    allowed = [5, 9, 11]
    reqs = [Request("r0", [1], SamplingParams(temperature=0, allowed_token_ids=allowed, logprobs=-1), None),
            Request("r1", [1], SamplingParams(temperature=0, extra_args={"target_token": 4}), None),
            Request("r2", [1], SamplingParams(temperature=0, _bad_words_token_ids=[[int(logits[2].argmax())]]),
                    None)]
    out = sampler(logits.clone(), reqs)
    tokens = out.token_ids.tolist()
    assert tokens[0] == allowed[int(logits[0, allowed].argmax())]
    assert tokens[1] == 4
    second = logits[2].clone()
    second[logits[2].argmax()] = float("-inf")
    assert tokens[2] == int(second.argmax())
    raw = torch.log_softmax(logits[0], dim=-1)  # vLLM's default: logprobs of the raw logits
    assert len(out.logprobs[0]) == VOCAB
    assert torch.allclose(torch.tensor([out.logprobs[0][t].logprob for t in range(VOCAB)]), raw, atol=1e-5)


def test_prepare_request_checks_against_the_engine():
    from types import SimpleNamespace

    from pageport.core.sampling_params import prepare_request

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return {"bad": [7], " bad": [8], "two words": [3, 4], " two words": [5, 4]}[text]

    engine = SimpleNamespace(config=SimpleNamespace(max_logprobs=20, max_model_len=10), vocab_size=VOCAB,
                             tokenizer=Tok(), logits_processor_classes=[ForceToken])
    with pytest.raises(ValueError, match="logprobs=-1 .* max_logprobs=20"):
        prepare_request(SamplingParams(logprobs=-1), [1], engine)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        prepare_request(SamplingParams(allowed_token_ids=[VOCAB]), [1], engine)
    with pytest.raises(ValueError, match="target_token"):
        prepare_request(SamplingParams(extra_args={"target_token": "x"}), [1], engine)
    with pytest.raises(ValueError, match="truncate_prompt_tokens=11 is more than max_model_len=10"):
        prepare_request(SamplingParams(truncate_prompt_tokens=11), [1], engine)
    p = SamplingParams(bad_words=["bad", "two words"], truncate_prompt_tokens=2)
    assert prepare_request(p, [1, 2, 3, 4], engine) == [3, 4]
    assert p._bad_words_token_ids == [[7], [8], [3, 4], [5, 4]]  # vLLM's rule: the spaced form of the same length
    assert p.clone(n=2)._bad_words_token_ids == p._bad_words_token_ids  # n > 1 children keep them
    assert prepare_request(SamplingParams(truncate_prompt_tokens=-1), list(range(12)), engine) == list(range(2, 12))
    engine.config.max_logprobs = -1
    prepare_request(SamplingParams(logprobs=-1, prompt_logprobs=-1), [1], engine)
