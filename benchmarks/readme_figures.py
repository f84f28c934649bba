"""The figures README quotes for SynthCE generation and the demo, printed as one table with the CPU named.

README's numbers drifted from what a run measured (a generation rate from another machine, demo figures
rounded from an older run). Each figure here is measured now or read from the run's own files.

Run: .venv/bin/python benchmarks/readme_figures.py [--run runs/demo/run] [--n 330]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cervl.data.synth import Identity, generate, render_sample, sample_aus
from cervl.core.labels import COMPOUND


def cpu_name() -> str:
    """``lscpu``'s model name (the processor, not the machine), with the core count and torch's CPU kernels."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def synth_rates(n: int) -> tuple[float, float]:
    """Samples/s on one core: rendering alone, and the full ``generate`` (JPEG, files, sample sheet)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        render_sample(sample_aus(COMPOUND[i % len(COMPOUND)], rng), Identity.sample(rng), rng)
    render = n / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as d:
        full = generate(d, per_class=max(1, n // len(COMPOUND)), subsets=("compound",), progress=False)
    return render, full["samples_per_second"]


def demo_rows(run: Path) -> list[tuple[str, str]]:
    """The demo's test figures from ``RUN/test_metrics.json``, with n and the standard error."""
    path = run / "test_metrics.json"
    if not path.is_file():
        return [("demo test metrics", f"not found: {path} (run `make demo` first)")]
    m = json.loads(path.read_text())
    n, acc = m["n"], m["accuracy"]
    se = math.sqrt(acc * (1 - acc) / n)
    return [("demo test accuracy (aligned SynthCE compound)", f"{acc:.2%} ± {se:.2%} (n = {n}, chance "
                                                               f"{1 / len(m['per_class_accuracy']):.1%})"),
            ("demo macro-F1", f"{m['macro_f1']:.3f}"), ("demo top-2 accuracy", f"{m['top2_accuracy']:.2%}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo/run"))
    ap.add_argument("--n", type=int, default=330, help="SynthCE samples per rate measurement")
    args = ap.parse_args()
    render, full = synth_rates(args.n)
    rows = [("CPU", cpu_name()),
            ("SynthCE render only, one core", f"{render:.0f} samples/s = {2 * render:.0f} images/s"),
            ("SynthCE generate (+ JPEG + files), one core", f"{full:.0f} samples/s = {2 * full:.0f} images/s"),
            *demo_rows(args.run)]
    print("| figure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
