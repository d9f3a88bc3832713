"""Qwen3-VL text decoder (Qwen3 blocks, interleaved mRoPE, deepstack) with a KV cache.

Params are a plain pytree with the Hugging Face names (`layers[i]["self_attn"]["q_proj"]["weight"]`),
weights kept in HF layout [out, in]. Prompts are left-padded to a bucket length P, so every row's
last prompt token sits in slot P-1 and decode step i writes slot P+i for the whole batch; per-row
`start` marks the first real slot and per-row mRoPE positions carry each row's own rope delta.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels
from .config import ModelConfig, TextConfig
from .memory import release_free_memory
from .ops import (LayerOf, Params, activation, apply_rope, attention, linear, matmul_t, rms_norm, rotate_half,
                  rotate_half_fused)

# {"k", "v"}: one [B, kv_heads, S, head_dim] array per layer, or one [layers, B, kv_heads, S, head_dim] array
# where the decoder loops over its layers (`layer_loop`)
Cache = dict[str, list[jax.Array] | jax.Array]


@dataclass(eq=False)
class Qwen3VL:
    """A loaded model's static description plus its jitted functions (built once, reused)."""

    cfg: ModelConfig
    dtype: Any
    preprocess: Any  # processing.PreprocessConfig
    generation: dict  # the checkpoint's generation_config.json
    source: str = ""
    quantize: str | None = None  # "int8": the text decoder's weights are int8 (vlm/quantize.py)
    compile_count: int = 0  # jit traces so far (a trace is a compile)
    programs: int = 0  # compiled programs held: those compiled since the last drop_programs()
    _jitted: dict = field(default_factory=dict, repr=False)

    def jit(self, fn: Callable, **jit_kwargs) -> Callable:
        """`jax.jit(fn)` with cfg bound, memoised per model; each trace bumps `compile_count`. Free heap goes
        back to the OS (`memory.release_free_memory`) before each compile (what earlier requests freed: the
        compiler's transient then does not stack on it; 2B, the benchmark's whole run: peak 4.88 -> 4.84
        GiB) and after it (what the compiler freed)."""
        if fn not in self._jitted:

            def traced(*args, **kwargs):
                release_free_memory()  # a trace is the start of a compile
                self.compile_count += 1
                self.programs += 1
                return fn(self.cfg, *args, **kwargs)

            traced.__name__ = fn.__name__
            traced.__signature__ = inspect.signature(functools.partial(fn, self.cfg))  # for *_argnames
            jitted = jax.jit(traced, **jit_kwargs)

            def releasing(run: Callable):
                """run(); if it compiled, what the compiler freed goes back to the OS."""
                before = self.compile_count
                out = run()
                if self.compile_count != before:
                    release_free_memory()
                return out

            @functools.wraps(fn)
            def call(*args, **kwargs):
                return releasing(lambda: jitted(*args, **kwargs))  # compiles (if it traced) before it returns

            def ahead(*args, **kwargs):
                """Compile for these arguments (jax.ShapeDtypeStruct where the array does not exist yet) now,
                unless already compiled; the call then runs that program. -> the program's output shapes."""

                def compile_it():
                    lowered = jitted.lower(*args, **kwargs)
                    lowered.compile()  # the call finds it in jax's caches
                    return lowered.out_info

                return releasing(compile_it)

            call.lower, call.ahead = jitted.lower, ahead
            self._jitted[fn] = call
        return self._jitted[fn]

    def drop_programs(self) -> None:
        """Forget every compiled program, jax's caches included, and hand their memory back: ~15 MB a
        program for the 2B model on a CPU in bf16 (its layers in a loop; measured: 0.09 GiB for 6 programs),
        ~50 MB in f32 (28 unrolled layers; 4.51 -> 4.31 GiB for the 4 programs of one image request).
        Later calls compile again: ~0.5-1 s a program with the compilation cache on (vlm/cache.py). Not while
        another thread runs this model (the demo calls it between generations)."""
        self._jitted.clear()
        jax.clear_caches()
        release_free_memory()
        self.programs = 0


def layer_loop(dtype) -> bool:
    """Whether the text decoder runs as a loop over its layers, compiling one layer instead of all of them:
    where its products and its cache's attention run on vlm/cpu_kernels.cc (bf16 activations, int8 or bf16
    weights, one CPU device), which read a layer's weights and cache in place given every layer's and the
    layer's index. A 2B batch-8 scan's HLO is then 0.84 MB instead of 1.8, compiles in 3.0 s, and keeps ~15
    MB after its compile instead of ~30-50.
    XLA's own products would copy each layer's weights out of a stack, so elsewhere the layers are unrolled."""
    return jnp.dtype(dtype) == jnp.bfloat16 and cpu_kernels.usable()


def init_cache(cfg: TextConfig, batch: int, length: int, dtype) -> Cache:
    """A zeroed KV cache: stacked over layers where the decoder loops over them (`layer_loop`), each layer's
    slots written in place in the loop; else one array per layer: unrolled, into one stacked array XLA
    (CPU) copies the whole array at every layer's write (as it does when the attention reads a reshaped
    view of the array it writes). Heads before slots make both attention products batched over (row, kv
    head) in the cache's own layout: no per-step copy."""
    shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
    if layer_loop(dtype):
        return {name: jnp.zeros((cfg.num_hidden_layers, *shape), dtype) for name in ("k", "v")}
    return {name: [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)] for name in ("k", "v")}


