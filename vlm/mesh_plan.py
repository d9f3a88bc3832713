"""Print how a checkpoint splits over a mesh and the memory each device needs, from its config.json alone.

    python -m vlm.mesh_plan Qwen/Qwen3-VL-8B-Instruct --mesh 1x4 --batch 4 --cache-tokens 8192
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import ModelConfig
from .sharding import memory_per_device, parse_mesh_shape, spec_table


def _config(name_or_path: str) -> ModelConfig:
    """A folder, a config.json, 'tiny', or a hub id (only config.json is fetched)."""
    path = Path(name_or_path)
    if path.is_file():
        return ModelConfig.from_dict(json.loads(path.read_text()))
    if path.is_dir() or name_or_path == "tiny":
        from .weights import resolve_path

        return ModelConfig.from_dir(resolve_path(name_or_path))
    from huggingface_hub import hf_hub_download

    return ModelConfig.from_dict(json.loads(Path(hf_hub_download(name_or_path, "config.json")).read_text()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.mesh_plan", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="hub id, checkpoint folder, config.json or 'tiny'")
    parser.add_argument("--mesh", default="1x1", help="DATAxMODEL, e.g. 1x4 or 2x4 (default 1x1)")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bfloat16 (default), 4 for float32")
    parser.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--cache-tokens", type=int, default=8192, help="KV cache length: prompt + new tokens")
    parser.add_argument("--table", action="store_true", help="also print the spec of every parameter kind")
    args = parser.parse_args(argv)
    cfg = _config(args.checkpoint)
    data, model = parse_mesh_shape(args.mesh)
    if args.table:
        for kind, shape, spec, why in spec_table(cfg, model):
            print(f"{kind:56s} {str(shape):15s} {spec:18s} {why}")
        print()
    mem = {k: v / 2**30 for k, v in memory_per_device(cfg, data, model, args.dtype_bytes, args.batch,
                                                       args.cache_tokens).items()}
    print(f"{args.checkpoint} on {data}x{model}: per device {mem['weights']:.2f} GiB weights + "
          f"{mem['kv_cache']:.2f} GiB KV cache ({args.batch} row(s) x {args.cache_tokens} tokens) = "
          f"{mem['total']:.2f} GiB, plus activations and compiled buffers")


if __name__ == "__main__":
    main()
