"""Images in a prompt: decoding (PIL images, data: URLs, raw bytes), preprocessing with the checkpoint's own
image processor, the `<image>` placeholder expanded to one token per image feature, the content hash that goes
into the prefix-cache key, and the encoder cache of the engine core."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from collections import OrderedDict
from typing import Any, Optional

import msgspec
import numpy as np


class MultiModalInput(msgspec.Struct, array_like=True, gc=False):
    """One image of a prompt, as it travels to the engine core: its placeholder run [offset, offset + length)
    in the prompt's token ids, the preprocessed pixel values (float32, C order) and their content hash;
    `image_size`: the original (height, width) where the model needs it (LLaVA-NeXT's tiles); `grid_thw`: the
    patch grid (frames, rows, columns) of Qwen2-VL's native-resolution images."""
    offset: int
    length: int
    hash: str
    data: bytes
    shape: list[int]
    image_size: Optional[list[int]] = None
    grid_thw: Optional[list[int]] = None

    def pixel_values(self):
        import torch

        return torch.from_numpy(np.frombuffer(self.data, dtype=np.float32).reshape(self.shape).copy())


# http(s) image URLs: vLLM reads VLLM_IMAGE_FETCH_TIMEOUT (5 s); the size cap keeps one request from
# pulling an unbounded body into the server's memory
FETCH_TIMEOUT_S = float(os.environ.get("PAGEPORT_IMAGE_FETCH_TIMEOUT", os.environ.get("VLLM_IMAGE_FETCH_TIMEOUT", 5)))
FETCH_MAX_BYTES = int(os.environ.get("PAGEPORT_IMAGE_FETCH_MAX_BYTES", 20 << 20))


def fetch_url(url: str, timeout: Optional[float] = None, max_bytes: Optional[int] = None) -> bytes:
    """The body of an http(s) URL, at most `max_bytes`; ValueError (saying why) when it cannot be fetched:
    no network, a refused connection, a timeout, an HTTP error status or a body over the limit."""
    import urllib.error
    import urllib.request

    timeout = FETCH_TIMEOUT_S if timeout is None else timeout
    max_bytes = FETCH_MAX_BYTES if max_bytes is None else max_bytes
    shown = url if len(url) <= 200 else url[:200] + "..."
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "pageport"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            size = resp.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > max_bytes:
                raise ValueError(f"the image at {shown} has {size} bytes, more than the limit of {max_bytes}")
            body = resp.read(max_bytes + 1)
    except ValueError:
        raise
    except urllib.error.HTTPError as e:
        raise ValueError(f"the image URL {shown} could not be fetched: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:  # no network, refused, timeout, DNS
        why = getattr(e, "reason", e)
        raise ValueError(f"the image URL {shown} could not be fetched (timeout {timeout:g} s): {why}") from None
    if len(body) > max_bytes:
        raise ValueError(f"the image at {shown} is larger than the limit of {max_bytes} bytes")
    return body


def load_image(item: Any):
    """A PIL image from a PIL image, bytes, a `data:image/...;base64,` URL or an http(s) URL (fetched with
    `fetch_url`'s timeout and size limit). Raises ValueError when the data is not a decodable image or the URL
    cannot be fetched."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str) and item.startswith(("http://", "https://")):
        item = fetch_url(item)
    elif isinstance(item, str):
        if not item.startswith("data:"):
            raise ValueError("an image must be a PIL image, bytes, a data: URL or an http(s) URL")
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
    raise ValueError(f"an image must be a PIL image, bytes, a data: URL or an http(s) URL, "
                     f"got {type(item).__name__}")


def parse_mm_limits(value) -> Optional[dict]:
    """--limit-mm-per-prompt / LLM(limit_mm_per_prompt=...): vLLM's JSON object of the most items per prompt for
    each modality, `{"image": 2}` (also vLLM's newer `{"image": {"count": 2, ...}}`). None: no limit."""
    if value is None:
        return None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"limit_mm_per_prompt must be a JSON object such as '{{\"image\": 2}}': {e}") from None
    if not isinstance(value, dict):
        raise ValueError("limit_mm_per_prompt must be an object of modality -> count, such as {\"image\": 2}")
    out = {}
    for k, v in value.items():
        if isinstance(v, dict):
            v = v.get("count")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"limit_mm_per_prompt[{k!r}] must be a count >= 0, got {v!r}")
        if k not in ("image", "video", "audio"):
            raise ValueError(f"limit_mm_per_prompt: unknown modality {k!r} (image, video, audio)")
        out[k] = v
    return out


def check_mm_limit(count: int, limits: Optional[dict], modality: str = "image") -> None:
    """ValueError naming the limit when a prompt has more items of `modality` than allowed."""
    limit = (limits or {}).get(modality)
    if limit is not None and count > limit:
        raise ValueError(f"At most {limit} {modality}(s) may be provided in one prompt; this one has {count} "
                         f"(--limit-mm-per-prompt {modality}={limit})")


# Qwen2-VL / Qwen2.5-VL: images in native resolution, one placeholder per merged patch of the image's grid
_GRID_MODELS = ("qwen2_vl", "qwen2_5_vl")


class ImageProcessor:
    """The front end's half: the checkpoint's image processor (e.g. CLIPImageProcessor) and the placeholder
    expansion: a fixed number of features per image (LLaVA 1.5), or one that depends on the image's size
    (LLaVA-NeXT's tiles, Qwen2-VL's patch grid)."""

    def __init__(self, model_dir: str, hf_config, limits: Optional[dict] = None):
        from transformers import AutoImageProcessor

        from pageport.models.llava import image_feature_count

        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = getattr(hf_config, "image_token_index", None)
        if self.image_token_id is None:
            self.image_token_id = hf_config.image_token_id
        self.hf_config = hf_config
        self.anyres = getattr(hf_config, "model_type", None) == "llava_next"
        self.grid = getattr(hf_config, "model_type", None) in _GRID_MODELS
        if self.grid:
            self._check_grid_processor()
        self.num_features = None if self.anyres or self.grid else image_feature_count(hf_config)
        self.limits = parse_mm_limits(limits) or {}

    def process(self, token_ids: list[int], mm_data: dict) -> tuple[list[int], list[MultiModalInput]]:
        unknown = set(mm_data) - {"image"}
        if unknown:
            raise ValueError(f"unsupported multi_modal_data modality: {', '.join(sorted(unknown))}")
        images = mm_data.get("image")
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        check_mm_limit(len(images), self.limits)
        n_ph = sum(1 for t in token_ids if t == self.image_token_id)
        if n_ph != len(images):
            raise ValueError(f"the prompt has {n_ph} image placeholders but {len(images)} images were given")
        if not images:
            return token_ids, []
        pil = [load_image(im).convert("RGB") for im in images]
        if self.anyres:
            items = [self._anyres(im) for im in pil]
        elif self.grid:
            items = [self._by_grid(im) for im in pil]
        else:
            pixels = np.asarray(self.processor(images=pil, return_tensors="np")["pixel_values"], dtype=np.float32)
            items = [(np.ascontiguousarray(pixels[k:k + 1]), None, self.num_features, None) for k in range(len(pil))]
        out, mm, k = [], [], 0
        for t in token_ids:
            if t != self.image_token_id:
                out.append(t)
                continue
            px, size, n, grid = items[k]
            data = px.tobytes()
            # the grid too: the same patches in another grid are another image
            digest = hashlib.sha256(data + str(px.shape).encode() + str(size).encode()
                                    + (str(grid).encode() if grid else b"")).hexdigest()
            mm.append(MultiModalInput(len(out), n, digest, data, list(px.shape), size, grid))
            out += [t] * n
            k += 1
        return out, mm

    def chat_image_text(self, tokenizer) -> str:
        """What stands for an image in a chat message: the image token; Qwen2-VL's between its vision start and
        end tokens, as its chat template writes an image part."""
        token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.grid:
            start = getattr(self.hf_config, "vision_start_token_id", None)
            end = getattr(self.hf_config, "vision_end_token_id", None)
            if start is not None and end is not None:
                return tokenizer.convert_ids_to_tokens(start) + token + tokenizer.convert_ids_to_tokens(end)
        return token

    def _check_grid_processor(self) -> None:
        """The processor's patches must be the tower's (placeholder counts and pixel rows follow from them)."""
        vc, p = self.hf_config.vision_config, self.processor
        for ours, theirs in (("spatial_merge_size", "merge_size"), ("patch_size", "patch_size"),
                             ("temporal_patch_size", "temporal_patch_size")):
            if getattr(p, theirs, None) != getattr(vc, ours):
                raise ValueError(f"the image processor's {theirs} {getattr(p, theirs, None)} differs from the "
                                 f"vision tower's {ours} {getattr(vc, ours)}")
        self.merge = vc.spatial_merge_size

    def _by_grid(self, img):
        """One image alone: its patches [N, C * T * P * P], no original size, t * h * w / merge^2 features, and its
        grid (t, h, w)."""
        r = self.processor(images=[img], return_tensors="np")
        px = np.ascontiguousarray(np.asarray(r["pixel_values"], dtype=np.float32))
        grid = [int(v) for v in np.asarray(r["image_grid_thw"])[0]]
        return px, None, grid[0] * grid[1] * grid[2] // self.merge ** 2, grid

    def _anyres(self, img):
        """One image alone (a batch would pad every image to the most tiles): its tiles, its original size as
        the processor reports it, and its feature count."""
        from pageport.models.llava_next import feature_count

        r = self.processor(images=[img], return_tensors="np")
        px = np.ascontiguousarray(np.asarray(r["pixel_values"], dtype=np.float32)[0])  # [tiles, 3, H, W]
        size = [int(v) for v in np.asarray(r["image_sizes"])[0]]
        return px, size, feature_count(self.hf_config, *size), None


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
    one string, every image replaced by the model's image token, and the images in order (data: or http(s) URL
    strings as given: `load_image` decodes or fetches them). The offline LLM.chat and the server both use it."""
    out, images = [], []
    for msg in conversation:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"a {kind} part needs a text string")
                texts.append(part["text"])
            elif kind in ("image_url", "input_image"):  # input_image: the Responses API's, a bare URL string
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError("an image_url part needs image_url.url")
                if not url.startswith(("data:", "http://", "https://")):
                    raise ValueError("an image_url must be a data: URL or an http(s) URL")
                images.append(url)
                texts.append(image_token)
            elif kind in ("image", "image_pil"):
                images.append(part.get(kind))
                texts.append(image_token)
            else:
                raise ValueError(f"unsupported content part type {kind!r}")
        out.append({**msg, "content": "\n".join(texts)})
    return out, images
