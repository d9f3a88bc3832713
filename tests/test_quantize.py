"""quantize="int8" (vlm/quantize.py): int8 text weights close to the float model, samplers still agree."""

import jax
import numpy as np
import pytest
from PIL import Image
from test_cli import PANDA, N, cli, library_answers  # the CLI run and the library's own answer
from test_model_parity import _all_logits  # logits at every prompt position

from vlm import SamplingConfig, load_model, prepare_inputs, sample, sample_streaming
from vlm.quantize import quantize_rows


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_quantize_rows_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 64)).astype(np.float32) * 0.02
    w[7] = 0  # an all-zero row
    w[9, 3] = 5.0  # one outlier: that row's step is 5/127
    q, scale = quantize_rows(w, chunk=64)  # several chunks, the last one partial
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (300,)
    assert np.abs(q).max() == 127 and not q[7].any()
    assert np.all(np.abs(q * scale[:, None] - w) <= scale[:, None] * (0.5 + 1e-5))
    np.testing.assert_allclose(scale[9], 5.0 / 127)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_logits_are_close_to_the_float_model(tiny_dir, tiny_tied_dir, tied):
    path = tiny_tied_dir if tied else tiny_dir
    ref_model, ref_params, tok = load_model(path, dtype="float32")
    model, params, _ = load_model(path, dtype="float32", quantize="int8")
    assert model.quantize == "int8"
    inputs = prepare_inputs(ref_model, ref_params, tok, [_image(256, 288, 0)], ["Describe this image in detail."])
    start = inputs.start[0]
    ref = _all_logits(ref_model, ref_params, inputs)[0, start:]
    got = _all_logits(model, params, inputs)[0, start:]
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref - ref.mean(-1, keepdims=True), axis=-1)
    # per position, the error against the logits' spread: a wrong scale or layout gives ~100%
    assert rel.mean() < 0.05 and rel.max() < 0.1, (rel.mean(), rel.max())
    agree = np.mean(got.argmax(-1) == ref.argmax(-1))
    assert agree >= 0.9, agree
    assert not np.allclose(got, ref, atol=1e-4), "int8 weights should not give the float model's exact numbers"


@pytest.fixture(scope="module")
def int8(tiny_dir):
    return load_model(tiny_dir, dtype="float32", quantize="int8")


def test_int8_weights_are_stored_as_int8(int8, tiny_dir):
    model, params, _ = int8
    lm = params["language_model"]
    for p in [lm["embed_tokens"], params["lm_head"], *lm["layers"][0]["self_attn"].values(),
              *lm["layers"][0]["mlp"].values()]:
        if "weight_scale" in p or p["weight"].ndim == 2:
            assert p["weight"].dtype == np.int8 and p["weight_scale"].shape == p["weight"].shape[:1]
    assert lm["norm"]["weight"].dtype == np.float32
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params["visual"]))  # the vision tower as loaded
    from vlm.weights import param_bytes

    _, full, _ = load_model(tiny_dir, dtype="float32")
    assert param_bytes(params) < 0.6 * param_bytes(full)


def test_int8_streaming_equals_scan(int8):
    model, params, tok = int8
    inputs = prepare_inputs(model, params, tok, [_image(256, 300, 1)], ["Tell me a story about it."])
    cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=24)
    streamed = list(sample_streaming(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok))
    res = sample(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok)
    assert [t for t, _, _ in streamed] == res.tokens[0]
    assert np.allclose([lp for _, _, lp in streamed], res.logprobs[0], atol=1e-5)


def test_bad_quantize_value_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="quantize must be one of none, int8"):
        load_model(tiny_dir, quantize="int4")


def test_cli_runs_int8_and_says_so(int8):
    out = cli("run_streaming.py", "model.name=tiny", "model.quantize=int8", f"inference.image={PANDA}",
              "inference.prompt=Describe this image", "sampling.temperature=0", f"sampling.max_new_tokens={N}")
    assert out.returncode == 0, out.stderr
    assert "(int8 weights)" in out.stderr
    assert out.stdout == library_answers(int8, [(PANDA, "Describe this image")], 0.0, 0)[0] + "\n"
