"""Incremental detokenizer: streaming, stop strings, hold-back, byte-split characters, special tokens."""
from __future__ import annotations

import pytest

from pageport.core.detokenizer import IncrementalDetokenizer, fast_backend
from pageport.core.sampling_params import SamplingParams

CHAT_PROMPT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
TEXT = "Hello there! The café serves 😀 and 日本語 food."


@pytest.fixture(scope="module")
def tok(default_tokenizer):
    return default_tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok.encode(CHAT_PROMPT, add_special_tokens=False)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def stream(detok, ids, per_update=1):
    """Feed ids; return (deltas, stop string or None, number of tokens fed)."""
    deltas = []
    n = 0
    for start in range(0, len(ids), per_update):
        chunk = ids[start:start + per_update]
        n += len(chunk)
        stop = detok.update(chunk, n)
        if stop is not None:
            deltas.append(detok.get_delta(True))
            return deltas, stop, n
        deltas.append(detok.get_delta(False))
    deltas.append(detok.get_delta(True))
    return deltas, None, n


def test_uses_fast_backend(tok):
    assert fast_backend(tok) is not None


@pytest.mark.parametrize("per_update", [1, 3])
def test_deltas_concatenate_to_full_decode(tok, prompt_ids, per_update):
    ids = enc(tok, TEXT + "<|im_end|>")
    d = IncrementalDetokenizer(tok, SamplingParams(), prompt_ids)
    deltas, stop, _ = stream(d, ids, per_update)
    assert stop is None
    full = tok.decode(ids, skip_special_tokens=True)
    assert full == TEXT
    assert "".join(deltas) == d.output_text == full
    # in context: the output is what the prompt + output decodes to beyond the prompt
    both = tok.decode(prompt_ids + ids, skip_special_tokens=False)
    assert both.startswith(tok.decode(prompt_ids, skip_special_tokens=False))


def test_multibyte_characters_split_across_byte_tokens(tok, prompt_ids):
    ids = enc(tok, " 😀 日本語")
    pieces = [tok.convert_ids_to_tokens(i) for i in ids]
    assert len(ids) > 4  # the emoji and the CJK characters take several byte tokens each
    d = IncrementalDetokenizer(tok, SamplingParams(), prompt_ids)
    deltas, _, _ = stream(d, ids)
    assert "\ufffd" not in "".join(deltas)
    assert "" in deltas[:-1]  # a token ending mid-character gives no text yet
    assert "".join(deltas) == d.output_text == " 😀 日本語", pieces
    # one byte token alone decodes to the replacement character (logprobs' decoded_token)
    assert "\ufffd" in d.decode_token(ids[0])


def test_stop_string_spanning_two_tokens(tok, prompt_ids):
    ids = enc(tok, TEXT)
    assert tok.decode(ids[:1]) == "Hello" and tok.decode(ids[1:2]) == " there"
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["o th"]), prompt_ids)
    deltas, stop, n = stream(d, ids)
    assert stop == "o th" and n == 2 and d.stop_string == "o th"
    assert d.output_text == "Hell"
    assert "".join(deltas) == "Hell"
    assert d.update(ids[2:3], 3) is None and d.output_text == "Hell"  # ignored after the stop


def test_include_stop_str_in_output(tok, prompt_ids):
    ids = enc(tok, TEXT)
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["o th"], include_stop_str_in_output=True), prompt_ids)
    assert d.stop_buffer_length == 0
    deltas, stop, _ = stream(d, ids)
    assert stop == "o th"
    assert d.output_text == "Hello th"  # cut right after the stop string
    assert "".join(deltas) == "Hello th"


def test_earliest_stop_string_wins(tok, prompt_ids):
    ids = enc(tok, TEXT)
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["! The", "there"]), prompt_ids)
    d.update(ids[:4], 4)  # "Hello there! The" in one update: both stops appear
    assert d.stop_string == "there" and d.output_text == "Hello "


def test_holds_back_while_streaming(tok, prompt_ids):
    ids = enc(tok, TEXT)
    stop = "there!"
    d = IncrementalDetokenizer(tok, SamplingParams(stop=[stop, "zz"]), prompt_ids)
    assert d.stop_buffer_length == len(stop) - 1
    streamed = ""
    n = 0
    for t in ids:
        n += 1
        found = d.update([t], n)
        if found:
            break
        streamed += d.get_delta(False)
        # everything but the last len(stop) - 1 characters is out, nothing more
        assert streamed == d.output_text[:max(len(d.output_text) - (len(stop) - 1), 0)]
    assert found == stop
    assert "t" not in streamed  # no part of the stop string was ever streamed
    streamed += d.get_delta(True)
    assert streamed == d.output_text == "Hello "


