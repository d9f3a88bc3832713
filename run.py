"""Answer questions about images with the batch sampler (one `lax.scan` for all rows), printing whole answers.

    python run.py inference.image=examples/imgs/panda_climbing.png inference.prompt="Describe this image"
    python run.py inference.batch="[examples/imgs/panda_climbing.png, {image: examples/imgs/coffee_laptop.png,
                                    prompt: 'What is on the table?'}]"
    python run.py --help

One row: stdout is the answer. Several rows (inference.batch): stdout is one JSON object per row,
{"image": ..., "prompt": ..., "answer": ...}. The backend, load time and speed go to stderr.
"""

from __future__ import annotations

import json
import sys
import time

from run_streaming import check_context, fail, fit_images, load_image, log, setup
from vlm.options import parse


def main(argv: list[str] | None = None) -> int:
    prog = "run.py"
    opts = parse(sys.argv[1:] if argv is None else argv, ("model", "sampling", "inference"), prog=prog)
    inf = opts.inference
    rows = [(r.image, r.prompt if r.prompt is not None else inf.prompt) for r in inf.batch] or [(inf.image, inf.prompt)]
    for i, (_, prompt) in enumerate(rows):
        if not prompt.strip():
            return fail(prog, f"inference.batch row {i}: the prompt is empty")
    images = [load_image(prog, path) for path, _ in rows]
    cfg, model, params, tokenizer = setup(prog, opts)

    import jax

    from vlm import prepare_inputs, sample

    images, max_pixels = fit_images(model, opts, [path for path, _ in rows], images)
    try:
        inputs = prepare_inputs(
            model, params, tokenizer, images=images, prompts=[p for _, p in rows], max_pixels=max_pixels
        )
    except ValueError as e:
        return fail(prog, e)
    check_context(prog, model, inputs, cfg.max_new_tokens)
    compiles = model.compile_count
    t0 = time.perf_counter()
    res = sample(model, params, inputs, cfg, jax.random.key(opts.sampling.seed), tokenizer=tokenizer)
    total = time.perf_counter() - t0
    if inf.batch:
        for (path, prompt), text in zip(rows, res.texts, strict=True):
            print(json.dumps({"image": path, "prompt": prompt, "answer": text}, ensure_ascii=False))
    else:
        print(res.texts[0])
    sys.stdout.flush()
    n = sum(len(t) for t in res.tokens)
    compiled = "yes" if model.compile_count > compiles else "no"
    rate = n / total if total else 0.0
    log(f"{n} tokens for {len(rows)} row(s) in {total:.2f} s, {rate:.1f} tokens/s (compiled this run: {compiled})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
