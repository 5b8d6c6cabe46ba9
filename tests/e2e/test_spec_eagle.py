"""EAGLE heads (the EAGLE-1 checkpoint layout) on a tiny random Llama target: every proposal the engine makes
equals a plain reference of the head (Transformers' decoder layer reading Transformers' hidden states of the
target); greedy output identical to plain decoding with chunked prefill and under preemption."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from pageport.core.config import EngineConfig
from pageport.core.engine import LLMEngine
from pageport.core.sampling_params import SamplingParams

CFG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target folder, head folder, Transformers target, the head's decoder layer, fc weight, fc bias)."""
    root = tmp_path_factory.mktemp("eagle")
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    target.save_pretrained(root / "target", safe_serialization=True)
    head_cfg = transformers.LlamaConfig(**CFG | {"num_hidden_layers": 1})
    head_cfg._attn_implementation = "eager"
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(head_cfg, 0).eval()
    for p in layer.parameters():  # larger than the default init, so the head's choices depend on its inputs
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.normal_(p, 1.0, 0.1)
    fc_w, fc_b = torch.randn(64, 128) * 0.2, torch.randn(64) * 0.1
    (root / "head").mkdir()
    head_cfg.save_pretrained(root / "head")
    state = {f"layers.0.{k}": v for k, v in layer.state_dict().items() if not k.startswith("input_layernorm")}
    state |= {"fc.weight": fc_w, "fc.bias": fc_b, "embed_tokens.weight": torch.randn(320, 64)}  # the last: ignored
    torch.save(state, root / "head" / "pytorch_model.bin")  # the format the published heads come in
    layer.input_layernorm = torch.nn.Identity()  # EAGLE's first layer has none
    return root / "target", root / "head", target, layer, fc_w, fc_b, head_cfg


def reference_proposals(models, tokens: list[int], k: int) -> tuple[list[int], list[float]]:
    """The head's proposals after `tokens` (the last one just sampled): position p reads (token p + 1, the
    target's last hidden state at p), then each proposal with the head's own output. Also each choice's margin
    over the runner-up (a near-tie may round either way)."""
    _, _, target, layer, fc_w, fc_b, cfg = models
    c = len(tokens) - 1
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    with torch.no_grad():
        feats = target.model(torch.tensor([tokens[:c]])).last_hidden_state[0]
        toks, out, margins = list(tokens[1:]), [], []
        for _ in range(k):
            x = F.linear(torch.cat([target.model.embed_tokens(torch.tensor(toks)), feats], -1), fc_w, fc_b)[None]
            pos = torch.arange(len(toks))[None]
            mask = torch.full((len(toks), len(toks)), float("-inf")).triu(1)[None, None]
            g = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rotary(x, pos))
            g = (g[0] if isinstance(g, tuple) else g)[0]
            logits = target.lm_head(g[-1])
            top = logits.topk(2)
            out.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            toks.append(out[-1])
            feats = torch.cat([feats, g[-1:]])
    return out, margins


def _engine(models, spec=True, **kw):
    cfg = dict(model=str(models[0]), dtype="float32", max_model_len=512, max_num_batched_tokens=48, **kw)
    if spec:
        cfg["speculative_config"] = {"method": "eagle", "model": str(models[1]), "num_speculative_tokens": 3}
    return LLMEngine(EngineConfig(**cfg), multiprocess=False)


def _run(engine, prompts, max_tokens, params=None):
    """Each prompt's tokens, greedy unless `params` (one per prompt) say otherwise."""
    params = params or [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * len(prompts)
    ids = [engine.add_request(None, p, q) for p, q in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.engine_request_id] = list(o.outputs[0].token_ids)
    return [done[i] for i in ids]


PROMPTS = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 40, 71, 23)]


def test_eagle_proposals_equal_the_reference_and_greedy_output_is_kept(models):
    plain = _engine(models, spec=False)
    want = _run(plain, PROMPTS, 24)
    plain.shutdown()
    engine = _engine(models)
    drafter, made = engine.core.drafter, []
    real = drafter.run

    def recording(sched, kv, follows):
        real(sched, kv, follows)
        made.extend((list(s.request.token_ids), list(s.spec_token_ids)) for s in sched.scheduled if s.spec_token_ids)
    drafter.run = recording
    engine.core._switch.record = lambda *a: None  # keep proposing: the proposals are what is tested
    assert _run(engine, PROMPTS, 24) == want
    assert len(made) >= 20
    checked = 0
    for tokens, props in made:
        ref, margins = reference_proposals(models, tokens, len(props))
        for got, exp, margin in zip(props, ref, margins):
            if got != exp:
                assert margin < 1e-4, (tokens, props, ref)
                break
            checked += 1
    assert checked >= 2 * len(made)
    engine.shutdown()


def test_eagle_greedy_output_kept_under_preemption(models):
    plain = _engine(models, spec=False)
    want = _run(plain, PROMPTS * 2, 40)
    plain.shutdown()
    engine = _engine(models, num_gpu_blocks_override=14)
    assert _run(engine, PROMPTS * 2, 40) == want
    s = engine.core.counters
    assert s.num_preemptions > 0 and s.spec_num_drafts > 0
    engine.shutdown()


def test_eagle_head_of_another_width_is_refused(models, tmp_path):
    cfg = transformers.LlamaConfig(**CFG | {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    cfg.save_pretrained(tmp_path)
    torch.save({"fc.weight": torch.zeros(32, 64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="hidden size"):
        LLMEngine(EngineConfig(model=str(models[0]), dtype="float32", max_model_len=256, speculative_config={
            "method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 2}), multiprocess=False)


def test_eagle_sampled_rows_verify_and_seeds_repeat(models):
    """Sampled rows draw their proposals from the head's distribution (kept for the rejection sampler); a seeded
    request gives the same tokens twice, beside greedy rows."""
    engine = _engine(models)
    engine.core._switch.record = lambda *a: None

    params = [SamplingParams(temperature=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    first, second = _run(engine, PROMPTS[:2], 20, params), _run(engine, PROMPTS[:2], 20, params)
    assert first == second and all(len(t) == 20 for t in first)
    assert engine.core.counters.spec_num_drafts > 0
    engine.shutdown()


def test_eagle_keeps_no_states_while_the_switch_is_off_and_resumes(models):
    """While the switch keeps speculation off the target's states are not kept (they would pile up unread); when
    it comes back on, the head skips what it missed and proposes again; the output stays the target's."""
    plain = _engine(models, spec=False)
    want = _run(plain, PROMPTS, 60)
    plain.shutdown()
    engine = _engine(models)
    sw, steps = engine.core._switch, {"n": 0, "kept_while_off": 0, "drafts_before_on": None}

    def scripted(*a):  # off from the 5th step to the 20th, on otherwise
        steps["n"] += 1
        sw.on = not 5 <= steps["n"] < 20
        if steps["n"] == 20:
            steps["drafts_before_on"] = engine.core.counters.spec_num_drafts
    sw.record = scripted
    real_stash = engine.core.drafter.stash

    def stash(hidden, scheduled, qsl):
        before = [s.request.eagle_hidden for s in scheduled]
        real_stash(hidden, scheduled, qsl)
        if not sw.on:
            steps["kept_while_off"] += sum(b is not s.request.eagle_hidden for b, s in zip(before, scheduled))
    engine.core.runner.hidden_hook = stash
    assert _run(engine, PROMPTS, 60) == want
    assert steps["kept_while_off"] == 0 and steps["n"] > 25
    assert engine.core.counters.spec_num_drafts > steps["drafts_before_on"]  # proposing again after the pause
    engine.shutdown()
