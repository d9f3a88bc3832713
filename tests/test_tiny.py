"""The tiny checkpoint is a real Hugging Face Qwen3-VL checkpoint: it loads cleanly and is deterministic."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from vlm import tiny

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _load(path):
    model, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    return model, info


@pytest.mark.parametrize("tied", [False, True])
def test_loads_in_transformers_without_missing_keys(tiny_dir, tiny_tied_dir, tied):
    path = tiny_tied_dir if tied else tiny_dir
    model, info = _load(path)
    assert {k: v for k, v in info.items() if v} == {}, info
    cfg = model.config
    assert cfg.tie_word_embeddings is tied
    assert cfg.text_config.hidden_size == tiny.TINY_SPEC["hidden_size"]
    assert cfg.text_config.rope_parameters["mrope_section"] == tiny.TINY_SPEC["mrope_section"]
    assert cfg.vision_config.deepstack_visual_indexes == tiny.TINY_SPEC["deepstack_visual_indexes"]
    assert cfg.image_token_id == 151655
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight) is tied


def test_tokenizer_and_generation_config(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<|image_pad|>"]) == [151645, 151655]
    gen = transformers.GenerationConfig.from_pretrained(tiny_dir)
    assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
    assert (gen.temperature, gen.top_p, gen.top_k, gen.do_sample) == (0.7, 0.8, 20, True)
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 262144}


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_deterministic_per_seed_and_cli(tmp_path, tiny_dir):
    out = subprocess.run(
        [sys.executable, "-m", "vlm.tiny", str(tmp_path / "a")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path / "a")
    assert _digest(tmp_path / "a") == _digest(tiny_dir)
    tiny.build_tiny(tmp_path / "b", seed=1)
    assert _digest(tmp_path / "b")["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]


def test_tiny_path_racing_processes_build_once(tmp_path, tiny_dir):
    env = {**os.environ, "VLM_CACHE": str(tmp_path)}
    code = "from vlm.tiny import tiny_path; print(tiny_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    final = tmp_path / tiny.TINY_VERSION
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(final)] * 2
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_VERSION]  # no temp dirs left behind
    assert _digest(final) == _digest(tiny_dir)


def test_greedy_decoding_varies_with_clear_margins(tiny_dir):
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=24, do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True
        )
    top2 = torch.stack(out.scores)[:, 0].topk(2).values
    margins = top2[:, 0] - top2[:, 1]
    assert len(set(out.sequences[0, ids.shape[1] :].tolist())) > 12
    assert (margins > 0.05).float().mean() > 0.8
