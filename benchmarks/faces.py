"""Face detection + alignment throughput on CPU at 640x480, side by side in one run.

* baseline: the same MTCNN, one image per call (no batching);
* batched: same-size frames detected as one batch (what video prediction does);
* each with min_face_size 20 (reference setting) and 40 (faces of >= 40 px, typical for photos/videos).
Also times tiny-model scoring of aligned crops, to state preprocessing's share of the time.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faces.py [--n 32]
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image
from skimage import data

from cervl.faces.align import align_face
from cervl.faces.detect import MTCNNDetector


def frames(n):
    face = Image.fromarray(data.astronaut()).crop((140, 20, 320, 220))
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        canvas = Image.fromarray(rng.integers(60, 200, (480, 640, 3), dtype=np.uint8))
        canvas.paste(face.resize((160, 178)), (100 + 10 * (i % 20), 120))
        out.append(canvas)
    return out


def run(det, imgs, batch):
    t = time.perf_counter()
    found = 0
    for i in range(0, len(imgs), batch):
        chunk = imgs[i:i + batch]
        for im, faces in zip(chunk, det.detect(chunk)):
            if faces:
                found += 1
                align_face(im, faces[0].landmarks, 112)
    return len(imgs) / (time.perf_counter() - t), found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    imgs = frames(args.n)
    rates = {}
    for min_face in (20, 40):
        det = MTCNNDetector(min_face_size=min_face)
        det.detect(imgs[:2])  # warm-up
        for batch in (1, 8):
            rate, found = run(det, imgs, batch)
            rates[(min_face, batch)] = rate
            print(f"min_face {min_face:2d}  batch {batch}: {rate:6.1f} img/s (detect + align), faces found {found}/{len(imgs)}")
    for min_face in (20, 40):
        print(f"batched / baseline (min_face {min_face}): {rates[(min_face, 8)] / rates[(min_face, 1)]:.2f}x")
    print(f"best / reference (min_face 20, batch 1): {max(rates.values()) / rates[(20, 1)]:.2f}x")

    from cervl.models import build_tiny
    from cervl.predict import Predictor

    model, proc = build_tiny("tiny-qwen2-vl")
    pred = Predictor(model, proc, "minimal", "rafdb-compound")
    crops = [im.resize((112, 112)) for im in imgs[:16]]
    pred.score(crops[:8])
    t = time.perf_counter()
    pred.score(crops, batch_size=8)
    model_rate = len(crops) / (time.perf_counter() - t)
    best = max(rates.values())
    print(f"tiny-model scoring (minimal prompt): {model_rate:.1f} img/s; preprocessing/model speed ratio "
          f"{best / model_rate:.2f}x (target >= 10x)")


if __name__ == "__main__":
    main()
