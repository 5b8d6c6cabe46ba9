"""A tiny random Llama saved to a folder and PEFT adapters on it (init_lora_weights=False, so they change the
output), for the LoRA tests of the engine and the server."""
from __future__ import annotations

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tiny_llama(folder):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    hf.save_pretrained(folder)
    return hf


def make_adapter(base_folder, folder, r: int, targets=ALL, seed: int = 0, std: float = 0.3):
    """A PEFT adapter saved to `folder`; returns the PEFT model (the reference)."""
    import peft
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder).eval(),
                             peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, std)
    pm.save_pretrained(folder)
    return pm.eval()


def greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
