"""Answer one question about an image, printing tokens as they come.

    python run_streaming.py inference.image=examples/imgs/panda_climbing.png inference.prompt="Describe this image"
    python run_streaming.py model.name=tiny ...      # offline, random weights
    python run_streaming.py --help                   # every key with its default

stdout carries only the answer; the backend, load time and speed go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

from vlm.options import Options, load_args, parse

# If a backend cannot reuse a donated KV cache buffer, jax warns at every compile and copies instead: noise here.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(prog: str, msg: str) -> int:
    """One line on stderr, exit status 1."""
    log(f"{prog}: error: {' '.join(str(msg).split())}")
    return 1


def load_image(prog: str, path: str | None):
    """Path -> RGB image; None for a text-only question. Raises SystemExit(1) with one line on a bad file.
    Runs before the model loads, so a bad file fails at once; what was changed goes to stderr as notes."""
    if path is None:
        return None
    from vlm.processing import ImageError, load_image_with_notes

    try:
        image, notes = load_image_with_notes(path)
    except (ImageError, OSError) as e:  # the library's message names the file and what is wrong with it
        raise SystemExit(fail(prog, e)) from None
    for note in notes:
        log(f"note: {path}: {note}")
    return image


def fit_images(model, opts: Options, paths, images) -> tuple[list, int]:
    """Images at the size the vision tower sees them (model.max_pixels, or the checkpoint's own limit when lower),
    with a note for each one downscaled; returns them and that pixel budget for prepare_inputs."""
    import dataclasses

    from vlm.processing import fit_to_budget

    pre = dataclasses.replace(model.preprocess, max_pixels=min(model.preprocess.max_pixels, opts.model.max_pixels))
    out = []
    for path, image in zip(paths, images, strict=True):
        if image is not None:
            image, note = fit_to_budget(image, pre)
            if note:
                log(f"note: {path}: {note}")
        out.append(image)
    return out, pre.max_pixels


def check_context(prog: str, model, inputs, max_new_tokens: int) -> None:
    """Refuse, with one line, a prompt that leaves no room in the model's context for max_new_tokens."""
    longest, context = int(inputs.lengths[: inputs.num_rows].max()), model.cfg.text.max_position_embeddings
    if longest + max_new_tokens > context:
        raise SystemExit(
            fail(
                prog,
                f"the prompt is {longest} tokens and sampling.max_new_tokens={max_new_tokens}: together over "
                f"the model's context of {context} tokens; shorten the prompt or lower sampling.max_new_tokens",
            )
        )


def setup(prog: str, opts: Options):
    """Validate sampling options, print the backend, load the model; one line and exit 1 on failure."""
    import jax

    from vlm import SamplingConfig, load_model
    from vlm.cache import use_compilation_cache
    from vlm.memory import tune_malloc

    s = opts.sampling
    try:
        cfg = SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)
    except ValueError as e:
        raise SystemExit(fail(prog, e)) from None
    log(f"backend: {jax.default_backend()} {jax.devices()}")
    tune_malloc()
    use_compilation_cache()
    t0 = time.perf_counter()
    try:
        model, params, tokenizer = load_model(opts.model.name, **load_args(opts))
    except Exception as e:  # hub errors, missing files, bad checkpoints: one line, not a traceback
        why = " ".join(str(e).split())[:400] or type(e).__name__
        offline = opts.model.name == "tiny" or os.path.isdir(opts.model.name)
        hint = "" if offline else " (no network? model.name=tiny runs offline)"
        raise SystemExit(fail(prog, f"could not load model {opts.model.name!r}: {why}{hint}")) from None
    int8 = " (int8 weights)" if model.quantize else ""
    log(f"loaded {opts.model.name}{int8} in {time.perf_counter() - t0:.1f} s")
    return cfg, model, params, tokenizer


def main(argv: list[str] | None = None) -> int:
    prog = "run_streaming.py"
    opts = parse(sys.argv[1:] if argv is None else argv, ("model", "sampling", "inference"), prog=prog)
    if opts.inference.batch:
        return fail(
            prog,
            "inference.batch is for run.py; run_streaming.py answers one question (inference.image, inference.prompt)",
        )
    image = load_image(prog, opts.inference.image)
    cfg, model, params, tokenizer = setup(prog, opts)

    import jax

    from vlm import prepare_inputs, sample_streaming

    (image,), max_pixels = fit_images(model, opts, [opts.inference.image], [image])
    try:
        inputs = prepare_inputs(
            model, params, tokenizer, images=[image], prompts=[opts.inference.prompt], max_pixels=max_pixels
        )
    except ValueError as e:
        return fail(prog, e)
    check_context(prog, model, inputs, cfg.max_new_tokens)
    compiles = model.compile_count
    t0 = time.perf_counter()
    t_first, n = None, 0
    for _token, text, _logprob in sample_streaming(
        model, params, inputs, cfg, jax.random.key(opts.sampling.seed), tokenizer=tokenizer
    ):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    total = time.perf_counter() - t0
    ttft = (t_first or t0) - t0
    rate = (n - 1) / (total - ttft) if n > 1 and total > ttft else 0.0
    compiled = "yes" if model.compile_count > compiles else "no"
    log(f"{n} tokens in {total:.2f} s: first token after {ttft:.2f} s, then {rate:.1f} tokens/s (compiled: {compiled})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
