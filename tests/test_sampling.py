"""Samplers: exact against transformers' greedy generate, streaming == scan, batch rows == alone, compile once."""

from dataclasses import replace

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from vlm import SamplingConfig, load_model, prepare_inputs, sample, sample_streaming
from vlm import sampling as S
from vlm.inputs import bucket
from vlm.sampling import STOP_CHUNK, Detokenizer, process_logits

transformers = pytest.importorskip("transformers")


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load_model(tiny_dir, dtype="float32")


def _stream(model, params, tok, inputs, cfg, seed=0):
    return list(sample_streaming(model, params, inputs, cfg, jax.random.key(seed), tokenizer=tok))


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_equals_transformers_generate(ours, tiny_dir, with_image):
    model, params, tok = ours
    image = _image(288, 256, 0) if with_image else None
    inputs = prepare_inputs(model, params, tok, [image], ["Describe this image in detail."])
    cfg = SamplingConfig(temperature=0, max_new_tokens=40, eos_id=[151645, 151643])
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor(inputs.prompt_tokens[:1, inputs.start[0]:].astype(np.int64))
    kwargs = {"mm_token_type_ids": (ids == model.cfg.image_token_id).long()}
    if with_image:
        v = inputs.vision
        kwargs |= {"pixel_values": torch.tensor(v.patches[: v.num_patches]),
                   "image_grid_thw": torch.tensor(inputs.grid_thw)}
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40,
                          eos_token_id=[151645, 151643], pad_token_id=151643, **kwargs)
    ref = out[0, ids.shape[1]:].tolist()
    assert len(set(ref)) > 5, "the tiny model should not repeat one token (weak comparison)"
    streamed = [t for t, _, _ in _stream(model, params, tok, inputs, cfg)]
    scanned = sample(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok).tokens[0]
    assert streamed == ref
    assert scanned == ref


def test_streaming_equals_scan_with_sampling(ours):
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [_image(256, 300, 1)], ["Tell me a story about it."])
    cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=48)
    for seed in (0, 1):
        streamed = _stream(model, params, tok, inputs, cfg, seed)
        res = sample(model, params, inputs, cfg, jax.random.key(seed), tokenizer=tok)
        assert [t for t, _, _ in streamed] == res.tokens[0]
        assert np.allclose([lp for _, _, lp in streamed], res.logprobs[0], atol=1e-5)
        assert "".join(text for _, text, _ in streamed) == res.texts[0]
        assert res.texts[0] == tok.decode(res.tokens[0], skip_special_tokens=True)
    other = sample(model, params, inputs, cfg, jax.random.key(2), tokenizer=tok)
    assert other.tokens[0] != res.tokens[0], "different seeds should give different samples"


def test_batch_rows_equal_rows_alone(ours):
    model, params, tok = ours
    images = [_image(256, 256, 2), None, [_image(320, 200, 3), _image(200, 330, 4)], _image(400, 260, 5)]
    prompts = ["What is this?", "Write a haiku about the sea, please.", "Compare these two.", "Describe."]
    cfg = SamplingConfig(temperature=0, max_new_tokens=24)
    batch = sample(model, params, prepare_inputs(model, params, tok, images, prompts), cfg, jax.random.key(0),
                   tokenizer=tok)
    for i in range(len(prompts)):
        alone = sample(model, params, prepare_inputs(model, params, tok, [images[i]], [prompts[i]]), cfg,
                       jax.random.key(0), tokenizer=tok)
        assert batch.tokens[i] == alone.tokens[0], f"row {i}"
        assert batch.texts[i] == alone.texts[0]
        assert np.allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-4)


def test_eos_stops_both_samplers(ours):
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [None], ["Hi"])
    free = sample(model, params, inputs, SamplingConfig(temperature=0, max_new_tokens=12), jax.random.key(0))
    eos = free.tokens[0][3]  # pretend the 4th greedy token is an eos id
    cfg = SamplingConfig(temperature=0, max_new_tokens=12, eos_id=[7, eos])
    res = sample(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok)
    streamed = _stream(model, params, tok, inputs, cfg)
    assert res.tokens[0] == free.tokens[0][: free.tokens[0].index(eos) + 1]
    assert [t for t, _, _ in streamed] == res.tokens[0]
    assert streamed[-1][1] == ""  # the eos token carries no text


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 3, 0.9),
                                                     (1.0, 1, 0.5), (2.0, 50, 0.99)])
