"""Images in a prompt: decoding (PIL images, data: URLs, raw bytes), preprocessing with the checkpoint's own
image processor, the `<image>` placeholder expanded to one token per image feature, the content hash that goes
into the prefix-cache key, and the encoder cache of the engine core."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
from collections import OrderedDict
from typing import Any, Optional

import msgspec
import numpy as np


class MultiModalInput(msgspec.Struct, array_like=True, gc=False):
    """One image of a prompt, as it travels to the engine core: its placeholder run [offset, offset + length)
    in the prompt's token ids, the preprocessed pixel values (float32, C order) and their content hash."""
    offset: int
    length: int
    hash: str
    data: bytes
    shape: list[int]

    def pixel_values(self):
        import torch

        return torch.from_numpy(np.frombuffer(self.data, dtype=np.float32).reshape(self.shape).copy())


def load_image(item: Any):
    """A PIL image from a PIL image, bytes, or a `data:image/...;base64,` URL. Raises ValueError when the data
    is not a decodable image."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str):
        if not item.startswith("data:"):
            raise ValueError("an image must be a PIL image, bytes or a data: URL")
        head, _, body = item.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URL image must be base64-encoded")
        try:
            item = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"the image's base64 data does not decode: {e}") from None
    if isinstance(item, (bytes, bytearray)):
        try:
            img = Image.open(io.BytesIO(item))
            img.load()
            return img
        except Exception as e:  # noqa: BLE001 - PIL raises several kinds
            raise ValueError(f"the image data is not a decodable image: {type(e).__name__}: {e}") from None
    raise ValueError(f"an image must be a PIL image, bytes or a data: URL, got {type(item).__name__}")


class ImageProcessor:
    """The front end's half: the checkpoint's image processor (e.g. CLIPImageProcessor) and the placeholder
    expansion for an architecture with a fixed number of features per image (LLaVA 1.5)."""

    def __init__(self, model_dir: str, hf_config, limits: Optional[dict] = None):
        from transformers import AutoImageProcessor

        from pageport.models.llava import image_feature_count

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = getattr(hf_config, "image_token_index", None)
        if self.image_token_id is None:
            self.image_token_id = hf_config.image_token_id
        self.num_features = image_feature_count(hf_config)
        self.limits = dict(limits or {})

    def process(self, token_ids: list[int], mm_data: dict) -> tuple[list[int], list[MultiModalInput]]:
        unknown = set(mm_data) - {"image"}
        if unknown:
            raise ValueError(f"unsupported multi_modal_data modality: {', '.join(sorted(unknown))}")
        images = mm_data.get("image")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        limit = self.limits.get("image")
        if limit is not None and len(images) > limit:
            raise ValueError(f"the prompt has {len(images)} images, more than --limit-mm-per-prompt image={limit}")
        n_ph = sum(1 for t in token_ids if t == self.image_token_id)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} image placeholders but {len(images)} images were given")
        if not images:
            return token_ids, []
        pil = [load_image(im).convert("RGB") for im in images]
        pixels = np.asarray(self.processor(images=pil, return_tensors="np")["pixel_values"], dtype=np.float32)
        out, mm, k = [], [], 0
        for t in token_ids:
            if t != self.image_token_id:
                out.append(t)
                continue
            px = np.ascontiguousarray(pixels[k:k + 1])
            data = px.tobytes()
            digest = hashlib.sha256(data + str(px.shape).encode()).hexdigest()
            mm.append(MultiModalInput(len(out), self.num_features, digest, data, list(px.shape)))
            out += [t] * self.num_features
            k += 1
        return out, mm


class EncoderCache:
    """The engine core's image features by content hash (LRU, a fixed number of images): an image seen again,
    or a prompt computed in several chunks, runs the vision tower once."""

    def __init__(self, max_items: int = 64):
        self.max_items = max_items
        self.items: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def get(self, mm: MultiModalInput, encode):
        feats = self.items.get(mm.hash)
        if feats is not None:
            self.items.move_to_end(mm.hash)
            self.hits += 1
            return feats
        self.misses += 1
        feats = encode(mm)
        self.items[mm.hash] = feats
        if len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return feats


def split_chat_images(conversation: list, image_token: str) -> tuple[list, list]:
    """OpenAI-style content parts with images (`{"type": "image_url", "image_url": {"url": ...}}`, also
    `{"type": "image", "image": ...}` / `"image_pil"`): the conversation with each message's parts joined into
    one string, every image replaced by the model's image token, and the images in order. http(s) URLs are not
    fetched here (ValueError): pass a data: URL or the image itself."""
    out, images = [], []
    for msg in conversation:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError("an image_url part needs image_url.url")
                if url.startswith(("http://", "https://")):
                    raise ValueError("image URLs are not fetched here: give the image as a data: URL")
                images.append(url)
                texts.append(image_token)
            elif kind in ("image", "image_pil"):
                images.append(part.get(kind))
                texts.append(image_token)
            else:
                raise ValueError(f"unsupported content part type {kind!r}")
        out.append({**msg, "content": "\n".join(texts)})
    return out, images
