"""Greedy decoding equals Transformers token for token on the default model (float32)."""
import pytest

from pageport import LLM, SamplingParams
from pageport.models.llama import pre_attention
from tests.e2e.conftest import NEW_TOKENS

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def assert_same(outs, hf_greedy):
    for i, (out, ref) in enumerate(zip(outs, hf_greedy)):
        assert out.outputs[0].token_ids == ref, f"prompt {i} diverged"


def test_one_mixed_batch_matches_transformers(llm, chat_prompts, hf_greedy):
    assert len({len(p) for p in chat_prompts}) > 4  # mixed lengths in one batch
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts], GREEDY)
    assert_same(outs, hf_greedy)
    assert sum(len(o.outputs[0].token_ids) for o in outs) >= 8 * 16


def test_chunked_prefill_matches_transformers(chat_prompts, hf_greedy):
    llm = LLM(dtype="float32", max_model_len=1024, max_num_batched_tokens=24, max_num_seqs=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts], GREEDY)
    assert_same(outs, hf_greedy)


def test_preemption_keeps_tokens_identical(chat_prompts, hf_greedy):
    llm = LLM(dtype="float32", num_gpu_blocks_override=16, block_size=16)  # shared system prompt: 16 forces preemption
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts], GREEDY)
    stats = llm.engine.core_stats()
    assert stats.num_preemptions > 0
    assert_same(outs, hf_greedy)
    assert stats.kv_free_blocks == stats.kv_usable_blocks


def test_chat_api_uses_the_template(llm, chat_prompts, hf_greedy):
    from tests.e2e.conftest import CHATS
    outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS[:2]], GREEDY)
    assert [o.prompt_token_ids for o in outs] == chat_prompts[:2]
    assert_same(outs, hf_greedy[:2])
    assert outs[0].outputs[0].text.strip()


@pytest.mark.parametrize("device", ["refcpu"])
def test_vendor_platform_generates_the_same_tokens(device, chat_prompts, hf_greedy):
    llm = LLM(device=device, dtype="float32", max_model_len=512)
    assert llm.engine.platform_name == device
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts[:2]],
                        SamplingParams(temperature=0, max_tokens=8))
    for out, ref in zip(outs, hf_greedy):
        assert out.outputs[0].token_ids == ref[:8]


def test_compiled_layers_match_transformers(chat_prompts, hf_greedy, monkeypatch):
    """compile=True (inductor's fused kernels for the dense part of every layer, token count dynamic): the
    same greedy tokens over a mixed batch, a chunked prefill and decodes of shrinking batch size."""
    monkeypatch.setenv("PAGEPORT_ENGINE_INPROC", "1")  # to look at the model's layers
    llm = LLM(dtype="float32", max_model_len=1024, max_num_batched_tokens=64, compile=True)
    layers = llm.engine.core.runner.model.model
    assert layers.pre is not pre_attention and layers.pre.__wrapped__ is pre_attention  # really compiled
    outs = llm.generate([{"prompt_token_ids": p} for p in chat_prompts[:4]], GREEDY)
    assert_same(outs, hf_greedy[:4])
