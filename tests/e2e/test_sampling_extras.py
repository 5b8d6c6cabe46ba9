"""bad_words, allowed_token_ids, a custom logits processor, logprobs=-1 and truncate_prompt_tokens through the
engine (its core in its own process), against Transformers on the same GGUF in float32: greedy decoding with
the same tokens masked by hand, and log_softmax of its logits."""
from __future__ import annotations

import contextlib

import pytest
import torch

from pageport.core.logits_processors import LogitsProcessor, MoveDirectionality

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "My favourite food is", "Once upon a time",
           "Hello, my name is"]
N = 8


class NoRepeat(LogitsProcessor):
    """Rows whose request sets extra_args["no_repeat"] may not repeat their last generated token: per-row state
    that follows the batch (update_state) and reads each request's live output ids."""

    def __init__(self, config, device, is_pin_memory):
        self.rows: dict[int, list[int]] = {}  # row -> the request's output ids (the engine's growing list)

    @classmethod
    def validate_params(cls, params):
        value = (params.extra_args or {}).get("no_repeat")
        if value is not None and not isinstance(value, bool):
            raise ValueError("extra_args['no_repeat'] must be a bool")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, update):
        if update is None:
            return
        for i in update.removed:
            self.rows.pop(i, None)
        for i, params, _, outputs in update.added:
            self.rows.pop(i, None)
            if (params.extra_args or {}).get("no_repeat"):
                self.rows[i] = outputs
        for a, b, kind in update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if kind is MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits):
        for i, outputs in self.rows.items():
            if outputs:
                logits[i, outputs[-1]] = float("-inf")
        return logits


@pytest.fixture(scope="module")
def llm():
    from pageport import LLM
    # one thread: on a shared 2-core machine, two OpenMP threads wait on each other (measured 5x slower)
    return LLM(dtype="float32", max_model_len=256, logits_processors=[NoRepeat], max_logprobs=-1, num_threads=1)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from tests.conftest import DEFAULT_GGUF, default_model_dir
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF,
                                                dtype=torch.float32).eval()


@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode(), one_thread():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return logits.clone()  # a normal tensor: the masks write into it


def hf_greedy(hf, prompt: list[int], n: int, mask) -> list[int]:
    """Transformers' greedy decoding where `mask(output_ids, logits)` edits the next token's logits."""
    out: list[int] = []
    with torch.inference_mode(), one_thread():
        step = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            logits = step.logits[0, -1].float().clone()
            mask(out, logits)
            out.append(int(logits.argmax()))
            step = hf(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


@pytest.fixture(scope="module")
def free(llm):
    """Every prompt's plain greedy tokens, in one batch."""
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]


def ids_of(llm, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text)


def greedy(**kw):
    from pageport import SamplingParams
    return SamplingParams(temperature=0, max_tokens=N, ignore_eos=True, **kw)


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_never_appear_and_match_masked_greedy(llm, hf, free):
    tok = llm.get_tokenizer()
    # a one-token word the free run produces, and a two-token one whose first token it produces
    words = ["Paris", "5, 6"]
    seqs = [tok.encode(w, add_special_tokens=False) for w in words]
    seqs += [tok.encode(" " + w, add_special_tokens=False) for w in words]
    assert seqs[2] == [free[0][0]]  # " Paris", one token, is what the free run says
    assert len(seqs[3]) > 1 and contains(free[1], seqs[3])  # likewise " 5, 6"

    params = [greedy(bad_words=words), greedy(bad_words=words), greedy()]  # the last row is free
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert outs[2].outputs[0].token_ids == free[2]
    for out, prompt in zip(outs[:2], PROMPTS[:2]):
        got = out.outputs[0].token_ids
        assert not any(contains(got, s) for s in seqs), (got, seqs)

        def mask(output, logits):  # vLLM's rule, written out: a sequence's last token after its prefix
            for s in seqs:
                if len(s) == 1 or (len(output) >= len(s) - 1 and output[len(output) - len(s) + 1:] == s[:-1]):
                    logits[s[-1]] = float("-inf")
        assert got == hf_greedy(hf, ids_of(llm, prompt), N, mask)
    assert outs[0].outputs[0].token_ids != free[0]  # the ban did change something
    assert outs[1].outputs[0].token_ids != free[1]