def cache_length(cache: Cache) -> int:
    """The cache's slots per row (of a cache or of its jax.ShapeDtypeStructs)."""
    return (cache["k"][0] if isinstance(cache["k"], list) else cache["k"]).shape[-2]


def mrope_cos_sin(positions: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """Interleaved mRoPE. positions [3, B, T] (T, H, W rows) -> cos/sin [B, T, 1, head_dim]."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    axis = np.zeros(half, np.int32)  # frequency slot -> T/H/W row: T,H,W,T,H,W,... then T
    axis[1 : 3 * cfg.mrope_section[1] : 3] = 1
    axis[2 : 3 * cfg.mrope_section[2] : 3] = 2
    pos = jnp.moveaxis(positions[axis], 0, -1).astype(jnp.float32)  # [B, T, half]
    emb = jnp.concatenate([pos * inv_freq] * 2, axis=-1)[:, :, None, :]  # [B, T, 1, head_dim]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _write_slots(cache: jax.Array, new: jax.Array, index, layer=None) -> jax.Array:
    """cache[:, :, index : index + T] = new (cache[layer, ...] of a stacked cache), in place. A bf16 cache is
    written as its uint16 bits: XLA:CPU widens a bf16 update to f32, and with it the whole cache, into a
    copy of every layer's cache per step (~3 % of a batch-1 decode step, ~4 % at batch 8)."""
    new, at = new.astype(cache.dtype), (0, 0, index, 0)
    if layer is not None:
        new, at = new[None], (layer, *at)
    if cache.dtype != jnp.bfloat16:
        return jax.lax.dynamic_update_slice(cache, new, at)
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
    return jax.lax.bitcast_convert_type(jax.lax.dynamic_update_slice(bits(cache), bits(new), at), cache.dtype)


def _self_attn(x, p: Params, cos, sin, ranges, cache: tuple[jax.Array, jax.Array] | None, layer, write_index,
               from_cache: bool, live, cfg: TextConfig):
    """Attention block; writes this call's keys/values into `cache` (k, v) at `write_index`: this layer's
    arrays where `layer` is a Python int (unrolled), else arrays stacked over layers and the index."""
    b, t, _ = x.shape
    kv, group, hd = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    q = rms_norm(linear(x, p["q_proj"], live).reshape(b, t, kv * group, hd), p["q_norm"]["weight"], cfg.rms_norm_eps)
    k = rms_norm(linear(x, p["k_proj"], live).reshape(b, t, kv, hd), p["k_norm"]["weight"], cfg.rms_norm_eps)
    v = linear(x, p["v_proj"], live).reshape(b, t, kv, hd)
    unrolled = isinstance(layer, int)
    # unrolled, each concatenate would be a kernel of its own; in the loop (compiled once) it is the faster
    # one (see `rotate_half_fused`)
    q, k = (apply_rope(a, cos, sin, rotate_half_fused if unrolled else rotate_half) for a in (q, k))
    keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, kv_heads, T, D], the cache's layout
    layer = None if unrolled else layer
    at = None  # the attention's keys are this call's own
    if cache is not None:
        cache = tuple(_write_slots(c, new, write_index, layer) for c, new in zip(cache, (keys, values)))
        if from_cache:  # decode: attend over the whole cache; prefill attends to its own keys
            (keys, values), at = cache, layer
    out = attention(q.reshape(b, t, kv, group, hd), keys, values, *ranges, layer=at)  # [B, T, H*D]
    return linear(out, p["o_proj"], live), cache


def _mlp(x, p: Params, live) -> jax.Array:
    gate = activation(jax.nn.silu, linear(x, p["gate_proj"], live))
    return linear(gate * linear(x, p["up_proj"], live), p["down_proj"], live)


def _layer(x, lp: Params, layer, cos, sin, ranges, cache, write_index, deepstack, from_cache, live, cfg: TextConfig):
    """One decoder layer: `lp` its params, `layer` its index (a Python int unrolled, traced in the loop)."""
    h, cache = _self_attn(rms_norm(x, lp["input_layernorm"]["weight"], cfg.rms_norm_eps), lp["self_attn"], cos, sin,
                          ranges, cache, layer, write_index, from_cache, live, cfg)
    x = x + h
    x = x + _mlp(rms_norm(x, lp["post_attention_layernorm"]["weight"], cfg.rms_norm_eps), lp["mlp"], live)
    if deepstack is not None:  # added after layers 0..k-1
        k = deepstack.shape[0]
        if isinstance(layer, int):
            return (x + deepstack[layer].astype(x.dtype) if layer < k else x), cache
        x = x + jnp.where(layer < k, deepstack[jnp.minimum(layer, k - 1)], 0).astype(x.dtype)
    return x, cache


