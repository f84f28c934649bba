"""The ``cervl`` command line: one sub-command per pipeline stage; argument parsing and printing only.

Every sub-command calls one library function. A :class:`~cervl.errors.UserError` (bad config, data
or input file) and an operating-system error (missing permission, full disk, port in use) print as
one ``error:`` line with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from cervl.cli.interrupt import kept_after_interrupt
from cervl.cli.data import run_compose, run_landmark_error, run_prepare, run_pseudo_label, run_synth
from cervl.cli.explain import run_explain
from cervl.cli.parser import build_parser
from cervl.errors import UserError

log = logging.getLogger("cervl")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _run_align(args) -> int:
    from cervl.cli.scale import align_hooks
    from cervl.faces.dataset import align_images, align_videos, list_video_inputs
    from cervl.faces.video import is_video

    hooks = align_hooks(args)  # --engine ray: the same outputs, computed on a Ray cluster
    if args.videos or (args.input.is_file() and is_video(args.input)):
        summary = align_videos(list_video_inputs(args.input), args.out, label_set=args.label_set, split=args.split,
                               size=args.size, every=args.every, events_fn=hooks.get("events_fn"),
                               **_face_kwargs(args), **_tracking(args))
        lost = sum(v.get("lost", 0) for v in summary["per_video"].values())
        print(f"{summary['videos']} videos -> {summary['crops']} aligned frames in {args.out / 'frames'} ({lost} "
              f"frames without a face, {len(summary['failed'])} videos failed)")
    else:
        summary = align_images(args.input, args.out, label_set=args.label_set, split=args.split, size=args.size,
                               faces=args.faces, fallback=args.fallback, batch_size=args.batch_size,
                               align_fn=hooks.get("align_fn"), **_face_kwargs(args))
        print(f"{summary['inputs']} images -> {summary['crops']} aligned crops in {args.out / 'crops'}; status: "
              + ", ".join(f"{k} {v}" for k, v in sorted(summary["status"].items())))
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    return 0


# --- training --------------------------------------------------------------------------------

def _run_train(args) -> int:
    from cervl.config import load_config
    from cervl.train import train

    cfg = load_config(args.config, args.overrides)
    if args.skip_bad:
        cfg.skip_bad = True
    _print_train_result(train(cfg, progress=args.progress))
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


def _run_ablate(args) -> int:
    from cervl.ablate import run_ablation

    md = run_ablation(args.grid, progress=args.progress)
    print(md.read_text())
    print(f"ablation report: {md.with_suffix('.html')}")
    return 0


def _run_demo(args) -> int:
    from cervl.config import load_config
    from cervl.data.prepare import prepare_synthce
    from cervl.train import train

    t0 = time.perf_counter()
    overrides = list(args.overrides)
    if args.rebuild_base:  # train from a freshly built base instead of the one shipped in the package
        base = Path("runs/pretrain-tiny/tiny-base")
        _run_pretrain_tiny(build_parser().parse_args(["pretrain-tiny", "--out", str(base)]))
        overrides.append(f"model.name={base.resolve()}")
    cfg = load_config(args.config, overrides)
    manifests = Path(cfg.test.manifest).parent  # the recipe's manifests live in runs/demo/manifests
    prepare_synthce(manifests.parent / "synthce", manifests, per_class=args.per_class, seed=0)
    print(f"SynthCE manifests in {manifests}")
    if args.data_only:
        return 0
    result = train(cfg)
    _print_train_result(result)
    test = result.get("test")
    if test:
        print(f"\nDEMO: stage-2 compound accuracy on the SynthCE test split (aligned): {test['accuracy']:.2%} "
              f"(chance {1 / len(test['confusion']):.0%}); total time {time.perf_counter() - t0:.0f} s")
    return 0


def _run_pretrain_tiny(args) -> int:
    from cervl.pretrain_tiny import pretrain_tiny

    out = pretrain_tiny(args.config, args.overrides, per_class=args.per_class, out=args.out, workers=args.workers,
                        warmup_steps=args.warmup_steps)
    print(f"tiny base written to {out}")
    return 0


# --- prediction ------------------------------------------------------------------------------

def _run_predict(args) -> int:
    from cervl.faces.video import is_video
    from cervl.predict import write_predictions
    from cervl.predict.predictor import align_items, items_from_manifest, items_from_paths, prediction_meta

    _check_model_choice(args)  # a missing or unfinished run is the first thing to report, before any input
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
        return scale.predict(args, items, videos, {"detector": args.detector, "options": _detector_options(args)},
                             _tracking(args))
    if args.format != "jsonl":
        raise UserError("--format parquet needs --engine ray (the local engine writes JSON Lines)")
    predictor = _load_predictor(args)
    if args.compound_from_basic:  # a basic-emotion run, answering in a compound label set
        from cervl.predict.pairwise import PairwisePredictor

        predictor = PairwisePredictor(predictor, args.compound_from_basic)
    if items and args.align:
        align_items(items, detector=args.detector, detector_options=_detector_options(args), workers=args.workers)
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
    for i, result in predict_videos(predictor, videos, detector=args.detector, detector_options=_detector_options(args),
                                    workers=args.workers, every=args.every, smoothing=args.smoothing,
                                    window=args.window, sigma=args.sigma, batch_size=args.batch_size,
                                    **_tracking(args)) if videos else ():
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


def _run_abaw(args) -> int:
    from cervl.abaw import abaw_submission
    from cervl.predict import Predictor

    if args.engine == "ray":
        from cervl.cli import scale

        return scale.abaw(args, {"detector": args.detector, "options": _detector_options(args)}, _tracking(args))
    sub = abaw_submission(Predictor.from_run(args.run), args.root, args.out, every=args.every,
                          smoothing=args.smoothing, **_face_kwargs(args), **_tracking(args))
    print(f"wrote {sub.rows} frame predictions for {sub.videos} videos to {sub.path}")
    if sub.failed:
        print(f"failed: {sub.failed}")
    return 0 if not sub.failed else 1


def _run_eval(args) -> int:
    from cervl.report import evaluate_predictions

    m = evaluate_predictions(args.predictions, args.out, label_set=args.label_set, title=args.title,
                             explain=args.explain)
    print(f"accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.3f}, invalid {m['invalid_rate']:.2%} "
          f"(n={m['n']}); report: {m['report']}")
    return 0


def _run_compare(args) -> int:
    from cervl.report import write_comparison

    if len(args.reports) < 2:
        raise UserError("compare needs at least two reports")
    print(write_comparison(args.reports, args.out, args.names.split(",") if args.names else None).read_text())
    return 0


def _run_serve(args) -> int:
    import os

    from cervl.serve import check_exposure, serve
    from cervl.serve.app import ServeSettings, run_summary

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    check_exposure(args.host, key, args.insecure_no_auth)  # before the model loads
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, align=args.align, api_key=key,
                             max_body_bytes=args.max_body_mb * 2**20, max_video_seconds=args.max_video_seconds,
                             request_timeout_s=args.timeout, max_request_pixels=int(args.max_request_mp * 1e6),
                             max_inflight_pixels=int(args.max_inflight_mp * 1e6), max_video_jobs=args.max_video_jobs)
    _check_model_choice(args)
    predictor = _load_predictor(args)
    info = run_summary(args.run) if args.run else {"base_model": args.model, "lineage": [], "run": None}
    print(f"serving {args.run or args.model} on http://{args.host}:{args.port} (page: /, API docs: /docs)")
    serve(predictor, host=args.host, port=args.port, settings=settings, run_info=info,
          insecure_no_auth=args.insecure_no_auth)
    return 0


def _check_model_choice(args) -> None:
    """Exactly one of --run (a trained run) and --model (zero-shot); a run must exist and be finished."""
    from cervl.run import RunMeta

    if bool(args.run) == bool(args.model):
        raise UserError("give --run RUN (a run written by cervl train) or --model NAME (a base model, zero-shot), "
                        "not both" if args.run else "give --run RUN (a run written by cervl train) or --model NAME "
                        "(a base model, zero-shot)")
    if args.run:
        RunMeta.read(args.run)


def _load_predictor(args):
    from cervl.predict import Predictor

    if args.run:
        return Predictor.from_run(args.run)
    return Predictor.from_model(args.model, prompt=args.prompt, label_set=args.zs_label_set)


def _run_labels(args) -> int:
    from cervl.labels import LABEL_SETS, get_label_set

    if args.name is None:
        for s in LABEL_SETS.values():
            print(f"{s.name:16s} {len(s):2d} classes  {s.description}")
        return 0
    s = get_label_set(args.name)
    print(json.dumps({"name": s.name, "classes": list(s.classes), "id_to_name": s.id_to_name}, indent=2))
    return 0


# --- shared option groups --------------------------------------------------------------------

def _detector_options(args) -> dict:
    if args.detector == "mtcnn":
        return {"max_side": args.detect_side or None, "min_face_size": args.min_face, "search": args.face_search,
                "landmarks": args.landmarks}
    return {"model_path": args.detector_model, "landmarks": args.landmarks}


def _face_kwargs(args) -> dict:
    return {"detector": args.detector, "detector_options": _detector_options(args), "workers": args.workers}


def _tracking(args) -> dict:
    return {"redetect_every": args.redetect_every, "verify_every": args.verify_every}


COMMANDS = {"synth": run_synth, "prepare": run_prepare, "compose": run_compose, "align": _run_align,
            "train": _run_train,
            "predict": _run_predict, "abaw": _run_abaw, "eval": _run_eval, "compare": _run_compare,
            "ablate": _run_ablate, "serve": _run_serve, "labels": _run_labels, "demo": _run_demo,
            "pretrain-tiny": _run_pretrain_tiny, "pseudo-label": run_pseudo_label,
            "explain": run_explain, "landmark-error": run_landmark_error}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (argparse stops filling a nargs="*" positional there)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.chosen = args.command  # "did you mean" looks among this sub-command's options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept and how to go on, not a traceback
        print(f"\ninterrupted: {kept_after_interrupt(args)}", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission, full disk, a folder where a file was expected, a port in use
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
