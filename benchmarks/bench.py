"""Benchmark: this JAX Qwen3-VL against transformers and against the machine's memory-bandwidth limit.

    python benchmarks/bench.py                    # Qwen3-VL-2B-shaped random weights, default dtype
    python benchmarks/bench.py --dtype bfloat16   # JAX side in bf16 (transformers always runs f32 and bf16)
    python benchmarks/bench.py --quantize int8    # JAX side with int8 text weights (vlm/quantize.py)
    python benchmarks/bench.py --quick            # tiny model, few tokens: a smoke test (well under a minute)

The random 2B-shaped checkpoint (real Qwen3-VL-2B config, N(0, 0.02) weights, norms 1, bf16 safetensors,
the real Qwen tokenizer) is written once to $VLM_CACHE (default ~/.cache/vlm) and loaded by both sides.
Each side runs in its own subprocess, so its peak RSS is its own and memory never holds two models.
Results: one Markdown table on stdout and benchmarks/results/<machine>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CKPT_VERSION = "bench-qwen3vl-2b-random-v1"
IMAGE_PAD = 151655
PAD = 151643
PROMPT = ("Describe this picture in detail: which objects and colours do you see, where are they placed, "
          "and what might have happened just before it was taken?")  # ~32 tokens
PROMPT_2 = "What is the main colour in this image, in one word?"  # the warm second request
BATCH_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night.",
    "Explain how a refrigerator keeps food cold, step by step, for a curious ten year old child.",
    "List five reasons why people enjoy hiking in the mountains, and describe each one briefly.",
    "Describe the taste, smell and texture of freshly baked bread to someone who has never eaten it.",
    "What are the main differences between a violin and a cello? Answer in a few short sentences.",
    "Give me a packing list for a weekend camping trip in autumn, with a note on why each item matters.",
    "Summarise the water cycle in plain words, from the ocean to the clouds and back to the rivers.",
    "Invent a new board game for four players and explain its rules, goal and a typical first turn.",
]
IMAGE_SIZE, IMAGE_2_SIZE = (448, 448), (416, 480)  # (w, h); both land in the same patch/prompt buckets

# Qwen3-VL-2B-Instruct's config.json values (text_config / vision_config).
TEXT_2B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
           "rope_parameters": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_theta": 5000000,
                               "rope_type": "default"}}
VISION_2B = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "out_hidden_size": 2048,
             "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 2304,
             "deepstack_visual_indexes": [5, 11, 17]}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the random 2B-shaped checkpoint


def _hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _write_safetensors_bf16(path: Path, shapes: dict[str, tuple[int, ...]], init) -> None:
    """Stream tensors into a bf16 .safetensors file one at a time (never the whole model in memory)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in shapes.items():
            x = init(name, shape).astype(np.float32)
            bits = x.view(np.uint32)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
            f.write(bits.tobytes())


def build_2b_checkpoint(out: Path, seed: int = 0) -> Path:
    """Qwen3-VL-2B config + random weights (N(0, 0.02) matrices, norms 1, biases 0) + tokenizer, in HF format."""
    from vlm import tiny
    from vlm.config import ModelConfig
    from vlm.weights import expected_shapes

    config = tiny.config_dict(tie_word_embeddings=True)
    config["text_config"].update(TEXT_2B)
    config["vision_config"].update(VISION_2B)
    config["dtype"] = "bfloat16"
    shapes = {_hf_key(k): v for k, v in expected_shapes(ModelConfig.from_dict(config)).items()}
    v = VISION_2B
    shapes["model.visual.patch_embed.proj.weight"] = (v["hidden_size"], 3, v["temporal_patch_size"],
                                                      v["patch_size"], v["patch_size"])  # Conv3d, as HF saves it
    rng = np.random.default_rng(seed)

    def init(name, shape):
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        if len(shape) == 1:  # RMSNorm / LayerNorm weight
            return np.ones(shape, np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors_bf16(out / "model.safetensors", shapes, init)
    tiny._write_json(out / "config.json", config)
    tiny._write_json(out / "generation_config.json", {
        "bos_token_id": PAD, "do_sample": True, "eos_token_id": tiny.EOS_TOKEN_IDS, "pad_token_id": PAD,
        "temperature": 0.7, "top_k": 20, "top_p": 0.8})
    tiny._write_json(out / "preprocessor_config.json", {
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2, "patch_size": 16, "temporal_patch_size": 2,
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}})
    tiny._write_tokenizer(out)
    return out


