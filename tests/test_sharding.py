"""Sharding: the spec rules on the tiny config here; the 4-device checks in a subprocess.

jax reads XLA_FLAGS once, when its backend starts, so the meshes (1x4, 2x2, 4x1 of fake CPU devices)
run in `python -m pytest tests/sharding_multidevice.py` with
XLA_FLAGS=--xla_force_host_platform_device_count=4, leaving this session on its single device.
"""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from vlm import sharding as SH
from vlm.config import ModelConfig
from vlm.sharding import MODEL, P
from vlm.weights import expected_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return ModelConfig.from_dir(tiny_dir)


def test_multidevice_suite_in_subprocess(tiny_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env.pop("VLM_MODEL_MESH", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "sharding_multidevice.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and "11 passed" in summary, summary  # a skip would hide everything


def test_single_device_default_is_plain_placement(tiny_dir, monkeypatch):
    monkeypatch.delenv("VLM_MODEL_MESH", raising=False)
    assert SH.make_mesh("auto", jax.devices()[:1]) is None
    assert SH.make_mesh("1x1") is None
    from vlm import load_model

    _, params, _ = load_model(tiny_dir, dtype="float32")
    assert SH.mesh_of(params) is None
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(params))


def test_mesh_setting_errors():
    for bad in ["4", "2x", "ax2", "0x1", "1x2x2"]:
        with pytest.raises(ValueError, match="mesh"):
            SH.make_mesh(bad)
    with pytest.raises(ValueError, match="needs 64 devices"):
        SH.make_mesh("8x8")


def test_spec_rules_on_tiny(cfg):
    """The tiny model: 4 heads / 2 kv heads, intermediate 128, vocab 151936; vision 2 heads, intermediate 64."""
    col, row = P(MODEL, None), P(None, MODEL)
    shapes = expected_shapes(cfg)

    def spec(name, m):
        return SH.param_spec(name, shapes[name], cfg, m)[0]

    layer, block = "language_model.layers.0.", "visual.blocks.0."
    for m in (2, 4):
        assert spec("language_model.embed_tokens.weight", m) == col
        assert spec("lm_head.weight", m) == col
        assert spec(layer + "mlp.gate_proj.weight", m) == col
        assert spec(layer + "mlp.down_proj.weight", m) == row
        assert spec(block + "mlp.linear_fc1.bias", m) == P(MODEL)
        assert spec(block + "mlp.linear_fc2.weight", m) == row
        assert spec(block + "mlp.linear_fc2.bias", m) == P()
        assert spec(block + "attn.qkv.weight", m) == P()  # fused q|k|v rows: never split
        assert spec("visual.deepstack_merger_list.1.linear_fc1.weight", m) == col
        assert spec("visual.merger.linear_fc2.weight", m) == row
        for name in ["language_model.norm.weight", layer + "self_attn.q_norm.weight", "visual.pos_embed.weight",
                     "visual.patch_embed.proj.weight", block + "norm1.bias"]:
            assert spec(name, m) == P()
    # 2 kv heads: attention splits over 2, and is replicated over 4 (query heads alone are not split)
    for proj in "qkv":
        assert spec(layer + f"self_attn.{proj}_proj.weight", 2) == col
        assert spec(layer + f"self_attn.{proj}_proj.weight", 4) == P()
    assert spec(layer + "self_attn.o_proj.weight", 2) == row
    assert spec(layer + "self_attn.o_proj.weight", 4) == P()
    assert spec(block + "attn.proj.weight", 2) == row  # 2 vision heads
    assert spec(block + "attn.proj.weight", 4) == P()
    assert all(s == P() for s in SH.param_specs(cfg, None).values())
    table = {kind: why for kind, _, _, why in SH.spec_table(cfg, 4)}
    assert table["language_model.layers.*.self_attn.q_proj.weight"] == "replicated (kv_heads 2 not divisible by 4)"


def test_memory_per_device_8b():
    """Qwen3-VL-8B-Instruct (sizes from its config.json): weights split ~1/M, KV cache over kv heads and rows."""
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  deepstack_visual_indexes=[8, 16, 24])
    cfg = ModelConfig.from_dict({"text_config": text, "vision_config": vision, "tie_word_embeddings": False})
    one = SH.memory_per_device(cfg, 1, 1, 2)["weights"]
    assert 8.5e9 * 2 < one < 9.0e9 * 2  # 8.77B parameters in bf16
    four = SH.memory_per_device(cfg, 1, 4, 2, batch=1, cache_tokens=8192)
    qkv = 27 * (3 * 1152 * 1152 + 3 * 1152) * 2  # vision qkv projections stay whole
    assert one / 4 < four["weights"] < one / 4 + qkv + 2e7  # + norms, patch and position embeddings
    assert four["kv_cache"] == 2 * 36 * 8192 * 8 * 128 * 2 // 4
    dp = SH.memory_per_device(cfg, 2, 2, 2, batch=4, cache_tokens=8192)
    assert dp["kv_cache"] == 2 * 36 * 2 * 8192 * 8 * 128 * 2 // 2
