"""run.py and run_streaming.py end to end (subprocesses, tiny checkpoint), and their option errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from vlm import SamplingConfig, load_model, prepare_inputs, sample
from vlm.options import parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
PANDA = "examples/imgs/panda_climbing.png"
COFFEE = "examples/imgs/coffee_laptop.png"
N = 12  # new tokens per answer: enough to compare, quick to run


def cli(script: str, *args: str, timeout: float = 240, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_") or k == "VLM_CACHE"} | env_vars
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def library_answers(tiny, rows, temperature, seed) -> list[str]:
    """The library's own answers (batch sampler) for (image path or None, prompt) rows."""
    from vlm.processing import load_image

    model, params, tokenizer = tiny
    inputs = prepare_inputs(
        model,
        params,
        tokenizer,
        images=[load_image(ROOT / i) if i else None for i, _ in rows],
        prompts=[p for _, p in rows],
    )
    cfg = SamplingConfig(temperature=temperature, top_p=0.8, top_k=20, max_new_tokens=N)
    return sample(model, params, inputs, cfg, jax.random.key(seed), tokenizer=tokenizer).texts


def test_run_streaming_prints_the_library_greedy_answer(tiny):
    out = cli(
        "run_streaming.py",
        "model.name=tiny",
        f"inference.image={PANDA}",
        "inference.prompt=Describe this image",
        "sampling.temperature=0",
        f"sampling.max_new_tokens={N}",
        "sampling.seed=3",
    )
    assert out.returncode == 0, out.stderr
    expected = library_answers(tiny, [(PANDA, "Describe this image")], 0.0, 3)[0]
    assert expected and out.stdout == expected + "\n"
    assert "backend: cpu" in out.stderr and "tokens/s" in out.stderr and "first token after" in out.stderr


def test_run_prints_the_library_sampled_answer(tiny):
    # the original command's sampling flags, with a seed: same seed -> the library's own answer
    out = cli(
        "run.py",
        "model.name=tiny",
        f"inference.image={PANDA}",
        "inference.prompt=Describe this image",
        "sampling.temperature=0.9",
        f"sampling.max_new_tokens={N}",
        "sampling.top_p=0.8",
        "sampling.seed=7",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == library_answers(tiny, [(PANDA, "Describe this image")], 0.9, 7)[0] + "\n"
    assert "backend: cpu" in out.stderr and "tokens/s" in out.stderr


def test_run_batch_is_one_json_line_per_row(tiny):
    rows = [(PANDA, "Describe this image"), (COFFEE, "What is on the table?"), (None, "Say hi")]
    batch = f"[{PANDA}, {{image: {COFFEE}, prompt: 'What is on the table?'}}, {{prompt: Say hi}}]"
    out = cli(
        "run.py",
        "model.name=tiny",
        f"inference.batch={batch}",
        "sampling.temperature=0",
        f"sampling.max_new_tokens={N}",
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["image"], r["prompt"]) for r in lines] == rows
    assert [r["answer"] for r in lines] == library_answers(tiny, rows, 0.0, 0)
    assert "3 row(s)" in out.stderr


BAD_OPTIONS = [
    (["sampling.temp=1"], "unknown key 'sampling.temp' (did you mean sampling.temperature?)"),
    (["server.port=1"], "unknown key 'server.port'"),
    (["sampling.temperature=hot"], "sampling.temperature='hot': expected a number"),
    (["sampling.temperature=-1"], "sampling.temperature='-1': expected a number >= 0"),
    (["sampling.top_p=1.5"], "sampling.top_p='1.5': expected a number in (0, 1]"),
    (["sampling.top_k=2.5"], "sampling.top_k='2.5': expected an integer"),
    (["sampling.max_new_tokens=0"], "sampling.max_new_tokens='0': expected an integer >= 1"),
    (["model.dtype=fp16"], "model.dtype='fp16': expected one of auto, float32, bfloat16"),
    (["inference.batch=[{imag: a.png}]"], "inference.batch row"),
    (["Describe this image"], "expected key=value"),
    (["inference.prompt="], "inference.prompt='': expected a non-empty question"),
    (["inference.prompt=  "], "inference.prompt='  ': expected a non-empty question"),
    (["model.max_pixels=1000"], "model.max_pixels='1000': expected an integer >= 65536"),
    (["sampling.seed=-1"], "sampling.seed='-1': expected an integer in [0, 4294967295]"),
    (["sampling.seed=9223372036854775808"], "sampling.seed='9223372036854775808': expected an integer"),
]


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [("run.py", *case) for case in BAD_OPTIONS] + [("run_streaming.py", *case) for case in BAD_OPTIONS[:3]],
)
def test_bad_options_fail_with_one_line(script, args, needle):
    out = cli(script, *args, timeout=60)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "allowed keys" in lines[0] or "expected" in lines[0]


