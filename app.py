"""Gradio demo: ask Qwen3-VL (JAX) about an image, streamed token by token or in one batch scan.

    python app.py                        # Qwen/Qwen3-VL-2B-Instruct from the Hugging Face hub
    python app.py model.name=tiny        # offline tiny checkpoint (random weights: answers are random)
    python app.py --help                 # every option: model.*, sampling.* defaults, server.*

From Python: gradio_client's Client(url).submit(..., api_name="/generate"), see README.md.
A thin layer over vlm: load_model / prepare_inputs / sample_streaming / sample do all the work.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import gradio as gr

from vlm.options import Options, dtype_arg, parse

HERE = Path(__file__).resolve().parent
STREAMING, BATCH = "Streaming", "Batch (scan)"
EXAMPLES = [
    ("panda_climbing.png", "Describe this image"),
    ("coffee_laptop.png", "What is on the table?"),
    ("mountain_landscape.png", "Where could this picture have been taken?"),
    ("f35_takeoff.png", "What kind of aircraft is this, and what is it doing?"),
    ("stadium_aerial.png", "What sport is played here? Describe the view."),
]
UI_EVERY_S = 0.05  # at most ~20 screen updates a second while streaming
# CPU backends cannot donate the KV cache buffer; jax warns on every compile, which is noise here.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def log(msg: str) -> None:
    print(f"[app] {msg}", file=sys.stderr, flush=True)


class Backend:
    """Loads the model in a background thread and warms both samplers up; `status` says how far it got."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.status = f"**Loading** {opts.model.name} …"
        self.ready = threading.Event()
        self.error: str | None = None
        self.model = self.params = self.tokenizer = None

    def start(self) -> None:
        threading.Thread(target=self._load, name="warm-up", daemon=True).start()

    def _load(self) -> None:
        import jax

        from vlm import load_model

        try:
            log(f"backend: {jax.default_backend()} {jax.devices()}")
            log(f"loading {self.opts.model.name} …")
            t0 = time.perf_counter()
            self.model, self.params, self.tokenizer = load_model(self.opts.model.name, dtype=dtype_arg(self.opts))
            log(f"loaded in {time.perf_counter() - t0:.1f} s; warm-up (first compile) …")
            self.status = "**Compiling** (warm-up): answers start once this is done …"
            t0 = time.perf_counter()
            image = str(HERE / "examples" / "imgs" / EXAMPLES[0][0])
            s = self.opts.sampling
            for mode in (STREAMING, BATCH):  # same shapes as a default request: image bucket, cache length, scan length
                updates = run(
                    self,
                    image,
                    EXAMPLES[0][1],
                    [],
                    mode,
                    s.temperature,
                    s.top_p,
                    s.top_k,
                    s.max_new_tokens,
                    s.seed,
                    warm_up=True,
                )
                for i, _ in enumerate(updates):
                    if mode == STREAMING and i >= 2:  # prefill and decode step compiled: no need for the whole answer
                        break
                updates.close()
            log(f"warm-up done in {time.perf_counter() - t0:.1f} s ({self.model.compile_count} compiles); ready")
            self.status = f"**Ready**: {self.opts.model.name} on {jax.default_backend()}"
        except Exception as e:  # shown on the page; the server keeps running and says why it cannot answer
            traceback.print_exc()
            self.error = " ".join(str(e).split())[:300] or type(e).__name__
            self.status = f"**Error**: could not load {self.opts.model.name}: {self.error}"
        finally:
            self.ready.set()


