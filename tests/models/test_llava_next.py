"""LLaVA-NeXT (anyres tiles, unpadding, image_newline) against Transformers on a tiny random checkpoint: greedy
tokens for prompts with one image, two images of other shapes, and text alone in one batch; the feature count of
each image equals the length of Transformers' packed image features."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL.Image")

from tests.models.tiny_vlm import image, make_tiny_llava_next  # noqa: E402

N = 8
# wide, tall, square and small images: different grids from PINPOINTS and padding cut on either axis
SIZES = [(60, 25), (20, 50), (40, 40), (90, 30), (13, 11), (100, 20)]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava-next")
    model, tok, image_id = make_tiny_llava_next(d)
    return d, model, tok, image_id


def _hf_features(model, proc, img) -> torch.Tensor:
    r = proc(images=[img], return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(r["pixel_values"], r["image_sizes"],
                                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    return out.pooler_output[0]


def _hf_greedy(model, tok, image_id, proc, prompt, images) -> list[int]:
    ids = tok.encode(prompt)
    counts = iter(_hf_features(model, proc, im).shape[0] for im in images)
    ex = []
    for t in ids:
        ex += [t] * next(counts) if t == image_id else [t]
    kw = {}
    if images:
        r = proc(images=images, return_tensors="pt")
        kw = {"pixel_values": r["pixel_values"], "image_sizes": r["image_sizes"]}
    out = model.generate(torch.tensor([ex]), attention_mask=torch.ones(1, len(ex), dtype=torch.long),
                         max_new_tokens=N, do_sample=False, **kw)
    return out[0, len(ex):].tolist()


def test_feature_count_and_features_match_transformers(next_dir, cpu_platform):
    from transformers import AutoImageProcessor

    from pageport.models.llava_next import LlavaNextForConditionalGeneration, feature_count

    d, model, tok, image_id = next_dir
    proc = AutoImageProcessor.from_pretrained(d)
    ours = LlavaNextForConditionalGeneration(model.config, cpu_platform, torch.float32)
    ours.load_weights(model.state_dict().items())
    for w, h in SIZES:
        img = image(w * h, (w, h))
        ref = _hf_features(model, proc, img)
        assert feature_count(model.config, h, w) == ref.shape[0], (w, h)
        r = proc(images=[img], return_tensors="pt")
        got = ours.embed_images(r["pixel_values"][0], image_sizes=[r["image_sizes"][0].tolist()])[0]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_llava_next_greedy_matches_transformers(next_dir):
    from transformers import AutoImageProcessor

    from pageport import LLM, SamplingParams

    d, model, tok, image_id = next_dir
    proc = AutoImageProcessor.from_pretrained(d)
    llm = LLM(str(d), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 24, block_size=16,
              max_num_batched_tokens=48, num_threads=1)
    a, b, c = image(1, (60, 25)), image(2, (20, 50)), image(3, (40, 40))
    prompts = [("USER: <image>\nWhat is this? ASSISTANT:", [a]),
               ("USER: <image> and <image>, compare. ASSISTANT:", [b, c]),
               ("USER: Tell me a story. ASSISTANT:", [])]
    inputs = [{"prompt": p, "multi_modal_data": {"image": im}} if im else p for p, im in prompts]
    sp = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    outs = llm.generate(inputs, sp, use_tqdm=False)
    for (p, im), o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(model, tok, image_id, proc, p, im), p
    # the placeholder run is the image's own length (a wide image: more tiles than a square one)
    assert len(outs[0].prompt_token_ids) == len(tok.encode(prompts[0][0])) - 1 + _hf_features(model, proc, a).shape[0]
    other = llm.generate({"prompt": prompts[0][0], "multi_modal_data": {"image": image(9, (60, 25))}}, sp,
                         use_tqdm=False)[0]
    assert other.outputs[0].token_ids != outs[0].outputs[0].token_ids  # the image steers the tokens