def test_logits_processing_matches_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 300)).astype(np.float32) * 3
    logits[1, :40] = 2.5  # ties, across the top-k / top-p cut
    logits[2, 10:20] = logits[2].max()
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(TopPLogitsWarper(top_p))
    ref = procs(None, torch.tensor(logits)).numpy()
    got = np.asarray(process_logits(jax.numpy.asarray(logits), np.float32(temperature), np.int32(top_k),
                                    np.float32(top_p)))
    kept, ref_kept = ~np.isinf(got), ~np.isinf(ref)
    assert np.allclose(got[kept], (logits / temperature)[kept], atol=1e-6)  # kept logits are just scaled
    for row in range(len(logits)):
        extra = kept[row] & ~ref_kept[row]
        assert not (ref_kept[row] & ~kept[row]).any()  # everything transformers keeps, we keep
        # anything more is an exact tie with the smallest logit transformers kept (torch.sort tie order)
        assert (got[row, extra] == ref[row, ref_kept[row]].min()).all()
    untied = [0, 3]
    assert np.array_equal(kept[untied], ref_kept[untied])


@pytest.mark.parametrize("text", ["你好，世界！这是一个测试。", "emoji 🐼🎉👩‍💻 mixed ü é", "plain ascii text"])
def test_streamed_text_joins_to_decode(ours, text):
    _, _, tok = ours
    ids = tok.encode(text) + [151645]
    detok = Detokenizer(tok)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text


def test_streamed_text_with_invalid_bytes(ours):
    """Byte tokens that never form valid UTF-8 still join to exactly what decode() shows."""
    _, _, tok = ours
    byte_ids = [tok.convert_tokens_to_ids(t) for t in ["Ã", "¤", "Ġ", "ä", "½"]]  # byte-level pieces
    ids = byte_ids + tok.encode("ok 好") + byte_ids[:1]
    detok = Detokenizer(tok)
    assert "".join([detok.push(t) for t in ids] + [detok.flush()]) == tok.decode(ids, skip_special_tokens=True)


def test_sampling_config_validation():
    for bad in [dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5),
                dict(max_new_tokens=0)]:
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_max_new_tokens_beyond_context(ours):
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [None], ["Hi"])
    with pytest.raises(ValueError, match="context"):
        sample(model, params, inputs, SamplingConfig(max_new_tokens=10**6), jax.random.key(0))


def test_second_and_third_requests_do_not_compile(ours):
    model, params, tok = ours
    first = prepare_inputs(model, params, tok, [_image(288, 256, 6)], ["What is this?"])
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=20)
    sample(model, params, first, cfg, jax.random.key(0))
    _stream(model, params, tok, first, cfg)
    before = model.compile_count
    for i, (size, prompt) in enumerate([((256, 288), "Describe the picture briefly."), ((320, 256), "Animals?")]):
        inputs = prepare_inputs(model, params, tok, [_image(*size, 7 + i)], [prompt])
        assert inputs.prompt_tokens.shape == first.prompt_tokens.shape  # same buckets, other sizes
        assert inputs.vision.patches.shape == first.vision.patches.shape
        assert inputs.vision.num_patches != first.vision.num_patches or i == 0
        other = SamplingConfig(temperature=0.5 + i, top_k=3 + i, top_p=0.7, max_new_tokens=18 + i)
        sample(model, params, inputs, other, jax.random.key(i))
        _stream(model, params, tok, inputs, other, seed=i)
    assert model.compile_count == before


def test_one_scan_program_for_every_length_the_cache_holds(ours):
    """sample() scans as many steps as the cache bucket has room for, skipping those past max_new_tokens:
    another length in the same cache bucket compiles nothing, and its tokens are the longer run's prefix."""
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [_image(256, 300, 9), None], ["What is this?", "Say hi"])
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=90, eos_id=[-1])
    lengths = (33, 50, 77)
    prompt = inputs.prompt_tokens.shape[1]
    assert len({bucket(prompt + n, S.CACHE_BUCKET_MIN) for n in (*lengths, 90)}) == 1  # one cache bucket
    long = sample(model, params, inputs, cfg, jax.random.key(5))
    before = model.compile_count
    for n in lengths:
        short = sample(model, params, inputs, replace(cfg, max_new_tokens=n), jax.random.key(5))
        assert short.tokens == [t[:n] for t in long.tokens]
    assert model.compile_count == before