def message_text(content) -> str:
    """Chatbot message content (str, or a list of {'type': 'text', 'text': ...} parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def hf_messages(history: list[dict], prompt: str, with_image: bool) -> list[dict]:
    """Chat so far + the new question -> HF chat messages; the image goes before the first question."""
    out = []
    for m in [*history, {"role": "user", "content": prompt}]:
        text = message_text(m.get("content"))
        if m.get("role") == "user":
            parts = [{"type": "text", "text": text}]
            if with_image and not out:
                parts.insert(0, {"type": "image"})
            out.append({"role": "user", "content": parts})
        elif m.get("role") == "assistant":
            out.append({"role": "assistant", "content": text})
    return out


def shade(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """(text, logprob) per token -> HighlightedText scores 1 - p: unsure tokens red, sure ones plain."""
    out, pending = [], 0.0
    for text, lp in pieces:
        pending += lp  # a token that printed nothing (part of a character) joins the next piece
        if text:
            out.append((text, round(1.0 - math.exp(pending), 3)))
            pending = 0.0
    return out


def batch_pieces(tokenizer, tokens, logprobs) -> list[tuple[str, float]]:
    """Whole answer from the scan -> (text, logprob) per token, by decoding growing prefixes."""
    tokens, pieces, prev = [int(t) for t in tokens], [], ""
    for i, lp in enumerate(logprobs):
        text = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            pieces.append(("", float(lp)))
            continue
        pieces.append((text[len(prev) :], float(lp)))
        prev = text
    return pieces


def stats_line(mode: str, n: int, t0: float, t_first: float | None, compiled: bool, stopped: bool = False) -> str:
    total = time.perf_counter() - t0
    rate = n / total if total > 0 else 0.0
    first = (
        f"first token {t_first - t0:.2f} s" if mode == STREAMING and t_first else f"whole answer after {total:.2f} s"
    )
    sampler = "streaming (Python loop over the jitted decode step)" if mode == STREAMING else "batch (one lax.scan)"
    end = " · stopped" if stopped else ""
    compiled_text = "yes" if compiled else "no"
    return f"{first} · {n} tokens · {rate:.1f} tokens/s · sampler: {sampler} · compiled: {compiled_text}{end}"


def run(
    backend: Backend,
    image,
    prompt,
    history,
    mode,
    temperature,
    top_p,
    top_k,
    max_new_tokens,
    seed,
    warm_up: bool = False,
):
    """The generation endpoint. Yields (chat history, stats line, shaded tokens) as the answer grows."""
    import jax

    from vlm import SamplingConfig, prepare_inputs, sample, sample_streaming
    from vlm.processing import ImageError, load_image_with_notes

    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("Please type a question.")
    if mode not in (STREAMING, BATCH):
        raise gr.Error(f"Unknown sampler {mode!r}: choose {STREAMING!r} or {BATCH!r}.")
    try:
        whole = {"top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed}
        for name, value in whole.items():
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        top_k, max_new_tokens, seed = (int(float(v)) for v in whole.values())
        cfg = SamplingConfig(
            temperature=float(temperature), top_p=float(top_p), top_k=top_k, max_new_tokens=max_new_tokens
        )
    except (TypeError, ValueError) as e:
        raise gr.Error(f"Bad sampling setting: {e}") from None
    pil, notes = None, []
    if isinstance(image, dict):  # the upload's FileData payload (events run with preprocess=False)
        image = image.get("path")
    if image:
        try:
            pil, notes = load_image_with_notes(image)
        except (ImageError, OSError) as e:  # name the upload, not the server's temp path
            raise gr.Error(f"Could not use this image: {str(e).replace(str(image), Path(image).name)}") from None
    history = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history or []]
    chat = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    note = "".join(f" · note: {n}" for n in notes)

    while not warm_up and not backend.ready.wait(0.5):
        yield chat, f"{backend.status} Your question runs when it is done.", []
    if backend.error:
        raise gr.Error(f"The model could not be loaded: {backend.error}")
    model, params, tokenizer = backend.model, backend.params, backend.tokenizer

    try:
        inputs = prepare_inputs(
            model, params, tokenizer, images=[pil], prompts=[hf_messages(history, prompt, pil is not None)]
        )
    except ValueError as e:
        raise gr.Error(str(e)) from None
    key = jax.random.key(seed)
    compiles, t0, t_first, pieces, answer = model.compile_count, time.perf_counter(), None, [], ""
    yield chat, f"Generating …{note}", []
    if mode == BATCH:
        res = sample(model, params, inputs, cfg, key, tokenizer=tokenizer)
        answer, pieces = res.texts[0], batch_pieces(tokenizer, res.tokens[0], res.logprobs[0])
    else:
        stream, last, done = sample_streaming(model, params, inputs, cfg, key, tokenizer=tokenizer), 0.0, False
        try:
            for _token, text, logprob in stream:
                t_first = t_first or time.perf_counter()
                answer += text
                pieces.append((text, float(logprob)))
                if time.perf_counter() - last >= UI_EVERY_S:
                    last = time.perf_counter()
                    chat[-1]["content"] = answer
                    yield (
                        chat,
                        stats_line(mode, len(pieces), t0, t_first, model.compile_count > compiles) + note,
                        shade(pieces),
                    )
            done = True
        finally:
            stream.close()  # Stop / disconnect: gradio closes this generator, which ends the decode loop here
            if not done and not warm_up:
                log(f"generation stopped after {len(pieces)} tokens")
    chat[-1]["content"] = answer
    yield chat, stats_line(mode, len(pieces), t0, t_first, model.compile_count > compiles) + note, shade(pieces)


def build(backend: Backend) -> gr.Blocks:
    """The page; `backend` may still be warming up."""
    opts, s = backend.opts, backend.opts.sampling

    def generate(image, prompt, history, mode, temperature, top_p, top_k, max_new_tokens, seed):
        try:
            yield from run(backend, image, prompt, history, mode, temperature, top_p, top_k, max_new_tokens, seed)
        except gr.Error:
            raise
        except Exception as e:  # unexpected: the traceback goes to the terminal, one line to the page
            traceback.print_exc()
            detail = f": {e}" if opts.server.debug else "; see the server log"
            raise gr.Error(f"Generation failed ({type(e).__name__}){detail}") from None

    def status():
        return backend.status

    def tick():
        return backend.status, gr.Timer(active=not backend.ready.is_set())

    with gr.Blocks(title="Qwen3-VL in JAX") as demo:
        gr.Markdown(
            "# Qwen3-VL in JAX\nAsk about an image. Answers stream token by token, or come whole from one `lax.scan`."
        )
        if opts.model.name == "tiny":
            gr.Markdown(
                "⚠️ **Tiny offline mode**: this model has random weights, so its answers are random tokens, "
                "not descriptions. Start with `python app.py` for the real Qwen3-VL-2B-Instruct.",
                elem_id="tiny-banner",
            )
        status_md = gr.Markdown(backend.status, elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard", "webcam"],
                    height=320,
                    label="Image (a new image starts a new chat)",
                    elem_id="image",
                )
                prompt = gr.Textbox(label="Question", placeholder="Describe this image", lines=2, elem_id="prompt")
                mode = gr.Radio([STREAMING, BATCH], value=STREAMING, label="Sampler", elem_id="mode")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(
                        0, 2, value=s.temperature, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.01, 1, value=s.top_p, step=0.01, label="Top-p")
                    top_k = gr.Slider(0, 200, value=s.top_k, step=1, label="Top-k (0 = off)")
                    max_new_tokens = gr.Slider(
                        1,
                        max(2048, s.max_new_tokens),
                        value=s.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(value=s.seed, precision=0, label="Seed")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=380,
                    elem_id="chat",
                    placeholder="Upload an image or pick an example below, ask a question, press Generate.",
                )
                stats = gr.Markdown("", elem_id="stats")
                tokens = gr.HighlightedText(
                    label="Tokens shaded by uncertainty (1 − p): redder = the model was less sure", elem_id="tokens"
                )
        gr.Examples(
            [[str(HERE / "examples" / "imgs" / name), p] for name, p in EXAMPLES],
            inputs=[image, prompt],
            label="Examples (one photo and four labelled stand-in drawings, see examples/imgs/README.md)",
            elem_id="examples",
        )

        inputs = [image, prompt, chatbot, mode, temperature, top_p, top_k, max_new_tokens, seed]
        outputs = [chatbot, stats, tokens]
        # preprocess=False: gradio still checks and caches the upload, but hands over its path undecoded, so the
        # library's loader judges the file and explains what is wrong with it
        events = [
            go.click(generate, inputs, outputs, api_name="generate", concurrency_id="model", preprocess=False),
            prompt.submit(
                generate, inputs, outputs, api_visibility="private", concurrency_id="model", preprocess=False
            ),
        ]
        for ev in events:
            ev.success(lambda: "", None, prompt, api_visibility="private", queue=False)
        stop.click(None, None, None, cancels=events)
        clear.click(lambda: ([], "", []), None, outputs, cancels=events, api_visibility="private", queue=False)
        image.change(lambda: ([], "", []), None, outputs, api_visibility="private", queue=False)
        chatbot.clear(lambda: ("", []), None, [stats, tokens], cancels=events, api_visibility="private", queue=False)
        timer = gr.Timer(1.0)
        timer.tick(tick, None, [status_md, timer], api_visibility="private", queue=False)
        demo.load(status, None, status_md, api_name="status", queue=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    opts = parse(sys.argv[1:] if argv is None else argv, ("model", "sampling", "server"), prog="app.py")
    backend = Backend(opts)
    backend.start()
    demo = build(backend)
    srv = opts.server
    demo.queue(max_size=srv.queue_size, default_concurrency_limit=srv.concurrency)
    log(f"serving on http://{srv.host}:{srv.port} (share={srv.share}); the page says when warm-up is done")
    demo.launch(
        server_name=srv.host,
        server_port=srv.port,
        share=srv.share,
        max_file_size=int(srv.max_upload_mb * 1024 * 1024),
        show_error=srv.debug,
        footer_links=["api", "gradio", "settings"],
    )


if __name__ == "__main__":
    main()
