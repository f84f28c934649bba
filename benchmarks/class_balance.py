"""Class-balanced sampling on an imbalanced SynthCE subset (issue 22, item 6), in one run.

The SynthCE compound training split is subsampled so that class sizes fall geometrically from the largest
(all its ~71 images) to a tenth of that (a 10:1 skew; the class order is fixed by seed 0, not chosen by
results). configs/ablation-balance.yaml then trains the demo recipe's stage 2 on it with natural, balanced
and sqrt sampling (same number of steps) and tests each on the full compound test split (n = 220).

Run after ``make demo``:  .venv/bin/python benchmarks/class_balance.py     (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "runs/demo/manifests/synthce-compound-aligned.jsonl"
SKEWED = ROOT / "runs/recipe/synthce-compound-skewed.jsonl"


def write_skewed(skew: float = 10.0, seed: int = 0) -> dict[str, int]:
    from cervl.data.manifest import read_manifest, write_manifest

    m = read_manifest(SOURCE)
    train = [r for r in m if r.split == "train"]
    classes = sorted({r.label for r in train})
    order = np.random.default_rng(seed).permutation(len(classes))
    largest = max(sum(r.label == c for r in train) for c in classes)
    keep = {classes[i]: max(1, int(round(largest * skew ** (-rank / (len(classes) - 1)))))
            for rank, i in enumerate(order)}
    taken: dict[str, int] = {}
    records = []
    for r in m:
        if r.split == "train":
            if taken.get(r.label, 0) >= keep[r.label]:
                continue
            taken[r.label] = taken.get(r.label, 0) + 1
        records.append(r)
    SKEWED.parent.mkdir(parents=True, exist_ok=True)
    for r in records:  # images stay where they are: absolute paths
        r.image, r.root = str(m.image_path(r)), None
    write_manifest(SKEWED, records)
    return taken


def main() -> None:
    from cervl.experiments.ablate import run_ablation

    counts = write_skewed()
    print("training images per class:", json.dumps(counts))
    md = run_ablation(ROOT / "configs/ablation-balance.yaml", progress=False)
    print(md.read_text())
    results = json.loads((md.parent / "ablation.json").read_text())
    base = results[0]
    for r in results[1:]:
        print(f"{r['cell']}: worst-class recall {r['worst_class_recall'] - base['worst_class_recall']:+.3f}, "
              f"accuracy {r['accuracy'] - base['accuracy']:+.4f}, macro-F1 {r['macro_f1'] - base['macro_f1']:+.4f} "
              f"vs natural")


if __name__ == "__main__":
    main()
