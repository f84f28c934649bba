"""Face preprocessing (detection + alignment) on one CPU core at 640x480, side by side with prediction.

Everything below is measured in one run, on one thread, so ratios are meaningful on a noisy machine:

* photos, with medium (~80 px) and large (~200 px) faces: the plain baseline (MTCNN at full size, one
  image per call), the same with batches of 8, the largest-first search, and detection on a 320-px
  copy (O-Net landmarks still at full resolution), alone and with the largest-first search;
* videos: a 640x480 clip of a real face (scikit-image's astronaut) panning, rolling and zooming
  along a known path, so landmark error is measured against the truth. Schedules: full detection on
  every frame (the baseline), O-Net on every frame, and the default: optical flow with an O-Net check
  every 10 frames and a full detection every 120. Also end to end with MJPG decoding, and six such
  videos in one process vs two worker processes (one video each, as ``cervl abaw --workers 2``);
* prediction: tiny-model scoring of 112-px crops (the demo's model size, minimal prompt);
* with ``../shared`` (or $CERVL_SHARED): the real Qwen2-VL-2B shape with random weights, scoring the
  same crops with the same code, for preprocessing's share of the time at real model size (CPU).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/faces.py [--frames 300] [--no-real-size]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from cervl.faces.align import align_face
from cervl.faces.detect import MTCNNDetector
from cervl.faces.video import track_faces, video_faces

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic clip lives with the tests
from clips import moving_face_clip  # noqa: E402

SHARED = Path(os.environ.get("CERVL_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def photos(n, face_width=160):
    """640x480 photos: the astronaut's face pasted at varying places on a noisy background.

    ``face_width=160`` gives a detected face box of ~80 px; 400 gives ~200 px, a face filling much
    of the frame as in most expression photos (RAF-DB, AffectNet originals)."""
    face = Image.fromarray(data.astronaut()).crop((140, 20, 320, 220))
    face = face.resize((face_width, round(face_width * 200 / 180)))
    out, rng = [], np.random.default_rng(0)
    for i in range(n):
        canvas = Image.fromarray(rng.integers(60, 200, (480, 640, 3), dtype=np.uint8))
        x = min(100 + 10 * (i % 20), 640 - face.width)
        canvas.paste(face, (x, max(0, 300 - face.height)))
        out.append(np.asarray(canvas))
    return out


def photo_rate(det, imgs, batch):
    t = time.perf_counter()
    found = 0
    for i in range(0, len(imgs), batch):
        chunk = imgs[i:i + batch]
        for im, faces in zip(chunk, det.detect(chunk)):
            if faces:
                found += 1
                align_face(im, faces[0].landmarks, 112)
    return len(imgs) / (time.perf_counter() - t), found


def nme(rows, truth):
    iod = np.linalg.norm(truth[:, 0] - truth[:, 1], axis=1)
    return np.array([np.linalg.norm(np.array(r.landmarks) - truth[i], axis=1).mean() / iod[i]
                     for i, r in enumerate(rows) if r.landmarks is not None])


def score_rate(predictor, crops, batch_size=16, repeats=1):
    predictor.score(crops[:2], batch_size=batch_size)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.score(crops, batch_size=batch_size)
        best = max(best, len(crops) / (time.perf_counter() - t))
    return best


def real_size_predictor(shape_dir):
    """Qwen2-VL-2B architecture, random weights (throughput does not depend on their values)."""
    from transformers import AutoConfig, AutoTokenizer

    from cervl.models.loading import (
        _transformers_attr,
        get_family,
        make_image_processor,
        make_processor,
    )
    from cervl.predict import Predictor

    cfg = AutoConfig.from_pretrained(shape_dir)
    family = get_family(cfg.model_type)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = _transformers_attr(family.model_class)(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    tok = AutoTokenizer.from_pretrained(SHARED / "qwen2-vl-tokenizer")
    proc = make_processor(family, make_image_processor(family, 56 * 56, 28 * 28 * 1280), tok)
    return Predictor(model, proc, "minimal", "rafdb-compound")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--no-real-size", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}\n")
    rates = {}

    # --- photos -------------------------------------------------------------------------------
    print("photos, 640x480, detection + alignment:")
    for faces, imgs in (("~80-px faces", photos(args.photos)), ("~200-px faces", photos(args.photos, 400))):
        for name, det, batch in (("baseline: full size, 1 per call", MTCNNDetector(max_side=None), 1),
                                 ("full size, batches of 8", MTCNNDetector(max_side=None), 8),
                                 ("largest-first search", MTCNNDetector(search="largest"), 1),
                                 ("detection on a 320-px copy", MTCNNDetector(max_side=320), 1),
                                 ("320-px copy, largest-first", MTCNNDetector(max_side=320, search="largest"), 1)):
            det.detect(imgs[:1])
            rate, found = photo_rate(det, imgs, batch)
            rates[f"photo, {faces}: {name}"] = rate
            print(f"  {faces}, {name:34s} {rate:7.1f} img/s   faces {found}/{len(imgs)}")

    # --- video --------------------------------------------------------------------------------
    photo = data.astronaut()
    det = MTCNNDetector(max_side=320)
    lm0 = MTCNNDetector(max_side=None).detect([photo])[0][0].landmarks
    frames, truth = moving_face_clip(photo, lm0, n=args.frames)
    print(f"\nvideo, {args.frames} frames 640x480 (moving face, known landmarks), detection on a 320-px copy; "
          f"detection + tracking + alignment, frames in memory:")
    schedules = (("baseline: full detection every frame", 1, 1), ("O-Net every frame, detection every 60", 60, 1),
                 ("flow, O-Net every 5, detection every 30", 30, 5),
                 ("flow, O-Net every 10, detection every 60", 60, 10),
                 ("default: flow, O-Net every 10, detection every 120", 120, 10))
    for name, redetect, verify in schedules:
        clip = frames if redetect > 1 else frames[: max(30, args.frames // 5)]
        t = time.perf_counter()
        rows = list(track_faces(enumerate(clip, 1), det, redetect_every=redetect, verify_every=verify))
        rate = len(rows) / (time.perf_counter() - t)
        err = nme(rows, truth[: len(clip)])
        rates[f"video: {name}"] = rate
        print(f"  {name:50s} {rate:7.1f} frames/s   NME mean {err.mean():.4f} max {err.max():.4f} "
              f"(faces {len(err)}/{len(rows)})")
    smile_frames, smile_truth = moving_face_clip(photo, lm0, n=min(args.frames, 120), smile=1.0)
    print("  the same motion plus a smile (mouth corners move 0.18 eye distances out and 0.1 up and back, twice):")
    for name, redetect, verify in (("full detection every frame", 1, 1), ("O-Net every frame", 120, 1),
                                   ("default: flow, O-Net every 10, detection every 120", 120, 10),
                                   ("flow alone after the first detection", 10**6, 10**6)):
        rows = list(track_faces(enumerate(smile_frames, 1), det, redetect_every=redetect, verify_every=verify))
        err = nme(rows, smile_truth)
        print(f"    {name:52s} NME mean {err.mean():.4f} max {err.max():.4f}")
    import cv2

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/clip.avi"
        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for f in frames:
            vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        vw.release()
        t = time.perf_counter()
        rows = list(video_faces(path, det))
        rate = len(rows) / (time.perf_counter() - t)
        rates["video: default, with MJPG decoding"] = rate
        print(f"  {'default, end to end with MJPG decoding':50s} {rate:7.1f} frames/s")
        # several videos: one process per video (decode + track + align), as `cervl abaw --workers N` does
        from cervl.faces.video import parallel_video_faces

        paths = [path] + [f"{d}/clip{i}.avi" for i in range(1, 6)]
        for p in paths[1:]:
            Path(p).write_bytes(Path(path).read_bytes())
        for workers in (1, 2):
            t = time.perf_counter()
            if workers == 1:
                n = sum(1 for p in paths for _ in video_faces(p, det))
                steady = n / (time.perf_counter() - t)
            else:
                n, first = 0, None
                for kind, _, x in parallel_video_faces(paths, detector_options={"max_side": 320}, workers=workers):
                    if kind == "frames":
                        if first is None:  # processes started, first chunk back
                            first, n0 = time.perf_counter(), len(x)
                        n += len(x)
                steady = (n - n0) / (time.perf_counter() - first)
            rate = n / (time.perf_counter() - t)
            rates[f"video: 6 videos, MJPG, {workers} process(es)"] = steady
            print(f"  {f'6 videos end to end, {workers} process(es)':50s} {steady:7.1f} frames/s "
                  f"({rate:.1f} with process start-up)")
    base = rates["video: baseline: full detection every frame"]
    print(f"  tracking (default) / per-frame detection: "
          f"{rates['video: default: flow, O-Net every 10, detection every 120'] / base:.1f}x")

    # --- prediction ---------------------------------------------------------------------------
    from cervl.models.loading import build_tiny
    from cervl.predict import Predictor

    crops = [align_face(f, truth[i], 112)[0] for i, f in enumerate(frames[:64])]
    model, proc = build_tiny("tiny-qwen2-vl")
    tiny = score_rate(Predictor(model, proc, "minimal", "rafdb-compound"), crops, repeats=2)
    print(f"\ntiny-model scoring (demo size, minimal prompt, batch 16): {tiny:.1f} img/s")
    print("preprocessing / tiny-model prediction (target >= 10x):")
    for key, rate in rates.items():
        print(f"  {key:62s} {rate / tiny:6.2f}x")

    shape = SHARED / "qwen-vl-shapes" / "qwen2-vl-2b"
    if args.no_real_size or not shape.is_dir() or not (SHARED / "qwen2-vl-tokenizer").is_dir():
        print(f"\n(real-size share skipped: needs {shape} and the tokenizer; see ../shared/README.md)")
        return
    real = score_rate(real_size_predictor(shape), crops[:4], batch_size=4)
    print(f"\nQwen2-VL-2B shape (random weights, fp32, CPU, 1 thread), minimal prompt: {real:.3f} img/s "
          f"({1 / real:.1f} s/img)")
    for key in ("photo, ~80-px faces: baseline: full size, 1 per call", "photo, ~200-px faces: largest-first search",
                "photo, ~80-px faces: detection on a 320-px copy",
                "video: default: flow, O-Net every 10, detection every 120"):
        share = (1 / rates[key]) / (1 / rates[key] + 1 / real)
        print(f"  preprocessing share of the time, {key}: {100 * share:.2f}%")


if __name__ == "__main__":
    main()
