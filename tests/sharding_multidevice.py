"""Sharded == single device on 4 fake CPU devices. Run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (jax reads it once, at backend start-up)."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from PIL import Image

from vlm import SamplingConfig, load_model, prepare_inputs, sample, sample_streaming
from vlm import model as M
from vlm import sampling as S
from vlm import sharding as SH
from vlm.sharding import DATA, MODEL, P

if jax.device_count() != 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (see tests/test_sharding.py)",
                allow_module_level=True)

MESHES = ["1x4", "2x2", "4x1"]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=24)
DRAWN = SamplingConfig(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=8)  # same compiled programs


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _requests(model, params, tok):
    image = _image(300, 260, 0)
    batch = prepare_inputs(model, params, tok, [image, None], ["Describe this image.", "Write a haiku about rain."])
    single = prepare_inputs(model, params, tok, [image], ["Describe this image."])
    return batch, single


def _logits(model, params, inputs):
    """All prompt-position logits [B, P, V] through the vision tower and the decoder, on the params' mesh."""
    mesh = SH.mesh_of(params)
    inputs, dev = S._device_inputs(inputs, mesh)
    v = dev["vision"]
    emb, ds = model.jit(S._encode)(params, v.patches, v.pos_taps, v.pos_weights, v.rope, v.segment)

    def f(params, ids, positions, start, emb, ds, vision_index):
        h, _ = M.forward(params, model.cfg, ids, positions, start, emb, ds, vision_index)
        return M.lm_head(params, model.cfg, h)

    out = jax.jit(f)(params, dev["prompt_tokens"], dev["positions"], dev["start"], emb, ds, dev["vision_index"])
    return np.asarray(out)[: inputs.num_rows]


