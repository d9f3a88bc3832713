"""Tensor and data parallelism on a `jax.sharding.Mesh` with axes ("data", "model").

Weights are split over `model` (Megatron-style: column-parallel q/k/v/gate/up/fc1, row-parallel
o/down/proj/fc2, vocab-parallel embedding and head) and replicated over `data`; batch rows and the KV
cache's batch axis go over `data`, its kv-head axis over `model`. Nothing here communicates: the
arrays carry their `NamedSharding`, and XLA's SPMD partitioner inserts the collectives when the
samplers' jitted functions run on them. A tensor whose split dimension does not divide by the
`model` axis is replicated instead (`RULES` below; `spec_table` lists every parameter kind). The
vision tower runs on every `data` group for the whole batch's images (its inputs are replicated).

    model, params, tok = load_model("Qwen/Qwen3-VL-8B-Instruct", mesh="1x4")  # or "2x2", "auto"

Several hosts (a TPU pod slice, several GPU nodes): call `jax.distributed.initialize()` on every
host first, then the same `load_model(..., mesh="DxM")` everywhere; `jax.devices()` is then global
and each host reads only the slices of the checkpoint its own devices hold.

`python -m vlm.mesh_plan CHECKPOINT --mesh 1x4` prints the spec table and the memory per device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .inputs import batch_bucket

DATA, MODEL = "data", "model"

# The spec table. Canonical parameter name -> (dimension split over `model`, the count that must divide
# by its size, else the tensor is replicated). A [out, in] weight split on dim 0 is column-parallel, on
# dim 1 row-parallel. Text attention splits by whole kv heads (each shard: its kv heads and their query
# heads) or not at all: splitting query heads alone leaves a replicated KV cache that XLA all-gathers on
# every decode step. Everything not listed is replicated: norms, row-parallel biases, q_norm/k_norm,
# patch_embed, pos_embed, and the vision blocks' fused qkv projection, whose rows [q | k | v] cut
# into contiguous shards would not be whole heads (XLA would all-gather its [N, 3*hidden] output).
RULES: list[tuple[str, int, str]] = [
    (r"language_model\.embed_tokens\.weight", 0, "vocab"),
    (r"lm_head\.weight", 0, "vocab"),
    (r"language_model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)", 0, "kv_heads"),
    (r"language_model\.layers\.\d+\.self_attn\.o_proj\.weight", 1, "kv_heads"),
    (r"language_model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", 0, "intermediate"),
    (r"language_model\.layers\.\d+\.mlp\.down_proj\.weight", 1, "intermediate"),
    (r"visual\.blocks\.\d+\.attn\.proj\.weight", 1, "vision_heads"),
    (r"visual\.blocks\.\d+\.mlp\.linear_fc1\.(weight|bias)", 0, "vision_intermediate"),
    (r"visual\.blocks\.\d+\.mlp\.linear_fc2\.weight", 1, "vision_intermediate"),
    (r"visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc1\.(weight|bias)", 0, "merger_hidden"),
    (r"visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc2\.weight", 1, "merger_hidden"),
]
_COMPILED = [(re.compile(pattern + "$"), dim, unit) for pattern, dim, unit in RULES]


def unit_counts(cfg: ModelConfig) -> dict[str, int]:
    """How many whole units (heads, rows) each rule's split dimension holds; the model axis must divide it."""
    t, v = cfg.text, cfg.vision
    return {"vocab": t.vocab_size, "kv_heads": t.num_key_value_heads, "intermediate": t.intermediate_size,
            "vision_heads": v.num_heads, "vision_intermediate": v.intermediate_size,
            "merger_hidden": v.hidden_size * v.spatial_merge_size**2}


def parse_mesh_shape(shape: str | tuple[int, int]) -> tuple[int, int]:
    """"2x4" / (2, 4) -> (data, model)."""
    if isinstance(shape, str):
        parts = shape.lower().replace("×", "x").split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"mesh {shape!r}: expected DATAxMODEL such as '1x4' or '2x2', or 'auto'")
        shape = (int(parts[0]), int(parts[1]))
    data, model = (int(s) for s in shape)
    if data < 1 or model < 1:
        raise ValueError(f"mesh {shape}: both axes must be >= 1")
    return data, model


def make_mesh(mesh: str | tuple[int, int] | Mesh | None = "auto", devices=None) -> Mesh | None:
    """A ("data", "model") mesh, or None for plain single-device placement.

    None / "auto": None with one device, else all devices on `model` (1 x N). "1x1" is the
    single-device path too. "DxM" must use exactly D*M of the available devices (the first ones).
    """
    # Auto axes: shardings propagate through the model code and XLA's SPMD partitioner adds the collectives
    auto = (jax.sharding.AxisType.Auto,) * 2
    if isinstance(mesh, Mesh):
        if mesh.axis_names != (DATA, MODEL):
            raise ValueError(f"mesh axes must be {(DATA, MODEL)}, got {mesh.axis_names}")
        return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    devices = list(devices if devices is not None else jax.devices())
    if mesh is None or mesh == "auto":
        shape = (1, len(devices))
    else:
        shape = parse_mesh_shape(mesh)
    if shape == (1, 1):
        return None
    n = shape[0] * shape[1]
    if n > len(devices):
        raise ValueError(f"mesh {shape[0]}x{shape[1]} needs {n} devices; jax sees {len(devices)}")
    return jax.make_mesh(shape, (DATA, MODEL), axis_types=auto, devices=devices[:n])


