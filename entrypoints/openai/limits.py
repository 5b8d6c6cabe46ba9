"""Server limits (no web dependencies: `pageport serve --help` works without the serve extra)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

API_KEY_ENV = "PAGEPORT_API_KEY"

# A prompt longer than this many characters per token of max_model_len cannot fit (real text averages 3-5
# characters a token), so it is refused before the tokenizer spends seconds on it.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass
class ServerLimits:
    max_n: int = 16  # most completions per request (n)
    max_seqs_per_request: int = 256  # most sequences (prompts x n) one request may fan out to
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get a 413
    max_prompt_chars: Optional[int] = None  # None: PROMPT_CHARS_PER_TOKEN x max_model_len
    request_body_timeout: float = 30.0  # seconds to receive a whole request body (408 beyond)
