"""Benchmarks that must not rot: the GPU script's --smoke mode runs the same code on CPU in seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "gpu.json").read_text())
    tiny = out["tiny"]
    assert tiny["samples_per_s"] > 0 and tiny["score_img_s"] > 0 and tiny["generate_img_s"] > 0
    assert tiny["prefix"] >= 16 and tiny["seq_len"] > tiny["prefix"] and tiny["paper_recipe_hours"] > 0
