"""Turn images + prompts into fixed-shape, bucketed model inputs (`VLMInputs`), all on the host."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import processing
from .vision import VisionBatch, pack_images


def bucket(n: int, minimum: int, splits: int = 2) -> int:
    """Smallest size >= n in minimum * 2^k * {1, 1 + 1/splits, ..., 2 - 1/splits}: with splits=2,
    {1, 1.5, 2, 3, 4, 6, ...} (few shapes, at most 1.5x waste); splits=4 adds 1.25 and 1.75."""
    size = minimum
    while True:
        for s in (size * (splits + j) // splits for j in range(splits)):
            if s >= n:
                return s
        size *= 2


def batch_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


PROMPT_BUCKET_MIN = 64
PATCH_BUCKET_MIN = 256
PATCH_BUCKET_SPLITS = 4  # the vision tower is most of a prefill: pad it by at most 1.25x (448x448: 784 -> 896)


@dataclass(frozen=True)
class VLMInputs:
    """A batch of prompts (each with its own images or none), left-padded to a bucket length P."""

    prompt_tokens: np.ndarray  # [B, P] int32, left-padded with pad_id
    vision: VisionBatch | None  # pixel patches of every image of every row, packed in row order
    grid_thw: np.ndarray  # [n_images, 3] (t, h, w) patch grid of each image
    image_pad_id: int
    lengths: np.ndarray  # [B] real prompt lengths
    positions: np.ndarray  # [3, B, P] mRoPE positions (T, H, W rows; 0 on padding)
    next_position: np.ndarray  # [B] mRoPE position of the first generated token (length + rope_delta)
    vision_index: np.ndarray  # [B, P] row of the image-token array per <|image_pad|>, -1 elsewhere
    num_rows: int  # real rows; the batch is padded to a power of two

    @property
    def rope_deltas(self) -> np.ndarray:
        return self.next_position - self.lengths

    @property
    def start(self) -> np.ndarray:
        """[B] first real slot of each left-padded row."""
        return (self.prompt_tokens.shape[1] - self.lengths).astype(np.int32)


def _as_list(x, n: int | None = None) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * (n or 1)


def prepare_inputs(model, params, tokenizer, images: Sequence[Any] | Any, prompts: Sequence[Any] | str,
                   pad_id: int | None = None, max_pixels: int | None = None) -> VLMInputs:
    """images[i]: None, an image (PIL / path / array) or a list of images for row i.
    prompts[i]: a str (one user turn, the row's images before the text) or a list of HF chat messages
    whose {"type": "image"} parts take the row's images in order.
    max_pixels: resize budget per image (default: the checkpoint's preprocessor_config, 16 MP for Qwen3-VL;
    vision attention memory grows with its square, so demos set ~1 MP)."""
    del params  # inputs depend only on the config; kept for the original API's signature
    pre = model.preprocess
    if max_pixels is not None:
        if max_pixels < pre.min_pixels:
            raise ValueError(f"max_pixels must be >= the checkpoint's min_pixels ({pre.min_pixels}), got {max_pixels}")
        pre = dataclasses.replace(pre, max_pixels=int(max_pixels))
    if isinstance(prompts, str):
        prompts, images = [prompts], [images]
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        raise ValueError(f"give one images entry (None, an image or a list) per prompt; got {len(prompts)} prompts")
    cfg, vcfg = model.cfg, model.cfg.vision
    merge = vcfg.spatial_merge_size**2
    rows, all_patches, grids = [], [], []
    for row_images, prompt in zip(images, prompts):
        row_images = [] if row_images is None else _as_list(row_images)
        counts = []
        for image in row_images:
            patches, grid = processing.preprocess_image(processing.load_image(image), pre)
            all_patches.append(patches)
            grids.append(grid)
            counts.append(int(np.prod(grid)) // merge)
        messages = [processing.user_message(prompt, len(row_images))] if isinstance(prompt, str) else prompt
        ids = np.asarray(processing.build_prompt_ids(tokenizer, messages, counts, cfg.image_token_id), np.int32)
        if len(ids) >= cfg.text.max_position_embeddings:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context is "
                             f"{cfg.text.max_position_embeddings} tokens")
        pos, delta = processing.get_rope_index(ids, grids[len(grids) - len(counts):], cfg.image_token_id,
                                               vcfg.spatial_merge_size)
        rows.append((ids, pos, delta))

    if pad_id is None:
        pad_id = model.generation.get("pad_token_id", tokenizer.pad_token_id)
        pad_id = pad_id if pad_id is not None else 151643
    b, p = batch_bucket(len(rows)), bucket(max(len(r[0]) for r in rows), PROMPT_BUCKET_MIN)
    tokens = np.full((b, p), pad_id, np.int32)
    positions = np.zeros((3, b, p), np.int32)
    lengths = np.ones(b, np.int32)  # padding rows: one pad token
    next_position = np.ones(b, np.int32)
    vision_index = np.full((b, p), -1, np.int32)
    seen = 0
    for i, (ids, pos, delta) in enumerate(rows):
        n = len(ids)
        tokens[i, p - n:] = ids
        positions[:, i, p - n:] = pos
        lengths[i], next_position[i] = n, n + delta
        is_image = ids == cfg.image_token_id
        vision_index[i, p - n:][is_image] = seen + np.arange(is_image.sum())
        seen += int(is_image.sum())

    vision = None
    if all_patches:
        total = sum(len(x) for x in all_patches)
        vision = pack_images(all_patches, grids, vcfg, bucket(total, PATCH_BUCKET_MIN, PATCH_BUCKET_SPLITS))
    return VLMInputs(prompt_tokens=tokens, vision=vision, grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
                     image_pad_id=cfg.image_token_id, lengths=lengths, positions=positions,
                     next_position=next_position, vision_index=vision_index, num_rows=len(rows))
