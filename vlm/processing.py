"""Host-side preprocessing: image loading and pixel patches, prompt token ids, mRoPE positions (numpy + PIL)."""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_PAD_ID = 151655
MAX_IMAGE_PIXELS = 100_000_000  # hard cap on decoded size; smart_resize does the real downscaling
MAX_ASPECT_RATIO = 200
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An input that cannot be used as an image; the message is meant for the user."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Image processor settings (preprocessor_config.json); defaults are the real Qwen3-VL ones."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PreprocessConfig:
        """Read preprocessor_config.json from a checkpoint dir (defaults where it or a key is missing)."""
        file = pathlib.Path(path) / "preprocessor_config.json"
        raw = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
        size = raw.get("size") or {}
        d = cls()
        return cls(
            patch_size=int(raw.get("patch_size", d.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", d.merge_size)),
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or d.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or d.max_pixels),
            image_mean=tuple(float(x) for x in raw.get("image_mean", d.image_mean)),
            image_std=tuple(float(x) for x in raw.get("image_std", d.image_std)),
        )


# ---------------------------------------------------------------- image loading


def load_image(x: Any) -> Image.Image:
    """Load a path, bytes, PIL image or numpy array as an 8-bit RGB PIL image (see load_image_with_notes)."""
    return load_image_with_notes(x)[0]


def load_image_with_notes(x: Any) -> tuple[Image.Image, list[str]]:
    """Load an image as 8-bit RGB, plus user-facing notes on what was changed to get there."""
    if isinstance(x, Image.Image):
        return _first_frame(x, "the image")
    if isinstance(x, np.ndarray):
        return _normalize(_from_array(x), [])
    if isinstance(x, (bytes, bytearray, memoryview)):
        if len(x) == 0:
            raise ImageError("the image data is empty (0 bytes)")
        return _decode(io.BytesIO(bytes(x)), "the image data")
    if isinstance(x, (str, os.PathLike)):
        path = pathlib.Path(x)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        if path.stat().st_size == 0:
            raise ImageError(f"the image file is empty (0 bytes): {path}")
        return _decode(path, str(path))
    raise ImageError(f"cannot use a {type(x).__name__} as an image (give a path, bytes, a PIL image or an array)")


def _decode(source: io.BytesIO | pathlib.Path, what: str) -> tuple[Image.Image, list[str]]:
    """Open an encoded image and load its first frame as RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap applies instead
            with Image.open(source) as im:
                return _first_frame(im, what)
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{what} is too large (over {MAX_IMAGE_PIXELS // 1_000_000} megapixels)") from None


def _first_frame(im: Image.Image, what: str) -> tuple[Image.Image, list[str]]:
    """Size-check, fully decode and normalise the first frame of an opened image (a new image; notes)."""
    _check_size(im)
    notes: list[str] = []
    try:
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            im.seek(0)
            kind = "animated" if im.format in ("GIF", "PNG", "WEBP") else "multi-page"
            notes.append(f"{kind} {im.format}: used the first of {n_frames} frames")
        im.load()
        image = _apply_exif(im, notes)
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on bad data
        raise ImageError(f"{what} is corrupt or truncated ({type(e).__name__}: {e})") from None
    return _normalize(image, notes)


def _check_size(im: Image.Image) -> None:
    """Refuse, before decoding, images that are empty, above the hard pixel cap or too long and thin for the model."""
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"the image has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"the image is too large: {w}x{h} is over {MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"the image is too long and thin ({w}x{h}, aspect ratio {max(w, h) / min(w, h):.0f}); "
            f"the model accepts at most {MAX_ASPECT_RATIO}:1, so crop it first"
        )


def fit_to_budget(image: Image.Image, cfg: PreprocessConfig) -> tuple[Image.Image, str | None]:
    """The image at the size the vision tower will see it (what preprocess_image would resize it to), and a note
    for the user when it was downscaled (over cfg.max_pixels) or blown up over 16-fold (far under cfg.min_pixels).
    Resizing again to the same size is a copy, so passing the result on gives the same patches as the original."""
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    note = None
    if w * h < image.width * image.height and image.width * image.height > cfg.max_pixels:
        note = (
            f"downscaled from {image.width}x{image.height} to {w}x{h} "
            f"(the budget is {cfg.max_pixels / 1e6:.2g} MP per image)"
        )
    elif w * h > 16 * image.width * image.height:
        note = f"enlarged from {image.width}x{image.height} to {w}x{h} (the model's smallest input)"
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    return image, note


def _from_array(a: np.ndarray) -> Image.Image:
    """A PIL image from an [H, W], [H, W, C] or [C, H, W] array (uint8, uint16, bool or float in [0, 1])."""
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # [C, H, W] -> [H, W, C]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4]; got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0):
            raise ImageError("a float image array must hold finite values in [0, 1]")
        a = (a * 255.0).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"unsupported image array dtype {a.dtype} (use uint8, uint16, bool or float)")
    image = Image.fromarray(np.ascontiguousarray(a))
    _check_size(image)
    return image


def _apply_exif(image: Image.Image, notes: list[str]) -> Image.Image:
    """A copy of the image turned upright per its EXIF orientation tag."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        notes.append("EXIF orientation applied")
    return ImageOps.exif_transpose(image)


_MODE_NAMES = {"I": "32-bit integer", "F": "32-bit float"} | {m: "16-bit" for m in ("I;16", "I;16L", "I;16B", "I;16N")}


def _normalize(image: Image.Image, notes: list[str]) -> tuple[Image.Image, list[str]]:
    """Convert any mode to 8-bit RGB, noting each change."""
    mode = image.mode
    if mode in _MODE_NAMES:
        image = Image.fromarray(_to_8bit(np.asarray(image), mode), mode="L")
        notes.append(f"{_MODE_NAMES.get(mode, mode)} image scaled to 8-bit")
    if _has_alpha(image):
        image = image.convert("RGBA")
        if image.getchannel("A").getextrema()[0] < 255:
            notes.append(f"{mode}: transparency composited on white")
        image = _composite_on_white(image)
    elif image.mode != "RGB":
        if image.mode == "CMYK":
            notes.append("CMYK converted to RGB")
        try:
            image = image.convert("RGB")
        except ValueError as e:
            raise ImageError(f"cannot convert a {image.mode} image to RGB ({e})") from None
    return image, notes


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float grayscale array to uint8 (NaN and infinities count as 0)."""
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)  # f32: half the memory of f64
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F" and a.min() >= 0.0 and a.max() <= 1.0:
        scale = 1.0
    elif a.min() >= 0.0 and a.max() <= 255.0:
        scale = 255.0
    elif a.min() >= 0.0 and a.max() <= 65535.0:
        scale = 65535.0
    else:  # unknown range: stretch min..max
        lo, hi = a.min(), a.max()
        a, scale = a - lo, max(hi - lo, 1e-12)
    return np.clip(np.round(a / scale * 255.0), 0, 255).astype(np.uint8)


def _has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a transparency key), as transformers checks."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _composite_on_white(image: Image.Image) -> Image.Image:
    """RGB of an image composited on white: transformers' convert_to_rgb for images with transparency."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# ---------------------------------------------------------------- pixel patches


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of factor, pixels within [min_pixels, max_pixels], aspect kept (as transformers)."""
    if min(height, width) < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"the image is too long and thin ({width}x{height}, aspect ratio {ratio:.0f}); "
            f"the model accepts at most {MAX_ASPECT_RATIO}:1, so crop it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Pixel patches [t*h*w, 3*T*P*P] (f32, merge-window order) and the patch grid (1, H/P, W/P) of one image."""
    if image.mode != "RGB":
        image = _composite_on_white(image) if _has_alpha(image) else image.convert("RGB")
    height, width = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    pixels = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))  # [H, W, C] uint8
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, 3)  # [gh/m, m, P, gw/m, m, P, C]
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, C, P, P]
    x = _value_table(cfg)[np.arange(3)[:, None, None], x]  # f32, same shape
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image repeated to T frames
    return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)  # [gh*gw, C*T*P*P]


