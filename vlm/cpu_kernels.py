"""The heavy parts of a bf16 (or int8) model on a CPU, as small C++ kernels (vlm/cpu_kernels.cc) called
through jax.ffi, where XLA:CPU's own are slow:

- products of a few rows (decode steps, batch <= `MAX_ROWS`): decoding a token reads every weight once.
  XLA's bf16 product of a few rows gets through ~16 GB/s of weights on a 2-core AVX-512 EPYC (int8: ~14
  GB/s), under half the memory bandwidth; the matrix-vector kernel reads each weight once for all rows
  at ~30-43 GB/s (`python benchmarks/kernels.py`): batch-1 decode ~2x faster in bf16, ~2.5x in int8.
  The int8 product is exact, the same integers as XLA's; the bf16 one differs by f32 rounding;
- bf16 products of more rows (a prefill, the vision tower): XLA's GEMM repacks the whole weight matrix
  at every call, ~360 GFLOP/s at 256 rows; the kernel packs the rows instead and reads the weights in
  place, ~390-410 (at 900 rows XLA's is ~5-10 % faster; one kernel for all keeps a row's result
  independent of the batch it is in). On a 2-core Intel Xeon without AVX-512 BF16 (bf16 widened to f32
  for FMAs): 214-263 GFLOP/s against XLA's 168-196 (this CPU's FMA peak: ~370). Where the CPU has AMX
  (Intel Sapphire Rapids and later) the product runs in AMX tiles: on a 2-core VM 1.0-1.7 TFLOP/s (its
  vdpbf16ps path: ~200; XLA's, which uses AMX there too: 1.2-1.9). With AVX2 and no AVX-512 (AMD Zen 2/3,
  Intel client cores) the same kernel in 8-lane FMAs: ~165-195 GFLOP/s on two Zen 4 cores running that
  build (~90 % of their AVX2 FMA peak), where XLA's bf16 GEMM ran ~95 on a 2-core Zen 3;
- one query token's attention over a bf16 KV cache (XLA's batched bf16 dots read the cache slowly: at
  batch 8 x 384 slots they took a quarter of the step);
- attention over one range of keys per query, a prefill's: the vision tower's (each patch over its own
  image's patches; XLA's took ~40 ms a layer at 896 patches, a third of the 2B tower, the kernel ~11) and
  a prompt's (causal, where XLA runs the products in f32).
The products and the cache's attention take every layer's arrays and a layer index and read that layer's
in place, so the text decoder runs as a loop over its layers (`vlm.model.layer_loop`): XLA's own products
would copy a layer's weights out of a stack at every step.
`vlm.ops` decides while tracing, on a single CPU device only (not on a mesh); f32 weights keep XLA's
products (at memory speed there), and so do prefills on CPUs with neither AVX-512 nor AVX2 (the portable
build of the prefill kernels is ~9x slower than XLA's GEMM; the decode ones are memory-bound either way).

They are compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`; ~8 s, once) against
the XLA FFI headers that ship with jaxlib, for this CPU (-march=native: AMX tiles for the prefill
kernels where the CPU has them, vdpbf16ps / vpdpwssd with AVX-512 BF16 and VNNI, AVX-512 FMAs without
them, AVX2 FMAs on CPUs without AVX-512, portable vector code elsewhere), and cached under
$VLM_CACHE/kernels. Without a compiler, or with VLM_CPU_KERNELS=0, everything runs on XLA (a one-line
warning says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .cache import cache_dir, cpu_flags

MAX_ROWS = 16  # products of at most this many rows: the matrix-vector kernel (decode); bf16 of more: matmul
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# weight dtype -> (FFI target, exported symbol, result dtype)
_KERNELS = {jnp.dtype(jnp.bfloat16): ("vlm_cpu_matvec_bf16", "VlmCpuMatvecBf16", jnp.float32),
            jnp.dtype(jnp.int8): ("vlm_cpu_matvec_int8", "VlmCpuMatvecInt8", jnp.int32)}
_ATTENTION = ("vlm_cpu_attend_one_query_bf16", "VlmCpuAttendOneQueryBf16")
_RANGE_ATTENTION = ("vlm_cpu_range_attention_bf16", "VlmCpuRangeAttentionBf16")
_MATMUL = ("vlm_cpu_matmul_bf16", "VlmCpuMatmulBf16")


def enabled() -> bool:
    """Whether decode products on a CPU may go through the kernel (False: VLM_CPU_KERNELS=0)."""
    return os.environ.get("VLM_CPU_KERNELS", "1") != "0"


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `vlm.ops.matmul_t(x, w)` runs on a kernel: bf16 x and w, or int8 w (x then goes to int8 per
    row, vlm/quantize.py); at most MAX_ROWS rows, or any number in bf16 where the CPU has AVX-512 or AVX2; a
    multiple of 32 columns (all of Qwen3-VL's); one CPU device; not disabled; built. Decided while
    tracing, so it costs nothing at run time."""
    bf16 = x.dtype == w.dtype == jnp.bfloat16
    if not ((bf16 or w.dtype == jnp.int8) and w.ndim == 2 and w.shape[1] % 32 == 0 and usable()):
        return False
    return x.size // x.shape[-1] <= MAX_ROWS or (bf16 and _native)


