"""The ``cervl`` command line: one sub-command per pipeline stage.

Each sub-command parses its arguments here and calls the library; errors in user input are
printed as one ``error:`` line (naming the file, line and field) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

log = logging.getLogger("cervl")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# ----------------------------------------------------------------------------------------------
# cervl synth
# ----------------------------------------------------------------------------------------------

def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate the SynthCE synthetic compound-expression dataset",
                       description="Write SynthCE in RAF-DB's layout (basic/ and compound/ subsets) plus sample sheets.")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class and subset (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class named test_* (default 0.2)")
    p.add_argument("--subsets", default="basic,compound", help="comma list of basic,compound")
    p.add_argument("--size", type=int, default=112, help="aligned crop size in pixels (default 112)")
    p.add_argument("--original-size", type=int, default=192, help="original image size in pixels (default 192)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    p.set_defaults(func=_run_synth)


def _run_synth(args) -> int:
    from cervl.data.synth import SUBSETS, generate

    subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown or args.per_class < 1:
        raise ValueError(f"--subsets must be drawn from {list(SUBSETS)}, --per-class >= 1 (got {args.subsets!r}, "
                         f"{args.per_class})")
    summary = generate(args.out, per_class=args.per_class, seed=args.seed, test_fraction=args.test_fraction,
                       subsets=subsets, original_size=args.original_size, aligned_size=args.size,
                       workers=args.workers)
    for subset, info in summary["subsets"].items():
        print(f"{subset}: {info['samples']} samples ({info['train']} train, {info['test']} test) in "
              f"{args.out / subset}; sample sheet {args.out / f'sample_sheet_{subset}.png'}")
    print(f"{summary['samples_per_second']:.0f} samples/s ({2 * summary['samples_per_second']:.0f} images/s, "
          f"original + aligned) with {args.workers} worker(s)")
    return 0


# ----------------------------------------------------------------------------------------------
# cervl prepare
# ----------------------------------------------------------------------------------------------

def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="read a dataset in its real layout and write a manifest",
                       description="Datasets: rafdb, affwild2, cexprdb, folder, csv. See README for layouts.")
    p.add_argument("dataset", help="rafdb | affwild2 | cexprdb | folder | csv")
    p.add_argument("root", type=Path, help="dataset root (for csv: the CSV file)")
    p.add_argument("-o", "--out", required=True, type=Path, help="manifest to write (.jsonl)")
    p.add_argument("--subset", default="basic", help="rafdb: basic | compound")
    p.add_argument("--variant", default="aligned", help="rafdb: aligned | original")
    p.add_argument("--annotations", help="affwild2/cexprdb: annotation folder (relative to ROOT or absolute)")
    p.add_argument("--frames", help="affwild2: frame folder (default ROOT/cropped_aligned)")
    p.add_argument("--every", type=int, default=1, help="affwild2/cexprdb: keep every Nth frame")
    p.add_argument("--label-set", help="folder/csv: label set (default: inferred from the labels)")
    p.add_argument("--split", help="split for datasets without one (train | val | test)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="move this fraction of train to val, deterministically (per video for video data)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples, summarise them and write "
                   "the first offenders to MANIFEST.bad.jsonl instead of stopping")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not open every image to check it decodes (faster on huge frame sets)")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args) -> int:
    from cervl.data import BadInputs, make_reader, write_manifest
    from cervl.data.base import assign_val

    bad = BadInputs(skip=args.skip_bad)
    reader = make_reader(args.dataset, args.root, subset=args.subset, variant=args.variant,
                         annotations=args.annotations, frames=args.frames, every=args.every,
                         label_set=args.label_set, split=args.split, check_images=args.check_images, bad=bad)
    records = reader.read()
    if not records:
        raise ValueError(f"no samples found in {args.root} for dataset {args.dataset!r}"
                         + (f" ({bad.summary()})" if bad.total else ""))
    assign_val(records, args.val_fraction)
    n = write_manifest(args.out, records, root=reader.image_root)
    splits = Counter(r.split for r in records)
    labels = Counter(r.label for r in records)
    print(f"wrote {n} records to {args.out} (" + ", ".join(f"{k}: {v}" for k, v in sorted(splits.items())) + ")")
    print("labels: " + ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda kv: str(kv[0]))))
    missing = getattr(reader, "missing_frames", 0)
    if missing:
        print(f"{missing} annotated frames had no image file and are not in the manifest")
    if bad.total:
        sidecar = bad.write_sidecar(args.out)
        print(bad.summary() + (f"; first offenders in {sidecar}" if sidecar else ""))
    return 0


# ----------------------------------------------------------------------------------------------
# cervl train
# ----------------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="run a staged training recipe (YAML) and evaluate it",
                       description="Re-running the same command resumes: finished stages are reused and an "
                                   "interrupted stage continues from its last checkpoint.")
    p.add_argument("config", type=Path, help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.1.lr=5e-5 output_dir=runs/x")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from cervl.config import load_config
    from cervl.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=args.progress)
    _print_train_result(result)
    return 0


def _print_train_result(result: dict) -> None:
    for name, ev in result["stages"].items():
        if ev:
            print(f"stage {name}: val accuracy {ev['accuracy']:.2%}, macro-F1 {ev['macro_f1']:.3f} (n={ev['n']})")
    test = result.get("test")
    if test:
        print(f"test accuracy ({test['label_set']}, {test['n']} samples): {test['accuracy']:.2%}, "
              f"macro-F1 {test['macro_f1']:.3f}, top-2 {test['top2_accuracy']:.2%}")
        print(f"report: {test['report']}")
    print(f"run directory: {result['run_dir']}")


# ----------------------------------------------------------------------------------------------
# cervl predict / eval / compare
# ----------------------------------------------------------------------------------------------

def _add_face_options(p, *, video: bool = False) -> None:
    """Detector options shared by predict, abaw and align."""
    p.add_argument("--detector", default="mtcnn", help="face detector: mtcnn (default, offline) or yunet")
    p.add_argument("--detect-side", type=int, default=640,
                   help="mtcnn: search faces on a copy with this longest side (landmarks still come from the "
                        "full-resolution image); 0 = full size. Default 640")
    p.add_argument("--min-face", type=int, default=20, help="mtcnn: smallest face, in pixels of that copy")
    p.add_argument("--face-search", default="all", choices=["all", "largest"],
                   help="mtcnn: 'all' searches every face size (default; the 'multiple' status counts every face); "
                        "'largest' searches from large to small faces and stops once the largest face is certain "
                        "(same largest face, 2-10x faster on photos with large faces, smaller faces not reported)")
    p.add_argument("--detector-model", help="yunet: path of face_detection_yunet_2023mar.onnx")
    p.add_argument("--workers", type=int, default=1,
                   help="preprocess in this many processes, one core each (default 1): photos are aligned in "
                        "parallel; videos are decoded, tracked and aligned one per process while the model scores "
                        "the crops in the main process")
    if video:
        p.add_argument("--redetect-every", type=int, default=120,
                       help="videos: full face detection every N sampled frames (and whenever the face is lost)")
        p.add_argument("--verify-every", type=int, default=10,
                       help="videos: re-locate the face with O-Net every N frames; optical flow in between "
                            "(1 = O-Net on every frame)")


def _detector_options(args) -> dict:
    if args.detector == "mtcnn":
        return {"max_side": args.detect_side or None, "min_face_size": args.min_face, "search": args.face_search}
    return {"model_path": args.detector_model}


def _make_detector(args):
    from cervl.faces.detect import make_detector

    return make_detector(args.detector, **_detector_options(args))


def _video_options(args) -> dict:
    return {"redetect_every": args.redetect_every, "verify_every": args.verify_every}


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict expressions with a trained run (score or generate mode)")
    p.add_argument("inputs", nargs="*", type=Path, help="image files or folders of images")
    p.add_argument("--run", required=True, type=Path, help="run directory written by cervl train")
    p.add_argument("--manifest", type=Path, help="predict the records of a manifest instead of files")
    p.add_argument("--split", action="append", help="manifest split(s) to predict (default: all)")
    p.add_argument("--mode", default="score", choices=["score", "generate"])
    p.add_argument("--normalize", default="sum", choices=["sum", "mean"],
                   help="score mode: sum (default) or mean log-likelihood over the answer tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--align", action="store_true", help="detect and align faces in photos before predicting")
    _add_face_options(p, video=True)
    p.add_argument("--frames-as-video", action="store_true", help="treat each input folder as one video's frames")
    p.add_argument("--every", type=int, default=1, help="videos: predict every Nth frame")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    p.add_argument("--window", type=int, default=5, help="moving-average window (frames)")
    p.add_argument("--sigma", type=float, default=1.5, help="Gaussian smoothing sigma (frames)")
    p.add_argument("--plot", action="store_true", help="videos: write <out>.<video>.png of probabilities over time")
    p.add_argument("-o", "--out", required=True, type=Path, help="predictions JSONL")
    p.set_defaults(func=_run_predict)


def _predict_items(args) -> list[dict]:
    from cervl.data.base import IMAGE_SUFFIXES
    from cervl.data.manifest import read_manifest

    items = []
    if args.manifest:
        m = read_manifest(args.manifest)
        for r in m:
            if args.split and r.split not in args.split:
                continue
            items.append({"id": r.sample_id, "image": m.image_path(r), "label": r.label, "video": r.video,
                          "frame": r.frame})
    for path in args.inputs:
        if _is_video_input(path, args):
            continue
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            items += [{"id": str(f.relative_to(path)), "image": f} for f in files]
        elif path.exists():
            items.append({"id": path.name, "image": path})
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not items and not any(_is_video_input(p, args) for p in args.inputs):
        raise ValueError("nothing to predict: give image files/folders or --manifest (with a non-empty --split)")
    return items


def _is_video_input(path: Path, args) -> bool:
    from cervl.faces.video import is_video

    return (path.is_file() and is_video(path)) or (path.is_dir() and getattr(args, "frames_as_video", False))


def _run_predict(args) -> int:
    from cervl.data.manifest import atomic_write_text
    from cervl.predict import Predictor

    items = _predict_items(args)
    predictor = Predictor.from_run(args.run)
    rows = []
    if items and args.align:
        from tqdm import tqdm

        from cervl.faces.pipeline import align_files

        aligned = align_files([item["image"] for item in items], detector=args.detector,
                              detector_options=_detector_options(args), workers=args.workers)
        for i, res in tqdm(aligned, total=len(items), desc="align", unit="img"):
            if isinstance(res, str):
                items[i]["error"] = res
            else:
                items[i]["face_status"] = res[0].status
                if res[0].crop is not None:
                    items[i]["pil"] = res[0].crop
        for item in [i for i in items if "pil" not in i]:
            reason = item.get("error") or f"no face found ({item.get('face_status')})"
            log.warning("%s: %s", item["image"], reason)
            rows.append({"id": item["id"], "image": str(item["image"]), "label": item.get("label"), "pred": None,
                         "error": reason})
        items = [i for i in items if "pil" in i]
    rows += list(predictor.predict(items, mode=args.mode, batch_size=args.batch_size, normalize=args.normalize))
    rows += _predict_videos(args, predictor)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    meta = {"run": str(args.run), "mode": args.mode, "normalize": args.normalize,
            "label_set": predictor.label_set.name, "prompt": predictor.style.name,
            "manifest": str(args.manifest) if args.manifest else None}
    atomic_write_text(Path(str(args.out) + ".meta.json"), json.dumps(meta, indent=2) + "\n")
    errors = sum(1 for r in rows if r.get("error"))
    invalid = sum(1 for r in rows if r["pred"] is None and not r.get("error"))
    print(f"wrote {len(rows)} predictions to {args.out} ({errors} unreadable images, {invalid} invalid answers)")
    return 0


def _predict_videos(args, predictor) -> list[dict]:
    """Per-frame rows for every video input; a broken video is reported and the others go on."""
    from cervl.predict import plot_video_probs, predict_videos

    videos = [p for p in args.inputs if _is_video_input(p, args)]
    if not videos:
        return []
    if args.mode != "score":
        raise ValueError("video prediction uses --mode score (per-frame probabilities are smoothed over time)")
    per_video: dict[int, list[dict]] = {}
    for i, result in predict_videos(predictor, videos, detector=args.detector, detector_options=_detector_options(args),
                                    workers=args.workers, every=args.every, smoothing=args.smoothing,
                                    window=args.window, sigma=args.sigma, batch_size=args.batch_size,
                                    **_video_options(args)):
        v = videos[i]
        if isinstance(result, str):
            log.error("video %s: %s", v, result)
            per_video[i] = [{"video": v.stem, "image": str(v), "pred": None, "error": result}]
            continue
        lost = sum(r["status"] == "lost" for r in result)
        print(f"{v}: {len(result)} frames predicted ({lost} without a face)")
        if args.plot:
            png = plot_video_probs(result, predictor.label_set.classes, Path(f"{args.out}.{result[0]['video']}.png"))
            print(f"  plot: {png}")
        per_video[i] = [{**r, "image": str(v)} for r in result]
    return [r for i in sorted(per_video) for r in per_video[i]]  # input order, whatever finished first


def _add_abaw(sub) -> None:
    p = sub.add_parser("abaw", help="ABAW compound-expression submission file for a folder of C-EXPR-DB videos",
                       description="ROOT holds the test videos (mp4/avi...) or one folder of frames per video. "
                                   "Every frame gets a line <video>/<frame:05d>.jpg,<0-6> (1-based frames).")
    p.add_argument("root", type=Path)
    p.add_argument("--run", required=True, type=Path, help="a run trained with label set cexprdb (or a superset)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--every", type=int, default=1, help="score every Nth frame; others take the nearest score")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    _add_face_options(p, video=True)
    p.set_defaults(func=_run_abaw)


def _run_abaw(args) -> int:
    import numpy as np

    from cervl.faces.video import is_video
    from cervl.labels import get_label_set
    from cervl.predict import Predictor, predict_videos
    from cervl.report import write_abaw_submission

    predictor = Predictor.from_run(args.run)
    cexpr = get_label_set("cexprdb")
    missing = [c for c in cexpr.classes if c not in predictor.label_set]
    if missing:
        raise ValueError(f"run {args.run} predicts {predictor.label_set.name}, which lacks {missing}")
    inputs = sorted(p for p in args.root.iterdir() if (p.is_file() and is_video(p)) or p.is_dir())
    if not inputs:
        raise ValueError(f"no videos or frame folders in {args.root}")
    keep = [predictor.label_set.index_of[c] for c in cexpr.classes]
    per_video: dict[int, list[dict]] = {}
    failed: list[str] = []
    # with --every N, score every Nth frame; every frame then takes the nearest scored frame's label
    for i, result in predict_videos(predictor, inputs, detector=args.detector,
                                    detector_options=_detector_options(args), workers=args.workers,
                                    every=args.every, smoothing=args.smoothing, **_video_options(args)):
        v = inputs[i]
        if isinstance(result, str):
            log.error("%s", result)
            failed.append(str(v))
            continue
        if all(r.get("probs_smoothed") is None for r in result):
            failed.append(f"{v} (no face in any frame)")
            continue
        if args.every > 1:
            result = _fill_every_frame(result, v)
        per_video[i] = []
        for r in result:
            # restrict to the 7 challenge classes (a run may predict a superset such as rafdb-compound)
            p = np.array([r["probs_smoothed"][predictor.label_set.classes[k]] for k in keep])
            per_video[i].append({"video": r["video"], "frame": r["frame"], "pred": cexpr.classes[int(p.argmax())]})
    rows = [r for i in sorted(per_video) for r in per_video[i]]
    write_abaw_submission(rows, args.out)
    print(f"wrote {len(rows)} frame predictions for {len(inputs) - len(failed)} videos to {args.out}")
    if failed:
        print(f"failed: {failed}")
    return 0 if not failed else 1


def _fill_every_frame(scored: list[dict], video) -> list[dict]:
    """Give every decoded frame of ``video`` the row of the nearest scored frame."""
    import bisect

    from cervl.faces.video import frame_numbers

    by_frame = {r["frame"]: r for r in scored}
    keys = sorted(by_frame)
    out = []
    for n in frame_numbers(video):
        i = bisect.bisect_left(keys, n)
        near = min((k for k in keys[max(0, i - 1): i + 1]), key=lambda k: abs(k - n))
        out.append({**by_frame[near], "frame": n})
    return out


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="metrics, plots and an HTML report from a predictions JSONL")
    p.add_argument("predictions", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="report folder")
    p.add_argument("--label-set", help="default: from PREDICTIONS.meta.json")
    p.add_argument("--title", default=None)
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from cervl.report import evaluate_predictions

    m = evaluate_predictions(args.predictions, args.out, label_set=args.label_set, title=args.title)
    print(f"accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.3f}, invalid {m['invalid_rate']:.2%} "
          f"(n={m['n']}); report: {m['report']}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare two or more eval reports side by side (per-class deltas)")
    p.add_argument("reports", nargs="+", type=Path, help="report folders written by cervl eval")
    p.add_argument("--names", help="comma-separated column names (default: folder names)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from cervl.report import write_comparison

    if len(args.reports) < 2:
        raise ValueError("compare needs at least two reports")
    names = args.names.split(",") if args.names else None
    md = write_comparison(args.reports, args.out, names)
    print(md.read_text())
    return 0


def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="run an ablation grid (YAML) and write one comparison table and plot")
    p.add_argument("grid", type=Path, help="ablation YAML, e.g. configs/ablation-quickstart.yaml")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args) -> int:
    from cervl.ablate import run_ablation

    md = run_ablation(args.grid, progress=args.progress)
    print(md.read_text())
    print(f"ablation report: {md.with_suffix('.html')}")
    return 0


# ----------------------------------------------------------------------------------------------
# cervl align
# ----------------------------------------------------------------------------------------------

def _add_align(sub) -> None:
    p = sub.add_parser("align", help="detect faces and write 5-point aligned crops plus a manifest",
                       description="INPUT is a folder of images or a manifest. Known landmarks in a manifest "
                                   "(e.g. RAF-DB manual annotations) are used instead of detection. A video "
                                   "file, or with --videos a folder of videos and frame folders, gives "
                                   "OUT/frames/<video>/<frame:05d>.jpg (the Aff-Wild2 cropped_aligned layout), "
                                   "one tracked face per frame.")
    p.add_argument("input", type=Path)
    p.add_argument("--videos", action="store_true",
                   help="INPUT is a folder of videos (files) and frame folders (sub-folders), one video each")
    p.add_argument("--every", type=int, default=1, help="videos: align every Nth frame (default 1)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (crops, manifest.jsonl, summary.json)")
    p.add_argument("--size", type=int, default=112, help="crop size (default 112, the 5-point template size)")
    _add_face_options(p, video=True)
    p.add_argument("--faces", default="largest", choices=["largest", "all"])
    p.add_argument("--fallback", default="skip", choices=["skip", "center"], help="when no face is found")
    p.add_argument("--label-set", default="basic-7", help="label set of the output records for folder input")
    p.add_argument("--split", default="test", help="split of the output records for folder input")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_run_align)


def _run_align(args) -> int:
    from collections import Counter

    from tqdm import tqdm

    from cervl.data.base import IMAGE_SUFFIXES
    from cervl.data.manifest import (
        Record,
        atomic_write_text,
        read_manifest,
        write_manifest,
    )
    from cervl.faces.pipeline import align_files
    from cervl.faces.video import is_video

    if args.videos or (args.input.is_file() and is_video(args.input)):
        return _align_videos(args)
    if args.input.is_dir():
        files = sorted(p for p in args.input.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        jobs = [(Record(image=str(f.relative_to(args.input)), label=None, label_set=args.label_set, split=args.split,
                        dataset="folder", id=str(f.relative_to(args.input))), f, None) for f in files]
    elif args.input.is_file():
        m = read_manifest(args.input)
        jobs = [(r, m.image_path(r), r.landmarks if r.source is None else None) for r in m]
    else:
        raise FileNotFoundError(f"input not found: {args.input}")
    if not jobs:
        raise ValueError(f"no images in {args.input}")
    crops_dir = args.out / "crops"
    crops_dir.mkdir(parents=True, exist_ok=True)
    records, statuses, log_rows = [], Counter(), []
    aligned = align_files([path for _, path, _ in jobs], [lm for _, _, lm in jobs], detector=args.detector,
                          detector_options=_detector_options(args), workers=args.workers,
                          chunk_size=args.batch_size, size=args.size, faces=args.faces, fallback=args.fallback)
    for i, results in tqdm(aligned, total=len(jobs), desc="align", unit="img"):
        rec, path, lm = jobs[i]
        if isinstance(results, str):
            statuses["unreadable"] += 1
            log_rows.append({"image": str(path), "status": "unreadable", "error": results})
            continue
        for res in results:
            statuses[res.status] += 1
            log_rows.append({"image": str(path), "status": res.status, "faces": res.n_faces, "box": res.box,
                             "score": res.score})
            if res.crop is None:
                continue
            name = f"{len(records):06d}_{Path(rec.sample_id).stem}" + (f"_f{res.face_index}" if res.face_index else "")
            res.crop.save(crops_dir / f"{name}.jpg", quality=95)
            records.append(Record(image=f"crops/{name}.jpg", label=rec.label, label_set=rec.label_set,
                                  split=rec.split, dataset=rec.dataset, id=rec.sample_id + (
                                      f"#face{res.face_index}" if res.face_index else ""),
                                  landmarks=res.landmarks or (lm if lm else None), bbox=res.box,
                                  video=rec.video, frame=rec.frame, variant="aligned", source=str(path)))
    write_manifest(args.out / "manifest.jsonl", records, root=args.out)
    atomic_write_text(args.out / "align_log.jsonl", "".join(json.dumps(r) + "\n" for r in log_rows))
    summary = {"inputs": len(jobs), "crops": len(records), "status": dict(statuses), "detector": args.detector,
               "detect_side": args.detect_side, "min_face": args.min_face, "face_search": args.face_search,
               "workers": args.workers,
               "size": args.size, "faces": args.faces, "fallback": args.fallback}
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"{len(jobs)} images -> {len(records)} aligned crops in {crops_dir}; status: "
          + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    return 0


def _align_videos(args) -> int:
    """`cervl align` for videos: tracked, aligned face crops per frame, a manifest and a summary.

    A video's crops and records are kept only once it is fully processed: a video that fails half
    way is reported (summary, stderr) and its partial folder removed, and the other videos go on.
    """
    import shutil
    from collections import Counter

    from tqdm import tqdm

    from cervl.data.manifest import Record, atomic_write_text, write_manifest
    from cervl.faces.video import is_video, many_video_faces
    from cervl.predict import video_name

    if args.input.is_file():
        videos = [args.input]
    elif args.input.is_dir():
        videos = sorted(p for p in args.input.iterdir() if (p.is_file() and is_video(p)) or p.is_dir())
    else:
        raise FileNotFoundError(f"input not found: {args.input}")
    if not videos:
        raise ValueError(f"no videos or frame folders in {args.input}")
    names = [video_name(v) for v in videos]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"{args.input}: several inputs would write the same video folder: {clash}")
    frames_dir = args.out / "frames"
    records: dict[int, list[Record]] = {i: [] for i in range(len(videos))}
    counts: dict[int, Counter] = {i: Counter() for i in range(len(videos))}
    failed: dict[str, str] = {}
    events = many_video_faces(videos, detector=args.detector, detector_options=_detector_options(args),
                              workers=args.workers, every=args.every, size=args.size, **_video_options(args))
    for kind, i, payload in tqdm(events, desc="align videos", unit="chunk"):
        out = frames_dir / names[i]
        if kind == "frames":
            out.mkdir(parents=True, exist_ok=True)
            for f in payload:
                counts[i][f.status] += 1
                if f.crop is None:
                    continue
                f.crop.save(out / f"{f.frame:05d}.jpg", quality=95)
                records[i].append(Record(image=f"frames/{names[i]}/{f.frame:05d}.jpg", label=None,
                                         label_set=args.label_set, split=args.split, dataset="video",
                                         id=f"{names[i]}/{f.frame:05d}", landmarks=f.landmarks, bbox=f.box,
                                         video=names[i], frame=f.frame, variant="aligned", source=str(videos[i])))
        elif kind == "error":
            log.error("%s", payload)
            failed[str(videos[i])] = payload
            records[i], counts[i] = [], Counter()
            shutil.rmtree(out, ignore_errors=True)
    kept = [r for i in range(len(videos)) for r in records[i]]
    write_manifest(args.out / "manifest.jsonl", kept, root=args.out)
    per_video = {names[i]: {"frames": sum(counts[i].values()), "crops": len(records[i]), **dict(counts[i])}
                 for i in range(len(videos)) if str(videos[i]) not in failed}
    summary = {"videos": len(videos), "crops": len(kept), "failed": failed, "per_video": per_video,
               "detector": args.detector, "detect_side": args.detect_side, "min_face": args.min_face,
               "face_search": args.face_search, "every": args.every, **_video_options(args),
               "workers": args.workers, "size": args.size}
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lost = sum(v.get("lost", 0) for v in per_video.values())
    print(f"{len(videos)} videos -> {len(kept)} aligned frames in {frames_dir} ({lost} frames without a face, "
          f"{len(failed)} videos failed)")
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a trained run over HTTP (GET /health, POST /predict)")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--align", action="store_true",
                   help="enable ?align=1 (MTCNN, largest-first search, + 5-point alignment of the largest face)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from cervl.predict import Predictor
    from cervl.serve import serve

    aligner = None
    if args.align:
        from cervl.faces.pipeline import FaceAligner

        # only the largest face is scored, so the largest-first search (same face, less latency) suffices;
        # the reply's "face" status then counts faces down to half the largest one's size
        aligner = FaceAligner("mtcnn", search="largest")
    print(f"serving {args.run} on http://{args.host}:{args.port}")
    serve(Predictor.from_run(args.run), host=args.host, port=args.port, aligner=aligner)
    return 0


# ----------------------------------------------------------------------------------------------
# cervl labels
# ----------------------------------------------------------------------------------------------

def _add_labels(sub) -> None:
    p = sub.add_parser("labels", help="list label sets, or show one as JSON")
    p.add_argument("name", nargs="?", help="a label set name (default: list them)")
    p.set_defaults(func=_run_labels)


def _run_labels(args) -> int:
    from cervl.labels import LABEL_SETS, get_label_set

    if args.name is None:
        for s in LABEL_SETS.values():
            print(f"{s.name:16s} {len(s):2d} classes  {s.description}")
        return 0
    s = get_label_set(args.name)
    print(json.dumps({"name": s.name, "classes": list(s.classes), "id_to_name": s.id_to_name}, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# cervl demo / pretrain-tiny
# ----------------------------------------------------------------------------------------------

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _prepare_synth(data: Path, manifests: Path, *, per_class: int, seed: int, prefix: str = "synthce-",
                   val_fraction: float = 0.1, workers: int = 1) -> None:
    """Generate SynthCE (unless present) and prepare its four manifests (basic/compound x aligned/original)."""
    meta = data / "synthce.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("per_class") != per_class \
            or json.loads(meta.read_text()).get("seed") != seed:
        _run_synth(build_parser().parse_args(["synth", "-o", str(data), "--per-class", str(per_class),
                                              "--seed", str(seed), "--workers", str(workers)]))
    for subset in ("basic", "compound"):
        for variant in ("aligned", "original"):
            out = manifests / f"{prefix}{subset}-{variant}.jsonl"
            _run_prepare(build_parser().parse_args(
                ["prepare", "rafdb", str(data / subset), "--subset", subset, "--variant", variant,
                 "-o", str(out), "--val-fraction", str(val_fraction)]))


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end (SynthCE + tiny base, offline)",
                       description="Generates SynthCE into runs/demo/, prepares manifests, then runs "
                                   "configs/quickstart.yaml (two LoRA stages) and reports the test accuracy.")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "quickstart.yaml")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--data-only", action="store_true", help="only generate and prepare the data")
    p.add_argument("--rebuild-base", action="store_true",
                   help="first rebuild the shipped tiny base with `cervl pretrain-tiny` (about 12 min on 2 cores)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the recipe")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    import time

    from cervl.config import load_config
    from cervl.train import train

    t0 = time.perf_counter()
    if args.rebuild_base:
        _run_pretrain_tiny(build_parser().parse_args(["pretrain-tiny"]))
    cfg = load_config(args.config, args.overrides)
    # The recipe's test manifest lives in runs/demo/manifests: generate the data beside it.
    manifests = Path(cfg.test.manifest).parent
    _prepare_synth(manifests.parent / "synthce", manifests, per_class=args.per_class, seed=0)
    if args.data_only:
        return 0
    result = train(cfg)
    _print_train_result(result)
    test = result.get("test")
    if test:
        print(f"\nDEMO: stage-2 compound accuracy on the SynthCE test split (aligned): {test['accuracy']:.2%} "
              f"(chance {1 / len(test['confusion']):.0%}); total time {time.perf_counter() - t0:.0f} s")
    return 0


def _add_pretrain_tiny(sub) -> None:
    p = sub.add_parser("pretrain-tiny", help="rebuild the shipped tiny pretrained base (AU-caption pretraining)",
                       description="Generates a separate SynthCE (seed 1000), warms up the vision tower on AU "
                                   "intensities, then fine-tunes tiny-qwen2-vl fully on AU captions with "
                                   "configs/pretrain-tiny.yaml; writes safetensors, tokenizer and processor to the "
                                   "package's assets/tiny-base. See cervl/pretrain_tiny.py.")
    p.add_argument("--config", type=Path, default=REPO_CONFIGS / "pretrain-tiny.yaml")
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "assets" / "tiny-base")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=400, help="vision warm-up steps (phase 1)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_run_pretrain_tiny)


def _run_pretrain_tiny(args) -> int:
    from cervl.pretrain_tiny import pretrain_tiny

    out = pretrain_tiny(args.config, args.overrides, per_class=args.per_class, out=args.out, workers=args.workers,
                        warmup_steps=args.warmup_steps)
    print(f"tiny base written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cervl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_prepare, _add_align, _add_train, _add_predict, _add_abaw, _add_eval, _add_compare,
                _add_ablate, _add_serve, _add_labels,
                _add_demo,
                _add_pretrain_tiny):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (argparse stops filling a nargs="*" positional there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(-1 if args.quiet else args.verbose)
    from cervl.data.manifest import ManifestError

    try:
        return args.func(args)
    except (ManifestError, ValueError, KeyError, FileNotFoundError) as e:  # ConfigError, DataError are ValueErrors
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
