"""The JAX model computes transformers' numbers: vision tower, deepstack, prefill logits, cached decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from vlm import load_model, prepare_inputs
from vlm import model as M
from vlm import sampling as S
from vlm.weights import load_params

transformers = pytest.importorskip("transformers")


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load_model(tiny_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny_dir):
    m = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    return m.eval()


def _hf_row(inputs, row):
    """One unpadded row of VLMInputs as transformers tensors."""
    ids = inputs.prompt_tokens[row, inputs.start[row]:]
    return torch.tensor(ids[None].astype(np.int64))


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _logits_program(model, params, inputs):
    """The jitted image + prompt -> logits of every position, and its arguments."""
    def f(params, ids, positions, start, patches, taps, weights, rope, segment, vision_index):
        emb, ds = S.encode(params["visual"], model.cfg.vision, patches, taps, weights, rope, segment)
        h, _ = M.forward(params, model.cfg, ids, positions, start, emb, ds, vision_index)
        return M.lm_head(params, model.cfg, h)

    v = inputs.vision
    return jax.jit(f), (params, inputs.prompt_tokens, inputs.positions, inputs.start, v.patches, v.pos_taps,
                        v.pos_weights, v.rope, v.segment, inputs.vision_index)


def _all_logits(model, params, inputs):
    program, args = _logits_program(model, params, inputs)
    return np.asarray(program(*args))


def test_vision_tower_and_deepstack_match(ours, hf):
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [[_image(300, 260, 0), _image(520, 270, 1)]], ["two"])
    v = inputs.vision
    emb, ds = jax.jit(lambda p, *a: S.encode(p["visual"], model.cfg.vision, *a))(
        params, v.patches, v.pos_taps, v.pos_weights, v.rope, v.segment)
    with torch.no_grad():
        out = hf.model.visual(torch.tensor(v.patches[: v.num_patches]), grid_thw=torch.tensor(inputs.grid_thw))
    n = v.num_patches // 4
    ref = out.pooler_output.numpy()
    assert np.abs(np.asarray(emb)[:n] - ref).max() <= _tol(ref)
    assert len(out.deepstack_features) == ds.shape[0] == 3
    for k, feat in enumerate(out.deepstack_features):
        assert np.abs(np.asarray(ds[k])[:n] - feat.numpy()).max() <= _tol(feat.numpy())


def test_prefill_logits_match_one_and_two_images(ours, hf):
    model, params, tok = ours
    images = [_image(256, 256, 2), [_image(300, 200, 3), _image(180, 420, 4)]]
    prompts = ["Describe this image.", "Compare the two pictures, please, in a few words."]
    inputs = prepare_inputs(model, params, tok, images, prompts)
    logits = _all_logits(model, params, inputs)
    first = 0
    for row in range(2):
        ids = _hf_row(inputs, row)
        n_img = 1 if row == 0 else 2
        grid = torch.tensor(inputs.grid_thw[first:first + n_img])
        npatch = int(grid.prod(-1).sum())
        offset = int(inputs.grid_thw[:first].prod(-1).sum())
        pixels = torch.tensor(inputs.vision.patches[offset:offset + npatch])
        first += n_img
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=(ids == model.cfg.image_token_id).long()).logits[0].numpy()
            pos, delta = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == model.cfg.image_token_id).int(),
                                                 image_grid_thw=grid)
        s = inputs.start[row]
        assert np.array_equal(inputs.positions[:, row, s:], pos[:, 0].numpy())
        assert inputs.rope_deltas[row] == int(delta[0, 0])
        ours_row = logits[row, s:]
        assert np.abs(ours_row - ref).max() <= _tol(ref), np.abs(ours_row - ref).max()
        assert (ours_row.argmax(-1) == ref.argmax(-1)).all()


def test_kv_cache_decode_matches_full_forward(ours):
    """Logits of token n+1 through the cache equal a full forward over the extended sequence, for 5 steps."""
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [_image(256, 320, 5)], ["What is shown?"])
    cfg = S.SamplingConfig(temperature=0, max_new_tokens=8).resolved(model)
    token, _, cache = S._start(model, params, inputs, cfg, jax.random.key(0))
    p, steps = inputs.prompt_tokens.shape[1], 5
    decode = jax.jit(lambda params, cache, t, pos, idx: M.decode(params, model.cfg, t, pos, inputs.start, idx, cache))
    generated, step_logits = [], []
    for i in range(steps):
        generated.append(int(token[0]))
        logits, cache = decode(params, cache, token, inputs.next_position + i, p + i)
        step_logits.append(np.asarray(logits[0]))
        token = jnp.argmax(logits, -1).astype(jnp.int32)
    # the same sequence in one forward: prompt (left-padded to P) + the generated tokens
    ext = dataclasses.replace(
        inputs,
        prompt_tokens=np.concatenate([inputs.prompt_tokens, [generated]], axis=1),
        positions=np.concatenate([inputs.positions, np.broadcast_to(inputs.next_position + np.arange(steps),
                                                                    (3, 1, steps))], axis=2),
        vision_index=np.concatenate([inputs.vision_index, -np.ones((1, steps), np.int32)], axis=1),
        lengths=inputs.lengths + steps,
    )
    full = _all_logits(model, params, ext)[0, p:]
    for i in range(steps):
        assert np.abs(step_logits[i] - full[i]).max() <= _tol(full[i])


def test_float32_products_ask_for_full_f32(ours):
    """Every product of the f32 model asks for f32 precision: a GPU's default for f32 is TF32, which failed
    the three tests above on an H200 (errors 15-45x their tolerance). A CPU computes the same either way,
    so this reads the program."""
    model, params, tok = ours
    program, args = _logits_program(model, params, prepare_inputs(model, params, tok, [_image(64, 64, 0)], ["Hi"]))
    products = [line for line in program.lower(*args).as_text().splitlines() if "dot_general" in line]
    assert len(products) > 10 and all("precision = [HIGHEST, HIGHEST]" in line for line in products)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_the_key(tiny_dir, tmp_path, problem):
    import shutil

    from safetensors.numpy import save_file

    from vlm.weights import read_safetensors

    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    tensors = {k: np.array(v) for f in tiny_dir.glob("*.safetensors") for k, v in read_safetensors(f).items()}
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    if problem == "missing":
        del tensors[key]
        key_in_message = "language_model.layers.1.mlp.up_proj.weight"
    elif problem == "extra":
        key_in_message = "model.language_model.layers.1.mlp.bogus.weight"
        tensors[key_in_message] = np.zeros(3, np.float32)
    else:
        tensors[key] = tensors[key][:, :-1].copy()
        key_in_message = key
    save_file(tensors, str(tmp_path / "model.safetensors"))
    from vlm.config import ModelConfig

    with pytest.raises(ValueError, match=key_in_message.replace(".", r"\.")):
        load_params(tmp_path, ModelConfig.from_dir(tmp_path), jnp.float32)
