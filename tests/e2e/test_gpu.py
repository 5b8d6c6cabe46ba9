"""End to end on a CUDA GPU (run by scripts/gpu_check.sh): a random Llama-shaped model vs Transformers."""
import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    path = tmp_path_factory.mktemp("llama-gpu")
    model.save_pretrained(path, safe_serialization=True)
    return path, model.cuda().eval()



@pytest.fixture(autouse=True)
def _shutdown_engines(monkeypatch):
    """Each LLM's engine core is a process holding its share of the GPU (or, in-process, this process's memory):
    end them with the test and give the memory back."""
    from pageport.core import llm as llm_module
    made = []
    real_init = llm_module.LLM.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(llm_module.LLM, "__init__", init)
    yield
    for x in made:
        x.engine.shutdown()
    made.clear()
    gc.collect()
    torch.cuda.empty_cache()


def prompts(n, lo=20, hi=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 31000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_logits_match_transformers_bf16(checkpoint):
    from pageport import LLM
    path, hf = checkpoint
    llm = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    ids = prompts(1)[0]
    out = llm.generate({"prompt_token_ids": ids},
                       __import__("pageport").SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids], device="cuda")).logits[0].float(), -1)
    ours = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].cpu()
    # bf16 weights and activations: logprobs agree to a few hundredths
    assert (ours - theirs).abs().max() < 0.15, (ours - theirs).abs().max()
    assert (ours - theirs).abs().mean() < 0.02


def test_greedy_tokens_match_transformers_over_the_first_steps(checkpoint):
    from pageport import LLM, SamplingParams
    path, hf = checkpoint
    llm = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    ps = prompts(8)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0, max_tokens=8,
                                                                             ignore_eos=True))
    same = 0
    with torch.inference_mode():
        for p, o in zip(ps, outs):
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8)[0, len(p):].tolist()
            same += o.outputs[0].token_ids[:4] == ref[:4]
    assert same >= len(ps) - 1  # a random model's near-flat logits: bf16 noise may flip one near-tie


