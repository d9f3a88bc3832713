"""Two samplers over one decode step: `sample_streaming` (Python loop, batch 1) and `sample` (lax.scan).

Both run the same jitted prefill (which also picks the first token, so the last prompt token is fed
exactly once) and the same `_decode_step`; token i is drawn with `fold_in(rng, i)`. That is why the
two samplers agree token for token. The reported logprob is log-softmax of the model's raw logits
(before temperature, top-k and top-p) at the chosen token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as M
from . import sharding as SH
from .inputs import VLMInputs, bucket
from .vision import encode

# KV cache slots: prompt bucket + max_new_tokens, rounded up to 128, 192, 256, 384, ... (2B: a batch-8 cache
# of 128 slots holds 0.11 GiB)
CACHE_BUCKET_MIN = 128
TOP_K_FAST = 64  # top-k up to this takes lax.top_k, not a full sort (process_logits)
# sample(should_stop=...) decodes in lax.scan chunks of this many steps and checks should_stop between them:
# the same compiled chunk for every offset; a stop lands within ~2 s at a 2B CPU model's ~0.25 s a step.
STOP_CHUNK = 8


@dataclass(frozen=True)
class SamplingConfig:
    """None means: take the checkpoint's generation_config value. temperature=0 is greedy; top_k=0 and
    top_p=1 switch those filters off."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    eos_id: int | Sequence[int] | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")

    def resolved(self, model: M.Qwen3VL) -> SamplingConfig:
        """Fill unset values from the checkpoint's generation_config (Qwen3-VL: 0.7 / 0.8 / 20, eos [151645, 151643])."""
        g = model.generation
        greedy = g.get("do_sample") is False
        eos = self.eos_id if self.eos_id is not None else g.get("eos_token_id", [151645, 151643])
        return replace(
            self,
            temperature=self.temperature if self.temperature is not None else (0.0 if greedy else g.get("temperature", 1.0)),
            top_p=self.top_p if self.top_p is not None else g.get("top_p", 1.0),
            top_k=self.top_k if self.top_k is not None else g.get("top_k", 0),
            eos_id=tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
            pad_id=self.pad_id if self.pad_id is not None else g.get("pad_token_id", 151643),
        )


@dataclass(frozen=True)
class SampleResult:
    texts: list[str]
    tokens: list[list[int]]  # per row, up to and including its eos
    logprobs: list[list[float]]
    stopped: bool = False  # should_stop() ended the decode loop early: the tokens made until then


def process_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """transformers' TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper on [B, V] logits."""
    x, smallest_kept, *_ = _filter(logits, temperature, top_k, top_p)
    return jnp.where(x >= smallest_kept, x, -jnp.inf)


