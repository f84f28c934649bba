"""Benchmarks that must not rot: the GPU script's --smoke mode runs the same code on CPU in seconds."""

import json
import math
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
    assert tiny["prefix"] >= 16 and tiny["seq_len"] > tiny["prefix"]
    # the derived figures follow from the measured ones (a wrong formula fails here, not just a zero)
    assert math.isclose(tiny["samples_per_s"] * tiny["step_s"], 4, rel_tol=1e-9)  # batch 4 in --smoke
    assert math.isclose(tiny["paper_recipe_hours"], 277_040 / tiny["samples_per_s"] / 3600, rel_tol=1e-9)
    assert math.isclose(tiny["tflops"] * 1e12, tiny["mfu"] * 989e12, rel_tol=1e-6)
    assert math.isfinite(tiny["loss"]) and tiny["loss"] > 0  # a summed cross-entropy


def test_readme_figures_come_from_the_run_and_name_the_cpu(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "test_metrics.json").write_text(json.dumps({"n": 220, "accuracy": 166 / 220, "macro_f1": 0.7421,
                                                      "top2_accuracy": 0.9, "per_class_accuracy": [0.5] * 11}))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_figures.py"), "--run", str(run),
                          "--n", "11"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = dict((c.strip() for c in line.strip().strip("|").split("|", 1)) for line in res.stdout.splitlines()[2:])
    assert rows["demo test accuracy (aligned SynthCE compound)"] == "75.45% ± 2.90% (n = 220, chance 9.1%)"
    assert rows["demo macro-F1"] == "0.742" and "cores, torch CPU capability" in rows["CPU"]
    assert float(rows["SynthCE render only, one core"].split()[0]) > 0
