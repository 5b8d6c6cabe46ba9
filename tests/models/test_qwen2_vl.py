"""Qwen2-VL and Qwen2.5-VL against Transformers on tiny random checkpoints: the tower's features for images of
several shapes (Qwen2.5-VL: windows cut at the edges), M-RoPE positions as get_rope_index, greedy tokens for one
image, two images and text alone in one batch (with chunked prefill too), chat image parts, and the same image
again as a prefix-cache and an encoder-cache hit."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")

from tests.models.tiny_vlm import QWEN_IMAGE, data_url, hf_qwen2_vl_greedy, image  # noqa: E402
from tests.models.tiny_vlm import make_tiny_qwen2_vl  # noqa: E402

N = 8
# grids (rows x columns of 4 px patches) 8x10, 14x4, 12x20, 8x8, 6x24: merged 4x5, 7x2, 6x10, 4x4, 3x12
SIZES = [(40, 30), (18, 55), (80, 50), (30, 33), (95, 22)]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    from transformers import AutoImageProcessor

    d = tmp_path_factory.mktemp(request.param)
    model, tok, image_id = make_tiny_qwen2_vl(d, v25=request.param == "qwen2_5_vl")
    return d, model, tok, image_id, AutoImageProcessor.from_pretrained(d)


@pytest.fixture(scope="module")
def llm(qwen):
    from pageport import LLM

    d, *_ = qwen
    return LLM(str(d), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24, block_size=16,
               max_num_batched_tokens=256, num_threads=1)


def _ours(qwen, cpu_platform):
    from safetensors.torch import load_file

    from pageport.models.registry import get_model_class

    d, model, *_ = qwen
    ours = get_model_class(model.config.architectures)(model.config, cpu_platform, torch.float32)
    ours.load_weights(load_file(d / "model.safetensors").items())
    return ours


def test_tower_features_match_transformers(qwen, cpu_platform):
    d, model, tok, image_id, proc = qwen
    ours = _ours(qwen, cpu_platform)
    for w, h in SIZES:
        r = proc(images=[image(w * h, (w, h))], return_tensors="pt")
        with torch.no_grad():
            ref = model.model.get_image_features(r["pixel_values"], r["image_grid_thw"]).pooler_output[0]
            got = ours.embed_images(r["pixel_values"], grid_thw=r["image_grid_thw"].tolist())[0]
        assert got.shape == ref.shape == (int(r["image_grid_thw"].prod()) // 4, 64), (w, h)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if ours.v25:  # the windows matter: attending to the whole image everywhere gives other features
        ours.visual.full_blocks = set(range(len(ours.visual.blocks)))
        with torch.no_grad():
            full = ours.embed_images(r["pixel_values"], grid_thw=r["image_grid_thw"].tolist())[0]
        assert (full - ref).abs().max() > 1e-3


def test_mrope_positions_match_get_rope_index(qwen, cpu_platform):
    from pageport.models.multimodal.inputs import MultiModalInput

    d, model, tok, image_id, proc = qwen
    ours = _ours(qwen, cpu_platform)
    grids = [proc(images=[image(i, s)], return_tensors="pt")["image_grid_thw"][0] for i, s in enumerate(SIZES[:3])]
    ids, types, mm = [5, 6], [0, 0], []
    for k, g in enumerate(grids):  # text and an image (wide, tall, wide), three times
        n = int(g.prod()) // 4
        ids += [7] * (k + 1)
        types += [0] * (k + 1)
        mm.append(MultiModalInput(len(ids), n, "", b"", [], None, g.tolist()))
        ids += [image_id] * n
        types += [1] * n
    ids += [9, 9, 9]
    types += [0, 0, 0]
    ref, delta = model.model.get_rope_index(torch.tensor([ids]), torch.tensor([types]), torch.stack(grids))
    pos, d_ours = ours.mrope_positions(mm)
    end = pos.shape[1]
    assert end == len(ids) - 3 and d_ours == int(delta) < 0
    np.testing.assert_array_equal(pos, ref[:, 0, :end].numpy())
    np.testing.assert_array_equal(ref[:, 0, end:].numpy(), np.broadcast_to(np.arange(end, len(ids)) + d_ours,
                                                                           (3, 3)))


PROMPTS = [(f"USER: {QWEN_IMAGE}\nWhat is this? ASSISTANT:", [(40, 30)]),
           (f"USER: {QWEN_IMAGE} and {QWEN_IMAGE}, compare. ASSISTANT:", [(18, 55), (80, 50)]),
           ("USER: Tell me a story. ASSISTANT:", [])]


def _generate(llm, prompts):
    from pageport import SamplingParams

    inputs = [{"prompt": p, "multi_modal_data": {"image": ims}} if ims else p for p, ims in prompts]
    outs = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _with_images(seed: int):
    return [(p, [image(seed + i, s) for i, s in enumerate(sizes)]) for p, sizes in PROMPTS]


def test_greedy_matches_transformers_in_one_batch(qwen, llm):
    d, model, tok, image_id, proc = qwen
    prompts = _with_images(1)
    got = _generate(llm, prompts)
    for (p, ims), g in zip(prompts, got):
        assert g == hf_qwen2_vl_greedy(model, image_id, proc, tok.encode(p), ims, N), p
    # the image steers the tokens (else the test could not tell images, or their positions, apart)
    other = _generate(llm, [(prompts[0][0], [image(9, (40, 30))])])[0]
    assert other != got[0]
    assert other == hf_qwen2_vl_greedy(model, image_id, proc, tok.encode(prompts[0][0]), [image(9, (40, 30))], N)


def test_chunked_prefill_gives_the_same_tokens(qwen):
    """Steps of 16 tokens: image runs cut in several chunks (their features and (t, h, w) positions sliced), rows
    decoding (1-D positions plus their delta) beside rows prefilling their images."""
    from pageport import LLM

    d, model, tok, image_id, proc = qwen
    small = LLM(str(d), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24, block_size=16,
                max_num_batched_tokens=16, num_threads=1)
    prompts = _with_images(1)
    got = _generate(small, prompts)
    for (p, ims), g in zip(prompts, got):
        assert g == hf_qwen2_vl_greedy(model, image_id, proc, tok.encode(p), ims, N), p


def test_preemption_by_recompute_gives_the_same_tokens(qwen):
    """10 blocks for three requests of 34, 90 and 11 tokens + 24 out: the newest are preempted and recomputed, their
    output tokens (past the images: index + delta) with the prompt."""
    from pageport import LLM, SamplingParams

    d, model, tok, image_id, proc = qwen
    small = LLM(str(d), dtype="float32", max_num_seqs=8, num_gpu_blocks_override=10, block_size=16,
                max_num_batched_tokens=32, num_threads=1)
    prompts = _with_images(1)
    inputs = [{"prompt": p, "multi_modal_data": {"image": ims}} if ims else p for p, ims in prompts]
    outs = small.generate(inputs, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert small.engine.core_stats().num_preemptions >= 1
    for (p, ims), o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_qwen2_vl_greedy(model, image_id, proc, tok.encode(p), ims, 24), p


def test_same_image_again_hits_the_caches(llm):
    from pageport import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    p = f"{QWEN_IMAGE} describe the picture in a few words please. ASSISTANT:"
    llm.engine.reset_prefix_cache()
    first = llm.generate({"prompt": p, "multi_modal_data": {"image": image(11)}}, sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    same = llm.generate({"prompt": p, "multi_modal_data": {"image": image(11)}}, sp, use_tqdm=False)[0]
    assert same.num_cached_tokens >= 16  # its blocks, positions and all, are hits
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    other = llm.generate({"prompt": p, "multi_modal_data": {"image": image(12)}}, sp, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0  # same text, another image: no hit
    # after other text the image's tokens are no prefix hit: its features come from the encoder cache
    before = llm.engine.core_stats()
    again = llm.generate({"prompt": f"USER: a new question about {QWEN_IMAGE} ASSISTANT:",
                          "multi_modal_data": {"image": image(11)}}, sp, use_tqdm=False)[0]
    after = llm.engine.core_stats()
    assert again.num_cached_tokens < 16
    looked_up = after.mm_cache_queries - before.mm_cache_queries
    assert looked_up >= 1 and after.mm_cache_hits - before.mm_cache_hits == looked_up


def test_chat_image_part(qwen, llm):
    from pageport import SamplingParams

    d, model, tok, image_id, proc = qwen
    img = image(3)
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                         {"type": "text", "text": "What is it?"}]}]
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), use_tqdm=False)[0]
    # the image part becomes the vision start, image and end tokens, as Qwen2-VL's chat template writes it
    text = tok.apply_chat_template([{"role": "user", "content": f"{QWEN_IMAGE}\nWhat is it?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(image_id) == 1 and ids[ids.index(image_id) - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert out.outputs[0].token_ids == hf_qwen2_vl_greedy(model, image_id, proc, ids, [img], N)


def test_flat_published_config(tmp_path, cpu_platform):
    """The published checkpoints' flat config.json (decoder fields at the top level, rope_scaling type "mrope", a
    sliding_window that use_sliding_window turns off, tied embeddings at the top level) builds the same decoder."""
    import json

    from transformers import AutoConfig

    from pageport.models.qwen2_vl import Qwen2VLForConditionalGeneration

    cfg = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 300, "max_position_embeddings": 256, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
           "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": True,
           "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28, "image_token_id": 5,
           "bos_token_id": 1, "eos_token_id": 2, "vision_start_token_id": 3, "vision_end_token_id": 4,
           "vision_config": {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2,
                             "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(tmp_path), cpu_platform, torch.float32)
    lm = ours.language_model
    assert lm.tie_word_embeddings and lm.sliding_windows == [None, None]
    attn = lm.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None
    assert attn.rotary_emb.axis.flatten().tolist() == [0, 0, 1, 1, 1, 2, 2, 2] * 2
    inv = 1.0 / 1e6 ** (torch.arange(0, 16, 2).float() / 16)  # rope_theta of the flat config
    torch.testing.assert_close(attn.rotary_emb.cos_sin_cache[7, :8], torch.cos(7 * inv))