def _filter(logits: jax.Array, temperature, top_k, top_p):
    """process_logits' work -> (x: the logits over the temperature, the smallest value kept [B, 1], the
    TOP_K_FAST largest of x [B, fast] (descending) and their ids, and whether they hold every kept token).

    With top-k on (1..TOP_K_FAST), top-p only ever looks at the k largest logits, so they come from
    lax.top_k (~0.2 ms a row on a CPU) instead of sorting the whole vocabulary (~30 ms a row); more than
    TOP_K_FAST candidates (top-k off, a larger k, or ties at the k-th value) take the full sort."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)
    vocab = x.shape[-1]
    fast = min(TOP_K_FAST, vocab)
    cand, ids = jax.lax.top_k(x, fast)  # [B, fast], descending
    kth = cand[:, jnp.clip(top_k - 1, 0, fast - 1)][:, None]  # the k-th largest when top_k <= fast
    use_fast = (top_k > 0) & (top_k <= fast) & jnp.all(jnp.sum(x >= kth, axis=-1) <= fast)
    smallest_kept = jax.lax.cond(use_fast, lambda: _top_p_cut(cand[:, ::-1], top_k, top_p, vocab),
                                 lambda: _top_p_cut(jnp.sort(x, axis=-1), top_k, top_p, vocab))
    return x, smallest_kept, cand, ids, use_fast


def _top_p_cut(asc: jax.Array, top_k, top_p, vocab: int) -> jax.Array:
    """The smallest logit top-k and top-p keep, per row [B, 1], from the rows' largest logits in
    ascending order `asc` [B, n] (n = vocab, or n >= every kept token when top-k is on)."""
    n = asc.shape[-1]
    kth = asc[:, n - jnp.clip(top_k, 1, min(n, vocab))][:, None]  # k-th largest value; ties are kept
    asc = jnp.where((top_k > 0) & (asc < kth), -jnp.inf, asc)
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    drop = (cum <= 1 - top_p).at[:, -1].set(False)  # always keep the most likely token
    # Keep every token tied with the smallest kept one: transformers' choice among exact ties at the cut
    # depends on torch.sort's unspecified tie order; keeping all of them is the deterministic superset.
    return jnp.min(jnp.where(drop | jnp.isneginf(asc), jnp.inf, asc), axis=-1, keepdims=True)


def choose(logits: jax.Array, key, temperature, top_k, top_p, mesh=None) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row (greedy when temperature == 0) -> (token [B], logprob [B] under raw logits).

    On a mesh the logits' vocab axis may be split over `model`; sampling gathers it first (its sort and
    cumsum run about 10x slower split), greedy's argmax and the logprob reduce it where it lies."""

    def draw(logits):
        if mesh is not None:
            logits = SH.constrain(logits, mesh, SH.P(SH.batch_axis(mesh, logits.shape[0]), None))
        keys = jax.random.split(key, logits.shape[0])
        categorical = jax.vmap(jax.random.categorical)
        x, smallest_kept, cand, ids, use_fast = _filter(logits, temperature, top_k, top_p)

        # Drawing among the kept tokens only, when they are few, skips ~150k Gumbel draws a row (a CPU's
        # largest sampling cost after the sort); the same distribution, another draw for a given key.
        def among(top, ids):  # top: the kept values first, descending, then -inf
            return jnp.take_along_axis(ids, categorical(keys, top)[:, None], axis=-1)[:, 0]

        def wide():  # top-k off or above TOP_K_FAST: the kept tokens may still be few (a low top-p)
            kept = jnp.where(x >= smallest_kept, x, -jnp.inf)
            few = jnp.all(jnp.isfinite(kept).sum(axis=-1) <= cand.shape[-1])
            return jax.lax.cond(few, lambda: among(*jax.lax.top_k(kept, cand.shape[-1])),
                                lambda: categorical(keys, kept))

        # with top-k's fast path the kept tokens lead the candidates already: no second pass over the
        # vocabulary (a top-k of 151,936 logits: ~0.4 ms a row on a 2-core CPU)
        return jax.lax.cond(use_fast, lambda: among(jnp.where(cand >= smallest_kept, cand, -jnp.inf), ids), wide)

    token = jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1), logits).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token, logprob


def _encode(cfg, params, patches, pos_taps, pos_weights, rope, segment):
    return encode(params["visual"], cfg.vision, patches, pos_taps, pos_weights, rope, segment)


def _prefill(cfg, params, ids, positions, start, vision_embeds, deepstack, vision_index, key, temperature, top_k,
             top_p, *, cache_len: int, mesh=None):
    cache = M.init_cache(cfg.text, ids.shape[0], cache_len, params["language_model"]["norm"]["weight"].dtype)
    cache = SH.constrain_cache(cache, mesh, cfg)
    h, cache = M.forward(params, cfg, ids, positions, start, vision_embeds, deepstack, vision_index, cache)
    logits = M.lm_head(params, cfg, h[:, -1])
    token, logprob = choose(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p, mesh=mesh)
    return _constrain_step(cfg, mesh, token, logprob, cache)


def _constrain_step(cfg, mesh, token, logprob, cache):
    """Pin a step's outputs on a mesh: the cache as `cache_spec`; token and logprob ([B], a few bytes)
    replicated, so that every host can read them. A no-op without a mesh."""
    if mesh is None:
        return token, logprob, cache
    return (SH.constrain(token, mesh, SH.P()), SH.constrain(logprob, mesh, SH.P()),
            SH.constrain_cache(cache, mesh, cfg))


def _decode_step(cfg, params, cache, token, position, start, write_index, key, temperature, top_k, top_p, *,
                 mesh=None):
    """The one decode step both samplers run: feed `token`, return the next one, its logprob, the cache."""
    logits, cache = M.decode(params, cfg, token, position, start, write_index, cache)
    token, logprob = choose(logits, key, temperature, top_k, top_p, mesh=mesh)
    return token, logprob, cache