def _run(model, params, tok, stream: bool = True):
    batch, single = _requests(model, params, tok)
    out = {"sample": sample(model, params, batch, GREEDY, jax.random.key(0), tokenizer=tok),
           "drawn": sample(model, params, batch, DRAWN, jax.random.key(1)),
           "logits": _logits(model, params, batch)}
    if stream:
        out["stream"] = list(sample_streaming(model, params, single, GREEDY, jax.random.key(0), tokenizer=tok))
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The plain single-device path (mesh 1x1 = no mesh), on device 0. Its streamed tokens are its batch
    row 0 (tests/test_sampling.py checks that), so streaming is compared with that row."""
    model, params, tok = load_model(tiny_dir, dtype="float32", mesh="1x1")
    assert SH.mesh_of(params) is None
    return _run(model, params, tok, stream=False)


@pytest.fixture(scope="module", params=MESHES)
def sharded(request, tiny_dir):
    model, params, tok = load_model(tiny_dir, dtype="float32", mesh=request.param)
    return request.param, model, params, tok, _run(model, params, tok)


def test_greedy_and_logits_equal_single_device(reference, sharded):
    name, _, _, _, got = sharded
    ref = reference
    assert len(set(ref["sample"].tokens[0])) > 5, "weak comparison: the tiny model repeats one token"
    assert got["sample"].tokens == ref["sample"].tokens, name
    assert got["sample"].texts == ref["sample"].texts, name
    for a, b in zip(got["sample"].logprobs, ref["sample"].logprobs):
        assert np.allclose(a, b, atol=1e-4), name
    assert [t for t, _, _ in got["stream"]] == ref["sample"].tokens[0], name
    assert np.allclose([lp for _, _, lp in got["stream"]], ref["sample"].logprobs[0], atol=1e-4), name
    assert "".join(x for _, x, _ in got["stream"]) == ref["sample"].texts[0]
    assert got["drawn"].tokens == ref["drawn"].tokens, name  # sampling: same key, same draws
    diff = np.abs(got["logits"] - ref["logits"]).max()
    assert diff < 1e-4, f"{name}: prefill logits differ by {diff}"


def _expected_spec(name: str, data: int, model: int) -> P:
    """Written out for the tiny model (2 kv heads, 2 vision heads; every other split dimension divides by 4)."""
    col, row = P(MODEL, None), P(None, MODEL)
    if model == 1:
        return P()
    attention = model == 2  # kv heads (2) and vision heads (2) divide 2 but not 4
    table = [
        (r"language_model\.embed_tokens\.weight|lm_head\.weight", col),
        (r".*self_attn\.[qkv]_proj\.weight", col if attention else P()),
        (r".*self_attn\.o_proj\.weight", row if attention else P()),
        (r".*mlp\.(gate|up)_proj\.weight", col),
        (r".*mlp\.down_proj\.weight", row),
        (r".*attn\.proj\.weight", row if attention else P()),
        (r".*linear_fc1\.weight", col),
        (r".*linear_fc1\.bias", P(MODEL)),
        (r".*linear_fc2\.weight", row),
    ]
    return next((spec for pattern, spec in table if re.fullmatch(pattern, name)), P())


def _flat(params, prefix=""):
    if isinstance(params, dict):
        for k, v in params.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(params, list):
        for i, v in enumerate(params):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], params


def test_weight_shardings_and_bytes_per_device(sharded):
    name, _, params, _, _ = sharded
    data, model = SH.parse_mesh_shape(name)
    mesh = SH.mesh_of(params)
    assert dict(mesh.shape) == {DATA: data, MODEL: model}
    per_device, split_total, whole_total = {d: 0 for d in mesh.devices.flat}, 0, 0
    for key, x in _flat(params):
        expected = _expected_spec(key, data, model)
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, expected), x.ndim), f"{name} {key}: {x.sharding}"
        if expected == P():
            whole_total += x.nbytes
            continue
        split_total += x.nbytes
        for shard in x.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
            assert shard.data.shape[expected.index(MODEL)] == x.shape[expected.index(MODEL)] // model
    if model > 1:
        assert split_total > 5 * whole_total  # most bytes are split: embedding, head, MLPs
        assert set(per_device.values()) == {split_total // model}, per_device


def test_kv_cache_and_rows_sharding(sharded):
    name, model, params, tok, _ = sharded
    data, size = SH.parse_mesh_shape(name)
    mesh = SH.mesh_of(params)
    batch, _ = _requests(model, params, tok)
    cfg = GREEDY.resolved(model)
    inputs, dev = S._device_inputs(batch, mesh)
    assert inputs.prompt_tokens.shape[0] % data == 0  # 2 rows padded to 4 on 4x1
    assert dev["prompt_tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(DATA if data > 1 else None)), 2)
    token, _, cache = S._start(model, params, inputs, cfg, jax.random.key(0), dev)
    kv_heads = MODEL if size == 2 else None  # 2 kv heads
    leaves = jax.tree.leaves(cache)  # whatever the cache layout: each array ends in [B, kv_heads, S, head_dim]
    for x in leaves:
        lead = [None] * (x.ndim - 4)
        expected = NamedSharding(mesh, P(*lead, DATA if data > 1 else None, kv_heads, None, None))
        assert x.sharding.is_equivalent_to(expected, x.ndim), f"{name}: {x.sharding.spec}"
    if size == 1:
        return
    # the decode step must never gather the whole cache (a replicated cache beside split query heads did)
    step = model.jit(S._step, donate_argnames="cache", static_argnames="mesh")
    hlo = step.lower(params, cache, token, dev["next_position"], dev["start"], np.int32(64), np.int32(0),
                     jax.random.key(0), *S._knobs(cfg), mesh=mesh).compile().as_text()
    for shape in {x.shape for x in leaves}:
        whole = r"= \w+" + re.escape("[" + ",".join(map(str, shape)) + "]") + r"\S* all-gather"
        assert not re.search(whole, hlo), f"{name}: the decode step all-gathers the KV cache"


def test_mesh_settings_on_four_devices():
    assert dict(SH.make_mesh("auto").shape) == {DATA: 1, MODEL: 4}  # several devices: all on `model`
    assert dict(SH.make_mesh("2x1").shape) == {DATA: 2, MODEL: 1}  # a subset of the devices
    explicit = jax.make_mesh((2, 2), (DATA, MODEL))  # jax's default axis type is Explicit
    assert SH.make_mesh(explicit).axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_int8_refuses_a_mesh_and_runs_on_one_device(tiny_dir):
    with pytest.raises(ValueError, match="quantize='int8' runs on one device; this mesh has 4"):
        load_model(tiny_dir, quantize="int8")  # "auto": all four devices
    model, params, _ = load_model(tiny_dir, quantize="int8", mesh="1x1")
    assert params["language_model"]["embed_tokens"]["weight"].dtype == np.int8
