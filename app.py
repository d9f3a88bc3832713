"""Gradio demo: ask Qwen3-VL (JAX) about an image, streamed token by token or in a batch lax.scan.

    python app.py                        # Qwen/Qwen3-VL-2B-Instruct from the Hugging Face hub
    python app.py model.name=tiny        # offline tiny checkpoint (random weights: answers are random)
    python app.py --help                 # every option: model.*, sampling.* defaults, server.*

From Python: gradio_client's Client(url).submit(..., api_name="/generate"), see README.md.
A thin layer over vlm: load_model / prepare_inputs / sample_streaming / sample do all the work.

Public-demo care: every input (the API's too) is checked and bad input gets one clear message, never a
traceback (those go to the terminal; `server.debug` shows their text); images are capped (model.max_pixels)
with a note when changed; uploads are deleted once read; one generation runs at a time and the others queue;
Stop or a client that goes away ends a streaming generation at its next token, and a batch one at the end of
the lax.scan chunk it is in (sample(should_stop=...), STOP_CHUNK decode steps).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import gradio as gr

from vlm.cache import use_compilation_cache
from vlm.memory import tune_malloc
from vlm.options import Options, load_args, parse

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
TEMPERATURE_MAX, TOP_K_MAX, SEED_MAX = 2.0, 200, 2**32 - 1  # the controls' ranges; the API accepts the same
CHAT_CHARS_PER_PROMPT = 8  # the whole conversation may be 8x server.max_prompt_chars
SESSION_IMAGES = 32  # sessions whose image is kept (in memory, at most ~3 MB each) for follow-up questions
UPLOAD_MAX_AGE_S = 3600  # uploads no request ever used (a stop while queued, a closed tab) are swept after this
# If a backend cannot reuse a donated KV cache buffer, jax warns at every compile and copies instead: noise here.
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
        self.model = self.params = self.tokenizer = self.preprocess = None
        # held while a generation runs, so that one still ending after a Stop never overlaps the next request
        self.lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._load, name="warm-up", daemon=True).start()

    def _load(self) -> None:
        import dataclasses

        import jax

        from vlm import load_model

        try:
            log(f"backend: {jax.default_backend()} {jax.devices()}")
            log(f"loading {self.opts.model.name} …")
            t0 = time.perf_counter()
            self.model, self.params, self.tokenizer = load_model(self.opts.model.name, **load_args(self.opts))
            pre = self.model.preprocess
            self.preprocess = dataclasses.replace(pre, max_pixels=min(pre.max_pixels, self.opts.model.max_pixels))
            log(f"loaded in {time.perf_counter() - t0:.1f} s; images up to {self.preprocess.max_pixels} pixels")
            log("warm-up (first compile) …")
            self.status = "**Compiling** (warm-up): answers start once this is done …"
            t0 = time.perf_counter()
            image = str(HERE / "examples" / "imgs" / EXAMPLES[0][0])
            s = self.opts.sampling
            for mode in (STREAMING, BATCH):  # same shapes as a default request: image bucket, cache length, scan chunk
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
            int8 = ", int8 weights" if self.model.quantize else ""
            self.status = f"**Ready**: {self.opts.model.name} on {jax.default_backend()}{int8}"
        except Exception as e:  # shown on the page; the server keeps running and says why it cannot answer
            traceback.print_exc()
            self.error = " ".join(str(e).split())[:300] or type(e).__name__
            self.status = f"**Error**: could not load {self.opts.model.name}: {self.error}"
        finally:
            self.ready.set()


class Job:
    """One request's stop flag and token counter, shared by its page event and the thread that generates."""

    def __init__(self):
        self.tokens = 0  # tokens made so far: the first from prefill, then one per decode step (batch: per chunk)
        self.stopped_at: int | None = None  # `tokens` when the stop came
        self.reason = ""
        self._stop = threading.Event()

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.reason, self.stopped_at = reason, self.tokens
            self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class Uploads:
    """Deletes each uploaded file once the requests it was sent with are done with it.

    Gradio keeps uploads until shutdown. Two clients uploading the same bytes under the same name share one file,
    so uploads are counted as gradio's upload route records them (its `upload_file_set`), and a file goes once
    the last request sent with it has read it. Example images gradio copied into its cache stay. Uploads that no
    request ever used (stopped while queued, a closed tab) go after UPLOAD_MAX_AGE_S (gradio's delete_cache).
    """

    def __init__(self, demo: gr.Blocks):
        self.demo, self.lock = demo, threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's; set by the first request
        self.folder = Path(os.path.realpath(gr.utils.get_upload_folder()))
        self.pending: collections.Counter[str] = collections.Counter()
        uploads = self

        class Counted(set):
            def update(self, *groups):  # gradio's /upload route: demo.upload_file_set.update(saved paths)
                with uploads.lock:
                    for group in groups:
                        uploads.pending.update(os.path.realpath(p) for p in group)
                super().update(*groups)

        counted = Counted(demo.upload_file_set)
        demo.temp_file_sets = [counted if s is demo.upload_file_set else s for s in demo.temp_file_sets]
        demo.upload_file_set = counted

    def is_upload(self, path: str) -> bool:
        return Path(os.path.realpath(path)).is_relative_to(self.folder)

    def release(self, path: str) -> None:
        """A request has read (or given up on) `path`. Checked on the server's event loop, where gradio's upload
        route moves a file into place and records it in one step, so a new upload of the same file is never lost."""
        if self.loop is None:
            return self.done(path)
        try:
            self.loop.call_soon_threadsafe(self.done, path)
        except RuntimeError:  # the loop has closed: the server is shutting down and gradio deletes its cache
            pass

    def done(self, path: str) -> None:
        """Delete `path` unless another request still waits for it."""
        real = os.path.realpath(path)
        with self.lock:
            if self.pending[real] > 1:
                self.pending[real] -= 1
                return
            self.pending.pop(real, None)
        keep = set().union(*(getattr(b, "keep_in_cache", ()) for b in self.demo.blocks.values()))
        if not self.is_upload(real) or real in {os.path.realpath(k) for k in keep}:
            return
        try:
            os.remove(real)
            os.rmdir(os.path.dirname(real))  # gradio's per-upload folder, if nothing else is in it
        except OSError:
            pass


