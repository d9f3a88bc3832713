"""Qwen3-VL vision tower: patch embed, interpolated position embedding, 2-D RoPE blocks, mergers.

Everything that depends on the image grids (position-embedding taps, rotary cos/sin, which image
a patch belongs to) is computed on the host in NumPy (`vision_metadata`), so `encode` is a pure,
jittable function of fixed-shape arrays and compiles once per patch-count bucket.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .config import VisionConfig
from .ops import Params, activation, apply_rope, layer_norm, linear, segment_attention


@dataclass(frozen=True)
class VisionBatch:
    """All images of a request, packed and padded to `patches.shape[0]` (a bucket size)."""

    patches: np.ndarray  # [N, C*T*P*P] float32 pixel patches, merge-window order
    pos_taps: np.ndarray  # [N, 4] int32 rows of the learned pos_embed table (bilinear taps)
    pos_weights: np.ndarray  # [N, 4] float32 bilinear weights (0 for padding)
    rope: np.ndarray  # [2, N, head_dim] float32 cos and sin of each patch's 2-D rotary angles
    segment: np.ndarray  # [N] int32 image index of each patch, -1 for padding
    num_patches: int  # real patches before padding


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) taps and weights along one axis of the side x side table."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


def _rotary(rows: np.ndarray, cols: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """Axial 2-D rotary: half the frequencies follow the row, half the column -> cos, sin [2, N, head_dim]
    (f32, as transformers computes them). On the host: inside the jitted tower XLA:CPU fused cos and sin
    into every layer's q and k rope and evaluated them once per head, ~0.15 s of a 2B tower at 448x448."""
    spatial = cfg.head_dim // 2
    exponents = np.arange(0, spatial, 2, dtype=np.float32) / spatial
    inv_freq = np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)
    freqs = np.stack([rows, cols], -1).astype(np.float32)[:, :, None] * inv_freq  # [N, 2, head_dim/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [N, head_dim/2]: rows then cols
    emb = np.concatenate([freqs, freqs], axis=-1)  # [N, head_dim]
    return np.stack([np.cos(emb), np.sin(emb)]).astype(np.float32)


def vision_metadata(grids: list[tuple[int, int, int]], cfg: VisionConfig, padded: int) -> dict[str, np.ndarray]:
    """Host-side per-patch metadata for `grids` (one (t, h, w) per image), padded to `padded` patches."""
    m, side = cfg.spatial_merge_size, int(round(cfg.num_position_embeddings**0.5))
    rows, cols, heights, widths, segment = [], [], [], [], []
    for i, (t, h, w) in enumerate(grids):
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # raster [h, w] -> merge-window order [h/m, w/m, m, m]
        r = r.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        c = c.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
        heights.append(np.full(t * h * w, h))
        widths.append(np.full(t * h * w, w))
        segment.append(np.full(t * h * w, i))
    row, col = np.concatenate(rows), np.concatenate(cols)
    h_taps, h_w = _axis_taps(row, np.concatenate(heights), side)
    w_taps, w_w = _axis_taps(col, np.concatenate(widths), side)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    n, pad = len(row), padded - len(row)
    if pad < 0:
        raise ValueError(f"{n} patches do not fit the bucket of {padded}")
    return {
        "pos_taps": np.pad(taps, ((0, pad), (0, 0))).astype(np.int32),
        "pos_weights": np.pad(weights, ((0, pad), (0, 0))).astype(np.float32),
        "rope": np.pad(_rotary(row, col, cfg), ((0, 0), (0, pad), (0, 0))),
        "segment": np.pad(np.concatenate(segment), (0, pad), constant_values=-1).astype(np.int32),
    }


def pack_images(patches: list[np.ndarray], grids: list[tuple[int, int, int]], cfg: VisionConfig, padded: int) -> VisionBatch:
    """Concatenate per-image pixel patches and pad them (and their metadata) to `padded` rows."""
    flat = np.concatenate(patches, axis=0).astype(np.float32)
    n = flat.shape[0]
    flat = np.pad(flat, ((0, padded - n), (0, 0)))
    return VisionBatch(patches=flat, num_patches=n, **vision_metadata(grids, cfg, padded))


_gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)  # the blocks' (gelu_pytorch_tanh)
_gelu_erf = functools.partial(jax.nn.gelu, approximate=False)  # the mergers'


def _block(x: jax.Array, p: Params, cos, sin, segment, live, cfg: VisionConfig) -> jax.Array:
    n = x.shape[0]
    h = layer_norm(x, p["norm1"])
    qkv = linear(h, p["attn"]["qkv"], live).reshape(n, 3, cfg.num_heads, cfg.head_dim)  # [N, 3, H, D]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = segment_attention(q, k, v, segment).reshape(n, -1)  # within each image; [N, H*D]
    x = x + linear(attn, p["attn"]["proj"], live)
    h = activation(_gelu_tanh, linear(layer_norm(x, p["norm2"]), p["mlp"]["linear_fc1"], live))
    return x + linear(h, p["mlp"]["linear_fc2"], live)


def _merger(x: jax.Array, p: Params, cfg: VisionConfig, postshuffle: bool, live) -> jax.Array:
    """LayerNorm, concatenate each 2x2 merge window, MLP with exact (erf) GELU -> [N/4, text hidden]."""
    window = cfg.spatial_merge_size**2 * cfg.hidden_size
    if postshuffle:
        x = layer_norm(x.reshape(-1, window), p["norm"])
    else:
        x = layer_norm(x, p["norm"]).reshape(-1, window)
    x = activation(_gelu_erf, linear(x, p["linear_fc1"], live))
    return linear(x, p["linear_fc2"], live)


def encode(params: Params, cfg: VisionConfig, patches, pos_taps, pos_weights, rope, segment):
    """Vision tower on a packed batch -> (image embeds [N/4, D], deepstack features [k, N/4, D])."""
    dtype = params["pos_embed"]["weight"].dtype
    live = jnp.stack([0, jnp.sum(segment >= 0)])[None]  # the real patches: the products skip the padding
    merged_live = live // cfg.spatial_merge_size**2  # after the mergers: whole 2x2 windows, padding last
    x = linear(patches.astype(dtype), params["patch_embed"]["proj"], live)  # the conv3d as a linear
    table = params["pos_embed"]["weight"]
    pos = jnp.sum(table[pos_taps].astype(jnp.float32) * pos_weights[:, :, None], axis=1)  # [N, hidden]
    x = x + pos.astype(dtype)
    cos, sin = rope[0][:, None, :], rope[1][:, None, :]  # [N, 1, head_dim]
    deepstack = []
    for i, block in enumerate(params["blocks"]):
        x = _block(x, block, cos, sin, segment, live, cfg)
        if i in cfg.deepstack_visual_indexes:
            k = cfg.deepstack_visual_indexes.index(i)
            deepstack.append(_merger(x, params["deepstack_merger_list"][k], cfg, True, merged_live))
    merged = _merger(x, params["merger"], cfg, False, merged_live)
    return merged, jnp.stack(deepstack) if deepstack else jnp.zeros((0, *merged.shape), merged.dtype)