def attention_applies(k: jax.Array) -> bool:
    """Whether one query token's attention over the cache `k` runs on the kernel: a bf16 cache [B, Kv, S,
    D] with D a multiple of 16, on one CPU device, not disabled, built."""
    return k.dtype == jnp.bfloat16 and k.shape[-1] % 16 == 0 and usable()


def range_attention_applies(k: jax.Array) -> bool:
    """Whether attention over key ranges (`range_attention`) runs on the kernel for keys `k` [B, Hk, S, D]:
    bf16, D even and at most 128, on one CPU device with AVX-512 or AVX2, not disabled, built."""
    return k.dtype == jnp.bfloat16 and k.shape[-1] % 2 == 0 and k.shape[-1] <= 128 and usable() and _native


def usable() -> bool:
    """On one CPU device, not disabled, and built."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and enabled() and _load()


def attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array, scale: float, layer=0) -> jax.Array:
    """softmax(q k^T * scale, over the slots `keep` keeps) v for q [B, Kv, G, D] and a bf16 cache k/v
    [B, Kv, S, D] (or stacked over layers, [L, B, Kv, S, D], of which layer `layer`), keep [B, S] -> f32
    [B, Kv, G, D]; probabilities rounded to bf16 before the sum of V, as `vlm.ops.attention` does."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(_ATTENTION[0], out)(q.astype(k.dtype), _index(layer), k, v, keep, scale=np.float32(scale))


def range_attention(q: jax.Array, k: jax.Array, v: jax.Array, lo: jax.Array, hi: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v, each query over the key slots [lo, hi) of its row, for bf16 q [B, T, H, D],
    k/v [B, Hk, S, D] (H a multiple of Hk), lo/hi [B, T] -> bf16 [B, T, H, D]; as `vlm.ops.attention`."""
    out = jax.ShapeDtypeStruct(q.shape, jnp.bfloat16)
    lo, hi = lo.astype(jnp.int32), hi.astype(jnp.int32)
    return jax.ffi.ffi_call(_RANGE_ATTENTION[0], out)(q.astype(k.dtype), k, v, lo, hi, scale=np.float32(scale))


def matmul_t(x: jax.Array, w, live: jax.Array | None = None, layer=0) -> jax.Array:
    """x [..., K] @ w.T for w [N, K]: bf16 x bf16 -> f32, int8 x int8 -> int32 (exact), [..., N]; the
    matrix-vector kernel up to MAX_ROWS rows, the matrix-matrix one (bf16) above. `w` may be a tuple of
    every layer's weights, of which the kernel reads layer `layer` in place (a loop over layers,
    `vlm.ops.LayerOf`). `live` [G, 2]: x's rows are G groups of equal size, and only rows [live[g, 0],
    live[g, 1]) of group g are needed; the matrix-matrix kernel computes only those (a bucket's padding
    costs nothing) and zeroes the others."""
    weights = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    target, _, out = _KERNELS[jnp.dtype(weights[0].dtype)]
    args = (x, _index(layer))
    if x.size // x.shape[-1] > MAX_ROWS:
        target = _MATMUL[0]
        live = jnp.array([[0, x.size // x.shape[-1]]]) if live is None else live
        args = (x, live.astype(jnp.int32), _index(layer))
    shape = jax.ShapeDtypeStruct((*x.shape[:-1], weights[0].shape[0]), out)
    return jax.ffi.ffi_call(target, shape)(*args, *weights)


def _index(layer) -> jax.Array:
    return jnp.asarray(layer, jnp.int32).reshape(())


_lock = threading.Lock()
_loaded: bool | None = None
_native = False  # built with AVX-512 or AVX2: the prefill kernels (products of many rows, attention) apply


def _load() -> bool:
    """Build (once per source, compiler, jaxlib and CPU) and register the kernels; False if it cannot be.
    Locked: the app's warm-up and a first request may trace at the same time."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build_and_register()
        return _loaded


def _build_and_register() -> bool:
    global _native
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"vlm: could not build the CPU decode kernel ({detail.strip().splitlines()[-1]}); "
                      "decoding uses XLA's products, about half as fast", stacklevel=3)
        return False
    register(lib)
    _native = bool(lib.VlmCpuKernelsNative())
    return True


def register(lib: ctypes.CDLL, prefix: str = "") -> None:
    """Register `lib`'s kernels as FFI targets (named `prefix` + the usual name)."""
    for target, symbol in [(t, s) for t, s, _ in _KERNELS.values()] + [_ATTENTION, _RANGE_ATTENTION, _MATMUL]:
        jax.ffi.register_ffi_target(prefix + target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def _build(march: str = "native") -> Path:
    """The kernels' shared library for `-march=<march>`, compiled into $VLM_CACHE/kernels if not there."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise OSError("no C++ compiler found; set CXX")
    cmd = [cxx, "-O3", f"-march={march}", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([_SOURCE.read_text(), " ".join(cmd), version, jax.__version__,
                                    platform.machine(), cpu_flags()]).encode()).hexdigest()[:16]
    cache = cache_dir() / "kernels"
    lib = cache / f"cpu_kernels-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([*cmd, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)  # atomic: concurrent first uses each build, one wins
        finally:
            Path(tmp).unlink(missing_ok=True)
    return lib