class SessionImages:
    """The last image of each of the most recent sessions, already at model size: a follow-up question in the
    page sends the same upload again, which was deleted after the first answer."""

    def __init__(self, size: int = SESSION_IMAGES):
        self.size, self.lock, self.items = size, threading.Lock(), collections.OrderedDict()

    def get(self, session: str | None, path: str):
        with self.lock:
            item = self.items.get(session)
            return item[1] if item and item[0] == path else None

    def put(self, session: str | None, path: str, image) -> None:
        if session is None:
            return
        with self.lock:
            self.items[session] = (path, image)
            self.items.move_to_end(session)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


def message_text(content) -> str:
    """Chatbot message content (str, or a list of {'type': 'text', 'text': ...} parts) -> plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, (list, tuple)):
        return ""
    parts = (part.get("text") for part in content if isinstance(part, dict))
    return "".join(t for t in parts if isinstance(t, str))


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


def chunk_stop(job: Job):
    """`should_stop` for sample(): True once the job is stopped. sample() asks before each chunk of STOP_CHUNK
    decode steps, so this also keeps `job.tokens` at the tokens made so far (the first one comes from prefill)."""
    from vlm.sampling import STOP_CHUNK

    chunks = itertools.count()

    def should_stop() -> bool:
        job.tokens = 1 + next(chunks) * STOP_CHUNK
        return job.stopped

    return should_stop


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
    sampler = "streaming (Python loop over the jitted decode step)" if mode == STREAMING else "batch (lax.scan)"
    end = " · stopped" if stopped else ""
    compiled_text = "yes" if compiled else "no"
    return f"{first} · {n} tokens · {rate:.1f} tokens/s · sampler: {sampler} · compiled: {compiled_text}{end}"


def refuse(message: str) -> gr.Error:
    """The page's error for bad input: a clear message for the user, one line in the server log."""
    log(f"refused: {message}")
    return gr.Error(message, print_exception=False)


def _number(name: str, value, lo: float, hi: float, whole: bool = False, open_low: bool = False):
    """A sampling control's value from the page or the API, checked against the control's range."""
    kind = "a whole number" if whole else "a number"
    bounds = f"{'(' if open_low else '['}{lo:g}, {hi:d}]" if whole else f"{'(' if open_low else '['}{lo:g}, {hi:g}]"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if open_low else lo <= value) and value <= hi and (not whole or float(value).is_integer())
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise refuse(f"Bad sampling setting: {name} must be {kind} in {bounds}, got {shown}.")
    return int(value) if whole else float(value)


