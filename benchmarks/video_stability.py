"""Stability on video (issue 22, item 5): a still face moved along a known path should keep its answer.

One clip per SynthCE compound class: the class's first test original (2x upscaled, 384 px) panned (±40 px),
rolled (±8°) and zoomed (±15%) over 60 frames, with sensor noise; nothing about the face changes
(tests/clips.py). Each frame goes through what ``cervl predict`` does to a video: MTCNN + optical-flow
tracking + 5-point alignment, then exact scoring. Per model and clip:

* the share of frames whose top class is the clip's majority class;
* the largest change of any class probability between adjacent frames, raw and after the default temporal
  smoothing (Gaussian, sigma 1.5 frames);
* the crop's jitter: mean absolute pixel difference between adjacent aligned crops (of 255).

Run after benchmarks/original_gap.py (which trains the frame and align-noise models):
    .venv/bin/python benchmarks/video_stability.py [--runs demo=runs/demo/run frame=...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = {"demo": ROOT / "runs/demo/run",
                **{name: ROOT / "runs/ablation-original/runs" / f"training-{name.replace('+', '-')}" for name in
                   ("frame", "align-noise", "align-noise+frame", "vision-lora", "frame+vision-lora",
                    "align-noise+vision-lora")}}


def clips(n_frames: int = 60):
    """(label, frames) for one test original per class, and the frames' true landmarks."""
    sys.path.insert(0, str(ROOT / "tests"))
    from clips import moving_face_clip
    from PIL import Image

    from cervl.data.manifest import read_manifest

    m = read_manifest(ROOT / "runs/demo/manifests/synthce-compound-original.jsonl")
    chosen = {}
    for r in m:
        if r.split == "test" and r.label not in chosen:
            chosen[r.label] = r
    out = []
    for label, r in sorted(chosen.items()):
        photo = np.asarray(Image.open(m.image_path(r)).convert("RGB").resize((384, 384), Image.BICUBIC))
        lm = np.asarray(r.landmarks) * 2 + 0.5
        frames, truth = moving_face_clip(photo, lm, n=n_frames, size=(480, 360), shift=40.0, roll_deg=8.0, zoom=0.15)
        out.append((label, frames, truth))
    return out


def track(frames) -> list:
    from cervl.faces.detect import make_detector
    from cervl.faces.video import track_faces

    return list(track_faces(enumerate(frames, 1), make_detector("mtcnn")))


def stability(probs: np.ndarray) -> dict:
    top = probs.argmax(1)
    majority = np.bincount(top).argmax()
    return {"majority_share": float((top == majority).mean()),
            "max_change": float(np.abs(np.diff(probs, axis=0)).max())}


def main() -> None:
    from cervl.predict import Predictor
    from cervl.predict.video import smooth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", help="NAME=RUN_DIR ... (default: demo and the original_gap models)")
    args = ap.parse_args()
    runs = dict(r.split("=", 1) for r in args.runs) if args.runs else {k: v for k, v in DEFAULT_RUNS.items()
                                                                         if (Path(v) / "final").is_dir()}
    tracked = [(label, track(frames)) for label, frames, _ in clips()]
    jitter = [float(np.mean([np.abs(np.asarray(a.crop, float) - np.asarray(b.crop, float)).mean()
                             for a, b in zip(t, t[1:]) if a.crop is not None and b.crop is not None]))
              for _, t in tracked]
    result = {"clips": len(tracked), "frames": len(tracked[0][1]), "crop_jitter_mean": float(np.mean(jitter)),
              "lost_frames": int(sum(f.crop is None for _, t in tracked for f in t)), "models": {}}
    for name, run in runs.items():
        predictor = Predictor.from_run(run)
        rows = []
        for label, t in tracked:
            crops = [f.crop for f in t if f.crop is not None]
            raw = predictor.score(crops, batch_size=30)
            rows.append({"label": label, "raw": stability(raw), "smoothed": stability(smooth(raw, "gaussian")),
                         "top_is_label": float((raw.argmax(1) == predictor.label_set.classes.index(label)).mean())})
        result["models"][name] = {
            "per_clip": rows,
            **{f"{kind}_{k}": float(np.mean([r[kind][k] for r in rows])) for kind in ("raw", "smoothed")
               for k in ("majority_share", "max_change")},
            "raw_max_change_worst": float(max(r["raw"]["max_change"] for r in rows)),
            "clips_at_95pct": int(sum(r["raw"]["majority_share"] >= 0.95 for r in rows))}
    out = ROOT / "runs/bench/video_stability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['clips']} clips x {result['frames']} frames; crop jitter {result['crop_jitter_mean']:.1f}/255; "
          f"{result['lost_frames']} frames without a face\n")
    print("| model | majority-class frames (raw) | clips >= 95% | max change, mean over clips (raw) | worst clip | "
          "max change (smoothed) |")
    print("|---|---|---|---|---|---|")
    for name, m in result["models"].items():
        print(f"| {name} | {m['raw_majority_share']:.1%} | {m['clips_at_95pct']} of {result['clips']} | "
              f"{m['raw_max_change']:.3f} | {m['raw_max_change_worst']:.3f} | {m['smoothed_max_change']:.3f} |")


if __name__ == "__main__":
    main()
