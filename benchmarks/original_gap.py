"""The aligned-versus-original gap on SynthCE (issue 22), measured in one run.

1. The detector's landmark error: MTCNN alone and flip-averaged, on the SynthCE compound *test* originals
   (true landmarks in the manifest) and on a real photo moved along a known path (tests/clips.py: truth from
   the motion). The error distribution the align-noise training draws from is measured on the *training*
   originals only (runs/recipe/lmerr-train-single.json), never on the test split.
2. The grid configs/ablation-original.yaml: trainings (demo, zero-shot, frame preset, alignment noise, both)
   x test crops (aligned, original as is, original + MTCNN, original + flip-averaged MTCNN, original + true
   landmarks), each with n, accuracy ± SE, the worst class and the faces not found.

Run after ``make demo``:  .venv/bin/python benchmarks/original_gap.py      (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "runs/demo/manifests/synthce-compound-original.jsonl"
OUT = ROOT / "runs/recipe"


def landmark_errors() -> dict:
    from cervl.faces.detect import make_detector
    from cervl.evaluate.landmarks import measure_landmark_error

    OUT.mkdir(parents=True, exist_ok=True)
    train = OUT / "lmerr-train-single.json"
    if not train.is_file():
        train.write_text(json.dumps(measure_landmark_error(MANIFEST, make_detector("mtcnn"), splits=["train"])))
    result = {}
    for mode in ("single", "flip"):
        r = measure_landmark_error(MANIFEST, make_detector("mtcnn", landmarks=mode), splits=["test"], progress=False)
        result[f"synthce_test_{mode}"] = {k: r[k] for k in ("n", "found", "missed", "nme_mean", "nme_se",
                                                              "nme_median")}
        result[f"moving_photo_{mode}"] = moving_photo_error(mode)
    return result


def moving_photo_error(mode: str) -> dict:
    """NME on 60 frames of the astronaut photo panned, rolled and zoomed along a known path.

    A real photo has no true landmarks: the truth is the same detector's landmarks on the still photo, moved
    along the path. This measures how consistently a detector places the landmarks on a moving face (the
    jitter that changes the crop), not its bias.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from clips import moving_face_clip
    from skimage import data

    from cervl.faces.detect import make_detector
    from cervl.faces.landmarks import nearest_face, nme

    photo = data.astronaut()
    det = make_detector("mtcnn", landmarks=mode)
    lm0 = det.detect([photo])[0][0].landmarks
    frames, truth = moving_face_clip(photo, lm0, n=60)
    errs = []
    for frame, t in zip(frames, truth):
        face = nearest_face(det.detect([frame])[0], t)  # the photo's reflected border can hold a second "face"
        if face is not None:
            errs.append(nme(face.landmarks, t))
    e = np.array(errs)
    return {"n": len(frames), "found": len(errs), "nme_mean": float(e.mean()),
            "nme_se": float(e.std(ddof=1) / np.sqrt(len(e)))}


def main() -> None:
    from cervl.experiments.ablate import run_ablation

    errors = landmark_errors()
    (OUT / "landmark_errors.json").write_text(json.dumps(errors, indent=2) + "\n")
    print("| landmarks | SynthCE test originals: NME ± SE (missed of n) | moving real photo, consistency: NME ± SE "
          "(found of n) |")
    print("|---|---|---|")
    for mode in ("single", "flip"):
        s, m = errors[f"synthce_test_{mode}"], errors[f"moving_photo_{mode}"]
        print(f"| {mode} | {s['nme_mean']:.4f} ± {s['nme_se']:.4f} ({s['missed']} of {s['n']}) | "
              f"{m['nme_mean']:.4f} ± {m['nme_se']:.4f} ({m['found']} of {m['n']}) |")
    md = run_ablation(ROOT / "configs/ablation-original.yaml", progress=False)
    print(md.read_text())


if __name__ == "__main__":
    main()
