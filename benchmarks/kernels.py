"""Why decode and prefill run at the speed they do: the products on this machine, one at a time.

    python benchmarks/kernels.py          # about four minutes; prints Markdown tables

Each row is one operation of a Qwen3-VL-2B decode step or prefill, run the way the model runs it
(`vlm.ops.matmul_t`, `vlm.sampling.process_logits`) on 28 distinct weight matrices in a chain, so the
weights stream from memory as in a real step instead of sitting in the CPU cache. Products of a few
bf16 or int8 rows run twice: on XLA's product and on vlm/cpu_kernels.cc (what decode uses on a CPU).
"GB/s" is weight bytes read per second: against the machine's bandwidth (bench.py measures it) it says
whether a product is bandwidth- or compute-bound. int8 rows are `quantize="int8"`'s product
(activations to int8 per row, int8 x int8 -> int32). A second table runs the same 28 weights as one
stacked array under lax.scan (XLA's product), as a scan over stacked layers would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlm import cpu_kernels  # noqa: E402
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


def _weights(out: int, inp: int, dtype, stacked: bool = False):
    """28 random [out, inp] weights (int8: with per-row scales, as vlm/quantize.py stores them), as a list
    of separate arrays (how the model holds its layers) or as one [28, out, inp] array."""
    key = jax.random.key(0)
    if dtype == jnp.int8:
        ws = [(jax.random.randint(jax.random.fold_in(key, i), (out, inp), -127, 128, jnp.int32).astype(jnp.int8),
               jnp.full((out,), 1e-3, jnp.float32)) for i in range(LAYERS)]
    else:
        ws = [(jax.random.normal(jax.random.fold_in(key, i), (out, inp), dtype) * 0.02, None) for i in range(LAYERS)]
    return jax.tree.map(lambda *a: jnp.stack(a), *ws) if stacked else ws


def chained_products(rows: int, out: int, inp: int, dtype, stacked: bool = False, kernel: bool = False) -> dict:
    """`rows` x [inp] times 28 distinct [out, inp] weights, one after another (as the layers of a step);
    `stacked`: the weights as one array, looped over with lax.scan (a scan over stacked layers);
    `kernel`: vlm/cpu_kernels.cc where matmul_t would use it, else XLA's product."""
    os.environ["VLM_CPU_KERNELS"] = "1" if kernel else "0"  # read when `chain` is traced
    weights = _weights(out, inp, dtype, stacked)
    x = jnp.ones((rows, inp), jnp.float32 if dtype == jnp.int8 else dtype)

    @jax.jit
    def chain(weights, x):
        if stacked:
            def body(acc, layer):
                w, scale = layer
                return acc + matmul_t(x, w, out_dtype=jnp.float32, scale=scale), None

            return jax.lax.scan(body, jnp.zeros((rows, out), jnp.float32), weights)[0]
        acc = jnp.zeros((rows, out), jnp.float32)
        for w, scale in weights:
            acc = acc + matmul_t(x, w, out_dtype=jnp.float32, scale=scale)
        return acc

    t = best_time(chain, weights, x)
    nbytes = sum(w.nbytes for w in jax.tree.leaves(weights))
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
    print("| product (x 28 distinct weights) | dtype | rows | by | ms per matrix | weight GB/s | GFLOP/s |")
    print("|---|---|---:|---|---:|---:|---:|")
    shapes = [("gate/up_proj [6144, 2048]", 6144, 2048), ("down_proj [2048, 6144]", 2048, 6144),
              ("q/o_proj [2048, 2048]", 2048, 2048)]
    for name, out, inp in shapes:
        for dtype in (jnp.float32, jnp.bfloat16, jnp.int8):
            for rows in (1, 8, 256):
                kernel = jax.default_backend() == "cpu" and (  # where vlm.ops.matmul_t may use one
                    dtype == jnp.bfloat16 or (dtype == jnp.int8 and rows <= cpu_kernels.MAX_ROWS))
                for by_kernel in (False, True) if kernel else (False,):
                    r = chained_products(rows, out, inp, dtype, kernel=by_kernel)
                    by = "vlm kernel" if by_kernel else "XLA"
                    print(f"| {name} | {jnp.dtype(dtype).name} | {rows} | {by} | {r['ms']:.2f} | {r['gb_s']:.1f} | "
                          f"{r['gflop_s']:.0f} |", flush=True)
    print()
    print("| gate/up_proj [6144, 2048] x 28, batch 1 | dtype | ms per matrix | weight GB/s |")
    print("|---|---|---:|---:|")
    for stacked in (False, True):
        for dtype in (jnp.float32, jnp.bfloat16):
            r = chained_products(1, 6144, 2048, dtype, stacked)
            how = "one stacked array, lax.scan" if stacked else "separate arrays, unrolled (the model)"
            print(f"| {how} | {jnp.dtype(dtype).name} | {r['ms']:.2f} | {r['gb_s']:.1f} |", flush=True)
    print()
    print("| sampling filter, 151,936 logits | rows | lax.top_k path (ms) | full sort (ms) |")
    print("|---|---:|---:|---:|")
    for rows in (1, 8):
        r = sampling_filters(rows)
        print(f"| top-k 20, top-p 0.8 | {rows} | {r['top_k_ms']:.2f} | {r['sort_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
