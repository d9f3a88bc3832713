"""Why decode and prefill run at the speed they do: XLA's kernels on this machine, one at a time.

    python benchmarks/kernels.py          # about a minute; prints one Markdown table

Each row is one operation of a Qwen3-VL-2B decode step or prefill, run the way the model runs it
(`vlm.ops.matmul_t`, `vlm.sampling.process_logits`) on 28 distinct weight matrices in a chain, so the
weights stream from memory as in a real step instead of sitting in the CPU cache. "GB/s" is weight bytes
read per second: against the machine's bandwidth (bench.py measures it) it says whether the kernel is
bandwidth- or compute-bound.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlm.ops import matmul_t  # noqa: E402
from vlm.sampling import process_logits  # noqa: E402

LAYERS = 28  # Qwen3-VL-2B's text layers


def best_time(fn, *args, repeat: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def chained_products(rows: int, out: int, inp: int, dtype) -> dict:
    """`rows` x [inp] times 28 distinct [out, inp] weights, one after another (as the layers of a step)."""
    key = jax.random.key(0)
    weights = [jax.random.normal(jax.random.fold_in(key, i), (out, inp), dtype) * 0.02 for i in range(LAYERS)]
    x = jnp.ones((rows, inp), dtype)

    @jax.jit
    def chain(weights, x):
        acc = jnp.zeros((rows, out), jnp.float32)
        for w in weights:
            acc = acc + matmul_t(x, w, out_dtype=jnp.float32)
        return acc

    t = best_time(chain, weights, x)
    nbytes = sum(w.nbytes for w in weights)
    return {"ms": t / LAYERS * 1e3, "gb_s": nbytes / t / 1e9, "gflop_s": 2 * rows * out * inp * LAYERS / t / 1e9}


def sampling_filters(rows: int) -> dict:
    """top-k 20 / top-p 0.8 over Qwen's 151,936 logits: the lax.top_k path and the full sort it replaced."""
    logits = jax.random.normal(jax.random.key(1), (rows, 151936), jnp.float32)
    knobs = (np.float32(0.7), np.int32(20), np.float32(0.8))  # arguments, as the decode step gets them
    sort = jax.jit(lambda x: jnp.sort(x, axis=-1))
    return {"top_k_ms": best_time(jax.jit(process_logits), logits, *knobs) * 1e3,
            "sort_ms": best_time(sort, logits) * 1e3}


def main() -> None:
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    print()
    print("| product (x 28 distinct weights) | dtype | rows | ms per matrix | weight GB/s | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    shapes = [("gate/up_proj [6144, 2048]", 6144, 2048), ("down_proj [2048, 6144]", 2048, 6144),
              ("q/o_proj [2048, 2048]", 2048, 2048)]
    for name, out, inp in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            for rows in (1, 8, 256):
                r = chained_products(rows, out, inp, dtype)
                print(f"| {name} | {jnp.dtype(dtype).name} | {rows} | {r['ms']:.2f} | {r['gb_s']:.1f} | "
                      f"{r['gflop_s']:.0f} |", flush=True)
    print()
    print("| sampling filter, 151,936 logits | rows | lax.top_k path (ms) | full sort (ms) |")
    print("|---|---:|---:|---:|")
    for rows in (1, 8):
        r = sampling_filters(rows)
        print(f"| top-k 20, top-p 0.8 | {rows} | {r['top_k_ms']:.2f} | {r['sort_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