@pytest.mark.parametrize("script", ["run.py", "run_streaming.py"])
def test_bad_images_fail_with_one_line(script, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, needle in (
        (tmp_path / "missing.png", "no such image file"),
        (fake, "not a recognised image format"),
        (empty, "empty (0 bytes)"),
    ):
        out = cli(script, "model.name=tiny", f"inference.image={path}", timeout=60)
        assert out.returncode == 1, out.stderr
        assert out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(path.name) in lines[0], out.stderr


BAD_FILES = [
    ("corrupt.png", "corrupt.png is corrupt or truncated"),
    ("truncated.jpg", "truncated.jpg is corrupt or truncated"),
    ("bomb.png", "bomb.png is too large (over 100 megapixels)"),
    ("overcap.png", "the image is too large: 11000x10000 is over 100 megapixels"),
    ("1x4000.png", "the image is too long and thin (1x4000, aspect ratio 4000)"),
]


@pytest.mark.parametrize(
    ("script", "name", "needle"),
    [("run.py", *case) for case in BAD_FILES] + [("run_streaming.py", *case) for case in BAD_FILES[2:4]],
)
def test_bad_image_files_fail_with_one_line_before_loading_the_model(script, name, needle, test_images):
    out = cli(script, "model.name=tiny", f"inference.image={test_images[name]}", timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and needle in lines[0], out.stderr
    assert "backend:" not in out.stderr  # refused before the model was loaded


def test_unusual_images_are_answered_with_notes_on_stderr(test_images):
    names = ["rgba.png", "animated.gif", "exif_rotated.jpg", "large.png", "cmyk.jpg", "i16.tif", "float.tif", "1x1.png"]
    batch = "[" + ", ".join(str(test_images[n]) for n in names) + "]"
    out = cli(
        "run.py",
        "model.name=tiny",
        "model.max_pixels=65536",
        f"inference.batch={batch}",
        "sampling.max_new_tokens=2",
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(names)
    for name, note in [
        ("rgba.png", "RGBA: transparency composited on white"),
        ("animated.gif", "animated GIF: used the first of 3 frames"),
        ("exif_rotated.jpg", "EXIF orientation applied"),
        ("large.png", "downscaled from 2400x1800 to 288x192 (the budget is 0.066 MP per image)"),
        ("cmyk.jpg", "CMYK converted to RGB"),
        ("i16.tif", "16-bit image scaled to 8-bit"),
        ("float.tif", "32-bit float image scaled to 8-bit"),
        ("1x1.png", "enlarged from 1x1 to 256x256"),
    ]:
        assert f"note: {test_images[name]}: {note}" in out.stderr, (name, out.stderr)


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        ("run_streaming.py", ["inference.prompt=" + "1" * 4000], "the prompt is 4202 tokens; the model's context"),
        (
            "run.py",
            ["sampling.max_new_tokens=4000"],
            "the prompt is 205 tokens and sampling.max_new_tokens=4000: together over the model's context of 4096",
        ),
    ],
)
def test_over_long_prompt_fails_with_one_line(script, args, needle):
    out = cli(script, "model.name=tiny", f"inference.image={PANDA}", *args)
    assert out.returncode == 1 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: ") and needle in last, out.stderr
    assert "Traceback" not in out.stderr


def test_unloadable_model_fails_with_one_line(tmp_path):
    out = cli("run.py", f"model.name={tmp_path}", timeout=60)  # a folder without a checkpoint
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1].startswith(f"run.py: error: could not load model '{tmp_path}'")
    assert "Traceback" not in out.stderr


def test_compiled_programs_are_kept_for_the_next_run(tmp_path):
    """The CLIs keep what they compile in $VLM_CACHE/xla (jax's persistent compilation cache): the next run
    loads it (the files are not written again) and answers the same; VLM_XLA_CACHE=0 keeps nothing."""
    args = ("model.name=tiny", f"inference.image={PANDA}", "inference.prompt=Hi", "sampling.temperature=0",
            f"sampling.max_new_tokens={N}")
    first = cli("run_streaming.py", *args, VLM_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "xla").glob("*/jit_*")}
    assert {p.name.split("-")[0] for p in kept} >= {"jit__encode", "jit__prefill", "jit__step"}
    second = cli("run_streaming.py", *args, VLM_CACHE=str(tmp_path))
    assert second.returncode == 0 and second.stdout == first.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "xla").glob("*/jit_*")} == kept  # loaded, not rebuilt
    off = cli("run.py", *args, VLM_CACHE=str(tmp_path / "off"), VLM_XLA_CACHE="0")
    assert off.returncode == 0 and off.stdout.strip() == first.stdout.strip()
    assert not (tmp_path / "off" / "xla").exists()


def test_run_streaming_refuses_a_batch():
    out = cli("run_streaming.py", f"inference.batch=[{PANDA}]", timeout=60)
    assert out.returncode == 1 and "inference.batch is for run.py" in out.stderr


@pytest.mark.parametrize("script", ["run.py", "run_streaming.py", "app.py"])
def test_help_lists_every_key_with_its_default(script):
    out = cli(script, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    sections = ("model", "sampling", "server") if script == "app.py" else ("model", "sampling", "inference")
    defaults = parse([], sections, environ={})
    for section in sections:
        for key, value in vars(getattr(defaults, section)).items():
            shown = getattr(value, "value", value)
            shown = (
                "none"
                if shown is None
                else "[]"
                if shown == []
                else str(shown).lower()
                if isinstance(shown, bool)
                else shown
            )
            assert f"  {section}.{key}={shown}  [" in out.stdout, (section, key)
    assert ("server.host=127.0.0.1" in out.stdout) == (script == "app.py")


def test_environment_overrides_and_argv_wins():
    env = {
        "VLM_MODEL_NAME": "tiny",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "7999",
        "VLM_SERVER_PORT": "",
    }
    opts = parse(["server.port=8001"], ("model", "server"), environ=env)
    assert (opts.model.name, opts.server.host, opts.server.port) == ("tiny", "0.0.0.0", 8001)
    defaults = parse([], ("model", "server"), environ={})
    assert (defaults.server.host, defaults.server.share, defaults.server.concurrency) == ("127.0.0.1", False, 1)
    with pytest.raises(SystemExit) as e:
        parse([], ("server",), environ={"GRADIO_SERVER_PORT": "http"})
    assert e.value.code == 2
