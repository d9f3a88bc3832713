"""Checkpoint loading: a hub id, a local folder or "tiny" -> (model, params, tokenizer).

Safetensors only. Each tensor is memory-mapped, checked against the shape the config implies and
put on the device in the configured dtype one at a time, its mapped pages released after it, so no
full host copy is ever held.
Every checkpoint key must map to a parameter and every parameter must be filled, or loading fails
naming the offending keys.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig, resolve_dtype
from .memory import release_free_memory
from .model import Qwen3VL
from .ops import Params
from .quantize import check_mode, is_quantized, quantize_rows

# Checkpoint key prefixes -> canonical prefixes ("language_model.", "visual.", "lm_head.").
# transformers 5 and the published Qwen3-VL checkpoints use the first two; the rest are older spellings.
_PREFIXES = [
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("lm_head.", "lm_head."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("visual.", "visual."),
    ("model.", "language_model."),
]
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}
_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


def canonical_key(key: str) -> str | None:
    for prefix, canon in _PREFIXES:
        if key.startswith(prefix):
            return canon + key[len(prefix):]
    return None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> shape, derived from the config alone."""
    t, v = cfg.text, cfg.vision
    d, hd, q, kv = t.hidden_size, t.head_dim, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    s = {"language_model.embed_tokens.weight": (t.vocab_size, d), "language_model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (t.vocab_size, d)
    for i in range(t.num_hidden_layers):
        p = f"language_model.layers.{i}."
        s |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
              p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
              p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
              p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
              p + "mlp.gate_proj.weight": (t.intermediate_size, d), p + "mlp.up_proj.weight": (t.intermediate_size, d),
              p + "mlp.down_proj.weight": (d, t.intermediate_size)}
        if t.attention_bias:
            s |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                  p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (d,)}
    h, w4 = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    s |= {"visual.patch_embed.proj.weight": (h, v.patch_dim), "visual.patch_embed.proj.bias": (h,),
          "visual.pos_embed.weight": (v.num_position_embeddings, h)}
    for i in range(v.depth):
        p = f"visual.blocks.{i}."
        s |= {p + "norm1.weight": (h,), p + "norm1.bias": (h,), p + "norm2.weight": (h,), p + "norm2.bias": (h,),
              p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
              p + "attn.proj.weight": (h, h), p + "attn.proj.bias": (h,),
              p + "mlp.linear_fc1.weight": (v.intermediate_size, h), p + "mlp.linear_fc1.bias": (v.intermediate_size,),
              p + "mlp.linear_fc2.weight": (h, v.intermediate_size), p + "mlp.linear_fc2.bias": (h,)}
    mergers = [("visual.merger.", h)] + [(f"visual.deepstack_merger_list.{k}.", w4)
                                         for k in range(len(v.deepstack_visual_indexes))]
    for p, norm in mergers:
        s |= {p + "norm.weight": (norm,), p + "norm.bias": (norm,), p + "linear_fc1.weight": (w4, w4),
              p + "linear_fc1.bias": (w4,), p + "linear_fc2.weight": (v.out_hidden_size, w4),
              p + "linear_fc2.bias": (v.out_hidden_size,)}
    return s


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a .safetensors file (zero-copy; bf16 via ml_dtypes)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        out[name] = raw[8 + n + b : 8 + n + e].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _drop_pages(array: np.ndarray) -> None:
    """Let the kernel drop a memory-mapped tensor's pages once it has been put on the device: touched
    file pages count as this process's resident memory, so without this a loaded model's RSS would be
    its weights twice over (device copy + page-cache mapping). Read-only mapping: safe at any time."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = array.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, first, start + array.nbytes - first)


def _set(tree: dict, key: str, value) -> None:
    """tree["a"]["b"][0]["c"] = value for key "a.b.0.c" (numeric parts become list slots)."""
    parts = key.split(".")
    node = tree
    for part, nxt in zip(parts[:-1], parts[1:]):
        child = [] if nxt.isdigit() else {}
        if isinstance(node, list):
            i = int(part)
            node.extend([None] * (i + 1 - len(node)))
            node[i] = node[i] if node[i] is not None else child
            node = node[i]
        else:
            node = node.setdefault(part, child)
    node[parts[-1]] = value


def load_params(path: str | Path, cfg: ModelConfig, dtype, put: Callable | None = None, quantize: bool = False
                ) -> Params:
    """Load and validate all safetensors in `path`; `put(name, array)` places one array (default: device_put).
    quantize: the text decoder's projections and token table as int8 + "<name>_scale" (vlm/quantize.py)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path} (only safetensors checkpoints are supported)")
    expected = expected_shapes(cfg)
    put = put or (lambda name, a: jnp.asarray(a, dtype=dtype))
    flat, errors = {}, []
    for file in files:
        for key, array in read_safetensors(file).items():
            name = canonical_key(key)
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the head is the embedding table itself; transformers writes a copy
            if name not in expected:
                errors.append(f"unexpected checkpoint key {key!r}")
                continue
            if name == "visual.patch_embed.proj.weight" and array.ndim == 5:
                array = array.reshape(array.shape[0], -1)  # Conv3d kernel == stride: a linear layer
            if tuple(array.shape) != expected[name]:
                errors.append(f"{key!r} has shape {tuple(array.shape)}, expected {expected[name]}")
                continue
            if name in flat:
                errors.append(f"{key!r} appears twice")
                continue
            if quantize and is_quantized(name):
                q, scale = quantize_rows(array)
                flat[name], flat[name + "_scale"] = jax.block_until_ready((jnp.asarray(q), jnp.asarray(scale)))
            else:
                flat[name] = jax.block_until_ready(put(name, array))  # the copy is done: its pages may go
            _drop_pages(array)
    errors += [f"missing checkpoint key for parameter {name!r}" for name in expected if name not in flat]
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise ValueError(f"checkpoint {path} does not match its config:\n  {shown}")
    params: Params = {}
    for name in sorted(flat, key=_natural):
        _set(params, name, flat[name])
    return params


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def resolve_path(name_or_path: str | Path) -> Path:
    """"tiny" -> the built tiny checkpoint; an existing folder -> itself; else a hub id (HF cache, HF_HUB_OFFLINE)."""
    if str(name_or_path) == "tiny":
        from .tiny import tiny_path

        return tiny_path()
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=_ALLOW))


