"""``cervl predict``, ``abaw``, ``eval``, ``compare`` and ``labels``: parsing and printing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cervl.cli.options import (check_model_choice, detector_options, face_kwargs, face_options, load_predictor,
                               ray_options, tracking, zero_shot_options)
from cervl.core.errors import UserError

log = logging.getLogger("cervl")


def run_predict(args) -> int:
    from cervl.faces.video import is_video
    from cervl.predict import write_predictions
    from cervl.predict.predictor import align_items, items_from_manifest, items_from_paths, prediction_meta

    check_model_choice(args)  # a missing or unfinished run is the first thing to report, before any input
    is_vid = [(p.is_file() and is_video(p)) or (p.is_dir() and args.frames_as_video) for p in args.inputs]
    videos = [p for p, v in zip(args.inputs, is_vid) if v]
    items = items_from_manifest(args.manifest, args.split) if args.manifest else []
    items += items_from_paths([p for p, v in zip(args.inputs, is_vid) if not v])
    if not items and not videos:
        raise UserError("nothing to predict: give image files/folders, videos or --manifest (with a non-empty --split)")
    if args.engine == "ray":
        from cervl.cli import scale

        if args.compound_from_basic or args.model:
            raise UserError("--compound-from-basic and --model run on the local engine only (drop --engine ray)")
        return scale.predict(args, items, videos, {"detector": args.detector, "options": detector_options(args)},
                             tracking(args))
    if args.format != "jsonl":
        raise UserError("--format parquet needs --engine ray (the local engine writes JSON Lines)")
    predictor = load_predictor(args)
    if args.compound_from_basic:  # a basic-emotion run, answering in a compound label set
        from cervl.predict.pairwise import PairwisePredictor

        predictor = PairwisePredictor(predictor, args.compound_from_basic)
    if items and args.align:
        align_items(items, detector=args.detector, detector_options=detector_options(args), workers=args.workers)
    rows = list(predictor.predict(items, mode=args.mode, batch_size=args.batch_size, normalize=args.normalize))
    rows += _predict_videos(args, predictor, videos)
    meta = prediction_meta(args.run or f"zero-shot:{args.model}", predictor.label_set, predictor.style,
                           mode=args.mode, normalize=args.normalize, manifest=args.manifest)
    if args.compound_from_basic:
        meta["compound_from_basic"] = predictor.basic.label_set.name
    write_predictions(args.out, rows, meta)
    unreadable = sum(1 for r in rows if r.get("error") and "face" not in r)
    no_face = sum(1 for r in rows if r.get("error") and "face" in r)
    invalid = sum(1 for r in rows if r["pred"] is None and not r.get("error"))
    print(f"wrote {len(rows)} predictions to {args.out} ({unreadable} unreadable images, "
          + (f"{no_face} without a face, " if args.align else "") + f"{invalid} invalid answers)")
    return 0


def _predict_videos(args, predictor, videos: list[Path]) -> list[dict]:
    from cervl.predict.video import plot_video_probs, predict_videos

    if videos and args.mode != "score":
        raise UserError("video prediction uses --mode score (per-frame probabilities are smoothed over time)")
    per_video: dict[int, list[dict]] = {}
    for i, result in predict_videos(predictor, videos, detector=args.detector, detector_options=detector_options(args),
                                    workers=args.workers, every=args.every, smoothing=args.smoothing,
                                    window=args.window, sigma=args.sigma, batch_size=args.batch_size,
                                    **tracking(args)) if videos else ():
        v = videos[i]
        if isinstance(result, str):
            log.error("video %s: %s", v, result)
            per_video[i] = [{"video": v.stem, "image": str(v), "pred": None, "error": result}]
            continue
        print(f"{v}: {len(result)} frames predicted ({sum(r['status'] == 'lost' for r in result)} without a face)")
        if args.plot:
            png = plot_video_probs(result, predictor.label_set.classes, Path(f"{args.out}.{result[0]['video']}.png"))
            print(f"  plot: {png}")
        per_video[i] = [{**r, "image": str(v)} for r in result]
    return [r for i in sorted(per_video) for r in per_video[i]]  # input order, whatever finished first


def run_abaw(args) -> int:
    from cervl.evaluate.abaw import abaw_submission
    from cervl.predict import Predictor

    if args.engine == "ray":
        from cervl.cli import scale

        return scale.abaw(args, {"detector": args.detector, "options": detector_options(args)}, tracking(args))
    sub = abaw_submission(Predictor.from_run(args.run), args.root, args.out, every=args.every,
                          smoothing=args.smoothing, **face_kwargs(args), **tracking(args))
    print(f"wrote {sub.rows} frame predictions for {sub.videos} videos to {sub.path}")
    if sub.failed:
        print(f"failed: {sub.failed}")
    return 0 if not sub.failed else 1


def run_eval(args) -> int:
    from cervl.evaluate.report import evaluate_predictions

    m = evaluate_predictions(args.predictions, args.out, label_set=args.label_set, title=args.title,
                             explain=args.explain)
    print(f"accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.3f}, invalid {m['invalid_rate']:.2%} "
          f"(n={m['n']}); report: {m['report']}")
    return 0


def run_compare(args) -> int:
    from cervl.evaluate.report import write_comparison

    if len(args.reports) < 2:
        raise UserError("compare needs at least two reports")
    print(write_comparison(args.reports, args.out, args.names.split(",") if args.names else None).read_text())
    return 0


def run_labels(args) -> int:
    from cervl.core.labels import LABEL_SETS, get_label_set

    if args.name is None:
        for s in LABEL_SETS.values():
            print(f"{s.name:16s} {len(s):2d} classes  {s.description}")
        return 0
    s = get_label_set(args.name)
    print(json.dumps({"name": s.name, "classes": list(s.classes), "id_to_name": s.id_to_name}, indent=2))
    return 0


def add_parsers(add) -> None:
    """The predict, abaw, eval, compare, labels sub-commands: arguments, and which function runs each."""
    p = add("predict", help="predict expressions with a trained run, or zero-shot with a base model")
    p.add_argument("inputs", nargs="*", type=Path, help="image files, folders of images, or videos")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    zero_shot_options(p)
    p.add_argument("--manifest", type=Path, help="predict the records of a manifest")
    p.add_argument("--split", action="append", help="manifest split(s) to predict (default: all)")
    p.add_argument("--mode", default="score", choices=["score", "generate"])
    p.add_argument("--normalize", default="sum", choices=["sum", "mean"],
                   help="score mode: sum (default) or mean log-likelihood over the answer tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--align", action="store_true", help="detect and align faces in photos before predicting")
    p.add_argument("--compound-from-basic", nargs="?", const="rafdb-compound", metavar="LABEL_SET",
                   help="a basic-emotion run answers in a compound label set (default rafdb-compound): "
                        "P(A and B) proportional to p_A * p_B, renormalised (the pair-wise baseline)")
    face_options(p)
    p.add_argument("--frames-as-video", action="store_true", help="treat each input folder as one video's frames")
    p.add_argument("--every", type=int, default=1, help="videos: predict every Nth frame")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    p.add_argument("--window", type=int, default=5, help="moving-average window (frames)")
    p.add_argument("--sigma", type=float, default=1.5, help="Gaussian smoothing sigma (frames)")
    p.add_argument("--plot", action="store_true", help="videos: write <out>.<video>.png of probabilities over time")
    p.add_argument("-o", "--out", required=True, type=Path, help="predictions JSONL")
    ray_options(p, output_format=True)
    p.set_defaults(func=run_predict)

    p = add("abaw", help="ABAW compound-expression submission file for a folder of C-EXPR-DB videos",
            description="ROOT holds the test videos or one folder of frames per video. Every frame gets a line "
                        "<video>/<frame:05d>.jpg,<0-6> (1-based frames).")
    p.add_argument("root", type=Path)
    p.add_argument("--run", required=True, type=Path, help="a run trained with label set cexprdb (or a superset)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.add_argument("--every", type=int, default=1, help="score every Nth frame; others take the nearest score")
    p.add_argument("--smoothing", default="gaussian", choices=["none", "moving", "gaussian"])
    face_options(p)
    ray_options(p)
    p.set_defaults(func=run_abaw)

    p = add("eval", help="metrics, plots and an HTML report from a predictions JSONL")
    p.add_argument("predictions", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="report folder")
    p.add_argument("--label-set", help="default: from PREDICTIONS.meta.json")
    p.add_argument("--title", default=None)
    p.add_argument("--explain", type=Path, metavar="DIR", help="add the 'Where the model looks' section of a "
                   "cervl explain --manifest folder")
    p.set_defaults(func=run_eval)

    p = add("compare", help="compare two or more eval reports side by side (per-class deltas)")
    p.add_argument("reports", nargs="+", type=Path, help="report folders written by cervl eval")
    p.add_argument("--names", help="comma-separated column names (default: folder names)")
    p.add_argument("-o", "--out", required=True, type=Path)
    p.set_defaults(func=run_compare)

    p = add("labels", help="list label sets, or show one as JSON")
    p.add_argument("name", nargs="?", help="a label set name (default: list them)")
    p.set_defaults(func=run_labels)


COMMANDS = {"predict": run_predict, "abaw": run_abaw, "eval": run_eval, "compare": run_compare, "labels": run_labels}
