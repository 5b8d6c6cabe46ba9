"""LLaVA 1.5 against Transformers on a tiny random checkpoint: greedy tokens for one image, two images and text
alone in one batch; the image in the prefix-cache key; a bad image fails its own request."""
import base64

import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from tests.models.tiny_vlm import data_url as _data_url  # noqa: E402
from tests.models.tiny_vlm import image as _image  # noqa: E402
from tests.models.tiny_vlm import make_tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    model, tok, image_id = make_tiny_llava(d)
    return d, model, tok, image_id


def _hf_greedy(model, tok, image_id, prompt: str, images, n: int, proc) -> list[int]:
    ids = tok.encode(prompt)
    feats = (28 // 7) ** 2
    ex = []
    for t in ids:
        ex += [t] * feats if t == image_id else [t]
    kw = {}
    if images:
        kw["pixel_values"] = proc(images=images, return_tensors="pt")["pixel_values"]
    out = model.generate(torch.tensor([ex]), attention_mask=torch.ones(1, len(ex), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ex):].tolist()


@pytest.fixture(scope="module")
def llm(llava_dir):
    from pageport import LLM

    d, *_ = llava_dir
    return LLM(str(d), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24, block_size=16,
               max_num_batched_tokens=24, num_threads=1)


def test_llava_greedy_matches_transformers(llava_dir, llm):
    from transformers import CLIPImageProcessor

    from pageport import SamplingParams

    d, model, tok, image_id = llava_dir
    proc = CLIPImageProcessor.from_pretrained(d)
    a, b = _image(1), _image(2, (50, 50))
    prompts = [("USER: <image>\nWhat is this? ASSISTANT:", [a]),
               ("USER: <image> and <image>, compare. ASSISTANT:", [a, b]),
               ("USER: Tell me a story. ASSISTANT:", [])]
    n = 8
    inputs = [{"prompt": p, "multi_modal_data": {"image": im if len(im) > 1 else im[0]}} if im else p
              for p, im in prompts]
    outs = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    for (p, im), o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(model, tok, image_id, p, im, n, proc), p
    # the image matters: another image, other tokens (else the test could not tell images apart)
    other = llm.generate({"prompt": prompts[0][0], "multi_modal_data": {"image": _image(7)}},
                         SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids == _hf_greedy(model, tok, image_id, prompts[0][0], [_image(7)], n, proc)
    assert other[0].outputs[0].token_ids != outs[0].outputs[0].token_ids


def test_llava_image_in_prefix_cache_key(llm):
    from pageport import SamplingParams

    # the placeholder run starts in the first block, so every full block depends on the image
    p = "<image> describe the picture in a few words please. ASSISTANT:"
    sp = SamplingParams(temperature=0, max_tokens=2)
    llm.engine.reset_prefix_cache()
    first = llm.generate({"prompt": p, "multi_modal_data": {"image": _image(11)}}, sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    same = llm.generate({"prompt": p, "multi_modal_data": {"image": _image(11)}}, sp, use_tqdm=False)[0]
    assert same.num_cached_tokens >= 16  # the same image again: its blocks are hits
    other = llm.generate({"prompt": p, "multi_modal_data": {"image": _image(12)}}, sp, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0  # same text, another image: no hit
    assert same.outputs[0].token_ids == first.outputs[0].token_ids


def test_llava_encoder_cache_hit_is_counted(llm):
    """The same image after other text: no prefix-cache hit on its tokens, so the vision tower's features come from
    the encoder cache, and the core counts the lookups and the hits (vLLM's mm_cache_queries / mm_cache_hits)."""
    from pageport import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=2)
    llm.engine.reset_prefix_cache()
    before = llm.engine.core_stats()
    llm.generate({"prompt": "USER: <image> what is it? ASSISTANT:", "multi_modal_data": {"image": _image(21)}}, sp,
                 use_tqdm=False)
    mid = llm.engine.core_stats()
    assert mid.mm_cache_queries > before.mm_cache_queries and mid.mm_cache_hits == before.mm_cache_hits  # new
    out = llm.generate({"prompt": "USER: a new question about this one: <image> ASSISTANT:",
                        "multi_modal_data": {"image": _image(21)}}, sp, use_tqdm=False)[0]
    after = llm.engine.core_stats()
    assert out.num_cached_tokens < 16  # its image tokens were not prefix-cache hits
    looked_up = after.mm_cache_queries - mid.mm_cache_queries  # once per prompt chunk that holds image tokens
    assert looked_up >= 1 and after.mm_cache_hits - mid.mm_cache_hits == looked_up


def test_llava_chat_image_parts_and_bad_image(llava_dir, llm):
    from transformers import CLIPImageProcessor

    from pageport import SamplingParams

    d, model, tok, image_id = llava_dir
    img = _image(3)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                                         {"type": "text", "text": "What is it?"}]}]
    out = llm.chat(conv, sp, use_tqdm=False)[0]
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(image_id) == 1
    proc = CLIPImageProcessor.from_pretrained(d)
    ex = []
    for t in ids:
        ex += [t] * 16 if t == image_id else [t]
    ref = model.generate(torch.tensor([ex]), attention_mask=torch.ones(1, len(ex), dtype=torch.long),
                         pixel_values=proc(images=[img], return_tensors="pt")["pixel_values"], max_new_tokens=6,
                         do_sample=False)[0, len(ex):].tolist()
    assert out.outputs[0].token_ids == ref
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                                        {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(ValueError, match="base64"):
        llm.chat(bad, sp, use_tqdm=False)
    not_png = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    with pytest.raises(ValueError, match="not a decodable image"):
        llm.generate({"prompt": "<image> hi", "multi_modal_data": {"image": not_png}}, sp, use_tqdm=False)
    with pytest.raises(ValueError, match="placeholders"):
        llm.generate({"prompt": "<image> <image> hi", "multi_modal_data": {"image": img}}, sp, use_tqdm=False)
    # the engine still serves after the refused requests
    again = llm.chat(conv, sp, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == ref
