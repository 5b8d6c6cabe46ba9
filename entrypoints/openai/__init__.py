"""The OpenAI-compatible server (FastAPI): `build_app(AsyncLLMEngine, ...)`, run by `pageport serve`."""
