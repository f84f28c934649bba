"""Face detection + alignment throughput on CPU at 640x480, side by side in one run.

* baseline: the same MTCNN, one image per call (no batching);
* batched: same-size frames detected as one batch (what video prediction does);
* each with min_face_size 20 (reference setting) and 40 (faces of >= 40 px, typical for photos/videos);
* photos detected on a 320-px copy; videos (detection on a 320-px copy) with a full detection every 1/10/30
  frames and O-Net tracking between.
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
    det = MTCNNDetector(max_side=320)
    rate, found = run(det, imgs, 1)
    rates["photo, detect at 320 px"] = rate
    print(f"photos, detection on a 320-px copy:   {rate:6.1f} img/s, faces found {found}/{len(imgs)}")
    # video: full detection every 10th frame, O-Net re-location around the tracked box in between
    import tempfile

    import cv2

    from cervl.faces.video import video_faces

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/clip.avi"
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for im in imgs:
            vw.write(np.asarray(im)[:, :, ::-1].copy())
        vw.release()
        for redetect in (1, 10, 30):
            t = time.perf_counter()
            res = list(video_faces(path, MTCNNDetector(max_side=320), redetect_every=redetect))
            rate = len(res) / (time.perf_counter() - t)
            rates[f"video, redetect every {redetect}"] = rate
            print(f"video (decode + detect/track + align), full detection every {redetect:2d} frames: {rate:6.1f} "
                  f"frames/s, faces {sum(r.crop is not None for r in res)}/{len(res)}")
    print(f"video tracking / per-frame detection: {rates['video, redetect every 10'] / rates['video, redetect every 1']:.2f}x")
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
    for key in ("photo, detect at 320 px", "video, redetect every 10", "video, redetect every 30", (20, 1)):
        print(f"tiny-model scoring (minimal prompt) {model_rate:.1f} img/s vs preprocessing [{key}] "
              f"{rates[key]:.1f} img/s: ratio {rates[key] / model_rate:.2f}x (target >= 10x)")


if __name__ == "__main__":
    main()
