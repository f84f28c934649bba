"""Reports: plots (PNG), ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

``evaluate_predictions`` turns a predictions JSONL into metrics and a report folder.

``write_report`` renders one evaluation; ``write_comparison`` puts several side by side with
per-class deltas against the first.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cervl.data.manifest import atomic_write_text  # noqa: E402
from cervl.core.errors import InputNotFound, InvalidInput  # noqa: E402
from cervl.core.plotting import PALETTE, legend_outside  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion, classes, path: Path, title: str = "Confusion matrix") -> Path:
    """Counts per (true, predicted) cell with the row share as colour; rows carry their n, the title the total.

    ``confusion``: raw counts (rows: true class); a row may hold fewer than its n when predictions were invalid.
    """
    counts = np.asarray(confusion, dtype=float)
    support = counts.sum(1)
    share = counts / np.maximum(support[:, None], 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.68 * n, 1.4 + 0.58 * n))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{c} (n={int(k)})" for c, k in zip(classes, support)], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (n = its test samples)")
    for i in range(n):
        for j in range(n):
            if counts[i, j] > 0:
                ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=6.5,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(f"{title} (n={int(support.sum())}; cell: count and share of the row)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    return _save(fig, path)


def plot_per_class(values: dict[str, list], classes, path: Path, *, ylabel: str = "accuracy (recall)",
                   title: str = "Per-class accuracy", support: list[int] | None = None,
                   overall: dict[str, float] | None = None, chance: float | None = None) -> Path:
    """Grouped bars: one group per class, one bar per series (e.g. runs being compared).

    ``support`` puts each class's n under its name; ``overall`` draws each series' overall accuracy as a
    line in its colour; ``chance`` a dotted line at the chance level.
    """
    n, m = len(classes), len(values)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * n * max(1, m / 2)) + (2.5 if m > 1 else 0), 4.4))
    for k, (name, vals) in enumerate(values.items()):
        v = [np.nan if x is None else x for x in vals]
        color = PALETTE[k % len(PALETTE)]
        ax.bar(np.arange(n) + (k - (m - 1) / 2) * width, v, width, label=name, color=color)
        if overall and overall.get(name) is not None:
            ax.axhline(overall[name], color=color, lw=1.2, ls="--",
                       label=f"{name}: overall {overall[name]:.1%}" if m > 1 else f"overall {overall[name]:.1%}")
    if chance is not None:
        ax.axhline(chance, color="0.3", lw=1, ls=":", label=f"chance {chance:.1%}")
    labels = [f"{c}\n(n={k})" for c, k in zip(classes, support)] if support is not None else list(classes)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("true class")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if m > 1 or overall or chance is not None:
        legend_outside(ax)
    return _save(fig, path)


def plot_reliability(rel: dict, path: Path) -> Path:
    edges = np.asarray(rel["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    acc = [np.nan if a is None else a for a in rel["accuracy"]]
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.bar(centres, acc, width=edges[1] - edges[0], edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {rel['ece']:.3f})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}" if isinstance(x, float) else str(x)


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_page(title: str, markdown_tables: list[tuple[str, str]], images: list[Path], sections: list[str] = ()) -> str:
    """A dependency-free HTML page: tables rendered from our own markdown, PNGs inlined as base64."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child{text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, table in markdown_tables:
        lines = [l for l in table.splitlines() if not l.startswith("|---")]
        rows = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
        parts.append(f"<h2>{html.escape(heading)}</h2><table>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
        parts.append("</table>")
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(img.stem.replace('_', ' '))}</h2><img src='data:image/png;base64,{data}'>")
    parts += list(sections)  # ready-made HTML (cervl explain's "Where the model looks")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path, metrics: dict, classes: list[str], *, title: str = "cervl evaluation",
                 extra: dict | None = None, sections: list[str] = ()) -> Path:
    """Write metrics.json, confusion/per-class(/reliability) PNGs, report.md and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"title": title, "classes": list(classes), **metrics, **(extra or {})}
    atomic_write_text(out / "metrics.json", json.dumps(data, indent=2) + "\n")
    support = [int(np.sum(row)) for row in metrics["confusion"]]
    images = [plot_confusion(metrics["confusion"], classes, out / "confusion_matrix.png",
                             title=f"{title}: confusion matrix"),
              plot_per_class({"accuracy": metrics["per_class_accuracy"]}, classes, out / "per_class_accuracy.png",
                             title=f"{title}: per-class accuracy (n={sum(support)})", support=support,
                             overall={"accuracy": metrics["accuracy"]}, chance=1 / len(classes))]
    if "reliability" in metrics:
        images.append(plot_reliability(metrics["reliability"], out / "reliability.png"))
    summary_keys = ["n", "accuracy", "macro_f1", "weighted_f1", "invalid_rate", "top2_accuracy", "mean_confidence"]
    summary = _md_table(["metric", "value"], [[k, metrics[k]] for k in summary_keys if k in metrics]
                        + ([["ece", metrics["reliability"]["ece"]]] if "reliability" in metrics else []))
    per_class = _md_table(["class", "accuracy", "F1", "support"],
                          [[c, metrics["per_class_accuracy"][i], metrics["per_class_f1"][i],
                            int(np.sum(metrics["confusion"][i]))] for i, c in enumerate(classes)])
    tables = [("Summary", summary), ("Per class", per_class)]
    if "per_au" in metrics:  # the au-caption mode: the AUs the model named against the manifest's true AUs
        tables.append(("Action units (au-caption answers vs the manifest's AUs at >= 0.3)", _md_table(
            ["AU", "F1", "precision", "recall", "support"],
            [[au, v["f1"], v["precision"], v["recall"], v["support"]] for au, v in metrics["per_au"].items()]
            + [["mean", metrics["au_macro_f1"], None, None, None]])))
    if extra:
        tables.append(("Run", _md_table(["key", "value"], [[k, json.dumps(v) if not isinstance(v, str) else v]
                                                            for k, v in extra.items()])))
    md = f"# {title}\n\n" + "\n\n".join(f"## {h}\n\n{t}" for h, t in tables) + "\n\n" + "\n".join(
        f"![{p.stem}]({p.name})" for p in images) + "\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _html_page(title, tables, images, sections))
    return out / "report.html"


def write_comparison(reports: list[str | Path], out: str | Path, names: list[str] | None = None) -> Path:
    """One table (overall metrics + per-class accuracy with deltas vs the first report) and one plot."""
    out = Path(out)
    loaded = []
    for r in reports:
        path = Path(r) / "metrics.json" if Path(r).is_dir() else Path(r)
        if not path.is_file():
            raise InputNotFound(f"no metrics.json at {path} (pass report folders written by cervl eval)")
        loaded.append(json.loads(path.read_text()))
    if names and len(names) != len(reports):
        raise InvalidInput(f"--names gives {len(names)} names for {len(reports)} reports")
    names = names or _series_names(reports, loaded)
    classes = loaded[0]["classes"]
    for n, m in zip(names, loaded):
        if m["classes"] != classes:
            raise InvalidInput(f"report {n!r} has classes {m['classes']}, not {classes}: cannot compare")
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed comparison leaves no empty folder behind
    keys = [k for k in ("accuracy", "macro_f1", "weighted_f1", "invalid_rate", "top2_accuracy") if k in loaded[0]]
    overall = _md_table(["metric"] + names + ([f"Δ {n}" for n in names[1:]]),
                        [[k] + [m.get(k) for m in loaded] + [_delta(m.get(k), loaded[0].get(k)) for m in loaded[1:]]
                         for k in keys])
    rows = []
    for i, c in enumerate(classes):
        vals = [m["per_class_accuracy"][i] for m in loaded]
        rows.append([c] + vals + [_delta(v, vals[0]) for v in vals[1:]])
    per_class = _md_table(["class"] + names + [f"Δ {n}" for n in names[1:]], rows)
    img = plot_per_class({n: m["per_class_accuracy"] for n, m in zip(names, loaded)}, classes,
                         out / "per_class_comparison.png", title="Per-class accuracy: " + " vs ".join(names),
                         overall={n: m.get("accuracy") for n, m in zip(names, loaded)}, chance=1 / len(classes),
                         support=[int(sum(r)) for r in loaded[0]["confusion"]] if "confusion" in loaded[0] else None)
    tables = [("Overall", overall), ("Per-class accuracy", per_class)]
    atomic_write_text(out / "comparison.json", json.dumps({"names": names, "classes": classes, "reports":
                                                           [str(r) for r in reports], "metrics": {
        n: {k: m.get(k) for k in keys + ["per_class_accuracy"]} for n, m in zip(names, loaded)}}, indent=2) + "\n")
    md = "# Comparison\n\n" + "\n\n".join(f"## {h}\n\n{t}" for h, t in tables) + f"\n\n![per class]({img.name})\n"
    atomic_write_text(out / "comparison.md", md)
    atomic_write_text(out / "comparison.html", _html_page("cervl comparison", tables, [img]))
    return out / "comparison.md"


def _series_names(reports: list, loaded: list[dict]) -> list[str]:
    """Legend names: each report's own title when they differ (``cervl eval --title``), else the folders."""
    titles = [str(m.get("title") or "").removeprefix("cervl evaluation: ") for m in loaded]
    if all(titles) and len(set(titles)) == len(titles):
        return titles
    return [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in reports]


