"""EAGLE-3 heads (the published checkpoint layout: `midlayer.*`, `fc`, `norm`, `lm_head` over a draft vocabulary,
`d2t` / `t2d`) on a tiny random Llama target: every proposal the engine makes equals a plain-torch reference of the
head fed Transformers' hidden states of the target's layers; greedy output identical to plain decoding with
chunked prefill and under preemption; only followed rows' states are kept, none while the switch is off."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from pageport.core.config import EngineConfig
from pageport.core.engine import LLMEngine
from pageport.core.sampling_params import SamplingParams

V, H, NH, NKV, VD = 320, 64, 4, 2, 200  # target vocabulary, width, heads, KV heads, draft vocabulary
TARGET = dict(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=8, num_attention_heads=NH,
              num_key_value_heads=NKV, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5)
HD = H // NH


def _head_weights(g: torch.Generator, own_embedding: bool) -> dict[str, torch.Tensor]:
    """A random head under the published names (larger than the default init, so its choices depend on its
    inputs), with a draft vocabulary of VD target ids (sorted, as the published ones)."""
    def mat(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def norm():
        return 1.0 + 0.1 * torch.randn(H, generator=g)
    w = {"fc.weight": mat(H, 3 * H), "norm.weight": norm(), "lm_head.weight": mat(VD, H),
         "midlayer.input_layernorm.weight": norm(), "midlayer.hidden_norm.weight": norm(),
         "midlayer.post_attention_layernorm.weight": norm(),
         "midlayer.self_attn.q_proj.weight": mat(NH * HD, 2 * H),  # q/k/v read [embedding, fused state]
         "midlayer.self_attn.k_proj.weight": mat(NKV * HD, 2 * H),
         "midlayer.self_attn.v_proj.weight": mat(NKV * HD, 2 * H), "midlayer.self_attn.o_proj.weight": mat(H, NH * HD),
         "midlayer.mlp.gate_proj.weight": mat(128, H), "midlayer.mlp.up_proj.weight": mat(128, H),
         "midlayer.mlp.down_proj.weight": mat(H, 128)}
    targets = torch.randperm(V, generator=g)[:VD].sort().values
    w["d2t"] = targets - torch.arange(VD)  # target id = draft id + d2t[draft id]
    w["t2d"] = torch.zeros(V, dtype=torch.bool)
    w["t2d"][targets] = True
    if own_embedding:
        w["embed_tokens.weight"] = torch.randn(V, H, generator=g)
    return w


def _save_head(folder, weights, bin_file=False, **cfg) -> None:
    folder.mkdir()
    c = transformers.LlamaConfig(**TARGET | {"num_hidden_layers": 1, "draft_vocab_size": VD} | cfg)
    c.architectures = ["LlamaForCausalLMEagle3"]
    c.save_pretrained(folder)
    if bin_file:  # the format the published heads come in
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """target folder, Transformers target, and per head: (folder, weights, the target layers it reads)."""
    root = tmp_path_factory.mktemp("eagle3")
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TARGET)).eval()
    target.save_pretrained(root / "target", safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    heads = {}
    # the target's embedding and vLLM's default layers (2, L // 2, L - 3); its own embedding and named layers
    # (0: the embedding itself, 7: the last layer's input), in a .bin, with a config whose positions end before
    # the sequences do
    w = _head_weights(g, own_embedding=False)
    _save_head(root / "shared", w)
    heads["shared"] = (root / "shared", w, (2, 4, 5))
    w = _head_weights(g, own_embedding=True)
    _save_head(root / "own", w, bin_file=True, eagle_aux_hidden_state_layer_ids=[0, 3, 7], max_position_embeddings=32)
    heads["own"] = (root / "own", w, (0, 3, 7))
    return root / "target", target, heads


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta=10000.0):  # x [T, heads, HD], positions 0..T-1, neox style
    inv = 1.0 / theta ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    f = torch.arange(len(x), dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _head(w, embeds, states):
    """The head's decoder layer over positions 0..T-1: embeddings and input states [T, H] -> pre-norm states."""
    T = len(embeds)
    x = torch.cat([_rms(embeds, w["midlayer.input_layernorm.weight"]),
                   _rms(states, w["midlayer.hidden_norm.weight"])], -1)
    q = _rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(T, NH, HD))
    k = _rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(T, NKV, HD)).repeat_interleave(NH // NKV, 1)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(T, NKV, HD).repeat_interleave(NH // NKV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, NH * HD)
    h = states + attn @ w["midlayer.self_attn.o_proj.weight"].T  # the fused state is the residual
    m = _rms(h, w["midlayer.post_attention_layernorm.weight"])
    return h + (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T


def reference_proposals(target, head, tokens: list[int], k: int) -> tuple[list[int], list[float]]:
    """The head's proposals after `tokens` (the last one just sampled): position p reads (token p + 1,
    fc(the target's inputs of the head's three layers at p)), then each proposal with the head's own pre-norm
    state. Also each choice's margin over the runner-up (a near-tie may round either way)."""
    _, w, layer_ids = head
    c = len(tokens) - 1
    embed = w.get("embed_tokens.weight", target.model.embed_tokens.weight)
    with torch.no_grad():
        hs = target(torch.tensor([tokens[:c]]), output_hidden_states=True).hidden_states  # [j]: layer j's input
        states = torch.cat([hs[j][0] for j in layer_ids], -1) @ w["fc.weight"].T
        toks, out, margins = list(tokens[1:]), [], []
        for _ in range(k):
            g = _head(w, embed[torch.tensor(toks)], states)
            logits = _rms(g[-1], w["norm.weight"]) @ w["lm_head.weight"].T  # over the draft vocabulary
            top = logits.topk(2)
            d = int(top.indices[0])
            out.append(d + int(w["d2t"][d]))
            margins.append(float(top.values[0] - top.values[1]))
            toks.append(out[-1])
            states = torch.cat([states, g[-1:]])
    return out, margins


def _engine(models, head=None, **kw):
    cfg = dict(model=str(models[0]), dtype="float32", max_model_len=512, max_num_batched_tokens=48, **kw)
    if head is not None:
        cfg["speculative_config"] = {"method": "eagle3", "model": str(models[2][head][0]),
                                     "num_speculative_tokens": 3}
    return LLMEngine(EngineConfig(**cfg), multiprocess=False)


def _run(engine, prompts, params):
    ids = [engine.add_request(None, p, q) for p, q in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.engine_request_id] = list(o.outputs[0].token_ids)
    return [done[i] for i in ids]


def _greedy(n, max_tokens):
    return [SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)] * n


PROMPTS = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 40, 71, 23)]