def checkpoint(model: str) -> Path:
    """The checkpoint dir for --model (built and cached on first use)."""
    from vlm import tiny
    from vlm.cache import cache_dir

    if model == "tiny":
        return tiny.tiny_path()
    cache = cache_dir()
    final = cache / CKPT_VERSION
    if (final / "config.json").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CKPT_VERSION}-", dir=cache))
    log(f"writing the random 2B-shaped checkpoint to {final} (once) ...")
    t = time.perf_counter()
    try:
        build_2b_checkpoint(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"  done in {time.perf_counter() - t:.0f} s")
    return final


# ---------------------------------------------------------------- shared inputs


def image(size: tuple[int, int], seed: int):
    """A deterministic picture: a colour gradient plus noise."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def requests(n_batch: list[int]) -> dict[str, tuple[list, list[str]]]:
    """name -> (images, prompts) of every request the benchmark makes (the same on both sides)."""
    reqs = {"image": ([image(IMAGE_SIZE, 0)], [PROMPT]), "image2": ([image(IMAGE_2_SIZE, 1)], [PROMPT_2])}
    for b in n_batch:
        reqs[f"text_b{b}"] = ([None] * b, [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(b)])
    return reqs


def export_inputs(ckpt: Path, n_batch: list[int], out: Path) -> dict:
    """Run prepare_inputs for every request (config + tokenizer only) and save transformers' view of it."""
    from vlm import prepare_inputs
    from vlm.config import ModelConfig, resolve_dtype
    from vlm.model import Qwen3VL
    from vlm.processing import PreprocessConfig, load_tokenizer

    gen = json.loads((ckpt / "generation_config.json").read_text())
    cfg = ModelConfig.from_dir(ckpt)
    model = Qwen3VL(cfg=cfg, dtype=resolve_dtype(None, cfg.stored_dtype),
                    preprocess=PreprocessConfig.from_dir(ckpt), generation=gen)
    tok = load_tokenizer(ckpt)
    arrays, info = {}, {}
    for name, (images, prompts) in requests(n_batch).items():
        x = prepare_inputs(model, None, tok, images, prompts)
        b = x.num_rows
        arrays[f"{name}.input_ids"] = x.prompt_tokens[:b]
        arrays[f"{name}.attention_mask"] = (np.arange(x.prompt_tokens.shape[1])[None] >= x.start[:b, None])
        if x.vision is not None:
            arrays[f"{name}.pixel_values"] = x.vision.patches[: x.vision.num_patches]
            arrays[f"{name}.image_grid_thw"] = x.grid_thw
        info[name] = {"rows": b, "prompt_tokens": int(x.lengths[:b].max()), "padded_to": int(x.prompt_tokens.shape[1]),
                      "image_tokens": int((x.prompt_tokens[:b] == IMAGE_PAD).sum()),
                      "grid_thw": x.grid_thw.tolist()}
    np.savez(out, **arrays)
    return info


# ---------------------------------------------------------------- machine and bandwidth


def machine() -> dict:
    import jax

    cpu = platform.processor() or "unknown CPU"
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    devices = jax.devices()
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1), "backend": jax.default_backend(),
            "isa": vector_isa(), "devices": [d.device_kind for d in devices], "jax": jax.__version__, "python": platform.python_version(),
            "load_avg_start": os.getloadavg()}