def load_model(name_or_path: str | Path = "Qwen/Qwen3-VL-2B-Instruct", dtype=None, mesh=None, quantize=None):
    """Load a Qwen3-VL checkpoint -> (model, params, tokenizer). dtype: None/"auto" (the checkpoint's: bf16 for Qwen3-VL).

    quantize: None / "none", or "int8": the text decoder's weights in int8, ~1.5x faster batch-1 decode
    than bf16 on a CPU in 40% less memory, answers close to but not the same as bf16's (vlm/quantize.py). One device.

    mesh: "DxM" such as "1x4" or "2x2", a jax Mesh with axes ("data", "model"), or "auto" (one device:
    plain placement; several: all on `model`). None reads VLM_MODEL_MESH, else "auto". Each weight goes
    straight from the memory-mapped file into its shards (see vlm/sharding.py).
    """
    from .processing import PreprocessConfig, load_tokenizer
    from .sharding import make_mesh, shard_put

    int8 = check_mode(quantize)
    path = resolve_path(name_or_path)
    cfg = ModelConfig.from_dir(path)
    dtype = resolve_dtype(dtype, cfg.stored_dtype)
    gen_file = path / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    model = Qwen3VL(cfg=cfg, dtype=dtype, preprocess=PreprocessConfig.from_dir(path), generation=generation,
                    source=str(name_or_path), quantize="int8" if int8 else None)
    mesh = make_mesh(mesh if mesh is not None else os.environ.get("VLM_MODEL_MESH") or "auto")
    if int8 and mesh is not None:
        raise ValueError(f"quantize='int8' runs on one device; this mesh has {mesh.size} (use mesh '1x1')")
    params = load_params(path, cfg, dtype, put=shard_put(cfg, mesh, dtype) if mesh is not None else None,
                         quantize=int8)
    tokenizer = load_tokenizer(path)
    release_free_memory()  # what loading freed between the weights (~0.1 GB for 2B) goes back to the OS
    return model, params, tokenizer


def param_bytes(params: Params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))