@pytest.mark.parametrize("head", ["shared", "own"])
def test_eagle3_proposals_equal_the_reference_and_greedy_output_is_kept(models, head):
    # the last request asks for logprobs: no proposals, so the head never follows it and keeps nothing of it
    params = _greedy(4, 24) + [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)]
    prompts = PROMPTS + [PROMPTS[1][::-1]]
    plain = _engine(models)
    want = _run(plain, prompts, params)
    plain.shutdown()
    engine = _engine(models, head)
    drafter, made, kept = engine.core.drafter, [], {"tokens": 0, "marked": 0, "unfollowed": 0}
    real_run, real_stash = drafter.run, drafter.stash

    def recording(sched, kv, follows):
        real_run(sched, kv, follows)
        made.extend((list(s.request.token_ids), list(s.spec_token_ids)) for s in sched.scheduled if s.spec_token_ids)

    def stash(hidden, scheduled, qsl):  # the hooks keep the marked rows' tokens, at every one of the three layers
        rows = drafter._rows or []
        kept["marked"] += sum(scheduled[i].num_tokens for i in rows)
        kept["tokens"] += sum(len(a) for a in drafter._aux.values())
        kept["unfollowed"] += sum(scheduled[i].request.params.logprobs is not None for i in rows)
        real_stash(hidden, scheduled, qsl)
    drafter.run = recording
    engine.core.runner.hidden_hook = stash
    engine.core._switch.record = lambda *a: None  # keep proposing: the proposals are what is tested
    assert _run(engine, prompts, params) == want
    assert kept["marked"] > 0 and kept["tokens"] == len(set(models[2][head][2])) * kept["marked"]
    assert kept["unfollowed"] == 0
    assert len(made) >= 20
    checked = 0
    for tokens, props in made:
        ref, margins = reference_proposals(models[1], models[2][head], tokens, len(props))
        for got, exp, margin in zip(props, ref, margins):
            if got != exp:
                assert margin < 1e-4, (tokens, props, ref)
                break
            checked += 1
    assert checked >= 2 * len(made)
    engine.shutdown()


@pytest.fixture(scope="module")
def predictable(models, tmp_path_factory):
    """A target and head whose final norms keep two dimensions, so both choose among the few tokens at the corners
    of the LM heads' 2-D projections (the head's rows are the target's): proposals are accepted at times, and the
    accepted path (KV and states of the accepted positions kept, the rest cut) is exercised too."""
    root = tmp_path_factory.mktemp("eagle3_predictable")
    torch.manual_seed(2)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TARGET)).eval()
    with torch.no_grad():
        target.model.norm.weight.zero_()[:2] = 1.0
    target.save_pretrained(root / "target", safe_serialization=True)
    angles = torch.linspace(0, 2 * math.pi, 3600)
    corners = (torch.stack([angles.cos(), angles.sin()], -1) @ target.lm_head.weight[:, :2].T).argmax(-1).unique()
    rest = torch.tensor([t for t in torch.randperm(V).tolist() if t not in corners.tolist()][:VD - len(corners)])
    ids = torch.cat([corners, rest]).sort().values
    w = _head_weights(torch.Generator().manual_seed(3), own_embedding=False)
    w["norm.weight"] = torch.zeros(H)
    w["norm.weight"][:2] = 1.0
    w["lm_head.weight"] = target.lm_head.weight.detach()[ids].clone()
    w["d2t"] = ids - torch.arange(VD)
    w["t2d"] = torch.zeros(V, dtype=torch.bool)
    w["t2d"][ids] = True
    _save_head(root / "head", w)
    return root / "target", root / "head"