def vector_isa() -> str:
    """The widest vector instructions the CPU kernels build for here (vlm/cpu_kernels.cc): one CPU name (an
    "AMD EPYC" VM) covers Zen 3 with AVX2 only and Zen 4 with AVX-512 BF16, which run at very different speeds,
    and one "Intel Xeon" covers Xeons with and without AMX."""
    from vlm.cache import cpu_flags

    flags = set(cpu_flags().split())
    widest_first = (("amx", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
                    ("avx512bf16", {"avx512f", "avx512_bf16"}), ("avx512", {"avx512f"}), ("avx2", {"avx2", "fma"}))
    for isa, needs in widest_first:
        if needs <= flags:
            return isa
    return platform.machine()


def machine_slug(m: dict) -> str:
    if m["backend"] == "cpu":
        name = f"cpu-{m['cpu']}-{m.get('isa', '')}-{m['cores']}c"
    else:
        name = f"{m['backend']}-{m['devices'][0]}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(gib: float = 2.0, repeat: int = 10) -> dict:
    """Bytes/s of reading one large array: numpy on 1 and on all host threads, and a jitted jnp.sum on the
    default device. The limit is the best of them (the fastest any reader got)."""
    import jax
    import jax.numpy as jnp

    out = {}
    if jax.default_backend() == "cpu":
        a = np.ones(int(gib * 2**30) // 4, np.float32)
        out["numpy_1_thread"] = a.nbytes / _best(a.sum, repeat)
        parts = np.array_split(a, os.cpu_count() or 1)

        def threaded():
            ts = [threading.Thread(target=p.sum) for p in parts]
            [t.start() for t in ts]
            [t.join() for t in ts]

        out["numpy_all_threads"] = a.nbytes / _best(threaded, repeat)
        del a, parts
    x = jnp.ones(int(gib * 2**30) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    out["jax_sum"] = x.nbytes / _best(lambda: total(x).block_until_ready(), repeat)
    del x
    out["best"] = max(out.values())
    return out


def decode_bytes_per_token(ckpt: Path, itemsize: int) -> int:
    """Weight bytes one decode step must read: every text-decoder weight plus the output head (the tied
    embedding table, read whole by lm_head; the input embedding reads one row)."""
    from vlm.config import ModelConfig
    from vlm.weights import expected_shapes

    shapes = expected_shapes(ModelConfig.from_dir(ckpt))
    n = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(("language_model.", "lm_head.")))
    return n * itemsize


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def peak_device_jax() -> int | None:
    """Peak bytes XLA's allocator held on the accelerator (None on a CPU, where RSS says it)."""
    import jax

    if jax.default_backend() == "cpu":
        return None
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


# ---------------------------------------------------------------- the JAX side


def weight_reader(params):
    """A plain read of the matrices a decode step reads (the text decoder's and the output head, a tied one
    being the token table), as the limit's jnp.sum reads its array: their memory viewed as float32, summed
    by one jitted program. -> (bytes, a function timing one read), or None off a CPU or if jax would copy
    the views instead of aliasing them."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return None
    tree = {"language_model": params["language_model"], "lm_head": params.get("lm_head")}
    host = [np.asarray(a).reshape(-1).view(np.float32) for a in jax.tree.leaves(tree) if a.ndim == 2 and a.nbytes % 4 == 0]
    views = []
    for a in host:
        views.append(jax.device_put(a))
        if views[-1].unsafe_buffer_pointer() != a.ctypes.data:
            return None
    total = jax.jit(lambda vs: sum(jnp.sum(v) for v in vs))
    total(views).block_until_ready()
    return sum(a.nbytes for a in host), lambda: _timed(lambda: total(views).block_until_ready())


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from vlm import SamplingConfig, cpu_kernels, load_model, prepare_inputs, sample, sample_streaming
    from vlm.memory import tune_malloc
    from vlm.weights import param_bytes

    res: dict = {"side": "jax"}
    tune_malloc()  # as the demo and the CLIs do
    t = time.perf_counter()
    model, params, tok = load_model(args.ckpt, dtype=args.dtype, quantize=args.quantize)
    jax.block_until_ready(params)
    res["load_s"] = time.perf_counter() - t
    res["dtype"] = model.quantize or np.dtype(model.dtype).name  # int8: what a decode step reads
    res["weight_bytes"] = param_bytes(params)
    res["decode_products"] = "vlm/cpu_kernels.cc" if cpu_kernels.applies(
        jnp.zeros((1, 32), model.dtype), jnp.zeros((8, 32), jnp.int8 if args.quantize == "int8" else model.dtype)
    ) else "XLA"
    res["rss_after_load"] = peak_rss()
    log(f"[jax] loaded {res['weight_bytes'] / 2**30:.2f} GiB of {res['dtype']} weights in {res['load_s']:.1f} s")
    n = args.tokens
    cfg = SamplingConfig(max_new_tokens=n, eos_id=[-1])  # checkpoint's sampling settings; eos can never occur
    reqs = requests(args.batch)
    rng = jax.random.key(0)

    def stream(name: str) -> dict:
        """One streaming request from raw images + prompt: preprocessing, first token, then the rest."""
        t0 = time.perf_counter()
        x = prepare_inputs(model, params, tok, *reqs[name])
        t1 = time.perf_counter()
        stamps = [time.perf_counter() for _ in sample_streaming(model, params, x, cfg, rng)]
        return {"prepare_s": t1 - t0, "prefill_s": stamps[0] - t1, "ttft_s": stamps[0] - t0, "total_s": stamps[-1] - t0,
                "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None}

    # first request: compiles the vision tower, prefill and decode step
    c0 = model.compile_count
    cold = stream("image")
    res["compiles_first_request"] = model.compile_count - c0
    warm = [stream("image") for _ in range(args.repeat)]
    best = min(warm, key=lambda r: r["total_s"])
    res["first_request_s"] = cold["total_s"]
    res["compile_s"] = cold["total_s"] - best["total_s"]
    res["prepare_s"] = min(r["prepare_s"] for r in warm)
    res["prefill_s"] = min(r["prefill_s"] for r in warm)
    log(f"[jax] first request {cold['total_s']:.1f} s, warm prefill {res['prefill_s']:.2f} s")

    # warm second request: other prompt length and image size, same buckets -> no compile
    c0 = model.compile_count
    ttfts = []
    for _ in range(args.repeat):  # compiles counted over all of them; the time is the best, as for transformers
        t0 = time.perf_counter()
        gen = sample_streaming(model, params, prepare_inputs(model, params, tok, *reqs["image2"]), cfg, rng)
        next(gen)
        ttfts.append(time.perf_counter() - t0)
        gen.close()
    res["ttft_warm_second_s"] = min(ttfts)
    res["compiles_warm_second"] = model.compile_count - c0
    res["peak_rss_b1"] = peak_rss()  # what a batch-1 user (the demo) holds: before the batched runs
    res["peak_device_b1"] = peak_device_jax()
    log(f"[jax] warm second request: first token after {res['ttft_warm_second_s']:.2f} s, "
        f"{res['compiles_warm_second']} compiles")

    def scan(x, between=lambda: None) -> float:
        """Decode tokens/s of the lax.scan sampler: rows * (n - 1) / (time of n tokens - time of 1 token).
        `between()` runs before each timed pair: the streaming run, so that both samplers see the same load."""
        one = replace(cfg, max_new_tokens=1)  # same prompt and cache buckets: the same prefill and scan programs
        sample(model, params, x, one, rng), sample(model, params, x, cfg, rng)  # compile
        pairs = []
        for _ in range(args.repeat):  # interleaved, so that all see the same load
            between()
            pairs.append((_timed(sample, model, params, x, one, rng), _timed(sample, model, params, x, cfg, rng)))
        first, full = min(p[0] for p in pairs), min(p[1] for p in pairs)
        return x.num_rows * (n - 1) / (full - first)

    # each streaming run between two plain reads of the weights it reads (a host whose bandwidth swings
    # within seconds, as a VM's may, is compared with itself at the time; the limit is its best moment)
    reader = weight_reader(params)
    streaming, reads = [], []

    def paired_stream():
        rate = lambda: reader[0] / min(reader[1](), reader[1]())  # noqa: E731 (bytes/s, best of two reads)
        before = rate() if reader else None
        streaming.append(stream("image")["decode_tok_s"])
        if reader:
            reads.append((before + rate()) / 2)

    res["decode_scan_b1"] = scan(prepare_inputs(model, params, tok, *reqs["image"]), between=paired_stream)
    res["decode_stream_b1"] = max(streaming)
    if reads:
        res["weights_read_gbs_around_stream_b1"] = [r / 1e9 for r in reads]
        res["decode_stream_b1_over_read"] = [tok_s * reader[0] / r for tok_s, r in zip(streaming, reads)]
        log("[jax] streaming b1 / a read of its weights around it: "
            + ", ".join(f"{q:.0%} of {r / 1e9:.1f} GB/s" for q, r in zip(res["decode_stream_b1_over_read"], reads)))
    log(f"[jax] streaming {res['decode_stream_b1']:.2f} tok/s, scan {res['decode_scan_b1']:.2f} tok/s")
    # batch 1 again on a text prompt, streaming beside it: the scan's rate is a difference of two runs that
    # each include a prefill, and an image prompt's (~2-7 s, +-5-20 % on a busy VM) can move it by 15 %;
    # a text prompt's (~0.1-0.5 s) cannot, so streaming / scan is compared here
    streaming_text = []
    for b in args.batch:
        between = (lambda: streaming_text.append(stream("text_b1")["decode_tok_s"])) if b == 1 else (lambda: None)
        res[f"scan_text_b{b}"] = scan(prepare_inputs(model, params, tok, *reqs[f"text_b{b}"]), between)
        log(f"[jax] scan, batch {b} text prompts: {res[f'scan_text_b{b}']:.2f} tok/s")
    if streaming_text:
        res["decode_stream_text_b1"] = max(streaming_text)
        log(f"[jax] streaming, text prompt: {res['decode_stream_text_b1']:.2f} tok/s")
    res["peak_rss"] = peak_rss()
    res["peak_device"] = peak_device_jax()
    return res


# ---------------------------------------------------------------- the transformers side


def worker_hf(args) -> dict:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    peak_device = torch.cuda.max_memory_allocated if dev == "cuda" else (lambda: None)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    res: dict = {"side": "transformers", "dtype": args.dtype, "device": dev, "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(args.ckpt, dtype=dtype).to(dev).eval()
    res["load_s"] = time.perf_counter() - t
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    res["rss_after_load"] = peak_rss()
    log(f"[hf {args.dtype}] loaded in {res['load_s']:.1f} s")
    data = np.load(args.inputs)
    gen = json.loads((Path(args.ckpt) / "generation_config.json").read_text())

    def inputs(name: str) -> dict:
        ids = torch.tensor(data[f"{name}.input_ids"].astype(np.int64), device=dev)
        kw = {"input_ids": ids, "attention_mask": torch.tensor(data[f"{name}.attention_mask"].astype(np.int64),
                                                               device=dev),
              "mm_token_type_ids": (ids == IMAGE_PAD).long()}
        if f"{name}.pixel_values" in data:
            kw["pixel_values"] = torch.tensor(data[f"{name}.pixel_values"], device=dev, dtype=dtype)
            kw["image_grid_thw"] = torch.tensor(data[f"{name}.image_grid_thw"], device=dev)
        return kw

    def generate(name: str, new: int) -> float:
        kw = inputs(name)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**kw, do_sample=True, temperature=gen["temperature"], top_k=gen["top_k"],
                           top_p=gen["top_p"], max_new_tokens=new, min_new_tokens=new, pad_token_id=PAD,
                           eos_token_id=gen["eos_token_id"])
        sync()
        return time.perf_counter() - t

    n = args.tokens
    torch.manual_seed(0)
    res["first_request_s"] = generate("image", n)
    firsts = [generate("image", 1) for _ in range(args.repeat)]
    fulls = [generate("image", n) for _ in range(args.repeat)]
    res["prefill_s"] = min(firsts)
    res["first_call_overhead_s"] = res["first_request_s"] - min(fulls)  # eager: nothing to compile
    res["decode_b1"] = (n - 1) / (min(fulls) - min(firsts))
    log(f"[hf {args.dtype}] prefill {res['prefill_s']:.2f} s, decode {res['decode_b1']:.2f} tok/s")
    res["ttft_warm_second_s"] = min(generate("image2", 1) for _ in range(args.repeat))
    res["peak_rss_b1"], res["peak_device_b1"] = peak_rss(), peak_device()
    for b in args.batch:
        name = f"text_b{b}"
        generate(name, 1)
        first = min(generate(name, 1) for _ in range(args.repeat))
        full = min(generate(name, n) for _ in range(args.repeat))
        res[f"scan_text_b{b}"] = b * (n - 1) / (full - first)
        log(f"[hf {args.dtype}] batch {b} text prompts: {res[f'scan_text_b{b}']:.2f} tok/s")
    res["peak_rss"], res["peak_device"] = peak_rss(), peak_device()
    return res


# ---------------------------------------------------------------- report


ROWS = [  # key, label, unit, higher_is_better, transformers key, tokens per step (for the bandwidth limit)
    ("prefill_s", "prefill: 448×448 image + ~32-token prompt, to first token", "s", False, "prefill_s", None),
    ("ttft_warm_second_s", "TTFT, warm 2nd request (416×480, other prompt)", "s", False, "ttft_warm_second_s", None),
    ("decode_stream_b1", "decode, streaming sampler, batch 1", "tok/s", True, "decode_b1", 1),
    ("decode_scan_b1", "decode, scan sampler, batch 1", "tok/s", True, "decode_b1", 1),
    ("decode_stream_text_b1", "decode, streaming sampler, batch 1 (text prompt)", "tok/s", True, "scan_text_b1", 1),
    ("scan_text_b{b}", "decode, scan, batch {b} (text prompts)", "tok/s", True, "scan_text_b{b}", "b"),
    ("compile_s", "first-request compile (first − warm request)", "s", False, None, None),
    ("compiles_warm_second", "compiles during the warm 2nd request", "", False, None, None),
    ("peak_rss_b1", "peak resident memory, load + batch-1 requests", "GiB", False, "peak_rss_b1", None),
    ("peak_rss", "peak resident memory, whole run (every batch size)", "GiB", False, "peak_rss", None),
    ("peak_device_b1", "peak accelerator memory, load + batch-1 requests", "GiB", False, "peak_device_b1", None),
    ("peak_device", "peak accelerator memory, whole run", "GiB", False, "peak_device", None),
    ("weight_bytes", "weights in memory", "GiB", False, "weight_bytes", None),
    ("load_s", "load checkpoint", "s", False, "load_s", None),
]


def _rows(batch: list[int]):
    for key, label, unit, higher, hf_key, per_step in ROWS:
        if "{b}" in key:
            for b in batch:
                yield key.format(b=b), label.format(b=b), unit, higher, hf_key.format(b=b), b
        else:
            yield key, label, unit, higher, hf_key, per_step


def _fmt(v, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "GiB":
        return f"{v / 2**30:.2f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summarise(result: dict) -> dict:
    """Add ratios: ours / transformers' best dtype for that measure, and tok/s / the bandwidth limit."""
    ours, hf, limits = result["jax"], result.get("transformers", {}), result["bandwidth_limit_tok_s"]
    ratios = {}
    for key, _, unit, higher, hf_key, per_step in _rows(result["config"]["batch"]):
        r = {}
        cands = {d: h[hf_key] for d, h in hf.items() if hf_key and h.get(hf_key) is not None}
        if cands:
            best = (max if higher else min)(cands, key=cands.get)
            r["hf_best_dtype"], r["hf_best"] = best, cands[best]
            if ours.get(key) is not None and cands[best]:
                r["ours_over_hf_best"] = ours[key] / cands[best]
        if per_step is not None:
            for side, d, v in [("ours", ours["dtype"], ours.get(key))] + [(f"hf_{d}", d, h.get(hf_key))
                                                                         for d, h in hf.items()]:
                if v is not None and d in limits:
                    r[f"{side}_over_bandwidth_limit"] = v / (per_step * limits[d])
        ratios[key] = r
    for key in ("peak_rss_b1", "peak_rss", "peak_device_b1", "peak_device"):
        if ours.get(key) is not None:
            ratios[key]["ours_over_weight_bytes"] = ours[key] / ours["weight_bytes"]
    result["ratios"] = ratios
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> list[dict]:
    ours, ratios, b = result["jax"], result["ratios"], result["config"]["batch"]

    def t(name, value, ok):
        return {"target": name, "value": value, "met": bool(ok) if value is not None else None}

    def ratio(key, field):
        return ratios.get(key, {}).get(field)

    out = [t(f"decode {s} b1 ≥ 1.25× transformers' best", ratio(k, "ours_over_hf_best"),
             (ratio(k, "ours_over_hf_best") or 0) >= 1.25) for s, k in (("streaming", "decode_stream_b1"),
                                                                      ("scan", "decode_scan_b1"))]
    out += [t(f"decode {s} b1 ≥ 80% of the bandwidth limit", ratio(k, "ours_over_bandwidth_limit"),
              (ratio(k, "ours_over_bandwidth_limit") or 0) >= 0.8) for s, k in (("streaming", "decode_stream_b1"),
                                                                               ("scan", "decode_scan_b1"))]
    out.append(t("prefill ≤ 1.0× transformers' best", ratio("prefill_s", "ours_over_hf_best"),
                 (ratio("prefill_s", "ours_over_hf_best") or 9) <= 1.0))
    text = bool(ours.get("decode_stream_text_b1"))  # both without an image prefill's noise (worker_jax)
    stream, scan = ("decode_stream_text_b1", "scan_text_b1") if text else ("decode_stream_b1", "decode_scan_b1")
    stream_over_scan = ours[stream] / ours[scan]
    out.append(t("streaming ≥ 95% of scan, b1" + (" (text prompt)" if text else ""), stream_over_scan,
                 stream_over_scan >= 0.95))
    if 1 in b and max(b) >= 8:
        x = ours["scan_text_b8"] / ours["scan_text_b1"]
        out.append(t("scan b8 ≥ 5× scan b1", x, x >= 5))
    out.append(t("zero compiles on the warm 2nd request", ours["compiles_warm_second"], ours["compiles_warm_second"] == 0))
    for key, what, when in (("peak_rss_b1", "RSS", "load + batch-1 requests"),
                            ("peak_rss", "RSS", "whole run, every batch size"),
                            ("peak_device_b1", "accelerator memory", "load + batch-1 requests"),
                            ("peak_device", "accelerator memory", "whole run, every batch size")):
        if ours.get(key) is not None:
            x = ours[key] / ours["weight_bytes"]
            out.append(t(f"peak {what} ≤ 1.2× weight bytes ({when})", x, x <= 1.2))
    return out


def markdown(result: dict) -> str:
    m, cfg, ours, hf, ratios = result["machine"], result["config"], result["jax"], result.get("transformers", {}), result["ratios"]
    bw = result["bandwidth"]
    lines = [
        f"**Machine:** {m['cpu']}{' (' + m['isa'] + ')' if m.get('isa') and m['backend'] == 'cpu' else ''}, {m['cores']} cores, {m['ram_gib']} GiB RAM; JAX {m['jax']} backend "
        f"`{m['backend']}` ({', '.join(sorted(set(m['devices'])))}); load average {m['load_avg_start'][0]:.1f} at start, "
        f"{result['load_avg_end'][0]:.1f} at end.  ",
        f"**Model:** {cfg['model']}{' with int8 text weights' if cfg.get('quantize') == 'int8' else ''} "
        f"(random weights, {cfg['ckpt']}); {cfg['tokens']} new tokens per request, "
        f"sampling {cfg['sampling']}, eos disabled; best of {cfg['repeat']} warm runs (streaming and scan interleaved); "
        f"decode on {ours.get('decode_products', 'XLA')}"
        + (f"; transformers' figures from an earlier run, {result['transformers_from']}" if "transformers_from" in result
           else "") + ".  ",
        f"**Bandwidth:** {bw['best'] / 1e9:.1f} GB/s (best of: " + ", ".join(
            f"{k} {v / 1e9:.1f}" for k, v in bw.items() if k != "best") + " GB/s) → limit "
        + ", ".join(f"{v:.2f} tok/s in {d} ({result['decode_bytes_per_token'][d] / 1e9:.2f} GB/token)"
                    for d, v in result["bandwidth_limit_tok_s"].items()) + "."
        + (" Decode streaming b1 against a plain read of the weights it reads (jnp.sum, best of two just"
           " before and two just after each run): " + ", ".join(f"{q:.0%} of {r:.1f} GB/s" for q, r in zip(
               ours["decode_stream_b1_over_read"], ours["weights_read_gbs_around_stream_b1"])) + "."
           if ours.get("decode_stream_b1_over_read") else ""),
        "",
        "| " + " | ".join(["measure", f"ours ({ours['dtype']})", *(f"transformers {d}" for d in hf),
                           "ours / transformers' best", "ours / bandwidth limit"]) + " |",
        "|---|---:|" + "---:|" * len(hf) + "---:|---:|",
    ]
    for key, label, unit, higher, hf_key, per_step in _rows(cfg["batch"]):
        if ours.get(key) is None and all(h.get(hf_key) is None for h in hf.values()):
            continue  # a measure neither side has here (accelerator memory on a CPU)
        r = ratios.get(key, {})
        cells = [_fmt(ours.get(key), unit)]
        for d, h in hf.items():
            v = _fmt(h.get(hf_key), unit) if hf_key else "—"
            if f"hf_{d}_over_bandwidth_limit" in r:
                v += f" ({r[f'hf_{d}_over_bandwidth_limit']:.0%} bw)"
            cells.append(v)
        vs = f"{r['ours_over_hf_best']:.2f}× (vs {r['hf_best_dtype']})" if "ours_over_hf_best" in r else "—"
        if "ours_over_weight_bytes" in r:
            vs += f"; {r['ours_over_weight_bytes']:.2f}× our weight bytes"
        lim = f"{r['ours_over_bandwidth_limit']:.0%}" if "ours_over_bandwidth_limit" in r else "—"
        arrow = {True: " ↑", False: " ↓"}[higher] if unit else ""
        lines.append(f"| {label}{f' ({unit}{arrow})' if unit else ''} | " + " | ".join(cells) + f" | {vs} | {lim} |")
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for t in result["targets"]:
        v, met = t["value"], {True: "yes", False: "no", None: "— (no transformers figure)"}[t["met"]]
        lines.append(f"| {t['target']} | {'—' if v is None else f'{v:.2f}' if isinstance(v, float) else v} | {met} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- driver


def run_worker(side: str, dtype: str, args, ckpt: Path, inputs: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--dtype", dtype, "--ckpt", str(ckpt),
           "--inputs", str(inputs), "--result", str(out), "--tokens", str(args.tokens), "--repeat", str(args.repeat),
           "--batch", *map(str, args.batch), "--quantize", args.quantize]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["2b", "tiny"], default=None, help="2B-shaped random weights (default) or tiny")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, 8 tokens, batch 1 and 2, 1 repeat, transformers in f32 only")
    p.add_argument("--dtype", default="auto", help="JAX side: auto (the checkpoint's: bf16), float32, bfloat16")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="JAX side: int8 text weights and activations (load_model's quantize)")
    p.add_argument("--hf-dtypes", nargs="*", default=None,
                   help="transformers dtypes (default float32 bfloat16; --quick: float32; none given: skip)")
    p.add_argument("--reuse-hf", type=Path, default=None,
                   help="take the transformers figures from an earlier results JSON instead of re-running them")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per request (default 64)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="scan batch sizes (default 1 4 8)")
    p.add_argument("--repeat", type=int, default=None, help="timed warm runs per measure, best taken (default 3)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where <machine>.json/.md go")
    # internal: one side in a subprocess
    p.add_argument("--worker", choices=["jax", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or ("tiny" if args.quick else "2b")
    args.tokens = args.tokens or (8 if args.quick else 64)
    args.batch = args.batch or ([1, 2] if args.quick else [1, 4, 8])
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.hf_dtypes is None:
        args.hf_dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]

    if args.worker:
        res = (worker_jax if args.worker == "jax" else worker_hf)(args)
        args.result.write_text(json.dumps(res, indent=1))
        return

    import jax

    from vlm.config import ModelConfig, resolve_dtype

    t_start = time.perf_counter()
    m = machine()
    log(f"machine: {m['cpu']}, {m['cores']} cores, backend {m['backend']} {m['devices']}")
    ckpt = checkpoint(args.model)
    dtype = np.dtype(resolve_dtype(args.dtype, ModelConfig.from_dir(ckpt).stored_dtype)).name
    work = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    try:
        info = export_inputs(ckpt, args.batch, work / "inputs.npz")
        bw = bandwidth(0.25 if args.quick else 2.0)
        log(f"bandwidth {bw['best'] / 1e9:.1f} GB/s")
        sizes = (("float32", 4), ("bfloat16", 2)) + ((("int8", 1),) if args.quantize == "int8" else ())
        per_token = {d: decode_bytes_per_token(ckpt, s) for d, s in sizes}
        result = {
            "machine": m, "bandwidth": bw, "decode_bytes_per_token": per_token,
            "bandwidth_limit_tok_s": {d: bw["best"] / b for d, b in per_token.items()},
            "config": {"model": args.model, "ckpt": str(ckpt), "dtype": dtype, "quantize": args.quantize,
                       "tokens": args.tokens,
                       "batch": args.batch, "repeat": args.repeat, "requests": info,
                       "sampling": "temperature 0.7, top-k 20, top-p 0.8 (the checkpoint's)"},
        }
        result["jax"] = run_worker("jax", dtype, args, ckpt, work / "inputs.npz", work / "jax.json")
        if args.reuse_hf:
            result["transformers"] = json.loads(args.reuse_hf.read_text())["transformers"]
            result["transformers_from"] = str(args.reuse_hf)
        else:
            result["transformers"] = {d: run_worker("hf", d, args, ckpt, work / "inputs.npz", work / f"hf-{d}.json")
                                      for d in args.hf_dtypes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    again = bandwidth(0.25 if args.quick else 2.0)  # the machine may be quieter now; keep the best
    bw = result["bandwidth"] = {k: max(v, again[k]) for k, v in bw.items()}
    result["bandwidth_limit_tok_s"] = {d: bw["best"] / b for d, b in per_token.items()}
    result["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    summarise(result)
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (machine_slug(m) + ("" if args.model == "2b" else f"-{args.model}") + f"-{dtype}"
            + ("-int8" if args.quantize == "int8" else ""))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(md)
    log(f"wrote {args.out / stem}.json/.md in {result['wall_s']:.0f} s total; jax backend {jax.default_backend()}")


if __name__ == "__main__":
    main()