def _delta(v, ref):
    if v is None or ref is None:
        return None
    return f"{v - ref:+.4f}"


def _au_metrics(rows: list[dict], manifest: str | None, path: Path) -> dict:
    """Per-AU F1 of the AUs named by au-caption predictions, against the manifest's true AUs (``aus``)."""
    from cervl.data.manifest import read_manifest
    from cervl.core.facs import AU_IDS, au_key
    from cervl.evaluate.metrics import per_au_f1

    if not manifest or not Path(manifest).is_file():
        log.warning("%s: rows name AUs but the manifest with the true AUs is not at hand (%s); no per-AU F1",
                    path, manifest)
        return {}
    truth = {r.sample_id: r.aus for r in read_manifest(manifest) if r.aus is not None}
    scored = [r for r in rows if "aus" in r and r["id"] in truth]
    if not scored:
        return {}
    true_sets = [{k for k, v in truth[r["id"]].items() if v >= 0.3} for r in scored]  # describe_aus's threshold
    per_au = per_au_f1([set(r["aus"]) for r in scored], true_sets, [au_key(a) for a in AU_IDS])
    present = [v["f1"] for v in per_au.values() if v["support"]]
    return {"per_au": per_au, "au_macro_f1": float(np.mean(present)) if present else 0.0, "au_n": len(scored)}


