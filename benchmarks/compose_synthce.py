"""Compound training data without compound labels, measured on SynthCE (issue 21): composed faces, few labels,
and the pair-wise baseline, each against supervised stage 2, in one run.

1. ``cervl compose`` (region and mixup) from the SynthCE *basic* training faces: 120 per compound class;
2. the few-label subsets: 10 real compound training images per class (seed 0), alone and with the composed faces;
3. ``cervl ablate configs/ablation-compose.yaml`` (stage 2 trained on each; the compound test split, n = 220);
4. the pair-wise baseline from the supervised cell's stage-1 model;
5. pseudo-labels: the composed cell's model labels the SynthCE compound *training* images as if they were
   unlabelled; precision and coverage against their true labels, per threshold.

Run: .venv/bin/python benchmarks/compose_synthce.py      (about 10 minutes on 2 cores; needs `cervl demo --data-only`)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from pairwise_baseline import score, stage_model  # noqa: E402

from cervl.experiments.ablate import run_ablation  # noqa: E402
from cervl.data.compose import ComposeSettings, compose  # noqa: E402
from cervl.data.manifest import Record, read_manifest, write_manifest  # noqa: E402
from cervl.predict import Predictor  # noqa: E402
from cervl.predict.pairwise import PairwisePredictor  # noqa: E402
from cervl.predict.pseudo import pseudo_label  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS, OUT = ROOT / "runs" / "demo" / "manifests", ROOT / "runs" / "compose"


def absolute(manifest: Path, records=None) -> list[Record]:
    """Records with absolute image paths, so that they can be joined into one manifest anywhere."""
    m = read_manifest(manifest)
    return [Record(**{**r.to_json(), "image": str(m.image_path(r)), "root": None}) for r in (records or m)]


def few_labels(per_class: int = 10, seed: int = 0) -> list[Record]:
    m = read_manifest(MANIFESTS / "synthce-compound-aligned.jsonl")
    train = [r for r in m if r.split == "train"]
    rng, chosen = np.random.default_rng(seed), []
    for c in sorted({r.label for r in train}):
        pool = [r for r in train if r.label == c]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), per_class, replace=False))]
    return absolute(MANIFESTS / "synthce-compound-aligned.jsonl", chosen)


def main() -> None:
    basic = MANIFESTS / "synthce-basic-aligned.jsonl"
    if not basic.is_file():
        sys.exit("run `cervl demo --data-only` first")
    for mode in ("region", "mixup"):
        compose(basic, OUT / mode, ComposeSettings(mode=mode, per_class=120, seed=0), workers=2)
    few = few_labels()
    write_manifest(OUT / "few10.jsonl", few)
    write_manifest(OUT / "few10-region.jsonl", few + absolute(OUT / "region" / "manifest.jsonl"))
    md = run_ablation(ROOT / "configs" / "ablation-compose.yaml", progress=False)
    cells = json.loads(md.with_suffix(".json").read_text())
    supervised_run = Path(cells[0]["run_dir"])
    model, processor, entry = stage_model(supervised_run, 1)
    test = MANIFESTS / "synthce-compound-aligned.jsonl"  # the grid's test split (its runs do not record it)
    pair = score(PairwisePredictor(Predictor(model, processor, entry["prompt"], entry["label_set"])), test)
    n_train = sum(r.split == "train" for r in read_manifest(MANIFESTS / "synthce-compound-aligned.jsonl"))
    labels = {"supervised": f"{n_train} (all)", "composed": 0, "mixup": 0, "few10": 110, "few10-composed": 110}
    rows = [(c["stage2_data"], labels[c["stage2_data"]], c["accuracy"], c["macro_f1"]) for c in cells]
    rows.append(("pair-wise baseline (stage-1 model)", 0, pair["accuracy"], pair["macro_f1"]))
    n = pair["n"]
    print(f"| stage-2 data | compound labels used | test accuracy (n = {n}, ± SE) | macro-F1 |\n|---|---|---|---|")
    for name, used, acc, f1 in rows:
        print(f"| {name} | {used} | {acc:.2%} ± {math.sqrt(acc * (1 - acc) / n):.2%} | {f1:.3f} |")
    composed_run = Path(next(c["run_dir"] for c in cells if c["stage2_data"] == "composed"))
    train = MANIFESTS / "synthce-compound-aligned.jsonl"
    s = pseudo_label(composed_run, train, OUT / "pseudo.jsonl", splits=["train"], threshold=0.7, window=0,
                     truth_from=train)
    print(f"\npseudo-labels from the composed (0-label) model on the {s['scored']} SynthCE compound training images "
          f"treated as unlabelled:\n\n| threshold | kept | coverage | precision (± SE) |\n|---|---|---|---|")
    for r in s["coverage"]:
        p, k = r["precision"], r["kept"]
        se = f" ± {math.sqrt(p * (1 - p) / k):.1%}" if k else ""
        print(f"| {r['threshold']:.1f} | {k} | {r['coverage']:.1%} | {'-' if p is None else f'{p:.1%}'}{se} |")


if __name__ == "__main__":
    main()
