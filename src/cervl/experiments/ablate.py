"""Ablations: ``cervl ablate GRID.yaml`` runs a grid of recipe variants and compares them.

A grid names a base recipe and axes; every axis has named variants. A variant changes training
(``overrides``, ``drop_stages``) or only the evaluation (``test_manifest``, e.g. aligned vs original
test images). Cells are one-factor-at-a-time around the baseline (the first variant of every axis)
or the full product. Cells with the same training share one run directory; each cell is a full run
directory, and finished runs/evaluations are skipped on re-run.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from cervl.train.config import ConfigError, build, load_config

log = logging.getLogger(__name__)


@dataclass
class ZeroShot:
    """A cell with no training: the base ``model`` scored with ``prompt`` over the last stage's label set."""

    model: str = "pretrained-tiny"
    prompt: str = "minimal"


@dataclass
class Variant:
    overrides: list[str] = field(default_factory=list)
    drop_stages: list[str] = field(default_factory=list)
    test_manifest: str | None = None
    # How test images become crops: none (as they are), detector (face detection + alignment, as predict --align),
    # landmarks (the manifest's true landmarks: the ceiling of any detector)
    test_align: str | None = None
    test_landmarks: str | None = None  # detector landmarks: single | flip (cervl.faces.landmarks.FlipAveraged)
    zero_shot: ZeroShot | None = None


@dataclass
class AblationConfig:
    base: str
    axes: dict
    output_dir: str = "runs/ablation"
    mode: str = "one-at-a-time"  # or "product"


