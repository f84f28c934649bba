"""Saliency maps checked against SynthCE's known action units, and their speed, in one run.

For every compound test image (220 with the demo data) and both methods (occlusion: 24-px patch of the
model's neutral colour at stride 8; gradient: gradient x input of the log-probability), the true class's map
is scored against the union of the class's required-AU regions, which come from the generator's drawing
code (cervl.explain.regions), never from the maps:

* pointing game: the map's peak lies inside the region (strict), or within 8 px of it;
* energy ratio: the share of the map's positive mass inside the region over the region's share of the area.

Sanity check (Adebayo et al., 2018): the same maps from the model with every layer re-initialised; their
rank correlation with the trained model's maps, and their pointing game.

Speed: maps per second for each method beside plain scoring (images per second), same images, one process.

Run after ``make demo``:  .venv/bin/python benchmarks/explain_synthce.py [--run runs/demo/run] [--limit N]
Writes runs/bench/explain_synthce.json (and prints a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cervl.core.images import load_rgb
from cervl.explain.maps import Explainer, VLMScorer, rank_correlation, reinitialized
from cervl.explain.regions import score_maps
from cervl.predict import Predictor
from cervl.predict.predictor import items_from_manifest

METHODS = ("occlusion", "gradient")


def true_class_maps(explainer: Explainer, images, labels) -> list[np.ndarray]:
    """Each image's map of its true class (the one the AU regions are for)."""
    return [ex.maps[0] for ex in explainer.explain(images, [[label] for label in labels])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo/run"))
    ap.add_argument("--manifest", type=Path, default=Path("runs/demo/manifests/synthce-compound-aligned.jsonl"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/explain_synthce.json"))
    ap.add_argument("--speed", type=int, default=0, metavar="N",
                    help="only the speed comparison, on N images (run it on an otherwise idle machine)")
    args = ap.parse_args()
    if args.speed:
        return speed(args)

    items = items_from_manifest(args.manifest, [args.split])
    items = items[:args.limit] if args.limit else items
    images, labels = [load_rgb(i.image) for i in items], [i.label for i in items]
    trained = Predictor.from_run(args.run)
    random = reinitialized(trained, seed=0)
    result = {"run": str(args.run), "manifest": str(args.manifest), "split": args.split, "n": len(items)}

    t0 = time.perf_counter()
    VLMScorer(trained).probs(images)
    result["scoring_images_per_s"] = len(images) / (time.perf_counter() - t0)

    for method in METHODS:
        maps = {}
        for name, predictor in (("trained", trained), ("reinitialized", random)):
            explainer = Explainer(VLMScorer(predictor), method)
            t0 = time.perf_counter()
            maps[name] = true_class_maps(explainer, images, labels)
            if name == "trained":
                result[f"{method}_maps_per_s"] = len(images) / (time.perf_counter() - t0)
            scores = score_maps(list(zip(labels, maps[name])))
            result[f"{method}_{name}"] = scores
        np.savez_compressed(args.out.with_name(f"explain_synthce_{method}_maps.npz"), labels=np.array(labels),
                            **{name: np.stack(m).astype(np.float32) for name, m in maps.items()})
        corr = [rank_correlation(a, b) for a, b in zip(maps["trained"], maps["reinitialized"])]
        result[f"{method}_rank_corr_median"] = float(np.nanmedian(corr))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def speed(args) -> None:
    """Maps per second for each method beside plain scoring (images per second), interleaved three times."""
    items = items_from_manifest(args.manifest, [args.split])[:args.speed]
    images, labels = [load_rgb(i.image) for i in items], [i.label for i in items]
    scorer = VLMScorer(Predictor.from_run(args.run))
    times: dict[str, list[float]] = {"scoring": [], "occlusion": [], "gradient": []}
    for _ in range(3):
        t0 = time.perf_counter()
        scorer.probs(images)
        times["scoring"].append(time.perf_counter() - t0)
        for method in METHODS:
            t0 = time.perf_counter()
            true_class_maps(Explainer(scorer, method), images, labels)
            times[method].append(time.perf_counter() - t0)
    rate = {k: len(images) / float(np.median(v)) for k, v in times.items()}
    print(f"n = {len(images)} images, median of 3 interleaved rounds")
    print("| | per second | scoring passes per map |\n|---|---|---|")
    print(f"| plain scoring | {rate['scoring']:.1f} images | 1 |")
    for method in METHODS:
        print(f"| {method} map (one class) | {rate[method]:.2f} maps | {rate['scoring'] / rate[method]:.1f} |")


def table(r: dict) -> str:
    lines = [f"SynthCE compound {r['split']}, n = {r['n']} (demo run {r['run']})", "",
             "| method | model | pointing (strict) | pointing (8 px) | median energy ratio | region area |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        for name in ("trained", "reinitialized"):
            o = r[f"{method}_{name}"]["overall"]
            lines.append(f"| {method} | {name} | {o['pointing']:.1%} ± {o['pointing_se']:.1%} | "
                         f"{o['pointing_within_8px']:.1%} | {o['energy_median']:.2f} | {o['area']:.1%} |")
    lines += ["", "| method | rank corr. trained vs re-initialised (median) | maps/s | vs scoring (img/s) |",
              "|---|---|---|---|"]
    for method in METHODS:
        lines.append(f"| {method} | {r[f'{method}_rank_corr_median']:.2f} | {r[f'{method}_maps_per_s']:.2f} | "
                     f"{r[f'{method}_maps_per_s'] / r['scoring_images_per_s']:.4f}x of {r['scoring_images_per_s']:.0f} |")
    lines += ["", "Per class (trained model):", "", "| class | n | " + " | ".join(
        f"{m} pointing | {m} energy" for m in METHODS) + " |", "|---" * (2 + 2 * len(METHODS)) + "|"]
    classes = [c for c in r["occlusion_trained"] if c != "overall"]
    for c in classes:
        cells = []
        for m in METHODS:
            o = r[f"{m}_trained"][c]
            cells += [f"{o['pointing']:.0%}", f"{o['energy_median']:.2f}"]
        lines.append(f"| {c} | {r['occlusion_trained'][c]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