def test_dropped_programs_compile_again_and_answer_the_same(ours):
    """drop_programs() (the demo's server.max_programs) forgets every compiled program: the next request
    compiles its programs again and answers as before."""
    model, params, tok = ours
    inputs = prepare_inputs(model, params, tok, [_image(288, 256, 10)], ["What is this?"])
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=12)
    before = sample(model, params, inputs, cfg, jax.random.key(3)), _stream(model, params, tok, inputs, cfg)
    assert model.programs >= 4  # vision tower, prefill, scan, decode step (and earlier tests' programs)
    model.drop_programs()
    assert model.programs == 0
    compiles = model.compile_count
    again = sample(model, params, inputs, cfg, jax.random.key(3)), _stream(model, params, tok, inputs, cfg)
    assert model.compile_count - compiles == model.programs == 4
    assert again[0].tokens == before[0].tokens and again[1] == before[1]


@pytest.mark.parametrize("sampler", ["streaming", "scan", "chunked"])
def test_decode_program_compiles_before_the_kv_cache_exists(tiny_dir, sampler):
    """Each sampler compiles its decode program before the prefill allocates the KV cache (so that the
    compiler's transient memory does not stack on the cache), once: the call reuses that program."""
    model, params, tok = load_model(tiny_dir, dtype="float32")  # its own programs: all compile here
    inputs = prepare_inputs(model, params, tok, [_image(288, 256, 11)], ["What is this?"])
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=12)
    text = model.cfg.text
    cache_slots = (text.num_key_value_heads, bucket(inputs.prompt_tokens.shape[1] + 12, S.CACHE_BUCKET_MIN),
                   text.head_dim)
    caches_live = []  # at each compile: whether any KV cache array is alive

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            caches_live.append(any(a.shape[-3:] == cache_slots for a in jax.live_arrays()))

    jax.monitoring.register_event_duration_secs_listener(on_event)
    persistent = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # every program is compiled, none loaded
    try:
        if sampler == "streaming":
            tokens = [t for t, _, _ in _stream(model, params, tok, inputs, cfg)]
        else:
            stop = (lambda: False) if sampler == "chunked" else None
            tokens = sample(model, params, inputs, cfg, jax.random.key(0), should_stop=stop).tokens[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
        jax.config.update("jax_enable_compilation_cache", persistent)
    assert len(tokens) == 12
    assert model.programs == 3  # vision tower, prefill, the decode program
    assert len(caches_live) >= 3  # (and jax's own small programs: a key, dtype conversions)
    assert not any(caches_live)


def _chunked_inputs(model, params, tok):
    return prepare_inputs(model, params, tok, [_image(256, 300, 8), None], ["Tell me a story about it.", "Say hi"])


def test_chunked_scan_equals_one_scan(ours):
    """sample(should_stop=...) decodes in lax.scan chunks: the same tokens as one scan, and it ends once every
    row has hit eos."""
    model, params, tok = ours
    inputs = _chunked_inputs(model, params, tok)
    cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=45)  # not a multiple of the chunk
    assert cfg.max_new_tokens % STOP_CHUNK
    for seed in (0, 1):
        one = sample(model, params, inputs, cfg, jax.random.key(seed), tokenizer=tok)
        chunked = sample(model, params, inputs, cfg, jax.random.key(seed), tokenizer=tok, should_stop=lambda: False)
        assert [len(t) for t in one.tokens] == [45, 45] and one.tokens[0] != one.tokens[1]
        assert chunked.tokens == one.tokens and chunked.texts == one.texts
        assert not chunked.stopped and not one.stopped
        for row in range(2):
            assert np.allclose(chunked.logprobs[row], one.logprobs[row], atol=1e-6, rtol=0)
    # eos: rows end at their own eos, and no chunk runs once every row has hit one
    eos_cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=45,
                             eos_id=[one.tokens[0][9], one.tokens[1][20]])
    one = sample(model, params, inputs, eos_cfg, jax.random.key(1), tokenizer=tok)
    calls = []

    def count_asks() -> bool:
        calls.append(1)
        return False

    chunked = sample(model, params, inputs, eos_cfg, jax.random.key(1), tokenizer=tok, should_stop=count_asks)
    assert chunked.tokens == one.tokens and not chunked.stopped
    longest = max(len(t) for t in one.tokens)
    assert longest <= 21 and len(calls) == -(-(longest - 1) // STOP_CHUNK)  # one ask per chunk run, no more


@pytest.mark.parametrize("chunks", [0, 2])
def test_should_stop_returns_the_tokens_made_so_far(ours, chunks):
    model, params, tok = ours
    inputs = _chunked_inputs(model, params, tok)
    cfg = SamplingConfig(temperature=0.9, top_k=40, top_p=0.85, max_new_tokens=45)
    full = sample(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok)
    calls = []

    def should_stop():  # False for the first `chunks` asks, then True
        calls.append(1)
        return len(calls) > chunks

    res = sample(model, params, inputs, cfg, jax.random.key(0), tokenizer=tok, should_stop=should_stop)
    n = 1 + chunks * STOP_CHUNK  # the prefill token, then STOP_CHUNK per chunk run
    assert res.stopped and len(calls) == chunks + 1
    for row in range(2):
        assert res.tokens[row] == full.tokens[row][:n]
        assert np.allclose(res.logprobs[row], full.logprobs[row][:n], atol=1e-6, rtol=0)
        assert res.texts[row] == tok.decode(res.tokens[row], skip_special_tokens=True)


def test_chunked_scan_compiles_once_not_per_chunk_or_length(ours):
    model, params, tok = ours
    inputs = _chunked_inputs(model, params, tok)
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=20)
    sample(model, params, inputs, cfg, jax.random.key(0), should_stop=lambda: False)
    before = model.compile_count
    # other sampling values, seed and length (another steps bucket for one scan, the same chunk)
    other = SamplingConfig(temperature=0.5, top_k=3, top_p=0.7, max_new_tokens=70)
    res = sample(model, params, inputs, other, jax.random.key(3), should_stop=lambda: False)
    assert [len(t) for t in res.tokens] == [70, 70]
    assert model.compile_count == before


