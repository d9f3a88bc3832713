"""Optional int8 text decoder: `load_model(..., quantize="int8")` (CLI/app: `model.quantize=int8`).

Every projection of the text layers (q/k/v/o, gate/up/down) and the embedding table (which is also the
tied lm_head; an untied `lm_head` likewise) is stored as int8 with one f32 scale per output row
(symmetric, max-abs; the table's rows are its tokens). At run time `vlm.ops.matmul_t` turns each row
of activations into int8 with its own scale the same way and multiplies int8 x int8 -> int32 (W8A8,
dynamic per-token). The vision tower, norms and KV cache stay in the model's dtype.

Why: on a CPU, decoding one token reads every weight once, and one-byte weights are half the bytes:
batch-1 decode runs ~1.5x faster than bf16 (both on vlm/cpu_kernels.cc, which computes the same int32
products as XLA; benchmarks/), and the weights take about half the memory (Qwen3-VL-8B: 8.7 GiB instead
of 16.3 GiB, so it fits a 16 GB machine). Weight-only int8 is not an option with XLA's products: f32 x
int8 runs at <1 GB/s on XLA:CPU (it converts the whole matrix first), hence W8A8. The price is
accuracy: answers are close to the bf16 model's but not the same (rounding each activation row to 255
levels hurts most where a row has one huge outlier), so it is opt-in.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODES = ("none", "int8")
# Canonical parameter names (see vlm/weights.py) stored as int8 + "<name>_scale".
_RULE = re.compile(r"language_model\.(layers\.\d+\.(self_attn|mlp)\.\w+_proj|embed_tokens)\.weight|lm_head\.weight")


def check_mode(quantize: str | None) -> bool:
    """None / "none" -> False, "int8" -> True; anything else is an error naming the choices."""
    if quantize in (None, "none"):
        return False
    if quantize == "int8":
        return True
    raise ValueError(f"quantize must be one of {', '.join(MODES)}; got {quantize!r}")


def is_quantized(name: str) -> bool:
    """Whether the canonical parameter `name` is stored as int8 under quantize="int8"."""
    return _RULE.fullmatch(name) is not None


def quantize_rows(w: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float weights -> (int8 [out, in], f32 scale [out]) with w ~= q * scale[:, None].

    On the host, `chunk` rows at a time on every core, so a memory-mapped tensor never needs a full f32
    copy (numpy releases the GIL in these loops)."""
    q = np.empty(w.shape, np.int8)
    scale = np.empty(w.shape[0], np.float32)

    def rows(i: int) -> None:
        block = np.asarray(w[i : i + chunk], np.float32)
        s = np.abs(block).max(axis=1) / 127
        s[s == 0] = 1  # an all-zero row stays zero
        q[i : i + chunk] = np.rint(block / s[:, None])
        scale[i : i + chunk] = s

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(rows, range(0, w.shape[0], chunk)))
    return q, scale