def test_allowed_token_ids_only_and_match_masked_greedy(llm, hf, free):
    tok = llm.get_tokenizer()
    allowed = sorted({t for w in [" 7", " 8", " 9", ",", " ten", " eleven"]
                      for t in tok.encode(w, add_special_tokens=False)})
    outs = llm.generate(PROMPTS[1:3], [greedy(allowed_token_ids=allowed), greedy()], use_tqdm=False)
    got = outs[0].outputs[0].token_ids
    assert set(got) <= set(allowed)
    keep = torch.zeros(len(tok), dtype=torch.bool)
    keep[allowed] = True
    assert got == hf_greedy(hf, ids_of(llm, PROMPTS[1]), N, lambda _, lg: lg.masked_fill_(~keep, float("-inf")))
    assert outs[1].outputs[0].token_ids == free[2]  # the free row beside it is untouched


def test_custom_processor_changes_only_the_rows_that_enable_it(llm, hf, free):
    from pageport import SamplingParams

    prompts = PROMPTS
    on = [0, 2, 4]
    # different lengths: rows leave the batch at different steps, so the processor's rows move
    params = [SamplingParams(temperature=0, max_tokens=N - i, ignore_eos=True,
                             extra_args={"no_repeat": True} if i in on else None) for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    changed = 0
    for i, out in enumerate(outs):
        got, ref = out.outputs[0].token_ids, free[i][:N - i]  # greedy: the shorter run is the prefix
        if i not in on:
            assert got == ref
            continue
        assert all(a != b for a, b in zip(got, got[1:]))

        def mask(output, logits):
            if output:
                logits[output[-1]] = float("-inf")
        assert got == hf_greedy(hf, ids_of(llm, prompts[i]), N - i, mask)
        changed += got != ref
    assert changed >= 1  # the free runs do repeat a token somewhere
    with pytest.raises(ValueError, match="no_repeat"):
        llm.generate(PROMPTS[0], greedy(extra_args={"no_repeat": "yes"}), use_tqdm=False)


def test_logprobs_minus_one_is_the_whole_vocabulary(llm, hf):
    out = llm.generate(PROMPTS[0], greedy(logprobs=-1).clone(max_tokens=3), use_tqdm=False)[0].outputs[0]
    vocab = len(llm.get_tokenizer())
    prompt = ids_of(llm, PROMPTS[0])
    ref = torch.log_softmax(hf_logits(hf, prompt + out.token_ids[:-1])[len(prompt) - 1:], dim=-1)
    assert len(out.logprobs) == 3
    for j, d in enumerate(out.logprobs):
        assert sorted(d) == list(range(vocab))
        got = torch.tensor([d[t].logprob for t in range(vocab)])
        assert torch.allclose(got, ref[j], atol=2e-3), (got - ref[j]).abs().max()
        assert d[out.token_ids[j]].rank == 1 and sorted(lp.rank for lp in d.values()) == list(range(1, vocab + 1))


def test_truncate_prompt_tokens_equals_a_prompt_cut_by_hand(llm):
    text = "Here is a long introduction that the model should never see. The capital of France is"
    ids = ids_of(llm, text)
    cut, got = llm.generate([{"prompt_token_ids": ids[-6:]}, text], [greedy(), greedy(truncate_prompt_tokens=6)],
                            use_tqdm=False)
    assert len(ids) > 6 and got.prompt_token_ids == ids[-6:]
    assert got.outputs[0].token_ids == cut.outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate(text, greedy(truncate_prompt_tokens=10_000), use_tqdm=False)


def test_invalid_values_name_the_field(llm):
    vocab = len(llm.get_tokenizer())
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate(PROMPTS[0], greedy(allowed_token_ids=[vocab]), use_tqdm=False)
    from pageport import SamplingParams
    with pytest.raises(ValueError, match="SamplingParams.bad_words"):
        SamplingParams(bad_words=[" "])