def test_cuda_graphs_on_and_off_agree(checkpoint):
    """Same tokens with and without graphs, up to a bf16 near-tie.

    Graph replays pad the batch and pick split-KV for max_model_len, so their bf16 rounding
    differs from eager; a random model's logits are nearly flat, so two tokens can sit within
    that rounding of each other. Before any divergence the logprobs must agree, and a
    divergence is only allowed where the two candidates are a near-tie in both runs."""
    from pageport import LLM, SamplingParams
    path, _ = checkpoint
    ps = [{"prompt_token_ids": p} for p in prompts(24)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    eager = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    a = [o.outputs[0] for o in eager.generate(ps, params)]
    eager.engine.shutdown()  # the core process gives its memory back
    graphs = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    assert graphs.engine.uses_graphs
    b = [o.outputs[0] for o in graphs.generate(ps, params)]
    compared = 0
    for oa, ob in zip(a, b):
        for x, y, la, lb in zip(oa.token_ids, ob.token_ids, oa.logprobs, ob.logprobs):
            if x != y:
                # each run's choice is within 0.05 nats of the other's among its own top 5
                assert y in la and la[x].logprob - la[y].logprob < 0.05
                assert x in lb and lb[y].logprob - lb[x].logprob < 0.05
                break
            assert abs(la[x].logprob - lb[x].logprob) < 0.05
            compared += 1
    assert compared >= 24 * 4  # graph decode steps really ran and were compared


def test_moe_model_runs_in_cuda_graphs_and_matches_transformers(tmp_path, monkeypatch):
    """A Qwen3-MoE model in float32: its decode steps are captured in CUDA graphs (the fused kernel's routing stays
    on the device) and greedy tokens equal Transformers'; the per-expert loop (PAGEPORT_FUSED_MOE=torch) reads
    counts on the host, so it runs eagerly, with the same tokens."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from pageport import LLM, SamplingParams
    cfg = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ps = prompts(6, lo=10, hi=60, seed=3)
    want = []
    with torch.no_grad():
        for p in ps:
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"))
            want.append(out[0, len(p):].tolist())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for loop in (False, True):
        if loop:
            monkeypatch.setenv("PAGEPORT_FUSED_MOE", "torch")
        llm = LLM(str(tmp_path), device="cuda", dtype="float32", gpu_memory_utilization=0.2)
        assert llm.engine.uses_graphs is (not loop)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], params)]
        llm.engine.shutdown()
        assert [g[:len(w)] for g, w in zip(got, want)] == want, f"loop={loop}"  # HF stops at an EOS


def test_lora_mixed_batch_in_cuda_graphs_matches_peft(tmp_path):
    """A tiny random Llama and three PEFT adapters in float32 (IEEE Triton dots): a batch mixing base rows and
    the adapters over two slots gives PEFT's greedy tokens, with its decode steps replayed from the LoRA graphs."""
    pytest.importorskip("peft")
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    from pageport.core.lora import LoRARequest
    from pageport.core.sampling_params import SamplingParams
    from tests.models.tiny_lora import greedy, make_adapter, make_tiny_llama

    refs = {0: make_tiny_llama(tmp_path / "base")}
    loras = {}
    for i in (1, 2, 3):
        refs[i] = make_adapter(tmp_path / "base", tmp_path / f"a{i}", 4 * i if i < 3 else 8, seed=i)
        loras[i] = LoRARequest(f"a{i}", i, str(tmp_path / f"a{i}"))
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "base"), dtype="float32", enable_lora=True, max_loras=2,
                                    max_lora_rank=8, max_num_seqs=32), multiprocess=False)
    graphs = engine.core.runner.graphs
    assert graphs is not None and graphs.lora_graphs
    replays = {"lora": 0}
    real = graphs.run_lora

    def counted(*a):
        out = real(*a)
        replays["lora"] += out is not None
        return out
    graphs.run_lora = counted
    g = torch.Generator().manual_seed(4)
    prompts_ = [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (12,), generator=g)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = {(k, i % 4): engine.add_request(None, p, params, lora_request=loras.get(i % 4))
           for k, p in enumerate(prompts_) for i in (k, k + 1)}
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.engine_request_id] = list(o.outputs[0].token_ids)
    refs_cpu = {k: m.float() for k, m in refs.items()}
    for (k, lid), rid in ids.items():
        assert done[rid] == greedy(refs_cpu[lid], prompts_[k], 16), (k, lid)
    assert replays["lora"] > 0
    engine.shutdown()


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_decoding_keeps_greedy_output(checkpoint, tmp_path, method):
    """float32, a draft (the same checkpoint: it proposes what the target would say) or n-gram lookup on prompts
    that repeat: tokens equal to plain decoding up to a float near-tie (a 1 + k token verify may round a tie the
    other way than a 1-token step); proposals verified and accepted, the verifying steps (ragged: rows with 0..k
    proposals) replayed from the target's CUDA graphs."""
    import msgspec

    from pageport import LLM, SamplingParams
    path, _ = checkpoint
    base = prompts(6, 20, 120, seed=5)
    ps = [{"prompt_token_ids": p * 3} for p in base]  # repeats, for the n-gram lookup
    spec = ({"model": str(path), "num_speculative_tokens": 4} if method == "draft"
            else {"method": "ngram", "num_speculative_tokens": 4})
    plain = LLM(str(path), device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    ref = [o.outputs[0] for o in plain.generate(ps, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                   logprobs=2))]
    plain.engine.shutdown()
    llm = LLM(str(path), device="cuda", dtype="float32", gpu_memory_utilization=0.3, speculative_config=spec)
    got = [o.outputs[0].token_ids for o in llm.generate(ps, SamplingParams(temperature=0, max_tokens=40,
                                                                            ignore_eos=True))]
    compared = 0
    for r, g in zip(ref, got):
        assert len(g) == 40
        for x, y, lp in zip(r.token_ids, g, r.logprobs):
            if x != y:
                assert y in lp and lp[x].logprob - lp[y].logprob < 1e-3  # a near-tie
                break
            compared += 1
    assert compared >= 6 * 20
    llm.engine.client.call("stats")
    s = msgspec.structs.asdict(llm.engine.client.last_stats)
    assert s["spec_num_drafts"] > 0 and s["spec_num_accepted_tokens"] > 0
    if method == "draft":  # the draft is the target: it is (nearly) always right
        assert s["spec_num_accepted_tokens"] > 0.8 * s["spec_num_draft_tokens"], s
    assert llm.engine.client.call("graph_replays")["5"] > 0
