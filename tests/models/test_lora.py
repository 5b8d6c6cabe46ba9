"""Multi-LoRA on a tiny random Llama: PEFT adapters made here (init_lora_weights=False, so they change the
output) on every projection, including the slices of the fused qkv and gate|up; a mixed batch of base rows and
two adapters gives each row PEFT's own logits (float32) and greedy tokens; bad adapters fail with a clear error."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from pageport.core.config import EngineConfig  # noqa: E402
from pageport.models import load_model  # noqa: E402
from pageport.models.lora import enable_lora  # noqa: E402

from .helpers import PagedRunner  # noqa: E402

TOL = 1e-4


def _config():
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)




@pytest.fixture(scope="module")
def setup(tmp_path_factory, cpu_platform):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(), attn_implementation="eager").eval()
    base_dir = tmp_path_factory.mktemp("base")
    hf.save_pretrained(base_dir)
    adapters = {}
    specs = {"all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
             "some": (4, ["k_proj", "up_proj", "down_proj"])}
    for i, (name, (r, targets)) in enumerate(specs.items()):
        fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(fresh, peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets,
                                                        init_lora_weights=False))
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data.normal_(0, 0.3)
        pm.save_pretrained(folder)
        adapters[name] = (folder, pm.eval())
    cfg = EngineConfig(model=str(base_dir), dtype=torch.float32)
    model = load_model(cfg, cpu_platform).model
    lora = enable_lora(model, max_loras=2, max_rank=8, ops=cpu_platform.ops)
    lora.load(1, str(adapters["all"][0]))
    lora.load(2, str(adapters["some"][0]))
    return hf, adapters, model, lora


def _greedy_mixed(model, lora, prompts, slots, steps):
    runner = PagedRunner(model)
    seqs = [list(p) for p in prompts]
    feed = [list(p) for p in prompts]
    logits_out = []
    for _ in range(steps):
        idx = torch.tensor([s for s, f in zip(slots, feed) for _ in f])
        lora.set_token_index(idx)
        out = runner.step([(i, f) for i, f in enumerate(feed)])
        logits_out.append([o[-1] for o in out])
        feed = []
        for i, o in enumerate(out):
            t = int(o[-1].argmax())
            seqs[i].append(t)
            feed.append([t])
    lora.set_token_index(None)
    return seqs, logits_out


def test_mixed_batch_matches_peft(setup):
    hf, adapters, model, lora = setup
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 11, 5, 9, 6)]
    slots = [0, 1, 2, 1, 0]
    refs = {0: hf, 1: adapters["all"][1], 2: adapters["some"][1]}
    steps = 6
    seqs, logits = _greedy_mixed(model, lora, prompts, slots, steps)
    for i, (p, s) in enumerate(zip(prompts, slots)):
        ref_model = refs[s]
        with torch.no_grad():
            ref = ref_model.generate(input_ids=torch.tensor([p]), max_new_tokens=steps, do_sample=False,
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long))[0].tolist()
            ref_logits = ref_model(input_ids=torch.tensor([seqs[i][:-1]])).logits[0].float()
        assert seqs[i] == ref, f"row {i} (slot {s})"
        for k in range(steps):
            diff = (logits[k][i] - ref_logits[len(p) - 1 + k]).abs().max().item()
            assert diff < TOL, f"row {i} step {k}: {diff}"
    # the adapters do change the output (the comparison means something)
    with torch.no_grad():
        x = torch.tensor([prompts[1]])
        assert (adapters["all"][1](input_ids=x).logits - hf(input_ids=x).logits).abs().max() > 0.1
        assert (adapters["some"][1](input_ids=x).logits - hf(input_ids=x).logits).abs().max() > 0.1


def test_base_rows_untouched_without_adapters(setup):
    hf, _, model, lora = setup
    ids = list(range(3, 15))
    lora.set_token_index(torch.zeros(len(ids), dtype=torch.long))
    assert lora.state.index is None  # no slot present: the LoRA layers skip their work
    (ours,) = PagedRunner(model).step([("a", ids)])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max() < TOL


def test_bad_adapters_are_clear_errors(setup, tmp_path):
    hf, adapters, model, lora = setup
    folder = adapters["all"][0]
    with pytest.raises(ValueError, match="not a folder"):
        lora.read(str(tmp_path / "missing"))
    big = tmp_path / "big"
    big.mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 64}))
    (big / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="max_lora_rank"):
        lora.read(str(big))
    unk = tmp_path / "unk"
    unk.mkdir()
    (unk / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["lm_head"]}))
    with pytest.raises(ValueError, match="unsupported modules"):
        lora.read(str(unk))
    # wrong base shape: an adapter made for a wider model
    wide_cfg = _config()
    wide_cfg.hidden_size = 96
    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(wide_cfg).eval()
    pm = peft.get_peft_model(wide, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "wide")
    before = lora.layers["model.layers.0.self_attn.qkv_proj"].lora_a.clone()
    with pytest.raises(ValueError, match="shapes"):
        lora.load(1, str(tmp_path / "wide"))
    assert torch.equal(before, lora.layers["model.layers.0.self_attn.qkv_proj"].lora_a)  # slot left intact

