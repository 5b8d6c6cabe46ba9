"""Tiny random vision-language checkpoints built from transformers' config classes, for the VLM tests."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch

from tests.conftest import DEFAULT_GGUF, default_model_dir


def image(seed: int, size=(40, 30)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def _parts(max_positions: int):
    """The default model's tokenizer with an added <image> token, a tiny CLIP tower and a tiny Llama decoder."""
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=7, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return tok, image_id, vision, text


def _seeded_model(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger image weights so the image visibly steers the tokens
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(4.0)
    return model


def make_tiny_llava(d):
    """LLaVA 1.5 (CLIP 28 px / patch 7 -> 16 features per image) on the default model's tokenizer with an added
    <image> token; saved with its CLIPImageProcessor. Returns (model, tokenizer, image token id)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    tok, image_id, vision, text = _parts(max_positions=512)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    model = _seeded_model(LlavaForConditionalGeneration, cfg)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(d)
    return model, tok, image_id


def hf_greedy_ids(model, ids: list[int], image_id: int, feats: int, pixel_values, n: int) -> list[int]:
    """Transformers' greedy tokens for prompt ids whose image tokens are expanded here to `feats` each."""
    ex = []
    for t in ids:
        ex += [t] * feats if t == image_id else [t]
    kw = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.generate(torch.tensor([ex]), attention_mask=torch.ones(1, len(ex), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ex):].tolist()


PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def make_tiny_llava_next(d):
    """LLaVA-NeXT: CLIP 28 px tiles of 4 x 4 features, anyres over PINPOINTS, on the default model's tokenizer
    with an added <image> token; saved with its image processor. Returns (model, tokenizer, image token id)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor

    tok, image_id, vision, text = _parts(max_positions=1024)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS)
    model = _seeded_model(LlavaNextForConditionalGeneration, cfg)
    with torch.no_grad():
        model.model.image_newline.mul_(8.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                            image_grid_pinpoints=PINPOINTS).save_pretrained(d)
    return model, tok, image_id


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # an image in a Qwen2-VL prompt


def make_tiny_qwen2_vl(d, v25: bool = False):
    """Qwen2-VL (v25: Qwen2.5-VL) with a 2-3 block tower of 4 px patches merged 2 x 2 (one feature per 8 x 8 px;
    Qwen2.5-VL: windows of 16 px = 2 x 2 features, block 1 full attention) and a 2-layer Qwen2 decoder with
    M-RoPE (head 16: mrope_section [2, 3, 3]), on the default model's tokenizer with Qwen's vision tokens added;
    saved with its image processor (the PIL one: no torchvision here). Returns (model, tokenizer, image token
    id); the in-memory model does not stop at EOS (the engine runs with ignore_eos)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    tok.add_special_tokens({"additional_special_tokens": QWEN_VISION_TOKENS})
    start, end, image_id, video_id = tok.convert_tokens_to_ids(QWEN_VISION_TOKENS)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start,
               vision_end_token_id=end, tie_word_embeddings=False)
    if v25:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    else:
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
    cfg = Config(vision_config=vision, text_config=text, **ids)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():  # larger weights in the tower so that images, and the windows, visibly matter
        for name, p in model.model.visual.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(8.0)
        # and sharp attention in the decoder, so that positions (each M-RoPE axis, the decode delta) matter
        for name, p in model.model.language_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    proc = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    proc(patch_size=4, merge_size=2, temporal_patch_size=2,
         size={"shortest_edge": 8 * 8, "longest_edge": 96 * 96}).save_pretrained(d)
    model.generation_config.eos_token_id = None
    return model, tok, image_id


def hf_qwen2_vl_greedy(model, image_id: int, proc, ids: list[int], images, n: int) -> list[int]:
    """Transformers' greedy tokens for Qwen2-VL prompt ids whose `<|image_pad|>` tokens are expanded here to each
    image's t * h * w / 4 features (as its processor does), with the processor's pixel values and grids."""
    kw = {}
    if images:
        r = proc(images=images, return_tensors="pt")
        kw = {"pixel_values": r["pixel_values"], "image_grid_thw": r["image_grid_thw"]}
        counts = iter((r["image_grid_thw"].prod(-1) // 4).tolist())
    ex, types = [], []
    for t in ids:
        k = next(counts) if t == image_id else 1
        ex += [t] * k
        types += [int(t == image_id)] * k
    out = model.generate(torch.tensor([ex]), attention_mask=torch.ones(1, len(ex), dtype=torch.long),
                         mm_token_type_ids=torch.tensor([types]), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ex):].tolist()