def load_ablation(path: str | Path) -> tuple[AblationConfig, dict[str, dict[str, Variant]]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    cfg = build(AblationConfig, data)
    if cfg.mode not in ("one-at-a-time", "product"):
        raise ConfigError(f"{path}: 'mode' must be one-at-a-time or product, got {cfg.mode!r}")
    axes = {}
    for axis, variants in cfg.axes.items():
        if not isinstance(variants, dict) or not variants:
            raise ConfigError(f"{path}: axis '{axis}' must map variant names to settings")
        axes[axis] = {name: build(Variant, v or {}, f"axes.{axis}.{name}") for name, v in variants.items()}
    base = Path(cfg.base)
    cfg.base = str(base if base.is_absolute() else (path.parent / base).resolve())
    for variants in axes.values():
        for v in variants.values():
            if v.test_align not in (None, "none", "detector", "landmarks"):
                raise ConfigError(f"{path}: test_align must be none, detector or landmarks, got {v.test_align!r}")
            if v.test_manifest and not Path(v.test_manifest).is_absolute():
                v.test_manifest = str((path.parent / v.test_manifest).resolve())
    if not Path(cfg.output_dir).is_absolute():
        cfg.output_dir = str(Path(cfg.output_dir))
    return cfg, axes


def cells(cfg: AblationConfig, axes: dict[str, dict[str, Variant]]) -> list[dict[str, str]]:
    """Each cell maps axis -> variant name."""
    names = {a: list(v) for a, v in axes.items()}
    baseline = {a: n[0] for a, n in names.items()}
    if cfg.mode == "product":
        return [dict(zip(names, combo)) for combo in itertools.product(*names.values())]
    out = [baseline]
    for a, variants in names.items():
        out += [{**baseline, a: v} for v in variants[1:]]
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def run_ablation(path: str | Path, *, progress: bool = True) -> Path:
    """Run (or resume) every cell; write ``ablation.md/html/json`` and plots; return the markdown path."""
    cfg, axes = load_ablation(path)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [_run_cell(cfg, axes, cell, out, progress) for cell in cells(cfg, axes)]
    return write_ablation_summary(out, results, axes)


def _run_cell(cfg: AblationConfig, axes: dict, cell: dict[str, str], out: Path, progress: bool) -> dict:
    """Train the cell's recipe (shared by cells with the same training; none for zero-shot), then test it."""
    from cervl.evaluate.evaluation import test_report
    from cervl.predict import Predictor
    from cervl.train.recipe import train

    chosen = [axes[a][v] for a, v in cell.items()]
    overrides = [o for v in chosen for o in v.overrides]
    drop = [s for v in chosen for s in v.drop_stages]
    zero_shot = next((v.zero_shot for v in chosen if v.zero_shot), None)
    train_key = "_".join(f"{a}={v}" for a, v in cell.items()
                         if axes[a][v].overrides or axes[a][v].drop_stages) or "baseline"
    run_dir = out / "runs" / _slug(train_key)
    recipe = load_config(cfg.base, overrides + [f"output_dir={run_dir}"])
    if drop:
        unknown = set(drop) - {s.name for s in recipe.stages}
        if unknown:
            raise ConfigError(f"drop_stages names unknown stages {sorted(unknown)}")
        recipe.stages = [s for s in recipe.stages if s.name not in drop]
    test_manifest = next((v.test_manifest for v in chosen if v.test_manifest), None) or recipe.test.manifest
    align = next((v.test_align for v in chosen if v.test_align), None) or "none"
    landmarks = next((v.test_landmarks for v in chosen if v.test_landmarks), None) or "single"
    cell_name = ", ".join(f"{a}={v}" for a, v in cell.items())
    cell_dir = out / "cells" / _slug("_".join(f"{a}={v}" for a, v in cell.items()))
    metrics_file = cell_dir / "report" / "metrics.json"
    if metrics_file.is_file():
        log.info("cell %s already evaluated; skipping", cell_name)
        metrics = json.loads(metrics_file.read_text())
    else:
        if zero_shot:  # the base model as it is: no run folder
            predictor = Predictor.from_model(zero_shot.model, prompt=zero_shot.prompt,
                                             label_set=recipe.stages[-1].labels.name)
        else:
            log.info("cell %s: training in %s (finished stages are reused)", cell_name, run_dir)
            recipe.test.manifest = None  # evaluated below, per cell
            train(recipe, progress=progress)
            predictor = Predictor.from_run(run_dir)
        metrics = test_report(predictor, test_manifest, recipe.test.splits, cell_dir,
                              max_samples=recipe.test.max_samples, progress=progress, title=cell_name,
                              align=align, detector_options={"landmarks": landmarks})
    worst = int(np.argmin(metrics["per_class_accuracy"]))
    return {"cell": cell_name, **cell, "run_dir": None if zero_shot else str(run_dir),
            "report": str(cell_dir / "report"), "n": metrics["n"], "accuracy": metrics["accuracy"],
            "accuracy_se": float(np.sqrt(metrics["accuracy"] * (1 - metrics["accuracy"]) / max(1, metrics["n"]))),
            "macro_f1": metrics["macro_f1"], "top2_accuracy": metrics.get("top2_accuracy"),
            "worst_class": metrics["classes"][worst], "worst_class_recall": metrics["per_class_accuracy"][worst],
            "no_face": metrics.get("errors", 0)}


def write_ablation_summary(out: Path, results: list[dict], axes: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cervl.core.fsio import atomic_write_text
    from cervl.evaluate.report import _html_page, _md_table, write_comparison

    base = results[0]
    rows = [[r["cell"], r["n"], f"{r['accuracy']:.4f} ± {r['accuracy_se']:.4f}", r["macro_f1"], r["top2_accuracy"],
             f"{r['worst_class']} {r['worst_class_recall']:.2f}", r["no_face"],
             f"{r['accuracy'] - base['accuracy']:+.4f}"] for r in results]
    table = _md_table(["cell", "n", "accuracy ± SE", "macro-F1", "top-2", "worst class (recall)", "no face / errors",
                       "Δ acc vs baseline"], rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    ax.bar(range(len(results)), [r["accuracy"] for r in results], color=["C1"] + ["C0"] * (len(results) - 1))
    ax.set_xticks(range(len(results)), [r["cell"].replace(", ", "\n") for r in results], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Ablation (orange: baseline)")
    fig.tight_layout()
    img = out / "ablation.png"
    fig.savefig(img, dpi=110)
    plt.close(fig)
    write_comparison([r["report"] for r in results], out / "per_class", [r["cell"] for r in results])
    atomic_write_text(out / "ablation.json", json.dumps(results, indent=2) + "\n")
    md = out / "ablation.md"
    atomic_write_text(md, f"# Ablation\n\n{table}\n\n![ablation](ablation.png)\n\nPer-class: per_class/comparison.md\n")
    atomic_write_text(out / "ablation.html", _html_page("cervl ablation", [("Cells", table)], [img]))
    return md