def evaluate_predictions(path: str | Path, out: str | Path, *, label_set: str | None = None, title: str | None = None,
                         explain: str | Path | None = None) -> dict:
    """Compute metrics from a predictions file and write the report folder; returns the metrics.

    ``explain``: a ``cervl explain --manifest`` folder whose "Where the model looks" section joins the report.
    """
    from cervl.core.labels import get_label_set
    from cervl.evaluate.metrics import summarize

    path, out = Path(path), Path(out)
    meta_path = Path(str(path) + ".meta.json")
    if not path.is_file():
        raise InputNotFound(f"predictions file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise InvalidInput(f"{path}:{lineno}: malformed JSON line") from None
    if rows and not any("pred" in r for r in rows):
        raise InvalidInput(f"{path}: no row has a 'pred' field, so this is not a predictions file (a manifest?); "
                           f"make one with cervl predict")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    name = label_set or meta.get("label_set")
    if not name:
        why = (f"{meta_path.name} has no 'label_set' key" if meta_path.is_file()
               else f"there is no {meta_path.name} beside it")
        raise InvalidInput(f"{path}: cannot tell the label set ({why}); pass --label-set")
    ls = get_label_set(name)
    labelled = [r for r in rows if r.get("label") is not None]
    if not labelled:
        raise InvalidInput(f"{path}: no predictions with a true label; nothing to evaluate")
    for r in labelled:
        if r["label"] not in ls:
            raise InvalidInput(f"{path}: sample {r['id']!r} has label {r['label']!r}, not in {ls.name!r}")
    y_true = np.array([ls.index_of[r["label"]] for r in labelled])
    y_pred = np.array([ls.index_of[r["pred"]] if r.get("pred") in ls else -1 for r in labelled])
    probs = None
    if all("probs" in r for r in labelled):
        probs = np.array([[r["probs"][c] for c in ls.classes] for r in labelled])
    metrics = summarize(y_true, y_pred, len(ls), probs)
    metrics["errors"] = sum(1 for r in rows if r.get("error"))
    if any("aus" in r for r in labelled):
        metrics.update(_au_metrics(labelled, meta.get("manifest"), path))
    sections = []
    if explain is not None:
        section = Path(explain) / "where_it_looks.html"
        if not section.is_file():
            raise InputNotFound(f"--explain {explain}: no where_it_looks.html there (write it with cervl explain "
                                f"--manifest M -o {explain})")
        sections.append(section.read_text())
    html = write_report(out, metrics, list(ls.classes), title=title or f"cervl evaluation: {path.name}",
                        extra={"predictions": str(path), **meta}, sections=sections)
    metrics["report"] = str(html)
    return metrics