def sampling_settings(opts: Options, mode, temperature, top_p, top_k, max_new_tokens, seed):
    """The controls' values -> (SamplingConfig, seed); gr.Error naming the control and its range otherwise."""
    from vlm import SamplingConfig

    if mode not in (STREAMING, BATCH):
        raise refuse(f"Unknown sampler {mode!r}: choose {STREAMING!r} or {BATCH!r}.")
    cfg = SamplingConfig(
        temperature=_number("temperature", temperature, 0, TEMPERATURE_MAX),
        top_p=_number("top_p", top_p, 0, 1, open_low=True),
        top_k=_number("top_k", top_k, 0, TOP_K_MAX, whole=True),
        max_new_tokens=_number("max_new_tokens", max_new_tokens, 1, max_new_tokens_limit(opts), whole=True),
    )
    return cfg, _number("seed", seed, 0, SEED_MAX, whole=True)


def max_new_tokens_limit(opts: Options) -> int:
    return max(2048, opts.sampling.max_new_tokens)


def conversation(opts: Options, prompt, history) -> tuple[str, list[dict]]:
    """The question and the chat so far, checked: text, not empty, within the demo's length limits."""
    if prompt is not None and not isinstance(prompt, str):
        raise refuse(f"The question must be text, got {type(prompt).__name__}.")
    prompt = (prompt or "").strip()
    if not prompt:
        raise refuse("Please type a question.")
    limit = opts.server.max_prompt_chars
    if len(prompt) > limit:
        raise refuse(f"The question is {len(prompt)} characters long; this demo takes at most {limit}.")
    if history is None:
        history = []
    bad = not isinstance(history, (list, tuple)) or not all(
        isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in history
    )
    if bad:
        raise refuse("The conversation must be a list of {role: user|assistant, content: text} messages.")
    history = [{"role": m["role"], "content": message_text(m.get("content"))} for m in history]
    chars = len(prompt) + sum(len(m["content"]) for m in history)
    if chars > CHAT_CHARS_PER_PROMPT * limit:
        raise refuse(f"The conversation is too long ({chars} characters): press Clear to start a new one.")
    return prompt, history


def image_path(image) -> str | None:
    """The upload's server path from the endpoint's image value (a FileData dict, a path, or nothing)."""
    if isinstance(image, dict):  # the upload's FileData payload (events run with preprocess=False)
        image = image.get("path")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise refuse("Could not use this image: send an uploaded file (gradio_client's handle_file).")
    return image


