"""The pair-wise baseline on SynthCE: the demo run's stage-1 (basic-only) model scores the compound test split
through ``P(A and B) ∝ p_A · p_B``, beside the demo's supervised stage 2, in one run.

Run after ``make demo``: .venv/bin/python benchmarks/pairwise_baseline.py [--run runs/demo/run]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from cervl.core.labels import get_label_set
from cervl.evaluate.metrics import summarize
from cervl.models.loading import load_model
from cervl.predict import Predictor
from cervl.predict.pairwise import PairwisePredictor
from cervl.predict.predictor import items_from_manifest
from cervl.run import RunMeta, apply_stage, base_weights


def stage_model(run: Path, upto: int):
    """The run's model right after lineage entry ``upto`` (1 = the first stage), as the trainer had it."""
    meta = RunMeta.read(run)
    model, processor = load_model(base_weights(meta.lineage[0], run), dtype="fp32")
    for entry in meta.lineage[1:upto + 1]:
        model = apply_stage(model, entry, run)
    return model, processor, meta.lineage[upto]


def score(predictor: Predictor, manifest: Path) -> dict:
    items = items_from_manifest(manifest, ["test"])
    rows = list(predictor.predict(items, progress=False))
    ls = predictor.label_set
    y_true = np.array([ls.index_of[r["label"]] for r in rows])
    y_pred = np.array([ls.index_of[r["pred"]] if r.get("pred") in ls else -1 for r in rows])
    probs = np.array([[r["probs"][c] for c in ls.classes] for r in rows])
    return summarize(y_true, y_pred, len(ls), probs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo/run"))
    args = ap.parse_args()
    config = json.loads((args.run / "config.json").read_text())
    manifest = Path(config["test"]["manifest"])
    model, processor, entry = stage_model(args.run, 1)
    basic = Predictor(model, processor, entry["prompt"], entry["label_set"])
    pair = score(PairwisePredictor(basic, "rafdb-compound"), manifest)
    supervised = score(Predictor.from_run(args.run), manifest)
    classes = get_label_set("rafdb-compound").classes
    print("| cell | compound labels used | test accuracy (n, SE) | macro-F1 | worst class (recall) |")
    print("|---|---|---|---|---|")
    for name, labels, m in (("pair-wise baseline from the stage-1 model", 0, pair),
                            ("supervised stage 2 (the demo)", "all", supervised)):
        n, acc = m["n"], m["accuracy"]
        worst = int(np.argmin(m["per_class_accuracy"]))
        print(f"| {name} | {labels} | {acc:.2%} (n = {n}, ± {math.sqrt(acc * (1 - acc) / n):.2%}) | "
              f"{m['macro_f1']:.3f} | {classes[worst]} ({m['per_class_accuracy'][worst]:.0%}) |")


if __name__ == "__main__":
    main()
