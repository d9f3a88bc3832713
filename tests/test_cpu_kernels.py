"""The CPU kernels (vlm/cpu_kernels.cc): built here; products exact for their bf16 inputs, attention within
a bf16 rounding of XLA's; a row's result the same whatever the batch; used by bf16 decode steps, prefills
and the vision tower (and only where they apply); samplers still agree, batch rows equal rows alone."""

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm import SamplingConfig, cpu_kernels, load_model, prepare_inputs, sample, sample_streaming
from vlm import model as M
from vlm.cache import cpu_flags
from vlm import sampling as S
from vlm.ops import LayerOf, attention, matmul_t, segment_attention, segment_ranges


@pytest.fixture(autouse=True, scope="module")
def prefill_kernels_everywhere():
    """The prefill kernels (products of many rows, attention over key ranges) run where the build has
    AVX-512 or AVX2; elsewhere XLA's are faster, but the kernels are tested all the same: this module
    turns them on there (test_which_products_use_which_kernel checks the choice itself)."""
    assert cpu_kernels._load(), "the kernels should build here"
    native = cpu_kernels._native
    cpu_kernels._native = True
    jax.clear_caches()  # the choice is made while tracing
    yield
    cpu_kernels._native = native
    jax.clear_caches()


def _bf16(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _product(x, w, out_dtype=jnp.float32):
    return jax.jit(lambda x, w: matmul_t(x, w, out_dtype=out_dtype))(x, w)


def _uses_kernel(fn, *args, kernel="vlm_cpu_matvec_bf16") -> bool:
    return kernel in jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("rows,k,n", [(1, 2048, 300), (3, 64, 13), (16, 192, 37), (5, 64, 5), (1, 6144, 8),
                                      (17, 64, 13), (130, 2048, 300), (700, 96, 49), (64, 6144, 8)])
def test_kernel_is_the_f32_product_of_its_bf16_inputs(rows, k, n):
    rng = np.random.default_rng(rows * k + n)
    x, w = _bf16(rng, rows, k), _bf16(rng, n, k)
    kernel = "vlm_cpu_matvec_bf16" if rows <= cpu_kernels.MAX_ROWS else "vlm_cpu_matmul_bf16"
    assert _uses_kernel(lambda x, w: matmul_t(x, w), x, w, kernel=kernel), "the kernel should build and run here"
    got = np.asarray(_product(x, w))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T  # bf16 products are exact in f32
    assert np.abs(got - exact).max() <= 1e-6 * np.abs(exact).max() * np.sqrt(k)  # f32 accumulation only
    xla = x.astype(jnp.float32) @ w.astype(jnp.float32).T
    np.testing.assert_allclose(got, np.asarray(xla), rtol=1e-4, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize("rows,k,n", [(1, 2048, 300), (4, 64, 13), (16, 128, 9)])
def test_int8_kernel_is_xlas_int32_product_exactly(rows, k, n):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.integers(-127, 128, (rows, k)), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    got = jax.jit(cpu_kernels.matmul_t)(x, w)
    assert got.dtype == jnp.int32
    assert np.array_equal(np.asarray(got), np.asarray(x, np.int64) @ np.asarray(w, np.int64).T)


@pytest.mark.parametrize("build", ["portable", "avx2", "avx512", "avx512bf16", "amx"])
def test_the_other_builds_agree_with_the_native_one(build):
    """The code other CPUs get, built here where this CPU can run it: plain vector code (no AVX2), AVX2 with
    FMA (8-lane kernels, as on AMD Zen 2/3), AVX-512 without BF16 and VNNI (bf16 widened to f32 for
    FMAs, int8 by vpmaddwd), as on Intel servers whose VM hides BF16, AVX-512 with them (vdpbf16ps, as on
    AMD Zen 4), and with AMX tiles for the prefill product (Intel Sapphire Rapids and later)."""
    march = {("portable", "x86_64"): "x86-64-v2", ("portable", "aarch64"): "armv8-a", ("avx2", "x86_64"): "haswell",
             ("avx512", "x86_64"): "skylake-avx512", ("avx512bf16", "x86_64"): "cooperlake",
             ("amx", "x86_64"): "sapphirerapids"}.get((build, platform.machine()))
    if march is None:
        pytest.skip(f"no -march known for a {build} build on {platform.machine()}")
    needs = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw"},
             "avx512bf16": {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"},
             "amx": {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx512_fp16"}}
    if not needs.get(build, set()) <= set(cpu_flags().split()):
        pytest.skip(f"this CPU cannot run {build} code")
    lib = ctypes.cdll.LoadLibrary(str(cpu_kernels._build(march)))
    # the portable build leaves prefill to XLA's products; the AMX build runs them in tiles where Linux allows
    assert lib.VlmCpuKernelsNative() == (build != "portable")
    assert lib.VlmCpuKernelsAmx() == (build == "amx")
    cpu_kernels.register(lib, prefix=f"{build}_")
    rng = np.random.default_rng(2)
    for dtype, target in [(jnp.bfloat16, "vlm_cpu_matvec_bf16"), (jnp.int8, "vlm_cpu_matvec_int8")]:
        x = jnp.asarray(rng.integers(-100, 100, (5, 384)), dtype)
        w = jnp.asarray(rng.integers(-100, 100, (21, 384)), dtype)
        native = np.asarray(jax.jit(cpu_kernels.matmul_t)(x, w))
        out = jax.ShapeDtypeStruct(native.shape, native.dtype)
        other = np.asarray(jax.jit(jax.ffi.ffi_call(f"{build}_{target}", out))(x, jnp.int32(0), w))
        assert np.array_equal(other, native), dtype  # small integers: every partial sum is exact
    # 45 weight rows: the AMX build's tiles take 32 of them, its vector code the other 13; K = 320: two
    # blocks of k (128 pairs a block), 130 rows: three blocks of x
    for rows, n, k, live in [(70, 45, 96, [[3, 30], [0, 35]]), (130, 13, 320, [[0, 130]])]:
        x, w = (jnp.asarray(rng.integers(-30, 30, shape), jnp.bfloat16) for shape in [(rows, k), (n, k)])
        live = jnp.asarray(live, jnp.int32)  # first: two groups of 35 rows
        native = np.asarray(jax.jit(cpu_kernels.matmul_t)(x, w, live))
        call = jax.ffi.ffi_call(f"{build}_vlm_cpu_matmul_bf16", jax.ShapeDtypeStruct(native.shape, native.dtype))
        assert np.array_equal(np.asarray(jax.jit(call)(x, live, jnp.int32(0), w)), native)
    q, k, v = _bf16(rng, 2, 40, 4, 32), _bf16(rng, 2, 2, 40, 32), _bf16(rng, 2, 2, 40, 32)  # D = 32: AMX takes it
    runs = np.repeat([[0, 17, 36], [17, 36, 40]], [17, 19, 4], axis=1)  # three images' [lo, hi), 2 rows
    lo, hi = (jnp.asarray(np.tile(r, (2, 1)), jnp.int32) for r in runs)
    native = np.asarray(jax.jit(cpu_kernels.range_attention, static_argnums=5)(q, k, v, lo, hi, 0.2), np.float32)
    call = jax.ffi.ffi_call(f"{build}_vlm_cpu_range_attention_bf16", jax.ShapeDtypeStruct(q.shape, jnp.bfloat16))
    other = np.asarray(jax.jit(lambda *a: call(*a, scale=np.float32(0.2)))(q, k, v, lo, hi), np.float32)
    np.testing.assert_allclose(other, native, rtol=0, atol=2**-7 * np.abs(native).max())  # bf16 rounding


def test_a_rows_result_does_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    x, w = _bf16(rng, 16, 512), _bf16(rng, 99, 512)
    batch = np.asarray(_product(x, w))
    for r in (0, 5, 15):
        assert np.array_equal(np.asarray(_product(x[r : r + 1], w))[0], batch[r]), f"row {r}"
    assert np.array_equal(np.asarray(_product(x[3:10], w)), batch[3:10])
    x = _bf16(rng, 700, 4096)  # the matrix-matrix kernel: rows in chunks of 256, K in blocks
    batch = np.asarray(_product(x, w := _bf16(rng, 45, 4096)))  # AMX: 32 weight rows in tiles, 13 not
    for rows in (slice(0, 17), slice(100, 300), slice(7, 500), slice(300, 700)):
        assert np.array_equal(np.asarray(_product(x[rows], w)), batch[rows]), rows


def test_kernels_read_the_layer_they_are_given():
    """In the decoder's loop over layers a product gets every layer's weights and the layer's index, the
    decode attention a cache stacked over layers and the index: each reads that layer in place."""
    rng = np.random.default_rng(4)
    index = jax.jit(lambda f, i: f(i), static_argnums=0)  # the layer index traced, as in the loop
    for dtype, rows in [(jnp.bfloat16, 3), (jnp.int8, 3), (jnp.bfloat16, 40)]:
        x = jnp.asarray(rng.integers(-9, 9, (rows, 64)), dtype)
        ws = tuple(jnp.asarray(rng.integers(-9, 9, (24, 64)), dtype) for _ in range(3))
        for i in range(3):
            got = index(lambda i: cpu_kernels.matmul_t(x, ws, layer=i), i)
            assert np.array_equal(np.asarray(got), np.asarray(cpu_kernels.matmul_t(x, ws[i]))), (dtype, rows, i)
            layer = LayerOf(ws, jnp.int32(i))  # as vlm.ops.matmul_t sees it; f32: a switch over the layers
            for w in [layer, LayerOf(tuple(a.astype(jnp.float32) for a in ws), jnp.int32(i))]:
                want = matmul_t(x.astype(w.dtype), w.arrays[i], out_dtype=jnp.float32)
                assert np.array_equal(np.asarray(matmul_t(x.astype(w.dtype), w, out_dtype=jnp.float32)), want)
    with pytest.raises(Exception, match="layer index out of range"):
        np.asarray(index(lambda i: cpu_kernels.matmul_t(x, ws, layer=i), 3))
    q, keep = _bf16(rng, 2, 2, 4, 32), jnp.asarray(rng.random((2, 40)) < 0.7)
    k, v = _bf16(rng, 3, 2, 2, 40, 32), _bf16(rng, 3, 2, 2, 40, 32)  # [L, B, Kv, S, D]
    for i in range(3):
        got = index(lambda i: cpu_kernels.attend_one_query(q, k, v, keep, 0.3, layer=i), i)
        assert np.array_equal(np.asarray(got), np.asarray(cpu_kernels.attend_one_query(q, k[i], v[i], keep, 0.3)))


def test_the_matmul_kernel_computes_only_the_live_rows():
    """A bucket's padding (a prompt's left padding, the vision tower's patches after the images) is skipped:
    the live rows are the product's rows exactly (a row's numbers never depend on its neighbours), the
    others zero."""
    rng = np.random.default_rng(3)
    x, w = _bf16(rng, 3, 150, 512), _bf16(rng, 40, 512)  # 3 groups (prompt rows) of 150 slots
    full = np.asarray(_product(x, w))
    live = jnp.asarray([[20, 150], [0, 150], [149, 150]], jnp.int32)
    got = np.asarray(jax.jit(lambda x, w, live: matmul_t(x, w, out_dtype=jnp.float32, live=live))(x, w, live))
    keep = np.zeros((3, 150), bool)
    keep[0, 20:], keep[1, :], keep[2, 149:] = True, True, True
    assert np.array_equal(got[keep], full[keep])
    assert not got[~keep].any()
    empty = jnp.asarray([[0, 0], [5, 5], [150, 150]], jnp.int32)  # nothing live: all zero
    assert not np.asarray(jax.jit(lambda x, w, live: matmul_t(x, w, live=live))(x, w, empty)).any()


def test_which_products_use_which_kernel(monkeypatch):
    rng = np.random.default_rng(1)
    w = _bf16(rng, 64, 128)
    mm = lambda x, w, scale=None: matmul_t(x, w, scale=scale)  # noqa: E731
    matmul = "vlm_cpu_matmul_bf16"
    assert _uses_kernel(mm, _bf16(rng, 2, 3, 128), w)  # [B, T, K] activations: 6 rows, a decode step
    assert not _uses_kernel(mm, _bf16(rng, 2, 3, 128), w, kernel=matmul)
    prompt = _bf16(rng, 2, cpu_kernels.MAX_ROWS // 2 + 1, 128)  # [B, T, K], one row more: a prefill
    assert _uses_kernel(mm, prompt, w, kernel=matmul) and not _uses_kernel(mm, prompt, w)
    assert _uses_kernel(mm, _bf16(rng, 4, 1000, 128), w, kernel=matmul)
    int8, scale = jnp.ones((64, 128), jnp.int8), jnp.ones((64,), jnp.float32)
    assert _uses_kernel(mm, jnp.ones((16, 128)), int8, scale, kernel="vlm_cpu_matvec_int8")
    assert not _uses_kernel(mm, jnp.ones((17, 128)), int8, scale, kernel="custom_call")  # int8 prefill: XLA
    assert not _uses_kernel(mm, jnp.ones((1, 128)), w.astype(jnp.float32), kernel="custom_call")  # f32: XLA
    assert not _uses_kernel(mm, _bf16(rng, 1, 100), _bf16(rng, 64, 100), kernel="custom_call")  # K % 32 != 0
    assert cpu_kernels.range_attention_applies(_bf16(rng, 1, 2, 8, 64))
    monkeypatch.setattr(cpu_kernels, "_native", False)  # neither AVX-512 nor AVX2: prefill stays on XLA
    jax.clear_caches()  # the choice is made while tracing
    assert _uses_kernel(mm, _bf16(rng, 1, 128), w) and not _uses_kernel(mm, prompt, w, kernel="custom_call")
    assert not cpu_kernels.range_attention_applies(_bf16(rng, 1, 2, 8, 64))
    monkeypatch.setattr(cpu_kernels, "_native", True)
    monkeypatch.setenv("VLM_CPU_KERNELS", "0")
    jax.clear_caches()
    assert not _uses_kernel(mm, _bf16(rng, 1, 128), w, kernel="custom_call")
    assert not _uses_kernel(mm, prompt, w, kernel="custom_call")
    jax.clear_caches()


def test_decode_attention_kernel_matches_xlas(monkeypatch):
    """One query token over a bf16 cache, rows with different kept slots (left padding, the slot written)."""
    rng = np.random.default_rng(3)
    b, kv, g, d, slots = 3, 2, 4, 128, 200
    q = _bf16(rng, b, 1, kv, g, d)
    k, v = _bf16(rng, b, kv, slots, d), _bf16(rng, b, kv, slots, d)
    lo, hi = jnp.asarray([[0], [30], [100]], jnp.int32), jnp.full((b, 1), 151, jnp.int32)

    assert "vlm_cpu_attend_one_query_bf16" in jax.jit(attention).lower(q, k, v, lo, hi).as_text()
    ours = np.asarray(jax.jit(attention)(q, k, v, lo, hi), np.float32)
    xla = np.asarray(_xla_only(attention, q, k, v, lo, hi), np.float32)
    assert ours.shape == xla.shape == (b, 1, kv * g * d)
    np.testing.assert_allclose(ours, xla, rtol=0, atol=2**-8 * np.abs(xla).max())  # a bf16 rounding at most
    alone = np.asarray(jax.jit(attention)(q[1:2], k[1:2], v[1:2], lo[1:2], hi[1:2]), np.float32)
    assert np.array_equal(alone[0], ours[1])


def _xla_only(fn, *args):
    """fn(*args) traced with the kernels disabled (the XLA path)."""
    os.environ["VLM_CPU_KERNELS"] = "0"
    jax.clear_caches()  # the choice is made while tracing
    try:
        return jax.jit(fn)(*args)
    finally:
        del os.environ["VLM_CPU_KERNELS"]
        jax.clear_caches()


@pytest.mark.parametrize("runs,heads,d", [([196, 180, -28], 16, 64), ([50, 14, 11], 2, 16), ([100, -12], 3, 72),
                                          ([33], 1, 128)])
def test_vision_attention_kernel_matches_xlas(runs, heads, d):
    """The vision tower's attention: images of any size packed one after another (a negative run is
    padding, segment -1), any head_dim of Qwen3-VL's towers (2B: 64, 4B/8B: 72; tiny: 16)."""
    rng = np.random.default_rng(d)
    segment = jnp.asarray(np.concatenate([np.full(abs(n), i if n > 0 else -1) for i, n in enumerate(runs)]), jnp.int32)
    q, k, v = (_bf16(rng, len(segment), heads, d) * 2 for _ in range(3))
    lo, hi = (np.asarray(a)[:, None] for a in segment_ranges(segment))
    slot = np.arange(len(segment))
    assert np.array_equal((slot >= lo) & (slot < hi), np.asarray(segment)[:, None] == np.asarray(segment)[None])
    assert "vlm_cpu_range_attention_bf16" in jax.jit(segment_attention).lower(q, k, v, segment).as_text()
    ours = np.asarray(jax.jit(segment_attention)(q, k, v, segment), np.float32)
    xla = np.asarray(_xla_only(segment_attention, q, k, v, segment), np.float32)
    assert ours.shape == xla.shape == q.shape
    np.testing.assert_allclose(ours, xla, rtol=0, atol=2**-7 * np.abs(xla).max())  # a bf16 rounding at most
    assert (ours != xla).mean() < 0.01
    first = int(runs[0])  # the first image alone: the others do not change its rows
    alone = np.asarray(jax.jit(segment_attention)(q[:first], k[:first], v[:first], segment[:first]), np.float32)
    assert np.array_equal(alone, ours[:first])


def test_prompt_attention_kernel_matches_xlas():
    """A prefill's: causal after each row's left padding, grouped-query (16 query heads over 8 kv heads)."""
    rng = np.random.default_rng(5)
    b, t, kv, g, d = 3, 70, 8, 2, 128
    q, k, v = _bf16(rng, b, t, kv, g, d), _bf16(rng, b, kv, t, d), _bf16(rng, b, kv, t, d)
    lo, hi = M.prefill_ranges(jnp.asarray([0, 5, 69], jnp.int32), t)
    _check_range_attention(q, k, v, lo, hi)


def test_range_attention_kernel_takes_any_ranges():
    """Ranges in no order, of any length, over more keys than queries."""
    rng = np.random.default_rng(6)
    b, t, s, kv, g, d = 2, 40, 56, 2, 3, 32
    q, k, v = _bf16(rng, b, t, kv, g, d), _bf16(rng, b, kv, s, d), _bf16(rng, b, kv, s, d)
    lo = rng.integers(0, s - 1, (b, t))
    hi = lo + 1 + (rng.integers(0, s, (b, t)) % (s - lo))
    lo[0, :4], hi[0, :4] = [5, 0, 21, 0], [32, 32, 56, 1]  # a row past a 16-key boundary, then one from key 0
    _check_range_attention(q, k, v, jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32))


def _check_range_attention(q, k, v, lo, hi):
    assert "vlm_cpu_range_attention_bf16" in jax.jit(attention).lower(q, k, v, lo, hi).as_text()
    ours = np.asarray(jax.jit(attention)(q, k, v, lo, hi), np.float32)
    xla = np.asarray(_xla_only(attention, q, k, v, lo, hi), np.float32)
    assert ours.shape == xla.shape == (*q.shape[:2], np.prod(q.shape[2:]))
    np.testing.assert_allclose(ours, xla, rtol=0, atol=2**-7 * np.abs(xla).max())  # a bf16 rounding at most
    assert (ours != xla).mean() < 0.01


def test_range_attention_kernel_refuses_an_empty_range():
    q = jnp.ones((1, 4, 1, 16), jnp.bfloat16)
    k = jnp.ones((1, 1, 4, 16), jnp.bfloat16)
    lo, hi = jnp.asarray([[0, 0, 2, 2]], jnp.int32), jnp.asarray([[1, 2, 2, 4]], jnp.int32)
    with pytest.raises(Exception, match="key range"):
        jax.block_until_ready(jax.jit(cpu_kernels.range_attention, static_argnums=5)(q, k, k, lo, hi, 0.25))


@pytest.fixture(scope="module")
def bf16(tiny_dir):
    return load_model(tiny_dir, dtype="bfloat16")


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_bf16_decode_step_writes_the_cache_in_place(bf16):
    """A decode step writes one slot per layer cache; XLA:CPU widened a bf16 write to f32 and with it the
    whole cache, copying every layer's cache at every step (model._write_slots writes the bits instead)."""
    model, params, tok = bf16
    inputs = prepare_inputs(model, params, tok, [None], ["Hi"])
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=4).resolved(model)
    token, _, cache = S._start(model, params, inputs, cfg, jax.random.key(0))

    slot = inputs.prompt_tokens.shape[1]

    def step(params, token, cache):
        return M.decode(params, model.cfg, token, inputs.next_position, inputs.start, slot, cache)

    hlo = jax.jit(step, donate_argnums=2).lower(params, token, cache).compile().as_text()
    assert isinstance(cache["k"], jax.Array)  # stacked over layers: the decoder loops over them
    shape = ",".join(map(str, cache["k"].shape))
    assert f"bf16[{shape}]" in hlo
    assert f"f32[{shape}]" not in hlo
    assert not any(f"[{shape}]" in line for line in hlo.splitlines() if " copy(" in line)


def test_bf16_decoder_is_one_layer_in_a_loop_and_computes_the_unrolled_layers(bf16, monkeypatch):
    """On the kernels the decoder loops over its layers: a program holds one layer's products, which read
    the layer's weights and cache in place given every layer's and the index, and computes what the
    unrolled layers compute (up to where XLA rounds bf16 between its fusions, which differ)."""
    model, params, tok = bf16
    inputs = prepare_inputs(model, params, tok, [_image(224, 256, 0)], ["Describe this image."])
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=4).resolved(model)
    layers = model.cfg.text.num_hidden_layers
    assert layers > 1

    def run():
        token, _, cache = S._start(model, params, inputs, cfg, jax.random.key(0))
        slot = inputs.prompt_tokens.shape[1]

        def step(params, token, cache):
            return M.decode(params, model.cfg, token, inputs.next_position, inputs.start, slot, cache)[0]

        hlo = jax.jit(step).lower(params, token, cache).as_text()
        return token, np.asarray(jax.jit(step)(params, token, cache)), hlo.count("@vlm_cpu_matvec_bf16(")

    token, looped, products = run()
    assert products == 7 + 1  # q, k, v, o, gate, up, down; the lm head
    monkeypatch.setattr(M, "layer_loop", lambda dtype: False)
    jax.clear_caches()  # the choice is made while tracing
    unrolled_token, unrolled, products = run()
    assert products == 7 * layers + 1
    assert token == unrolled_token  # the prefill's
    assert np.abs(looped - unrolled).max() < 0.02 * (unrolled.max() - unrolled.min())
    assert np.argmax(looped) == np.argmax(unrolled)
    jax.clear_caches()


def test_bf16_decode_step_runs_on_the_kernel_and_matches_xla(bf16, monkeypatch):
    model, params, tok = bf16
    inputs = prepare_inputs(model, params, tok, [_image(224, 256, 0)], ["Describe this image."])
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=4).resolved(model)
    token, _, cache = S._start(model, params, inputs, cfg, jax.random.key(0))
    slot = inputs.prompt_tokens.shape[1]

    def step(params, token, cache):
        return M.decode(params, model.cfg, token, inputs.next_position, inputs.start, slot, cache)[0]

    assert _uses_kernel(step, params, token, cache)
    assert "vlm_cpu_attend_one_query_bf16" in jax.jit(step).lower(params, token, cache).as_text()
    ours = np.asarray(jax.jit(step)(params, token, cache))
    monkeypatch.setenv("VLM_CPU_KERNELS", "0")
    jax.clear_caches()  # the choice is made while tracing
    assert not _uses_kernel(step, params, token, cache)
    xla = np.asarray(jax.jit(step)(params, token, cache))
    assert np.abs(ours - xla).max() < 0.02 * (xla.max() - xla.min())  # bf16 rounding between layers
    assert np.argmax(ours) == np.argmax(xla)
    jax.clear_caches()


def test_bf16_vision_tower_runs_on_the_kernel_and_matches_xla(bf16):
    model, params, tok = bf16
    inputs = prepare_inputs(model, params, tok, [_image(224, 256, 0), _image(160, 96, 1)], ["Compare.", "Hi"])
    v = inputs.vision
    args = (params, v.patches, v.pos_taps, v.pos_weights, v.rope, v.segment)
    encode = model.jit(S._encode)
    assert "vlm_cpu_range_attention_bf16" in encode.lower(*args).as_text()
    real = v.num_patches // model.cfg.vision.spatial_merge_size**2  # the kernel skips the padding after them
    assert real < v.patches.shape[0] // 4
    ours = [np.asarray(a, np.float32)[..., :real, :] for a in encode(*args)]
    xla = [np.asarray(a, np.float32)[..., :real, :] for a in _xla_only(lambda *a: S._encode(model.cfg, *a), *args)]
    for a, b in zip(ours, xla):
        assert np.abs(a - b).max() < 0.02 * np.abs(b).max()  # bf16 rounding through the layers


def test_bf16_streaming_equals_scan_and_rows_equal_rows_alone(bf16):
    model, params, tok = bf16
    images, prompts = [_image(256, 300, 1), None, _image(200, 240, 2)], ["Tell me a story.", "Hi!", "What is it?"]
    sampled = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=32)
    greedy = SamplingConfig(temperature=0, max_new_tokens=24)
    batch = sample(model, params, prepare_inputs(model, params, tok, images, prompts), greedy, jax.random.key(0))
    for i in range(len(prompts)):
        alone = prepare_inputs(model, params, tok, [images[i]], [prompts[i]])
        streamed = [t for t, _, _ in sample_streaming(model, params, alone, sampled, jax.random.key(i), tokenizer=tok)]
        assert streamed == sample(model, params, alone, sampled, jax.random.key(i)).tokens[0], f"row {i}"
        assert batch.tokens[i] == sample(model, params, alone, greedy, jax.random.key(0)).tokens[0], f"row {i}"


def test_without_a_compiler_it_warns_once_and_uses_xla(tmp_path):
    code = """
import warnings, jax, jax.numpy as jnp
from vlm.ops import attention, matmul_t, segment_attention, segment_ranges
x, w = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    hlo = jax.jit(matmul_t).lower(x, w).as_text()
    y = jax.jit(matmul_t)(x, w)
    matmul_t(x, w)
print(len(caught), caught[0].message if caught else "", "custom_call" in hlo, float(y[0, 0]))
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "VLM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.startswith("1 vlm: could not build the CPU decode kernel (")
    assert out.rstrip().endswith("False 64.0")
