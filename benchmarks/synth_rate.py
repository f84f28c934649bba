"""SynthCE generation rate on one core: render only vs render + JPEG + files, side by side.

Run: .venv/bin/python benchmarks/synth_rate.py [--n 300]
"""

import argparse
import tempfile
import time

import numpy as np

from cervl.data.synth import Identity, generate, render_sample, sample_aus
from cervl.core.labels import COMPOUND


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=330, help="samples per measurement")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(args.n):
        render_sample(sample_aus(COMPOUND[i % len(COMPOUND)], rng), Identity.sample(rng), rng)
    render_rate = args.n / (time.perf_counter() - t)
    per_class = max(1, args.n // len(COMPOUND))
    with tempfile.TemporaryDirectory() as d:
        s = generate(d, per_class=per_class, subsets=("compound",), progress=False)
    full_rate = s["samples_per_second"]
    print(f"render only (original 192px + aligned 112px): {render_rate:7.1f} samples/s = {2 * render_rate:7.1f} images/s")
    print(f"full generate (+ JPEG, files, sample sheet):  {full_rate:7.1f} samples/s = {2 * full_rate:7.1f} images/s")
    print(f"ratio full/render: {full_rate / render_rate:.2f}")


if __name__ == "__main__":
    main()
