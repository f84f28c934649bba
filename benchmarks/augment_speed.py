"""Training throughput with augmentation off and on, side by side in one run (issue 22).

The demo's stage 2 (tiny base, SynthCE compound crops, batch 16) for 3 epochs (147 steps), three ways:
augmentation off (the vision cache serves every image after its first epoch), the ``frame`` preset with a fresh
view every time (never cached: every step runs the vision tower and the augmentation), and ``frame`` with 4 fixed
views per image (``views: 4``, cached under image and view). Samples per second are the median of the logged
steps after the first epoch (the cache is warm by then); the vision-cache hit rate comes from ``DONE.json``.

Run after ``make demo``:  .venv/bin/python benchmarks/augment_speed.py     (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs/bench/augment_speed"
VARIANTS = {"off": None, "frame (fresh views)": {"preset": "frame"},
            "frame, 4 cached views": {"preset": "frame", "views": 4}}


def main() -> None:
    from cervl.train.config import load_config
    from cervl.train.recipe import train

    rows = []
    for name, augment in VARIANTS.items():
        run = OUT / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        if run.exists() and (run / "cervl-run.json").is_file():
            shutil.rmtree(run)  # a run folder this benchmark wrote (cervl's marker is in it)
        overrides = [f"output_dir={run}", "stages.1.epochs=3", "test.manifest=null", "log_every=5"]
        if augment:
            overrides.append("stages.1.augment=" + json.dumps(augment))
        cfg = load_config(ROOT / "configs/quickstart.yaml", overrides)
        cfg.stages = cfg.stages[1:]  # stage 2 alone, from the shipped base
        cfg.stages[0].eval.manifest = None
        train(cfg, progress=False)
        stage = next((run / "stages").iterdir())
        with open(stage / "metrics.csv") as fh:
            logged = [r for r in csv.DictReader(fh) if r["samples_per_s"]]
        warm = [float(r["samples_per_s"]) for r in logged if float(r["epoch"]) > 1.0]
        done = json.loads((stage / "DONE.json").read_text())
        rows.append((name, statistics.median(warm), done["levers"].get("vision_cache_hit_rate")))
    base = rows[0][1]
    print("| augmentation | samples/s (median, epochs 2-3) | vs off | vision-cache hit rate |")
    print("|---|---|---|---|")
    for name, rate, hit in rows:
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {hit} |")


if __name__ == "__main__":
    main()
