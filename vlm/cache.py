"""$VLM_CACHE (default ~/.cache/vlm): what vlm builds once and keeps between runs, in one place.

- tiny-v1/    the tiny random checkpoint (vlm/tiny.py)
- kernels/    the CPU kernels' shared library (vlm/cpu_kernels.py)
- xla/<key>/  compiled programs, jax's persistent compilation cache (`use_compilation_cache`)
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_CACHE", Path.home() / ".cache" / "vlm"))


def cpu_flags() -> str:
    """The CPU's feature flags, part of the key of what is built for this CPU (the kernels' -march=native
    library, XLA's compiled code), so that a cache shared between machines never loads another CPU's."""
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def use_compilation_cache() -> Path | None:
    """Keep the compiled programs (vision tower, prefill, decode step, scans) on disk, so that the next run of
    the demo or a CLI loads them instead of compiling again: a 2B bf16 first request on 2 CPU cores takes
    ~3 s instead of ~7.8 s of compiling. The demo and both CLIs call it; VLM_XLA_CACHE=0 turns it off, and
    a cache directory jax already has (JAX_COMPILATION_CACHE_DIR) is kept. One folder per jax version and
    CPU (its feature flags), so that a cache shared between machines never loads code built for another
    CPU. Returns the folder, or None when off."""
    import jax

    if os.environ.get("VLM_XLA_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    key = hashlib.sha256(f"{jax.__version__}\n{cpu_flags()}".encode()).hexdigest()[:16]
    folder = cache_dir() / "xla" / key
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the tiny model's programs too
    return folder