def param_spec(name: str, shape: tuple[int, ...], cfg: ModelConfig, model_size: int) -> tuple[P, str]:
    """PartitionSpec for one canonical parameter, and why (for the spec table)."""
    for pattern, dim, unit in _COMPILED:
        if pattern.match(name):
            count = unit_counts(cfg)[unit]
            if model_size > 1 and count % model_size == 0 and shape[dim] % model_size == 0:
                spec = [None] * len(shape)
                spec[dim] = MODEL
                return P(*spec), f"dim {dim} by {unit} ({count}/{model_size})"
            return P(), f"replicated ({unit} {count} not divisible by {model_size})"
    if ".attn.qkv." in name:
        return P(), "replicated (fused q|k|v rows: a contiguous split is not whole heads)"
    return P(), "replicated"


def param_specs(cfg: ModelConfig, mesh: Mesh | None) -> dict[str, P]:
    """Canonical parameter name -> PartitionSpec on `mesh` (all replicated without a mesh)."""
    from .weights import expected_shapes

    size = mesh.shape[MODEL] if mesh is not None else 1
    return {name: param_spec(name, shape, cfg, size)[0] for name, shape in expected_shapes(cfg).items()}


def spec_table(cfg: ModelConfig, model_size: int) -> list[tuple[str, tuple[int, ...], str, str]]:
    """One row per distinct parameter kind (layer indices folded to `*`): (name, shape, spec, why)."""
    from .weights import expected_shapes

    rows, seen = [], set()
    for name, shape in expected_shapes(cfg).items():
        kind = re.sub(r"\.\d+\.", ".*.", name)
        if kind in seen:
            continue
        seen.add(kind)
        spec, why = param_spec(name, shape, cfg, model_size)
        rows.append((kind, shape, str(spec), why))
    return rows


def _host_slicer(array: np.ndarray, dtype) -> Callable:
    """index -> the host slice in `dtype`, converted once per distinct slice (devices along `data` share it)."""
    memo: dict = {}

    def get(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in memo:
            memo[key] = np.asarray(array[index]).astype(dtype, copy=False)
        return memo[key]

    return get


def shard_put(cfg: ModelConfig, mesh: Mesh, dtype) -> Callable[[str, np.ndarray], jax.Array]:
    """A `load_params` put hook: each device receives only its slice of the memory-mapped tensor."""
    size = mesh.shape[MODEL]
    dtype = np.dtype(dtype)

    def put(name: str, array: np.ndarray) -> jax.Array:
        spec, _ = param_spec(name, tuple(array.shape), cfg, size)
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(tuple(array.shape), sharding, _host_slicer(array, dtype))

    return put


def mesh_of(params) -> Mesh | None:
    """The mesh `params` were loaded onto, or None for single-device params."""
    sharding = getattr(params["language_model"]["norm"]["weight"], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def batch_axis(mesh: Mesh | None, rows: int) -> str | None:
    """`data` when it divides the batch, else None (rows replicated)."""
    if mesh is None or mesh.shape[DATA] == 1 or rows % mesh.shape[DATA]:
        return None
    return DATA


def cache_spec(mesh: Mesh, cfg: ModelConfig, shape: tuple[int, ...]) -> P:
    """A KV cache array [..., B, kv_heads, S, head_dim] (any leading layer axes): rows over `data`, kv
    heads over `model` when they divide, else replicated."""
    kv = cfg.text.num_key_value_heads
    heads = MODEL if mesh.shape[MODEL] > 1 and kv % mesh.shape[MODEL] == 0 else None
    return P(*[None] * (len(shape) - 4), batch_axis(mesh, shape[-4]), heads, None, None)


def constrain_cache(cache, mesh: Mesh | None, cfg: ModelConfig):
    """Pin every array of a KV cache pytree to `cache_spec`; a no-op without a mesh."""
    if mesh is None:
        return cache
    return jax.tree.map(lambda x: constrain(x, mesh, cache_spec(mesh, cfg, x.shape)), cache)


def constrain(x, mesh: Mesh | None, spec: P):
    """`with_sharding_constraint` to `spec` on `mesh`; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def place(x: np.ndarray, mesh: Mesh | None, spec: P):
    """Put a host array on the mesh (each device gets its slice; works on several hosts). No mesh: as is."""
    if mesh is None:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])


def pad_rows(inputs, multiple: int):
    """Repeat row 0 of a VLMInputs until the batch divides by `multiple` (extra rows are dropped at the end)."""
    b = inputs.prompt_tokens.shape[0]
    extra = -b % multiple
    if extra == 0:
        return inputs
    rows = np.r_[np.arange(b), np.zeros(extra, np.int64)]
    return dataclasses.replace(
        inputs, prompt_tokens=inputs.prompt_tokens[rows], lengths=inputs.lengths[rows],
        positions=inputs.positions[:, rows], next_position=inputs.next_position[rows],
        vision_index=inputs.vision_index[rows])


def memory_per_device(cfg: ModelConfig, data: int, model: int, dtype_bytes: int, batch: int = 1,
                      cache_tokens: int = 0) -> dict[str, float]:
    """Bytes per device of the weights (exact, from the spec table) and of a KV cache for `batch` rows."""
    from .weights import expected_shapes

    weights = 0
    for name, shape in expected_shapes(cfg).items():
        spec, _ = param_spec(name, shape, cfg, model)
        weights += math.prod(shape) * dtype_bytes // (model if MODEL in spec else 1)
    t = cfg.text
    kv_split = model if model > 1 and t.num_key_value_heads % model == 0 else 1
    rows = -(-batch_bucket(batch) // data)  # the sampler pads rows to a power of two, then to a multiple of data
    cache = 2 * t.num_hidden_layers * rows * cache_tokens * t.num_key_value_heads * t.head_dim * dtype_bytes
    return {"weights": weights, "kv_cache": cache // kv_split, "total": weights + cache // kv_split}