def _step(cfg, params, cache, token, next_position, start, prompt_len, i, key, temperature, top_k, top_p, *,
          mesh=None):
    """Decode step i: consumes token i, draws token i + 1 with fold_in(key, i + 1)."""
    out = _decode_step(cfg, params, cache, token, next_position + i, start, prompt_len + i,
                       jax.random.fold_in(key, i + 1), temperature, top_k, top_p, mesh=mesh)
    return _constrain_step(cfg, mesh, *out)


def _generate(cfg, params, cache, token, next_position, start, prompt_len, key, temperature, top_k, top_p,
              max_new, eos, *, steps: int, mesh=None):
    """Tokens 1..steps-1 in one lax.scan -> (cache, tokens, logprobs), tokens and logprobs [B, steps-1]. Jitted
    with the cache donated: returning it lets the scan update the prefill's cache in place (not a copy).
    `steps` is what the cache has room for (sample()), so every max_new_tokens in one cache bucket runs the
    same program: the steps past max_new are skipped at a few microseconds each."""
    cache, _, _, tokens, logprobs = _scan(cfg, params, cache, token, jnp.isin(token, eos), next_position, start,
                                      prompt_len, key, temperature, top_k, top_p, max_new, eos, 0, steps=steps - 1,
                                      mesh=mesh)
    return cache, tokens, logprobs


def _scan(cfg, params, cache, token, done, next_position, start, prompt_len, key, temperature, top_k, top_p, max_new,
          eos, first, *, steps: int, mesh=None):
    """Decode steps first..first+steps-1 in one lax.scan (step i draws token i + 1); steps past max_new or after
    every row hit eos (`done`) are skipped. `first` may be traced: sample(should_stop=...) runs this jitted as
    one chunk after another, carrying (cache, token, done) over.
    -> (cache, token, done, tokens [B, steps], logprobs [B, steps])"""

    def body(carry, i):
        cache, token, done = carry

        def run(cache):
            return _step(cfg, params, cache, token, next_position, start, prompt_len, i, key, temperature, top_k,
                         top_p, mesh=mesh)

        def skip(cache):
            return token, jnp.zeros(token.shape, jnp.float32), cache

        token, logprob, cache = jax.lax.cond((i + 1 < max_new) & ~jnp.all(done), run, skip, cache)
        done = done | jnp.isin(token, eos)
        return (cache, token, done), (token, logprob)

    (cache, token, done), (tokens, logprobs) = jax.lax.scan(body, (cache, token, done), first + jnp.arange(steps))
    # on a mesh: the cache as `cache_spec`, the rest replicated so that every host can read it
    token, done, cache = _constrain_step(cfg, mesh, token, done, cache)
    return cache, token, done, SH.constrain(tokens.T, mesh, SH.P()), SH.constrain(logprobs.T, mesh, SH.P())


def _check_context(model: M.Qwen3VL, inputs: VLMInputs, cfg: SamplingConfig) -> None:
    longest = int(inputs.lengths[: inputs.num_rows].max())
    limit = model.cfg.text.max_position_embeddings
    if longest + cfg.max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens")


def _start(model: M.Qwen3VL, params, inputs: VLMInputs, cfg: SamplingConfig, rng, dev: dict | None = None,
           compile_decode: Callable | None = None):
    """Vision tower (if any images) + prefill + first token. Returns device arrays, no host sync.
    `dev`: `inputs` as `_device_inputs` placed them (computed here when not given). `compile_decode(token,
    logprob, cache)`, given the prefill's output shapes, compiles the sampler's decode program (`.ahead`)
    before the prefill allocates the KV cache, so that the compiler's transient memory does not stack on
    the cache: 2B on a CPU, ~0.13 GiB of compiling beside a batch-8 cache of 0.12 GiB. Without a mesh
    (on one, the shapes would also have to carry the cache's sharding)."""
    _check_context(model, inputs, cfg)
    mesh = SH.mesh_of(params)
    if dev is None:
        inputs, dev = _device_inputs(inputs, mesh)
    if inputs.vision is not None:
        v = dev["vision"]
        vision_embeds, deepstack = model.jit(_encode)(params, v.patches, v.pos_taps, v.pos_weights, v.rope,
                                                      v.segment)
    else:  # text only: one zero image embedding that no token uses. The prefill is then the same program
        # as with images, so a text row gets the same numbers alone as beside images (XLA rounds a bf16
        # residual sum differently when it has the deepstack add to fuse, even of zeros).
        d, k = model.cfg.text.hidden_size, len(model.cfg.vision.deepstack_visual_indexes)
        vision_embeds, deepstack = np.zeros((1, d), model.dtype), np.zeros((k, 1, d), model.dtype)
        if mesh is not None:
            vision_embeds, deepstack = (SH.place(a, mesh, SH.P()) for a in (vision_embeds, deepstack))
    cache_len = bucket(inputs.prompt_tokens.shape[1] + cfg.max_new_tokens, CACHE_BUCKET_MIN)
    prefill = model.jit(_prefill, static_argnames=("cache_len", "mesh"))
    args = (params, dev["prompt_tokens"], dev["positions"], dev["start"], vision_embeds, deepstack, dev["vision_index"],
            rng, *_knobs(cfg))
    if compile_decode is not None and mesh is None:
        compile_decode(*prefill.ahead(*args, cache_len=cache_len, mesh=mesh))
    return prefill(*args, cache_len=cache_len, mesh=mesh)