def test_no_holdback_when_finished(tok, prompt_ids):
    ids = enc(tok, "Hello there")
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["xyzxyz"]), prompt_ids)
    d.update(ids, len(ids))
    assert d.get_text(False) == "Hello " and d.get_text(True) == "Hello there"
    assert d.get_delta(False) == "Hello "  # the last len("xyzxyz") - 1 = 5 characters are held back
    assert d.get_delta(False) == ""
    assert d.get_delta(True) == "there"
    assert d.get_delta(True) == ""


def test_stop_strings_wait_for_min_tokens(tok, prompt_ids):
    ids = enc(tok, "Hello Hello Hello")
    assert len(ids) == 3
    d = IncrementalDetokenizer(tok, SamplingParams(stop=["Hello"], min_tokens=2), prompt_ids)
    assert d.update(ids[:1], 1) is None  # 1 output token < min_tokens
    assert d.update(ids[1:2], 2) == "Hello"  # now it counts: the second "Hello" stops
    assert d.output_text == "Hello "


def test_skip_special_tokens(tok, prompt_ids):
    ids = enc(tok, "Hi<|im_end|>")
    assert len(ids) == 2
    d = IncrementalDetokenizer(tok, SamplingParams(skip_special_tokens=True), prompt_ids)
    deltas, _, _ = stream(d, ids)
    assert "".join(deltas) == d.output_text == "Hi"
    d = IncrementalDetokenizer(tok, SamplingParams(skip_special_tokens=False), prompt_ids)
    deltas, _, _ = stream(d, ids)
    assert "".join(deltas) == d.output_text == "Hi<|im_end|>"
    assert d.decode_token(ids[1]) == "<|im_end|>"


def test_no_tokenizer():
    d = IncrementalDetokenizer(None, SamplingParams(stop=["a"]), [1, 2, 3])
    assert d.update([4, 5], 2) is None
    assert d.output_text == "" and d.get_delta(True) == "" and d.stop == []
    assert d.token_ids == [4, 5]


def test_detokenize_false(tok, prompt_ids):
    d = IncrementalDetokenizer(tok, SamplingParams(detokenize=False), prompt_ids)
    assert d.update(enc(tok, "Hello"), 1) is None and d.output_text == ""
    with pytest.raises(ValueError, match="needs detokenize=True"):  # as vLLM: stop strings are matched in text
        SamplingParams(detokenize=False, stop=["Hello"])


class SlowTokenizer:
    """Only `decode`: forces the fallback path."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_fallback_without_fast_tokenizer(tok, prompt_ids):
    slow = SlowTokenizer(tok)
    assert fast_backend(slow) is None
    ids = enc(tok, TEXT + "<|im_end|>")
    d = IncrementalDetokenizer(slow, SamplingParams(), prompt_ids)
    deltas, _, _ = stream(d, ids)
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == d.output_text == TEXT
    d = IncrementalDetokenizer(slow, SamplingParams(stop=["o th"]), prompt_ids)
    _, stop, n = stream(d, ids)
    assert stop == "o th" and n == 2 and d.output_text == "Hell"
    assert d.decode_token(ids[0]) == "Hello"


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A tiny in-memory tokenizer with Llama/Mistral's SentencePiece-style decoder (▁ for spaces, byte fallback,
    the first token's leading space stripped)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "▁Hello": 1, "▁there": 2, "!": 3, "<0xF0>": 4, "<0x9F>": 5, "<0x98>": 6, "<0x80>": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    return t


def test_sentencepiece_style_first_token_keeps_its_space_after_prompt(sp_tokenizer):
    out = [2, 4, 5, 6, 7, 3]  # "▁there", the four bytes of 😀, "!"
    d = IncrementalDetokenizer(sp_tokenizer, SamplingParams(), [1])  # prompt "Hello"
    deltas, _, _ = stream(d, out)
    assert "".join(deltas) == d.output_text == " there😀!"
    assert sp_tokenizer.decode([1] + out) == "Hello" + d.output_text
    # without a prompt, the first token is at the start of the text: no leading space
    d = IncrementalDetokenizer(sp_tokenizer, SamplingParams(), [])
    stream(d, out)
    assert d.output_text == "there😀!"
    # same through the fallback (decode of a window of ids, primed with the end of the prompt)
    d = IncrementalDetokenizer(SlowTokenizer(sp_tokenizer), SamplingParams(), [1])
    deltas, _, _ = stream(d, out)
    assert "".join(deltas) == d.output_text == " there😀!"
