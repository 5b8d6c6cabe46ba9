import pytest
import torch

from tests.conftest import DEFAULT_GGUF, default_model_dir

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "hi",
    "List three prime numbers and explain why each one is prime, briefly.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Tell me a very short story about a robot who learns to paint, in two sentences.",
    "Name a color.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def chat_prompts(default_tokenizer):
    """The chat prompts as token ids, through the model's own chat template."""
    out = []
    for c in CHATS:
        text = default_tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                     add_generation_prompt=True)
        out.append(default_tokenizer.encode(text, add_special_tokens=False))
    return out


@pytest.fixture(scope="session")
def hf_greedy(chat_prompts):
    """Transformers' greedy continuation of each prompt (float32, same GGUF), EOS included."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF,
                                                 dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    outs = []
    with torch.inference_mode():
        for ids in chat_prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
            cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
            outs.append(gen[:cut])
    return outs


@pytest.fixture(scope="module")
def llm():
    from pageport import LLM
    return LLM(dtype="float32", max_model_len=1024)
