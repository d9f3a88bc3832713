"""Dotted `key=value` options shared by app.py, run.py and run_streaming.py (OmegaConf structured configs).

    python run.py inference.image=examples/imgs/panda_climbing.png sampling.temperature=0.9

Precedence: defaults < environment (`VLM_SECTION_KEY`, plus GRADIO_SERVER_NAME / GRADIO_SERVER_PORT) < argv.
Only the standard library and OmegaConf are imported here, so `--help` and bad options answer at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DEFAULT_MODEL = "Qwen/Qwen3-VL-2B-Instruct"


class Dtype(enum.StrEnum):
    """Parameter dtype; `auto` is the checkpoint's own (bfloat16 for Qwen3-VL, float32 for the tiny model)."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


def _opt(default: Any, help: str, check: tuple[Callable[[Any], bool], str] | None = None, env: str | None = None):
    """A dataclass field with a --help line, an optional range check (predicate, wording) and an extra env name."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "check": check, "env": env}, **kw)


class Quantize(enum.StrEnum):
    """Text decoder weights: as loaded (`none`) or int8 (vlm/quantize.py)."""

    none = "none"
    int8 = "int8"


@dataclass
class ModelOptions:
    name: str = _opt(
        DEFAULT_MODEL,
        "hub id (e.g. Qwen/Qwen3-VL-4B-Instruct), local checkpoint dir, or 'tiny' (offline, random weights)",
    )
    dtype: Dtype = _opt(Dtype.auto, "parameter dtype: auto | float32 | bfloat16")
    quantize: Quantize = _opt(
        Quantize.none,
        "int8: text decoder weights and activations in int8 (one device): ~1.5x faster decode than bf16 on a "
        "CPU in 40% less memory; answers close to, not the same as, the unquantized model's",
    )
    max_pixels: int = _opt(
        1_048_576,
        "most pixels per image for the vision tower; larger images are downscaled, with a note "
        "(the checkpoint's own limit applies when lower; Qwen3-VL's is 16777216)",
        (lambda v: v >= 65_536, "an integer >= 65536 (the model's smallest input)"),
    )
    mesh: str = _opt(
        "auto",
        "device mesh DATAxMODEL to shard over (e.g. 1x4, 2x2); auto = all devices on 'model', none with one device",
        (lambda v: v == "auto" or re.fullmatch(r"\d+x\d+", v) is not None, "'auto' or DATAxMODEL such as 1x4"),
    )


@dataclass
class SamplingOptions:
    temperature: float = _opt(0.7, "softmax temperature; 0 = greedy", (lambda v: v >= 0, "a number >= 0"))
    top_p: float = _opt(0.8, "nucleus sampling mass, in (0, 1]; 1 = off", (lambda v: 0 < v <= 1, "a number in (0, 1]"))
    top_k: int = _opt(20, "keep the k most likely tokens; 0 = off", (lambda v: v >= 0, "an integer >= 0"))
    max_new_tokens: int = _opt(256, "most tokens to generate", (lambda v: v >= 1, "an integer >= 1"))
    seed: int = _opt(
        0, "random seed (same seed, same answer)", (lambda v: 0 <= v <= 2**32 - 1, "an integer in [0, 4294967295]")
    )


@dataclass
class BatchItem:
    image: str | None = None
    prompt: str | None = None


@dataclass
class InferenceOptions:
    image: str | None = _opt(None, "image file for the question (omit for a text-only question)")
    prompt: str = _opt("Describe this image", "the question", (lambda v: bool(v.strip()), "a non-empty question"))
    batch: list[BatchItem] = _opt(
        list,
        "run.py: several rows in one scan, a YAML list of paths or {image, prompt}: "
        "\"[a.png, {image: b.png, prompt: 'What colour?'}]\"; a row without prompt uses inference.prompt",
    )


@dataclass
class ServerOptions:
    host: str = _opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the demo to your network", env="GRADIO_SERVER_NAME")
    port: int = _opt(
        7860, "port to listen on", (lambda v: 1 <= v <= 65535, "an integer in [1, 65535]"), env="GRADIO_SERVER_PORT"
    )
    share: bool = _opt(False, "create a public gradio.live link (off unless asked)")
    queue_size: int = _opt(32, "requests waiting at most; more are refused", (lambda v: v >= 1, "an integer >= 1"))
    concurrency: int = _opt(
        1, "generations run at once (others queue and see their position)", (lambda v: v >= 1, "an integer >= 1")
    )
    max_upload_mb: float = _opt(10.0, "largest upload accepted, in MB", (lambda v: v > 0, "a number > 0"))
    max_prompt_chars: int = _opt(
        4000,
        "longest question accepted, in characters (the whole conversation: 8x this)",
        (lambda v: v >= 1, "an integer >= 1"),
    )
    max_programs: int = _opt(
        24,
        "compiled programs kept (one per shape: image size, prompt and answer length; ~15 MB each for the 2B model "
        "in bf16 on a CPU, ~50 in f32); past this, all are dropped before the next request and compile again as "
        "needed (~0.5-1 s each from the on-disk cache); 0 = keep all",
        (lambda v: v >= 0, "an integer >= 0"),
    )
    debug: bool = _opt(False, "show the text of unexpected errors in the page (tracebacks always go to the terminal)")


@dataclass
class Options:
    model: ModelOptions = field(default_factory=ModelOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    server: ServerOptions = field(default_factory=ServerOptions)


def _fields(sections: Sequence[str]) -> dict[str, dataclasses.Field]:
    """Dotted key -> dataclass field, for the given sections in declaration order."""
    out = {}
    for sec in dataclasses.fields(Options):
        if sec.name in sections:
            for f in dataclasses.fields(sec.default_factory):
                out[f"{sec.name}.{f.name}"] = f
    return out


def _type_name(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = globals().get(t)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "|".join(member.value for member in kind)
    return {"str | None": "str", "list[BatchItem]": "list"}.get(t, t)


def _env_name(key: str) -> str:
    return "VLM_" + key.upper().replace(".", "_")


def help_text(prog: str, sections: Sequence[str]) -> str:
    """Every key with its type, default and a one-line description."""
    lines = [f"usage: python {prog} [key=value ...]", "", "options (environment: VLM_SECTION_KEY=value; argv wins):"]
    defaults = Options()
    for key, f in _fields(sections).items():
        sec, name = key.split(".")
        default = getattr(getattr(defaults, sec), name)
        default = default.value if isinstance(default, enum.Enum) else default
        default = (
            "none"
            if default is None
            else "[]"
            if default == []
            else str(default).lower()
            if isinstance(default, bool)
            else default
        )
        env = f" (env {f.metadata['env']})" if f.metadata.get("env") else ""
        lines.append(f"  {key}={default}  [{_type_name(f)}]\n      {f.metadata['help']}{env}")
    return "\n".join(lines)


class OptionError(ValueError):
    """A bad option, with a one-line message naming the key and what it accepts."""


def _parse_batch(raw: str) -> list[dict]:
    """YAML list of paths or {image, prompt} mappings -> list of dicts."""
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"batch={raw}"]))["batch"]
    except Exception as e:  # yaml.YAMLError, OmegaConf grammar errors
        msg = " ".join(str(e).split())
        raise OptionError(
            f"inference.batch is not a valid YAML list ({msg[:120]}); put prompts with : ? , in single quotes"
        ) from None
    if not isinstance(value, list):
        raise OptionError(
            f"inference.batch={raw!r}: expected a YAML list like \"[a.png, {{image: b.png, prompt: 'Hi?'}}]\""
        )
    rows = []
    for item in value:
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or set(item) - {"image", "prompt"}:
            raise OptionError(f"inference.batch row {item!r}: expected a path or a mapping with keys image, prompt")
        rows.append({k: None if v is None else str(v) for k, v in item.items()})
    return rows


def parse_overrides(overrides: Sequence[tuple[str, str, str]], sections: Sequence[str]) -> Options:
    """(source, key, raw value) triples -> validated Options; raises OptionError with a one-line message."""
    fields = _fields(sections)
    cfg = OmegaConf.structured(Options)
    OmegaConf.set_struct(cfg, True)
    for source, key, raw in overrides:
        where = f"{source}: " if source else ""
        if key not in fields:
            close = [k for k in fields if key and k.startswith(key)] or difflib.get_close_matches(
                key, list(fields), n=1
            )
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise OptionError(f"{where}unknown key {key!r}{hint}; allowed keys: {', '.join(fields)}")
        f = fields[key]
        try:
            if key == "inference.batch":
                cfg.inference.batch = OmegaConf.merge(
                    OmegaConf.structured(InferenceOptions), {"batch": _parse_batch(raw)}
                ).batch
            elif key == "inference.image":
                OmegaConf.update(cfg, key, raw or None, merge=False)
            else:
                OmegaConf.update(cfg, key, raw, merge=False)
        except OmegaConfBaseException as e:
            kind = _type_name(f)
            expected = {"float": "a number", "int": "an integer", "bool": "true or false"}.get(
                kind, f"one of {kind.replace('|', ', ')}"
            )
            raise OptionError(f"{where}{key}={raw!r}: expected {expected}") from e
        check = f.metadata.get("check")
        sec, name = key.split(".")
        if check and not check[0](cfg[sec][name]):
            raise OptionError(f"{where}{key}={raw!r}: expected {check[1]}")
    return OmegaConf.to_object(cfg)


def _env_overrides(sections: Sequence[str], environ: dict[str, str]) -> list[tuple[str, str, str]]:
    out = []
    for key, f in _fields(sections).items():
        for name in (f.metadata.get("env"), _env_name(key)):  # VLM_* is read last, so it wins
            if name and environ.get(name, "") != "":
                out.append((f"environment {name}", key, environ[name]))
    return out


def parse(
    argv: Sequence[str], sections: Sequence[str], prog: str | None = None, environ: dict[str, str] | None = None
) -> Options:
    """Parse `key=value` argv (+ environment) into Options; a bad option prints one line and exits 2; --help exits 0."""
    prog = prog or os.path.basename(sys.argv[0] or "run.py")
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(prog, sections))
        sys.exit(0)
    try:
        overrides = _env_overrides(sections, dict(os.environ) if environ is None else environ)
        for arg in argv:
            key, sep, raw = arg.partition("=")
            if not sep:
                raise OptionError(f"expected key=value, got {arg!r}; allowed keys: {', '.join(_fields(sections))}")
            overrides.append(("", key.strip(), raw))
        return parse_overrides(overrides, sections)
    except OptionError as e:
        print(f"{prog}: error: {e}  (see --help)", file=sys.stderr)
        sys.exit(2)


def load_args(opts: Options) -> dict[str, Any]:
    """The model section as load_model's keyword arguments (after the name)."""
    m = opts.model
    return {"dtype": None if m.dtype is Dtype.auto else m.dtype.value, "mesh": m.mesh, "quantize": m.quantize.value}
