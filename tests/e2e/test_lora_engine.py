"""Multi-LoRA through the engine on the default model: PEFT adapters made here (init_lora_weights=False, so they
change the output); a batch mixing base rows and three adapters, with two slots, gives each row PEFT's own greedy
tokens (float32); the adapter is part of the prefix-cache key; bad adapters are a ValueError and the engine goes on."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from pageport import LLM, SamplingParams  # noqa: E402
from pageport.lora.request import LoRARequest  # noqa: E402
from tests.conftest import DEFAULT_GGUF, default_model_dir  # noqa: E402

NEW = 12
SPECS = {  # name: (rank, target modules, spread of B: enough to change the greedy tokens)
    "all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 0.02),
    "mlp": (4, ["up_proj", "down_proj"], 0.4),
    "attn": (8, ["q_proj", "v_proj"], 0.4),
}


def _hf():
    return AutoModelForCausalLM.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (folder, the PEFT model); plus the base model under None."""
    out = {None: (None, _hf())}
    for i, (name, (r, targets, std)) in enumerate(SPECS.items()):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(_hf(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                        init_lora_weights=False))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, std)
        folder = tmp_path_factory.mktemp(f"lora-{name}")
        pm.save_pretrained(folder)
        out[name] = (folder, pm.eval())
    return out


def _peft_greedy(model, ids):
    with torch.inference_mode():
        gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
    return gen[:cut]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="float32", max_model_len=512, enable_lora=True, max_loras=2, max_lora_rank=8)
    yield engine
    engine.engine.shutdown()


def _req(adapters, name):
    return None if name is None else LoRARequest(name, 1 + list(SPECS).index(name), str(adapters[name][0]))


@pytest.mark.slow
def test_mixed_batch_matches_peft(llm, adapters, chat_prompts):
    prompts = chat_prompts[:4]
    names = [None, "all", "mlp", "attn"]
    # every prompt with every adapter in one call: four adapters' worth of rows over two slots
    rows = [(p, n) for p in prompts for n in names]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW)
    outs = llm.generate([p for p, _ in rows], greedy, use_tqdm=False,
                        lora_request=[_req(adapters, n) for _, n in rows])
    refs = {}
    for (p, n), out in zip(rows, outs):
        ref = refs[(tuple(p), n)] = _peft_greedy(adapters[n][1], p)
        assert list(out.outputs[0].token_ids) == ref, f"adapter {n}"
    # each adapter changes the greedy tokens of some prompt (the comparison means something)
    for n in names[1:]:
        assert any(refs[(tuple(p), n)] != refs[(tuple(p), None)] for p in prompts), n
    # the same prompt again, one adapter at a time: its cached prefix is its own adapter's, never the base's
    for n in names[::-1]:
        (out,) = llm.generate([prompts[0]], greedy, use_tqdm=False, lora_request=_req(adapters, n))
        assert list(out.outputs[0].token_ids) == refs[(tuple(prompts[0]), n)], f"adapter {n} (cached)"
        assert out.num_cached_tokens > 0


@pytest.mark.slow
def test_bad_adapters_fail_alone(llm, adapters, chat_prompts, tmp_path):
    folder = adapters["all"][0]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 32}))
    (big / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["embed_tokens"]}))
    (unknown / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    cases = [(LoRARequest("missing", 7, str(tmp_path / "nowhere")), "not a folder"),
             (LoRARequest("big", 8, str(big)), "max_lora_rank"),
             (LoRARequest("unknown", 9, str(unknown)), "unsupported modules"),
             (LoRARequest("clash", 1, str(unknown)), "already")]
    llm.generate([chat_prompts[0]], greedy, use_tqdm=False, lora_request=_req(adapters, "all"))  # id 1 is taken
    for bad, why in cases:
        with pytest.raises(ValueError, match=why):
            llm.generate([chat_prompts[0], chat_prompts[1]], greedy, use_tqdm=False, lora_request=[None, bad])
    # nothing was queued, and the engine goes on
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([chat_prompts[1]], greedy, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


def test_lora_request_needs_enable_lora(chat_prompts):
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("x", 1, "")
    with pytest.raises(ValueError, match=">= 1"):
        LoRARequest("x", 0, "/tmp")
