"""Incremental detokenization with stop strings.

Fast tokenizers (anything exposing a ``tokenizers.Tokenizer``: transformers' ``backend_tokenizer`` /
``_tokenizer``, or a ``tokenizers.Tokenizer`` itself) decode through ``tokenizers.decoders.DecodeStream``,
which buffers a token until it completes a UTF-8 character, so characters split across byte tokens come
out right. The stream is primed with the end of the prompt (as vLLM does) so the first output token is
decoded in context (e.g. keeps its leading space with SentencePiece-style decoders). Other tokenizers fall
back to decoding a short window of token ids with ``tokenizer.decode`` (vLLM's prefix/read offsets).

Stop strings are searched only in the text added by this update plus an overlap of max(len(stop)) - 1
characters; while streaming, ``get_delta`` holds back that many characters so a stop string is never
streamed partially.
"""
from __future__ import annotations

from typing import Any, Optional

from pageport.core.sampling_params import SamplingParams

try:  # tokenizers >= 0.21
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    _HFTokenizer = None
    DecodeStream = None

_INVALID_PREFIX_ERR = "Invalid prefix encountered"
_REPLACEMENT = "\ufffd"


def fast_backend(tokenizer: Any) -> Optional[Any]:
    """The ``tokenizers.Tokenizer`` behind a transformers tokenizer (or the object itself), else None."""
    if _HFTokenizer is None or tokenizer is None:
        return None
    if isinstance(tokenizer, _HFTokenizer):
        return tokenizer
    for attr in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attr, None)
        if isinstance(backend, _HFTokenizer):
            return backend
    return None


class IncrementalDetokenizer:
    """One per request (per completion for n > 1).

    ``update(new_token_ids, num_output_tokens)`` appends sampled tokens and returns the stop string that
    ended the text, if any (``output_text`` is then cut before it, or after it with
    include_stop_str_in_output). ``get_delta(finished)`` gives the text not yet handed out.
    With ``tokenizer=None`` (or ``params.detokenize=False``) no text is produced and stop strings are off.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.params = params
        self.output_text = ""
        self.token_ids: list[int] = []  # output tokens seen so far
        self.stop_string: Optional[str] = None  # set once a stop string ended the text
        self._last_offset = 0  # output_text handed out by get_delta
        self._decoded_cache: dict[int, str] = {}

        self._enabled = tokenizer is not None and params.detokenize
        self.stop: list[str] = list(params.stop or []) if self._enabled else []
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self.stop_buffer_length = (self._max_stop_len - 1
                                   if self.stop and not params.include_stop_str_in_output else 0)

        self._backend = fast_backend(tokenizer)
        self._stream = None
        if not self._enabled:
            return
        skip = params.skip_special_tokens
        if self._backend is not None and DecodeStream is not None:
            self._stream = DecodeStream(skip_special_tokens=skip)
            for tid in self._prompt_suffix(prompt_token_ids):  # prime the stream; its text is discarded
                self._step(tid)
        else:
            # slow path: decode ids[prefix_offset:] and emit what follows decode(ids[prefix_offset:read_offset])
            self._ids = list(prompt_token_ids[-6:])
            self._prefix_offset = 0
            self._read_offset = len(self._ids)

    # --------------------------------------------------------------------------------------------
    def _prompt_suffix(self, prompt_token_ids: list[int]) -> list[int]:
        """A few last prompt tokens that decode cleanly (not mid-character), as context for the stream."""
        n = len(prompt_token_ids)
        if n <= 4:
            return list(prompt_token_ids)
        for i in range(4, min(n + 1, 24)):
            suffix = prompt_token_ids[-i:]
            if _REPLACEMENT not in self._backend.decode(suffix, skip_special_tokens=False):
                return list(suffix)
        return list(prompt_token_ids[-4:])

    def _step(self, token_id: int) -> Optional[str]:
        try:
            return self._stream.step(self._backend, token_id)
        except (OverflowError, TypeError):
            return None
        except Exception as e:  # tokenizers raises a plain Exception
            if not str(e).startswith(_INVALID_PREFIX_ERR):
                raise
            # DecodeStream's state broke on non-monotonic output (vllm-project/vllm#17448): restart it
            self._stream = DecodeStream(skip_special_tokens=self.params.skip_special_tokens)
            return self._stream.step(self._backend, token_id)

    def _slow_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        skip = self.params.skip_special_tokens
        prefix_text = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset],
                                            skip_special_tokens=skip)
        new_text = self.tokenizer.decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    # --------------------------------------------------------------------------------------------
    def update(self, new_token_ids: list[int], num_output_tokens: int) -> Optional[str]:
        """Append tokens; return the stop string if one now appears in the output text (searched only once
        num_output_tokens >= params.min_tokens), with output_text cut before it (or after it when
        include_stop_str_in_output). Calls after a stop string was found are ignored."""
        if self.stop_string is not None:
            return None
        self.token_ids.extend(new_token_ids)
        if not self._enabled:
            return None
        pieces = []
        for tid in new_token_ids:
            piece = self._step(tid) if self._stream is not None else self._slow_step(tid)
            if piece:
                pieces.append(piece)
        if not pieces:
            return None
        new_text = "".join(pieces)
        self.output_text += new_text
        if self.stop and num_output_tokens >= self.params.min_tokens:
            return self._check_stop(len(new_text))
        return None

    def _check_stop(self, new_char_count: int) -> Optional[str]:
        text = self.output_text
        best: Optional[tuple[int, str]] = None  # the earliest stop string wins; ties: the first listed
        for stop in self.stop:
            idx = text.find(stop, max(0, len(text) - new_char_count - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        end = idx + len(stop) if self.params.include_stop_str_in_output else idx
        self.output_text = text[:end]
        self.stop_string = stop
        return stop

    def get_delta(self, finished: bool) -> str:
        """Text added since the last call. While not finished, the last max(len(stop)) - 1 characters are
        held back (unless include_stop_str_in_output) so a stop string is never streamed in part."""
        hold = 0 if finished else self.stop_buffer_length
        end = max(len(self.output_text) - hold, 0)
        if end <= self._last_offset:
            return ""
        delta = self.output_text[self._last_offset:end]
        self._last_offset = end
        return delta

    def get_text(self, finished: bool) -> str:
        """All text so far, less the held-back tail while not finished (for cumulative, non-delta streaming)."""
        if finished or not self.stop_buffer_length:
            return self.output_text
        return self.output_text[:max(len(self.output_text) - self.stop_buffer_length, 0)]

    def decode_token(self, token_id: int) -> str:
        """One token's text, for logprobs' decoded_token ("" without a tokenizer). A token that is only part
        of a UTF-8 character decodes to U+FFFD, as in vLLM."""
        text = self._decoded_cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                return ""
            if self._backend is not None:
                text = self._backend.decode([token_id], skip_special_tokens=False)
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._decoded_cache[token_id] = text
        return text