def test_eagle3_greedy_output_kept_under_preemption_with_accepted_proposals(predictable):
    target, head = predictable
    cfg = dict(model=str(target), dtype="float32", max_model_len=512, max_num_batched_tokens=48)
    plain = LLMEngine(EngineConfig(**cfg), multiprocess=False)
    want = _run(plain, PROMPTS * 2, _greedy(8, 40))
    plain.shutdown()
    engine = LLMEngine(EngineConfig(**cfg, num_gpu_blocks_override=14, speculative_config={
        "method": "eagle3", "model": str(head), "num_speculative_tokens": 3}), multiprocess=False)
    engine.core._switch.record = lambda *a: None
    assert _run(engine, PROMPTS * 2, _greedy(8, 40)) == want
    s = engine.core.counters
    assert s.num_preemptions > 0 and 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    engine.shutdown()


def test_eagle3_keeps_nothing_while_the_switch_is_off_and_resumes(models):
    """While the switch keeps speculation off no pass is marked (nothing kept, graphs may replay); when it comes
    back on, the head skips what it missed and proposes again; the output stays the target's."""
    plain = _engine(models)
    want = _run(plain, PROMPTS, _greedy(4, 60))
    plain.shutdown()
    engine = _engine(models, "own")
    sw, drafter = engine.core._switch, engine.core.drafter
    steps = {"n": 0, "kept_while_off": 0, "drafts_before_on": None}

    def scripted(*a):  # off from the 5th step to the 20th, on otherwise
        steps["n"] += 1
        sw.on = not 5 <= steps["n"] < 20
        if steps["n"] == 20:
            steps["drafts_before_on"] = engine.core.counters.spec_num_drafts
    sw.record = scripted

    def stash(hidden, scheduled, qsl):
        before = [s.request.eagle_hidden for s in scheduled]
        if not sw.on:
            steps["kept_while_off"] += len(drafter._aux) + (drafter._rows is not None)
        drafter.stash(hidden, scheduled, qsl)
        if not sw.on:
            steps["kept_while_off"] += sum(b is not s.request.eagle_hidden for b, s in zip(before, scheduled))
    engine.core.runner.hidden_hook = stash

    class Graphs:  # a platform's graph runner, as the runner sees it: every pass it may replay, and if it was marked
        offered: list[bool] = []

        def run(self, *a):
            self.offered.append(drafter._tokens is not None)
            return None  # no graph of that shape: the runner runs the pass eagerly
    engine.core.runner.graphs = graphs = Graphs()
    assert _run(engine, PROMPTS, _greedy(4, 60)) == want
    assert steps["kept_while_off"] == 0 and steps["n"] > 25
    assert len(graphs.offered) >= 10 and not any(graphs.offered)  # a marked pass never replays: its hooks would not run
    assert engine.core.counters.spec_num_drafts > steps["drafts_before_on"]  # proposing again after the pause
    engine.shutdown()


def test_eagle3_sampled_rows_draw_from_the_draft_vocabulary_and_seeds_repeat(models):
    """Sampled rows draw their proposals from the head's distribution, which has no mass outside the draft
    vocabulary (kept for the rejection sampler); a seeded request gives the same tokens twice, beside a greedy row."""
    engine = _engine(models, "shared")
    engine.core._switch.record = lambda *a: None
    t2d, drafter, outside = models[2]["shared"][1]["t2d"], engine.core.drafter, []
    real_run = drafter.run

    def recording(sched, kv, follows):
        real_run(sched, kv, follows)
        for s in sched.scheduled:
            q = s.request.spec_probs
            if s.spec_token_ids and q is not None:
                outside.append(float(q[:, ~t2d].sum()))
                assert all(t2d[t] for t in s.spec_token_ids)
    drafter.run = recording
    params = [SamplingParams(temperature=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    first, second = _run(engine, PROMPTS[:2], params), _run(engine, PROMPTS[:2], params)
    assert first == second and all(len(t) == 20 for t in first)
    assert len(outside) > 5 and max(outside) == 0.0
    engine.shutdown()


def _refused(models, folder, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(models[0]), dtype="float32", max_model_len=256, speculative_config={
            "method": "eagle3", "model": str(folder), "num_speculative_tokens": 2}), multiprocess=False)


def test_eagle3_heads_that_do_not_fit_are_refused(models, tmp_path):
    w = models[2]["shared"][1]
    _save_head(tmp_path / "narrow", w, hidden_size=32)  # refused before its weights are read
    _refused(models, tmp_path / "narrow", "hidden size")
    _save_head(tmp_path / "layers", w, eagle_aux_hidden_state_layer_ids=[2, 4, 8])  # the target has layers 0..7
    _refused(models, tmp_path / "layers", "three target layers")
    _save_head(tmp_path / "t2d", w | {"t2d": torch.ones(V, dtype=torch.bool)})
    _refused(models, tmp_path / "t2d", "t2d")
    _save_head(tmp_path / "nod2t", {k: v for k, v in w.items() if k != "d2t"})  # a smaller vocabulary needs it
    _refused(models, tmp_path / "nod2t", "d2t")
