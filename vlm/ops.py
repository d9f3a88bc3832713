"""Small numerical building blocks shared by the vision tower and the text decoder."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import cpu_kernels

Params = dict


@dataclass(frozen=True)
class LayerOf:
    """Layer `index` (traced) of every layer's weight matrix `arrays`, not copied out: what the text
    decoder's loop over its layers (`vlm.model.decoder`) gives `matmul_t`. The CPU kernel gets every
    layer's matrix and the index and reads that layer's in place; anywhere else `matmul_t` switches over
    the layers (one product per layer in the program)."""

    arrays: tuple[jax.Array, ...]
    index: jax.Array

    dtype = property(lambda self: self.arrays[0].dtype)
    shape = property(lambda self: self.arrays[0].shape)


def matmul_t(x: jax.Array, w: jax.Array, out_dtype=None, scale: jax.Array | None = None,
             live: jax.Array | None = None) -> jax.Array:
    """x @ w.T over the last axis, [..., I] x [O, I] -> [..., O], accumulated in f32, cast to `out_dtype`
    (default: x's dtype); `w` may be a `LayerOf`. An int8 `w` comes with its per-row `scale`
    (vlm/quantize.py). `live` [G, 2] names the rows whose results are needed (x's rows as G equal groups,
    rows [lo, hi) of each; the others are a bucket's padding): the prefill kernel skips the others and
    gives zeros there.

    On a CPU, products with bf16 weights (and int8 ones in decode steps) run on vlm/cpu_kernels.cc: a
    decode step's read the weights at memory speed, where XLA:CPU's products of a few rows are
    compute-bound at under half of it; a prefill's read them in place, where XLA repacks them per call.
    Otherwise one row is padded to two for XLA:CPU's bf16 and int8 products: it runs a single row in a
    naive loop ~10x slower than its two-row path."""
    out_dtype = out_dtype or x.dtype
    if isinstance(w, LayerOf):
        if cpu_kernels.applies(x, w.arrays[0]):
            kernel = functools.partial(cpu_kernels.matmul_t, live=live, layer=w.index)
            return _product(x, w.arrays, scale, kernel).astype(out_dtype)
        each = [functools.partial(matmul_t, w=a, out_dtype=out_dtype, scale=scale, live=live) for a in w.arrays]
        return jax.lax.switch(w.index, each, x)
    if cpu_kernels.applies(x, w):
        return _product(x, w, scale, functools.partial(cpu_kernels.matmul_t, live=live)).astype(out_dtype)
    if math.prod(x.shape[:-1]) == 1 and w.dtype != jnp.float32 and jax.default_backend() == "cpu":
        two = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])  # [2, I]
        return _product(two, w, scale)[:1].reshape(*x.shape[:-1], -1).astype(out_dtype)
    return _product(x, w, scale).astype(out_dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array, acc=jnp.float32) -> jax.Array:
    """jnp.einsum of two operands accumulated in `acc`, float32 ones multiplied in full f32: on GPUs
    XLA's default for them is TF32 (10-bit mantissas), which put the tiny f32 model's logits 15-45x
    past the parity tolerance with transformers on an H200."""
    precision = "highest" if a.dtype == b.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=acc, precision=precision)


def _xla_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T: float -> f32 (for bf16, given a bf16 result type XLA:CPU first converts the whole weight
    matrix to f32), int8 -> int32."""
    return einsum("...i,oi->...o", x, w, acc=jnp.int32 if w.dtype == jnp.int8 else jnp.float32)


def _product(x: jax.Array, w: jax.Array, scale: jax.Array | None, dot=_xla_product) -> jax.Array:
    """x @ w.T in f32. With int8 weights each row of x goes to int8 too, with its own max-abs scale, and
    the product runs int8 x int8 -> int32 (W8A8)."""
    if scale is None:
        return dot(x, w)
    x = x.astype(jnp.float32)
    step = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    step = jnp.where(step > 0, step, 1.0)  # an all-zero row (the padding row above) stays zero
    xq = jnp.round(x / step).astype(jnp.int8)
    return dot(xq, w).astype(jnp.float32) * step * scale


def linear(x: jax.Array, p: Params, live: jax.Array | None = None) -> jax.Array:
    """x @ W.T (+ b) with W in Hugging Face layout [out, in] (int8 W: with its "weight_scale"); `live`: as
    for `matmul_t`."""
    y = matmul_t(x, p["weight"], scale=p.get("weight_scale"), live=live)
    return y + p["bias"] if "bias" in p else y


def activation(fn, x: jax.Array) -> jax.Array:
    """fn(x) computed in f32 and rounded once to x's dtype, as torch computes its bf16 activations; on
    a CPU XLA's own bf16 tanh, erf and exp run 1.3-2.6x slower than this round trip."""
    return fn(x.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen3 RMSNorm: normalise in f32, cast back to the input dtype, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def layer_norm(x: jax.Array, p: Params, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["weight"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_half_fused(x: jax.Array) -> jax.Array:
    """rotate_half as a reverse of the two halves times a sign, which XLA fuses into the rope. XLA:CPU
    leaves the concatenate unfused, one kernel per use: 56 of a 2B decode step's 162 kernels, ~40 % of
    its compile time. The text decoder's where its layers are unrolled. The reverse itself runs slower:
    in a 2B batch-8 decode step q's norm and rope took ~75 us a layer, ~45 with the concatenate (~1 % of
    the step in all), and 3x slower in the vision tower's layout; so the decoder's loop over its layers
    (compiled once) and the vision tower concatenate."""
    halves = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    return (jnp.flip(halves, axis=-2) * jnp.array([[-1], [1]], x.dtype)).reshape(x.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotate=rotate_half) -> jax.Array:
    """HF rotate-half RoPE, computed in f32 and rounded once to x's dtype (transformers' vision tower does
    the same; its text decoder rounds each bf16 product); cos/sin broadcast over the head axis."""
    xf, cos, sin = (a.astype(jnp.float32) for a in (x, cos, sin))
    return (xf * cos + rotate(xf) * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array, hi: jax.Array, layer=None) -> jax.Array:
    """Grouped-query attention, each query over one range of key slots [lo, hi) of its row.

    q [B, T, K, G, D], k/v [B, K, S, D] (or a cache stacked over layers, [L, B, K, S, D], and the `layer` to
    read), lo/hi [B, T] -> [B, T, K*G*D]: a prompt's (causal from the
    row's first real slot) or a decode step's (the row's slots so far). Scores and softmax in f32, as
    transformers' eager attention, probabilities in v's dtype, their sum of V accumulated in f32. Both
    products are batched over (row, kv head) in the cache's own layout, with a kv head's G query heads x
    T tokens as the rows, so a decode step (T = 1) is a matrix-vector product per head that reads the
    cache in place. In bf16 on a CPU, vlm/cpu_kernels.cc runs a decode step's (one query over the cache)
    and a prefill's (which scores only each query's range).
    """
    b, t, kv, g, d = q.shape
    slot = jnp.arange(k.shape[-2])
    mask = (slot >= lo[..., None]) & (slot < hi[..., None])  # [B, T, S]
    if t == 1 and cpu_kernels.attention_applies(k):  # a bf16 decode step on a CPU: vlm/cpu_kernels.cc
        out = cpu_kernels.attend_one_query(q[:, 0], k, v, mask[:, 0], d**-0.5, 0 if layer is None else layer)
        return out.reshape(b, 1, -1).astype(v.dtype)
    if layer is not None:
        k, v = k[layer], v[layer]
    if t == 1 and k.dtype == jnp.float32:
        return _attend_one_query(q, k, v, mask)
    if cpu_kernels.range_attention_applies(k):  # a bf16 prefill on a CPU
        return cpu_kernels.range_attention(q.reshape(b, t, kv * g, d), k, v, lo, hi, d**-0.5).reshape(b, t, -1)
    rows = jnp.moveaxis(q, 1, 3).reshape(b, kv, g * t, d)  # [B, K, G*T, D]
    scores = einsum("bkmd,bksd->bkms", rows, k) * d**-0.5
    scores = jnp.where(mask[:, None, None], scores.reshape(b, kv, g, t, -1), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = einsum("bkms,bksd->bkmd", probs, v)  # [B, K, G*T, D]
    return jnp.moveaxis(out.reshape(b, kv, g, t, d), 3, 1).reshape(b, t, -1).astype(v.dtype)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array) -> jax.Array:
    """Attention of every query over the keys of its own segment (the vision tower: each patch over the
    patches of its image; padding, segment -1, among itself). q/k/v [N, H, D], segment [N] -> [N, H, D].
    Numerics as `attention`. In bf16 on a CPU this runs on vlm/cpu_kernels.cc, which scores only the keys
    of each query's image: XLA:CPU's takes ~40 ms a layer at 896 patches (2B), ~40 % of the vision tower."""
    scale = q.shape[-1] ** -0.5
    if cpu_kernels.range_attention_applies(k):
        lo, hi = segment_ranges(segment)
        k, v = (jnp.swapaxes(a, 0, 1)[None] for a in (k, v))  # [1, H, N, D]
        return cpu_kernels.range_attention(q[None], k, v, lo[None], hi[None], scale)[0]
    scores = einsum("qhd,khd->hqk", q, k) * scale
    scores = jnp.where((segment[:, None] == segment[None, :])[None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return einsum("hqk,khd->qhd", probs, v).astype(v.dtype)


def segment_ranges(segment: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rows [lo, hi) of each row's segment, ([N], [N]), for segments that are each one run of rows
    (as `vlm.vision.vision_metadata` packs images and their padding)."""
    n = segment.shape[0]
    index = jnp.arange(n)
    starts = jnp.concatenate([jnp.ones(1, bool), segment[1:] != segment[:-1]])
    ends = jnp.concatenate([segment[1:] != segment[:-1], jnp.ones(1, bool)])
    lo = jax.lax.cummax(jnp.where(starts, index, 0))
    return lo, jax.lax.cummin(jnp.where(ends, index + 1, n), reverse=True)


def _attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` for one query token over an f32 cache, as products and sums instead of dots.

    XLA:CPU runs f32 dots through its YNNPACK fusion, which cannot take the cache's in-place update as
    part of it; XLA then duplicates the update into a second fusion and copies the whole layer cache four
    times per step (~70 ms a step at 2B size). Element-wise products and reductions fuse with it instead."""
    b, _, kv, g, d = q.shape
    scores = jnp.sum(q[:, 0, :, :, None, :] * k[:, :, None], axis=-1) * d**-0.5  # [B, K, G, S]
    scores = jnp.where(mask[:, 0, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.sum(probs[..., None] * v[:, :, None], axis=-2).reshape(b, 1, kv * g * d)  # [B, 1, K*G*D]
