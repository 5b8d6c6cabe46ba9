"""End to end on a CUDA GPU (run by scripts/gpu_check.sh): a random Llama-shaped model vs Transformers."""
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
    with torch.no_grad():  # a random model's logits are nearly flat: sharpen them so bf16 noise
        model.lm_head.weight.mul_(40)  # cannot flip a greedy choice between two near-equal tokens
    path = tmp_path_factory.mktemp("llama-gpu")
    model.save_pretrained(path, safe_serialization=True)
    return path, model.cuda().eval()


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
    assert same == len(ps)


def test_cuda_graphs_on_and_off_give_identical_tokens(checkpoint):
    from pageport import LLM, SamplingParams
    path, _ = checkpoint
    ps = [{"prompt_token_ids": p} for p in prompts(24)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    eager = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    a = [o.outputs[0].token_ids for o in eager.generate(ps, params)]
    del eager
    torch.cuda.empty_cache()
    graphs = LLM(str(path), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    assert graphs.engine.runner.graphs is not None
    b = [o.outputs[0].token_ids for o in graphs.generate(ps, params)]
    assert a == b