def _device_inputs(inputs: VLMInputs, mesh) -> tuple[VLMInputs, dict]:
    """The arrays the jitted functions take. On a mesh: rows padded to a multiple of `data` and put over
    it, the vision inputs replicated; without one, the host arrays as they are."""
    names = ("prompt_tokens", "positions", "start", "next_position", "vision_index")
    if mesh is None:
        return inputs, {"vision": inputs.vision} | {n: getattr(inputs, n) for n in names}
    inputs = SH.pad_rows(inputs, mesh.shape[SH.DATA])
    rows = SH.batch_axis(mesh, inputs.prompt_tokens.shape[0])
    specs = {"prompt_tokens": SH.P(rows, None), "positions": SH.P(None, rows, None), "start": SH.P(rows),
             "next_position": SH.P(rows), "vision_index": SH.P(rows, None)}
    dev = {n: SH.place(getattr(inputs, n), mesh, specs[n]) for n in names}
    v = inputs.vision
    if v is not None:
        fields = ("patches", "pos_taps", "pos_weights", "rope", "segment")
        v = replace(v, **{f: SH.place(getattr(v, f), mesh, SH.P()) for f in fields})
    return inputs, dev | {"vision": v}


def _knobs(cfg: SamplingConfig):
    return np.float32(cfg.temperature), np.int32(cfg.top_k), np.float32(cfg.top_p)


