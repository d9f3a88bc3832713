"""load_model: hub ids resolve through the Hugging Face cache (offline here), tied heads stay one array."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm import SamplingConfig, load_model, prepare_inputs, sample


def test_hub_id_loads_from_the_hf_cache_offline(tiny_dir, tmp_path, monkeypatch):
    """The default path for users: a hub id, served from the HF cache when HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hub" / "models--Qwen--Qwen3-VL-2B-Instruct"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model, params, tok = load_model("Qwen/Qwen3-VL-2B-Instruct")
    assert model.cfg.text.hidden_size == 64 and tok.decode(tok.encode("hello")) == "hello"


def test_tied_head_is_the_embedding_table(tiny_tied_dir):
    model, params, tok = load_model(tiny_tied_dir)
    assert model.cfg.tie_word_embeddings and "lm_head" not in params  # one array, not a copy
    inputs = prepare_inputs(model, params, tok, [None], ["Hello"])
    res = sample(model, params, inputs, SamplingConfig(temperature=0, max_new_tokens=4), jax.random.key(0))
    assert len(res.tokens[0]) == 4


def test_bfloat16_weights(tiny_dir):
    model, params, tok = load_model(tiny_dir, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    ref_model, ref_params, _ = load_model(tiny_dir, dtype="float32")
    inputs = prepare_inputs(model, params, tok, [None], ["Hello there"])
    cfg = SamplingConfig(temperature=0, max_new_tokens=3)
    a = sample(model, params, inputs, cfg, jax.random.key(0))
    b = sample(ref_model, ref_params, inputs, cfg, jax.random.key(0))
    assert np.allclose(a.logprobs[0][0], b.logprobs[0][0], atol=0.1)


def test_unknown_dtype_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dir, dtype="float8")


def test_auto_dtype_is_the_checkpoints_own(tiny_dir, tmp_path):
    """`auto` loads what config.json says: float32 for the tiny model, bfloat16 for the Qwen3-VL releases."""
    model, params, _ = load_model(tiny_dir)
    assert model.dtype == jnp.float32 and params["language_model"]["norm"]["weight"].dtype == jnp.float32
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_dir, bf16)
    cfg = json.loads((bf16 / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(cfg))
    model, params, _ = load_model(bf16)
    assert model.dtype == jnp.bfloat16 and params["language_model"]["norm"]["weight"].dtype == jnp.bfloat16
    model, params, _ = load_model(bf16, dtype="float32")
    assert params["language_model"]["norm"]["weight"].dtype == jnp.float32