@pytest.mark.parametrize("chunked", [False, True])
def test_scan_sampler_decodes_into_the_prefill_cache(ours, monkeypatch, chunked):
    """The decode scan takes the prefill's KV cache over (donated), instead of working on a copy of it:
    at batch 8 x 256 slots of the 2B model a copy was 224 MB more at the peak."""
    model, params, tok = ours
    caches, start = [], S._start
    monkeypatch.setattr(S, "_start", lambda *a, **k: (out := start(*a, **k), caches.append(out[2]))[0])
    res = sample(model, params, _chunked_inputs(model, params, tok), SamplingConfig(max_new_tokens=20),
                 jax.random.key(0), should_stop=(lambda: False) if chunked else None)
    assert [len(t) for t in res.tokens] == [20, 20]
    assert all(a.is_deleted() for a in jax.tree.leaves(caches))


@pytest.mark.parametrize("top_k,top_p", [(20, 0.8), (1, 1.0), (64, 0.95), (65, 0.9), (0, 0.5), (5, 0.3)])
def test_top_k_fast_path_keeps_what_the_full_sort_keeps(top_k, top_p):
    """process_logits takes lax.top_k instead of sorting the vocabulary when top-k is on; ties at the k-th
    value (more candidates than TOP_K_FAST) fall back to the sort. Both give the same kept set."""
    from vlm.sampling import TOP_K_FAST, _top_p_cut

    rng = np.random.default_rng(top_k)
    logits = (rng.standard_normal((3, 151936)) * 4).astype(np.float32)
    logits[1, : TOP_K_FAST + 10] = logits[1].max()  # more ties at the top than the fast path holds
    logits[2] = np.round(logits[2], 1)  # many ties everywhere
    x = jax.numpy.asarray(logits) / 0.7
    ref = np.asarray(x >= _top_p_cut(jax.numpy.sort(x, axis=-1), np.int32(top_k), np.float32(top_p), x.shape[-1]))
    got = np.asarray(process_logits(jax.numpy.asarray(logits), np.float32(0.7), np.int32(top_k), np.float32(top_p)))
    assert np.array_equal(~np.isinf(got), ref)


@pytest.mark.parametrize("top_k,top_p,only_three", [
    (3, 1.0, True),  # top-k's fast path: drawn among its own candidates
    (0, 0.99, True),  # top-k off, top-p keeps three: drawn among a second top-k's
    (100, 0.99, True),  # top-k above the fast path's 64, the same
    (0, 1.0, False),  # every token kept: drawn over the whole vocabulary
])
def test_draws_follow_the_kept_distribution(top_k, top_p, only_three):
    """choose() draws among the kept tokens only with their softmax odds, on each of its three paths."""
    from vlm.sampling import choose

    logits = np.full((1, 5000), -5.0, np.float32)
    logits[0, [7, 1234, 4999]] = np.log([0.5, 0.3, 0.2]) + 10  # the other 4997 tokens: 0.15 % of the odds
    draw = jax.jit(jax.vmap(lambda k: choose(jax.numpy.asarray(logits), k, np.float32(1.0), np.int32(top_k),
                                             np.float32(top_p))[0][0]))
    tokens = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
    others = set(tokens.tolist()) - {7, 1234, 4999}
    assert not others if only_three else others  # ~6 of 4000 draws expected outside the three
    freq = [np.mean(tokens == t) for t in (7, 1234, 4999)]
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.03), freq
