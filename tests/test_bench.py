"""The benchmark's smoke mode runs end to end (tiny model, both sides, every measure) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_completes(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| decode, streaming sampler, batch 1 (tok/s ↑) |" in proc.stdout
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert data["jax"]["compiles_warm_second"] == 0
    assert data["jax"]["decode_stream_b1"] > 0 and data["transformers"]["float32"]["decode_b1"] > 0
    # streaming / scan is compared on a text prompt, where no image prefill's noise enters the scan's rate
    assert data["jax"]["decode_stream_text_b1"] > 0
    (target,) = [t for t in data["targets"] if t["target"].startswith("streaming ≥ 95% of scan")]
    assert target["value"] == data["jax"]["decode_stream_text_b1"] / data["jax"]["scan_text_b1"]
    assert 0 < data["jax"]["peak_rss_b1"] <= data["jax"]["peak_rss"]
    assert result.with_suffix(".md").exists()