def use_image(
    backend: Backend, path: str | None, uploads: Uploads | None, images: SessionImages | None, session: str | None
):
    """Read the upload at `path` (or the session's copy of it) -> (RGB image at model size or None, notes)."""
    from vlm.processing import ImageError, fit_to_budget, load_image_with_notes

    if path is None:
        return None, ["no image: a text-only answer"]
    if uploads is not None and not uploads.is_upload(path):  # a path of the server's own: refuse to look
        raise refuse("Could not use this image: it was not uploaded to this server.")
    name = Path(path).name
    if not os.path.exists(path):
        kept = images.get(session, path) if images else None
        if kept is None:
            raise refuse(
                f"Could not use this image: {name} is no longer on the server "
                "(uploads are deleted once answered); please upload it again."
            )
        return kept, []
    try:
        pil, notes = load_image_with_notes(path)
        pil, note = fit_to_budget(pil, backend.preprocess)
    except (ImageError, OSError) as e:  # name the upload, not the server's temp path
        raise refuse(f"Could not use this image: {str(e).replace(path, name)}") from None
    if images is not None:
        images.put(session, path, pil)
    return pil, notes + ([note] if note else [])


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
    *,
    job: Job | None = None,
    uploads: Uploads | None = None,
    images: SessionImages | None = None,
    session: str | None = None,
    warm_up: bool = False,
):
    """The generation endpoint, run in a worker thread. Checks every input, then yields
    (chat history, stats line, shaded tokens, notes for the user) as the answer grows; stops within a token
    (streaming) or a chunk of STOP_CHUNK decode steps (batch) of `job.stop()`, ending with the partial answer
    and "· stopped" in the stats line. Bad input raises gr.Error with a message for the user."""
    import jax

    from vlm import prepare_inputs, sample, sample_streaming
    from vlm.sampling import STOP_CHUNK

    job = job or Job()
    path = image_path(image)
    try:
        opts = backend.opts
        cfg, seed = sampling_settings(opts, mode, temperature, top_p, top_k, max_new_tokens, seed)
        prompt, history = conversation(opts, prompt, history)
        chat = [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
        while not warm_up and not backend.ready.wait(0.5):
            if job.stopped:
                return
            yield chat, f"{backend.status} Your question runs when it is done.", [], []
        if backend.error:
            raise refuse(f"The model could not be loaded: {backend.error}")
        pil, notes = use_image(backend, path, uploads, images, session)
    finally:
        if uploads is not None and path is not None:
            uploads.release(path)
    model, params, tokenizer = backend.model, backend.params, backend.tokenizer
    note = "".join(f" · note: {n}" for n in notes)

    while not backend.lock.acquire(timeout=0.05):  # a stopped generation may still be finishing its last step
        if job.stopped:
            return
    try:
        limit = backend.opts.server.max_programs
        if limit and model.programs > limit:  # a long-running server: shapes seen once stop holding memory
            log(f"dropping {model.programs} compiled programs (server.max_programs={limit}); "
                "they compile again as needed")
            model.drop_programs()
        try:
            inputs = prepare_inputs(
                model,
                params,
                tokenizer,
                images=[pil],
                prompts=[hf_messages(history, prompt, pil is not None)],
                max_pixels=backend.preprocess.max_pixels,
            )
        except ValueError as e:  # e.g. a prompt longer than the model's context
            raise refuse(f"Could not use this question: {e}") from None
        context, length = model.cfg.text.max_position_embeddings, int(inputs.lengths[0])
        if length + cfg.max_new_tokens > context:
            raise refuse(
                f"The conversation is {length} tokens and the answer may take {cfg.max_new_tokens} more: "
                f"over the model's context of {context} tokens. Press Clear, or lower Max new tokens."
            )
        key = jax.random.key(seed)
        compiles, t0, t_first, pieces, answer = model.compile_count, time.perf_counter(), None, [], ""
        yield chat, f"Generating …{note}", [], notes
        if mode == BATCH:
            if job.stopped:
                return
            res = sample(model, params, inputs, cfg, key, tokenizer=tokenizer, should_stop=chunk_stop(job))
            job.tokens, stopped = len(res.tokens[0]), res.stopped
            answer, pieces = res.texts[0], batch_pieces(tokenizer, res.tokens[0], res.logprobs[0])
            in_flight = f"the scan stops between chunks of {STOP_CHUNK} steps"
        else:
            stream, last = sample_streaming(model, params, inputs, cfg, key, tokenizer=tokenizer), 0.0
            try:
                for _token, text, logprob in stream:
                    job.tokens += 1
                    if job.stopped:
                        break
                    t_first = t_first or time.perf_counter()
                    answer += text
                    pieces.append((text, float(logprob)))
                    if time.perf_counter() - last >= UI_EVERY_S:
                        last = time.perf_counter()
                        chat[-1]["content"] = answer
                        stats = stats_line(mode, len(pieces), t0, t_first, model.compile_count > compiles)
                        yield chat, stats + note, shade(pieces), notes
            finally:
                stream.close()  # ends the decode loop; a step already dispatched finishes on the device
            stopped, in_flight = job.stopped, "+1 already dispatched"
        chat[-1]["content"] = answer
        stats = stats_line(mode, len(pieces), t0, t_first, model.compile_count > compiles, stopped=stopped)
        if stopped and not warm_up:  # nobody may be listening any more; the partial answer still ends the run
            log(
                f"generation stopped after {job.tokens} tokens ({job.reason}): "
                f"decode steps after the stop request: {job.tokens - job.stopped_at} ({in_flight})"
            )
        elif not warm_up:
            log(f"answered: {stats}")
        yield chat, stats + note, shade(pieces), notes
    finally:
        backend.lock.release()


def build(backend: Backend) -> gr.Blocks:
    """The page; `backend` may still be warming up."""
    opts, s = backend.opts, backend.opts.sampling
    images = SessionImages()
    uploads: Uploads | None = None

    async def generate(
        image, prompt, history, mode, temperature, top_p, top_k, max_new_tokens, seed, request: gr.Request
    ):
        """Runs `run` in a worker thread and streams its updates. Stop and a client gone away close this
        generator, which stops the worker at its next token (streaming) or scan chunk (batch)."""
        job, loop, updates = Job(), asyncio.get_running_loop(), asyncio.Queue()
        uploads.loop = loop
        values = (image, prompt, history, mode, temperature, top_p, top_k, max_new_tokens, seed)
        session = getattr(request, "session_hash", None)

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(updates.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                job.stop("server shutting down")

        def work() -> None:
            try:
                for update in run(backend, *values, job=job, uploads=uploads, images=images, session=session):
                    post(("update", update))
                post(("done", None))
            except gr.Error as e:
                post(("error", e))
            except Exception as e:  # unexpected: the traceback goes to the terminal, one line to the page
                traceback.print_exc()
                detail = f": {e}" if opts.server.debug else "; see the server log"
                post(("error", gr.Error(f"Generation failed ({type(e).__name__}){detail}", print_exception=False)))

        threading.Thread(target=work, name="generate", daemon=True).start()
        finished, shown = False, set()
        try:
            while True:
                kind, value = await updates.get()
                if kind != "update":
                    finished = True
                    if kind == "error":
                        raise value
                    return
                chat, stats, tokens, notes = value
                for note in notes:
                    if note not in shown:
                        shown.add(note)
                        gr.Info(note)
                yield chat, stats, tokens
        except asyncio.CancelledError:
            job.stop("Stop pressed")
            raise
        finally:
            if not finished:
                job.stop("client gone")

    def status():
        return backend.status

    def tick():
        return backend.status, gr.Timer(active=not backend.ready.is_set())

    with gr.Blocks(title="Qwen3-VL in JAX", delete_cache=(UPLOAD_MAX_AGE_S // 6, UPLOAD_MAX_AGE_S)) as demo:
        uploads = Uploads(demo)
        gr.Markdown(
            "# Qwen3-VL in JAX\nAsk about an image. Answers stream token by token, or come whole from a `lax.scan`."
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
                prompt = gr.Textbox(
                    label="Question",
                    placeholder="Describe this image",
                    lines=2,
                    max_length=opts.server.max_prompt_chars,
                    elem_id="prompt",
                )
                mode = gr.Radio([STREAMING, BATCH], value=STREAMING, label="Sampler", elem_id="mode")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(
                        0,
                        TEMPERATURE_MAX,
                        value=s.temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                        elem_id="temperature",
                    )
                    top_p = gr.Slider(0.01, 1, value=s.top_p, step=0.01, label="Top-p")
                    top_k = gr.Slider(0, TOP_K_MAX, value=s.top_k, step=1, label="Top-k (0 = off)")
                    max_new_tokens = gr.Slider(
                        1,
                        max_new_tokens_limit(opts),
                        value=s.max_new_tokens,
                        step=1,
                        label="Max new tokens",
                        elem_id="max-new-tokens",
                    )
                    seed = gr.Number(value=s.seed, precision=0, minimum=0, maximum=SEED_MAX, label="Seed")
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
        # library's loader judges the file and explains what is wrong with it; `run` checks every other value
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


def private_upload_folder() -> str:
    """Uploads go to GRADIO_TEMP_DIR when set (Spaces), else to a fresh folder only this user can read
    (gradio's default, /tmp/gradio, is shared by every user of the machine); removed at exit."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        folder = tempfile.mkdtemp(prefix="vlm-app-uploads-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["GRADIO_TEMP_DIR"] = folder
    return os.environ["GRADIO_TEMP_DIR"]


def main(argv: list[str] | None = None) -> None:
    tune_malloc(arenas=2)  # before the server's threads start
    opts = parse(sys.argv[1:] if argv is None else argv, ("model", "sampling", "server"), prog="app.py")
    use_compilation_cache()  # a restart loads what the last run compiled
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a polite kill still runs the atexit clean-up
    folder = private_upload_folder()
    backend = Backend(opts)
    backend.start()
    demo = build(backend)
    srv = opts.server
    demo.queue(max_size=srv.queue_size, default_concurrency_limit=srv.concurrency)
    log(f"serving on http://{srv.host}:{srv.port} (share={srv.share}); the page says when warm-up is done")
    log(f"uploads: {folder}, each deleted once its request has read it; at most {srv.max_upload_mb:g} MB")
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