def decoder(params: Params, cfg: TextConfig, x, positions, ranges, cache=None, write_index=0, deepstack=None,
            from_cache: bool = False, live=None):
    """Decoder layers + final norm. x [B, T, D]; ranges: the key slots [lo, hi) each token attends to,
    ([B, T], [B, T]); deepstack [k, B, T, D] is added after layers 0..k-1; live [B, 2]: each row's
    slots [lo, hi) whose products are needed (a prompt's: not its left padding; `ops.matmul_t`). A loop
    over the layers where `layer_loop` (the cache then stacked over layers), else unrolled."""
    cos, sin = mrope_cos_sin(positions, cfg, x.dtype)
    run = functools.partial(_layer, cos=cos, sin=sin, ranges=ranges, write_index=write_index, deepstack=deepstack,
                            from_cache=from_cache, live=live, cfg=cfg)
    layers = params["layers"]
    if layer_loop(x.dtype):
        # every layer's weight matrices, read in place by index (ops.LayerOf); the small vectors stacked
        per_leaf = jax.tree.map(lambda *a: a if a[0].ndim == 2 else jnp.stack(a), *layers)
        is_matrices = lambda a: isinstance(a, tuple)  # noqa: E731

        def body(i, carry):
            x, cache = carry
            lp = jax.tree.map(lambda a: LayerOf(a, i) if is_matrices(a) else a[i], per_leaf, is_leaf=is_matrices)
            return run(x, lp, i, cache=cache)

        x, cache = jax.lax.fori_loop(0, len(layers), body, (x, None if cache is None else (cache["k"], cache["v"])))
        new_cache = None if cache is None else dict(zip(("k", "v"), cache))
    else:
        new_cache = None if cache is None else {"k": [], "v": []}
        for i, lp in enumerate(layers):
            x, layer_cache = run(x, lp, i, cache=None if cache is None else (cache["k"][i], cache["v"][i]))
            if new_cache is not None:
                new_cache["k"].append(layer_cache[0])
                new_cache["v"].append(layer_cache[1])
    return rms_norm(x, params["norm"]["weight"], cfg.rms_norm_eps), new_cache


def lm_head(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Logits in f32; a tied head reads the embedding table itself (no copy)."""
    head = params["language_model"]["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return matmul_t(h, head["weight"], out_dtype=jnp.float32, scale=head.get("weight_scale"))


def embed(params: Params, ids, vision_embeds=None, vision_index=None):
    """Token embeddings with image-pad positions replaced by vision embeddings.

    vision_embeds [Nv, D]; vision_index [B, T] row of vision_embeds for each image token, -1 elsewhere.
    """
    table = params["language_model"]["embed_tokens"]
    x = table["weight"][ids]  # [B, T, D]
    if "weight_scale" in table:  # int8 table (vlm/quantize.py): one scale per token row
        x = (x * table["weight_scale"][ids][..., None]).astype(params["language_model"]["norm"]["weight"].dtype)
    if vision_embeds is None:
        return x
    return jnp.where((vision_index >= 0)[..., None], vision_embeds[vision_index].astype(x.dtype), x)


def gather_deepstack(deepstack, vision_index):
    """[k, Nv, D] features -> [k, B, T, D], zero at text positions."""
    rows = jnp.concatenate([deepstack, jnp.zeros_like(deepstack[:, :1])], axis=1)  # index -1 -> zero row
    return rows[:, vision_index]


def prefill_ranges(start: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """The key slots [lo, hi) each prompt slot attends to, ([B, T], [B, T]): causal over left-padded rows,
    from the row's first real slot `start`; padding slots attend to themselves only."""
    slot = jnp.broadcast_to(jnp.arange(length), (start.shape[0], length))
    return jnp.where(slot >= start[:, None], start[:, None], slot), slot + 1


def forward(params: Params, cfg: ModelConfig, ids, positions, start, vision_embeds=None, deepstack=None,
            vision_index=None, cache: Cache | None = None):
    """Prompt forward. Returns final hidden states [B, T, D] and the cache with slots [0, T) filled."""
    x = embed(params, ids, vision_embeds, vision_index)
    ds = gather_deepstack(deepstack, vision_index) if deepstack is not None else None
    ranges = prefill_ranges(start, ids.shape[1])
    live = jnp.stack([start, jnp.full_like(start, ids.shape[1])], axis=-1)  # the left padding is skipped
    return decoder(params["language_model"], cfg.text, x, positions, ranges, cache, 0, ds, live=live)


def decode(params: Params, cfg: ModelConfig, token, position, start, write_index, cache: Cache):
    """One token per row: token [B], position [B] (mRoPE, text so T=H=W), writes slot `write_index`."""
    x = embed(params, token[:, None])
    ranges = start[:, None], jnp.broadcast_to(write_index + 1, start.shape)[:, None]  # the row's slots so far
    positions = jnp.broadcast_to(position[None, :, None], (3, token.shape[0], 1))
    h, cache = decoder(params["language_model"], cfg.text, x, positions, ranges, cache, write_index, from_cache=True)
    return lm_head(params, cfg, h[:, -1]), cache
