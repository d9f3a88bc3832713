"""glibc malloc settings for a long-running process: requests reuse the heap's memory instead of page-faulting
fresh memory each time, and what compiles free goes back to the OS.

The demo, both CLIs and the benchmark call `tune_malloc()` at start; a Python API user may call it too.
`release_free_memory()` runs after each compile (`Qwen3VL.jit`) and after loading (`load_model`).
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc(arenas: int | None = None) -> None:
    """Blocks under 32 MiB come from the heap, and the heap keeps up to 64 MiB of free memory at its top:
    a batch-1 request's large blocks (XLA's scratch for a program, 5-33 MB for the 2B model; the prefill
    kernels' packed rows) then reuse the last request's pages. With their own mmap each (glibc's default
    from 128 KiB, or the 4 MiB this set before), every request page-faulted them in anew: ~150k faults per
    2B image request on a 2-core Xeon VM, where the vision tower and the prompt's prefill each took 20-50 %
    longer (interleaved in one process: 4.1-5.4 s against 3.4-3.6 s for the tower). Larger blocks, which
    grow with the batch (a batch-8 KV cache: two 59 MB arrays; its prefill's scratch 49 MB), get their own
    mmap and go back to the OS when freed: from the heap they left free holes that the next request's
    blocks did not fit (the benchmark's whole run with batches 1-8: peak 4.81 -> 4.69 GiB, resting after a
    batch-8 request 4.70 -> 4.53), at ~0.5-1 us a page to fault them in again (~40 ms of a 10 s batch-8
    request). glibc's defaults also raise both thresholds as large blocks are freed (to 32 and 64 MiB),
    so fixed values behave the same in every run; what compiles free goes back to the OS through
    `release_free_memory`.
    `arenas` caps malloc's arenas (one per allocating thread, up to 8 per core by default): a server's pool
    threads each keep what their requests freed in their own arena (the demo uses 2; tests/test_load.py's
    soak). Call it before threads start. A no-op off glibc."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    if arenas is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (malloc_trim), not only its free top. A compile leaves
    ~0.1-0.2 GiB of freed blocks between live ones, in the heaps of the threads that compiled: measured on
    the 2B model (bf16), RSS after a batch-8 scan's two compiles 4.84 -> 4.69 GiB, ~15 ms a call. A no-op
    off glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