def _value_table(cfg: PreprocessConfig) -> np.ndarray:
    """[C, 256] f32: each uint8 value rescaled and normalised exactly as transformers does (f64 rescale, f32 rest)."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return (scaled[None, :] - mean[:, None]) / std[:, None]


# ---------------------------------------------------------------- prompt


def user_message(prompt: str, n_images: int) -> dict:
    """One user turn: n image placeholders, then the prompt text."""
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}


def _is_image_part(part: Any) -> bool:
    """Whether a content part renders as an image placeholder (the chat template's own test)."""
    return isinstance(part, dict) and (part.get("type") == "image" or "image" in part or "image_url" in part)


def count_image_parts(messages: list[dict]) -> int:
    """Number of image placeholders in HF chat messages."""
    return sum(
        sum(_is_image_part(p) for p in m.get("content", [])) for m in messages if isinstance(m.get("content"), list)
    )


def build_prompt_ids(
    tokenizer: Any, messages: list[dict], image_token_counts: list[int], image_pad_id: int = IMAGE_PAD_ID
) -> list[int]:
    """Chat-template token ids with the i-th <|image_pad|> expanded to image_token_counts[i] copies.

    Text in the messages is encoded as plain text: a literal "<|im_end|>" in a prompt never becomes a control token.
    """
    n_parts = count_image_parts(messages)
    if n_parts != len(image_token_counts):
        raise ValueError(f"the messages have {n_parts} image placeholders but {len(image_token_counts)} images")
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    n_pads = sum(t == image_pad_id for t in ids)
    if n_pads != len(image_token_counts):
        raise ValueError(f"the chat template wrote {n_pads} image pad tokens for {len(image_token_counts)} images")
    counts = iter(image_token_counts)
    out: list[int] = []
    for t in ids:
        out.extend([t] * next(counts) if t == image_pad_id else [t])
    return out


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer, with the chat template from chat_template.jinja/.json if the config lacks one.

    With a tokenizer.json (every Qwen3-VL checkpoint), transformers' tokenizer over that file as written
    (`PreTrainedTokenizerFast`): the same ids as the Qwen2Tokenizer that AutoTokenizer picks, in half its
    memory (48 vs 97 MB: Qwen2Tokenizer also keeps the 151k-entry vocab and merges as Python objects).
    Otherwise the class named in tokenizer_config.json, when transformers has one by that name, else
    AutoTokenizer. Never AutoTokenizer first: it reads the model config, and transformers' config module
    imports torch when it is installed (+210 MB resident, for nothing)."""
    import transformers

    root = pathlib.Path(path)
    if (root / "tokenizer.json").exists():
        cls = transformers.PreTrainedTokenizerFast
    else:
        config = root / "tokenizer_config.json"
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class", "") if config.exists() else ""
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
            cls = transformers.AutoTokenizer
    tokenizer = cls.from_pretrained(path)
    if not tokenizer.chat_template:
        if (root / "chat_template.jinja").exists():
            tokenizer.chat_template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif (root / "chat_template.json").exists():
            raw = json.loads((root / "chat_template.json").read_text(encoding="utf-8"))
            tokenizer.chat_template = raw["chat_template"]
    return tokenizer


# ---------------------------------------------------------------- mRoPE positions


def get_rope_index(
    input_ids: np.ndarray, image_grid_thw: list[tuple[int, int, int]], image_token_id: int, spatial_merge_size: int
) -> tuple[np.ndarray, int]:
    """mRoPE positions [3, L] (T, H, W rows) and rope_delta for one unpadded row (transformers' get_rope_index)."""
    ids = np.asarray(input_ids).reshape(-1)
    grids = [tuple(int(v) for v in g) for g in image_grid_thw]
    chunks: list[np.ndarray] = []
    pos, i, n_images = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            chunks.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))  # text: T = H = W
            pos, i = pos + j - i, j
            continue
        if n_images == len(grids):
            raise ValueError(f"more image tokens in input_ids than the {len(grids)} image grids account for")
        t, h, w = grids[n_images]
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        n = t * gh * gw
        if not (ids[i : i + n] == image_token_id).all():
            raise ValueError(f"image {n_images} has grid {(t, h, w)} = {n} tokens but fewer image tokens follow")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        chunks.append(np.stack([tt, hh, ww]).reshape(3, n) + pos)  # [3, t*gh*gw]
        pos, i, n_images = pos + max(gh, gw), i + n, n_images + 1
    if n_images != len(grids):
        raise ValueError(f"{len(grids)} image grids given but input_ids hold {n_images} images")
    positions = np.concatenate(chunks, axis=1).astype(np.int32) if chunks else np.zeros((3, 0), np.int32)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta
