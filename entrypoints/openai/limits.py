"""Server limits (no web dependencies: `pageport serve --help` works without the serve extra)."""
from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "PAGEPORT_API_KEY"


@dataclass
class ServerLimits:
    max_n: int = 16  # most completions per request (n)
    max_prompts: int = 256  # most prompts in one /v1/completions request
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get a 413