class Detokenizer:
    """Incremental detokenizer: emits text only once it is complete UTF-8; the pieces join to decode(all)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD, as decode() does)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def sample_streaming(model: M.Qwen3VL, params, inputs: VLMInputs, sampling_cfg: SamplingConfig, rng,
                     tokenizer=None) -> Iterator[tuple[int, str, float]]:
    """Yield (token_id, new_text, logprob) per generated token, batch 1. Text is '' without a tokenizer,
    for special tokens and while a multi-byte character is incomplete. Closing the generator stops it."""
    if inputs.num_rows != 1:
        raise ValueError(f"sample_streaming takes one row, got {inputs.num_rows}; use sample() for batches")
    cfg = sampling_cfg.resolved(model)
    mesh = SH.mesh_of(params)
    inputs, dev = _device_inputs(inputs, mesh)
    step = model.jit(_step, donate_argnames="cache", static_argnames="mesh")
    args = (dev["next_position"], dev["start"], np.int32(inputs.prompt_tokens.shape[1]))
    # the step gets the text decoder's arrays only: handing a program its arguments costs the host ~5 us an
    # array at every call (2B: 310 arrays instead of 625, ~2.0 ms instead of ~2.7 ms a step on a 2-core CPU)
    decoder = {name: tree for name, tree in params.items() if name != "visual"}

    def compile_step(token, logprob, cache):
        step.ahead(decoder, cache, token, *args, np.int32(0), rng, *_knobs(cfg), mesh=mesh)

    token, logprob, cache = _start(model, params, inputs, cfg, rng, dev,
                                   compile_step if cfg.max_new_tokens > 1 else None)  # else no step runs
    detok = Detokenizer(tokenizer) if tokenizer is not None else None
    eos = set(cfg.eos_id)
    for i in range(cfg.max_new_tokens):
        pending = None
        if i + 1 < cfg.max_new_tokens:  # dispatch step i before reading token i: device works while host decodes
            pending = step(decoder, cache, token, *args, np.int32(i), rng, *_knobs(cfg), mesh=mesh)
        # np.asarray waits for token i only; token[0] would be an XLA op that XLA:CPU queues behind step i
        # (the device would idle while the host decodes and yields)
        tok, lp = int(np.asarray(token)[0]), float(np.asarray(logprob)[0])
        last = tok in eos or pending is None
        text = ""
        if detok is not None:
            text = detok.flush() if tok in eos else detok.push(tok) + (detok.flush() if last else "")
        yield tok, text, lp
        if last:
            return
        token, logprob, cache = pending


def _decode_in_chunks(chunk: Callable, params, cache, token, args, cfg: SamplingConfig, rows: int,
                      should_stop: Callable[[], bool], mesh) -> tuple[list, bool]:
    """sample()'s decode loop as one lax.scan chunk (`_scan` jitted) of STOP_CHUNK steps after another (one
    compiled chunk, the cache donated from each to the next). should_stop() is asked before each chunk; the
    loop also ends once every row has hit eos or max_new is reached.
    -> ([(tokens, logprobs) [B, STOP_CHUNK] per chunk], stopped)"""
    done, parts, first = np.isin(np.asarray(token), cfg.eos_id), [], 0
    while first + 1 < cfg.max_new_tokens and not done[:rows].all():
        if should_stop():
            return parts, True
        cache, token, done, tokens, logprobs = chunk(params, cache, token, done, *args, np.int32(first),
                                                     steps=STOP_CHUNK, mesh=mesh)
        parts.append((tokens, logprobs))
        done, first = np.asarray(done), first + STOP_CHUNK  # waits for the chunk: a stop lands within one
    return parts, False


def sample(model: M.Qwen3VL, params, inputs: VLMInputs, sampling_cfg: SamplingConfig, rng,
           tokenizer=None, *, should_stop: Callable[[], bool] | None = None) -> SampleResult:
    """The whole decode loop in one jitted lax.scan, any batch; each row is cut at its own eos.

    With `should_stop`, the loop runs as lax.scan chunks of STOP_CHUNK steps instead (the same tokens, one
    compile for every chunk): should_stop() is called before each chunk, and once it returns True the result
    holds the tokens made so far, with `stopped=True`."""
    cfg = sampling_cfg.resolved(model)
    mesh = SH.mesh_of(params)
    inputs, dev = _device_inputs(inputs, mesh)
    args = (dev["next_position"], dev["start"], np.int32(inputs.prompt_tokens.shape[1]), rng, *_knobs(cfg),
            np.int32(cfg.max_new_tokens), np.asarray(cfg.eos_id, np.int32))
    generate = model.jit(_generate, donate_argnames="cache", static_argnames=("steps", "mesh"))
    chunk = model.jit(_scan, donate_argnames="cache", static_argnames=("steps", "mesh"))
    steps = lambda cache: M.cache_length(cache) - inputs.prompt_tokens.shape[1]  # noqa: E731 (the cache's room)

    def compile_decode(token, logprob, cache):
        if should_stop is None:
            generate.ahead(params, cache, token, *args, steps=steps(cache), mesh=mesh)
        elif cfg.max_new_tokens > 1:  # else no chunk runs
            chunk.ahead(params, cache, token, np.zeros(token.shape, bool), *args, np.int32(0), steps=STOP_CHUNK,
                        mesh=mesh)

    token, logprob, cache = _start(model, params, inputs, cfg, rng, dev, compile_decode)
    stopped = False
    if should_stop is None:
        _, tokens, logprobs = generate(params, cache, token, *args, steps=steps(cache), mesh=mesh)
        parts = [(tokens, logprobs)]
    else:
        parts, stopped = _decode_in_chunks(chunk, params, cache, token, args, cfg, inputs.num_rows, should_stop,
                                            mesh)
    tokens = np.concatenate([np.asarray(token)[:, None]] + [np.asarray(t) for t, _ in parts], axis=1)
    tokens = tokens[:, : cfg.max_new_tokens]
    logprobs = np.concatenate([np.asarray(logprob)[:, None]] + [np.asarray(lp) for _, lp in parts], axis=1)
    out_tokens, out_logprobs, texts = [], [], []
    for row in range(inputs.num_rows):
        ids = tokens[row].tolist()
        hits = [j for j, t in enumerate(ids) if t in cfg.eos_id]
        n = hits[0] + 1 if hits else len(ids)
        out_tokens.append(ids[:n])
        out_logprobs.append(logprobs[row, :n].tolist())
        texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True) if tokenizer is not None else "")
    return SampleResult(texts=texts, tokens=out_tokens, logprobs=out_logprobs, stopped=stopped)
