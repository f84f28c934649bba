"""``cervl synth``, ``prepare`` and ``compose``: the data commands (arguments in, summary lines out)."""

from __future__ import annotations

from pathlib import Path

from cervl.cli.options import detector_options, face_kwargs, face_options, ray_options, tracking
from cervl.core.errors import UserError


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0])))


def run_synth(args) -> int:
    from cervl.data.synth import SUBSETS, generate

    subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip())
    if [s for s in subsets if s not in SUBSETS] or args.per_class < 1:
        raise UserError(f"--subsets must be drawn from {list(SUBSETS)}, --per-class >= 1 (got {args.subsets!r}, "
                        f"{args.per_class})")
    summary = generate(args.out, per_class=args.per_class, seed=args.seed, test_fraction=args.test_fraction,
                       subsets=subsets, original_size=args.original_size, aligned_size=args.size, workers=args.workers)
    for subset, info in summary["subsets"].items():
        print(f"{subset}: {info['samples']} samples ({info['train']} train, {info['test']} test) in "
              f"{args.out / subset}; sample sheet {args.out / f'sample_sheet_{subset}.png'}")
    print(f"{summary['samples_per_second']:.0f} samples/s ({2 * summary['samples_per_second']:.0f} images/s, "
          f"original + aligned) with {args.workers} worker(s)")
    return 0


def run_prepare(args) -> int:
    from cervl.data.prepare import prepare_dataset

    res = prepare_dataset(args.dataset, args.root, args.out, skip_bad=args.skip_bad, val_fraction=args.val_fraction,
                          check_images=args.check_images, subset=args.subset, variant=args.variant,
                          annotations=args.annotations, frames=args.frames, every=args.every,
                          label_set=args.label_set, split=args.split)
    print(f"wrote {res.records} records to {res.manifest} ({_counts(res.splits)})")
    print(f"labels: {_counts(res.labels)}")
    if res.missing_frames:
        print(f"{res.missing_frames} annotated frames had no image file and are not in the manifest")
    if res.duplicates_dropped:
        print(f"dropped {res.duplicates_dropped} exact duplicate samples")
    if res.bad.total:
        print(res.bad.summary() + (f"; first offenders in {res.sidecar}" if res.sidecar else ""))
    return 0


def run_compose(args) -> int:
    from cervl.data.compose import ComposeSettings, compose

    try:
        mix = tuple(float(x) for x in args.mix.split(","))
    except ValueError:
        mix = ()
    if len(mix) != 2:
        raise UserError(f"--mix must be LOW,HIGH (two numbers), got {args.mix!r}")
    s = compose(args.manifest, args.out, ComposeSettings(label_set=args.label_set, mode=args.mode,
                per_class=args.per_class, seed=args.seed, feather=args.feather, mix=mix, size=args.size),
                splits=args.split, workers=args.workers)
    if s["assignment"]:
        print("class                  upper face   lower face   (score vs swapped)")
        for r in s["assignment"]:
            print(f"{r['class']:22s} {r['upper']:12s} {r['lower']:12s} ({r['score']:+.2f} vs {r['other']:+.2f})")
    print(f"wrote {s['samples']} composed faces ({_counts(s['per_class'])}) to {args.out / 'manifest.jsonl'}; "
          f"sample sheet {args.out / 'sample_sheet.png'}")
    if s["skipped_classes"]:
        print(f"no faces for a component of: {', '.join(s['skipped_classes'])}")
    if s["bad_inputs"]:
        print(f"skipped {sum(s['bad_inputs'].values())} unreadable input images: {_counts(s['bad_inputs'])}")
    return 0


def run_pseudo_label(args) -> int:
    from cervl.predict.pseudo import compound_labels, pseudo_label

    compound_labels(args.run)  # a basic run is refused before anything is scored
    rows = None
    if args.engine == "ray":  # the frames are scored on the cluster, then selected here
        rows = _ray_rows(args)
    s = pseudo_label(args.run, args.manifest, args.out, splits=args.split, threshold=args.threshold,
                     window=args.window, batch_size=args.batch_size, rows=rows, truth_from=args.truth)
    print(f"kept {s['kept']} of {s['scored']} scored frames as compound labels in {args.out}"
          + (f" ({s['unscored']} could not be scored)" if s["unscored"] else ""))
    print(f"splits: each record keeps its own (read {', '.join(s['splits'])}; kept "
          f"{_counts(s['per_split']) or 'none'})")
    print(f"per class: {_counts(s['per_class'])}")
    print("threshold  kept   coverage" + ("  precision" if "precision" in s["coverage"][0] else ""))
    for r in s["coverage"]:
        prec = f"  {r['precision']:.2%}" if r.get("precision") is not None else ("  -" if "precision" in r else "")
        print(f"{r['threshold']:9.2f}  {r['kept']:5d}  {r['coverage']:8.2%}{prec}")
    return 0


def _ray_rows(args) -> list[dict]:
    import json
    from pathlib import Path

    from cervl.cli.scale import ray_options
    from cervl.predict.predictor import items_from_manifest
    from cervl.scale.pipeline import PredictJob, ray_predict

    scores = Path(f"{args.out}.scores.jsonl")  # kept: a re-run resumes from its shards
    job = PredictJob(args.run, items_from_manifest(args.manifest, args.split), [], batch_size=args.batch_size)
    ray_predict(job, scores, ray_options(args))
    return [json.loads(line) for line in scores.read_text().splitlines()]


def run_landmark_error(args) -> int:
    import json

    from cervl.core.fsio import atomic_write_text
    from cervl.faces.detect import make_detector
    from cervl.evaluate.landmarks import measure_landmark_error

    det = make_detector(args.detector, **detector_options(args))
    try:
        result = measure_landmark_error(args.manifest, det, splits=args.split, limit=args.limit)
    except ValueError as e:
        raise UserError(str(e)) from None
    atomic_write_text(args.out, json.dumps(result) + "\n")
    print(f"{result['detector']} on {result['n']} faces of {args.manifest}: NME {result['nme_mean']:.4f} ± "
          f"{result['nme_se']:.4f} (median {result['nme_median']:.4f}), {result['missed']} missed; wrote {args.out}")
    return 0


def run_align(args) -> int:
    from cervl.cli.scale import align_hooks
    from cervl.data.aligned import align_images, align_videos, list_video_inputs
    from cervl.faces.video import is_video

    hooks = align_hooks(args)  # --engine ray: the same outputs, computed on a Ray cluster
    if args.videos or (args.input.is_file() and is_video(args.input)):
        summary = align_videos(list_video_inputs(args.input), args.out, label_set=args.label_set, split=args.split,
                               size=args.size, every=args.every, events_fn=hooks.get("events_fn"),
                               **face_kwargs(args), **tracking(args))
        lost = sum(v.get("lost", 0) for v in summary["per_video"].values())
        print(f"{summary['videos']} videos -> {summary['crops']} aligned frames in {args.out / 'frames'} ({lost} "
              f"frames without a face, {len(summary['failed'])} videos failed)")
    else:
        summary = align_images(args.input, args.out, label_set=args.label_set, split=args.split, size=args.size,
                               faces=args.faces, fallback=args.fallback, batch_size=args.batch_size,
                               align_fn=hooks.get("align_fn"), **face_kwargs(args))
        print(f"{summary['inputs']} images -> {summary['crops']} aligned crops in {args.out / 'crops'}; status: "
              + ", ".join(f"{k} {v}" for k, v in sorted(summary["status"].items())))
    print(f"manifest: {args.out / 'manifest.jsonl'}")
    return 0


def add_parsers(add) -> None:
    """The synth, prepare, compose, pseudo-label, landmark-error, align sub-commands: arguments, and which function runs each."""
    p = add("synth", help="generate the SynthCE synthetic compound-expression dataset")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--per-class", type=int, default=100, help="samples per class and subset (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of each class named test_*")
    p.add_argument("--subsets", default="basic,compound", help="comma list of basic,compound")
    p.add_argument("--size", type=int, default=112, help="aligned crop size in pixels (default 112)")
    p.add_argument("--original-size", type=int, default=192, help="original image size in pixels (default 192)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    p.set_defaults(func=run_synth)

    p = add("prepare", help="read a dataset in its real layout and write a manifest",
            description="Datasets: rafdb, affwild2, cexprdb, folder, csv. See README for layouts.")
    p.add_argument("dataset", help="rafdb | affwild2 | cexprdb | folder | csv")
    p.add_argument("root", type=Path, help="dataset root (for csv: the CSV file)")
    p.add_argument("-o", "--out", required=True, type=Path, help="manifest to write (.jsonl)")
    p.add_argument("--subset", help="rafdb: basic (default) | compound")
    p.add_argument("--variant", help="rafdb: aligned (default) | original")
    p.add_argument("--annotations", help="affwild2/cexprdb: annotation folder (relative to ROOT or absolute)")
    p.add_argument("--frames", help="affwild2: frame folder (default ROOT/cropped_aligned)")
    p.add_argument("--every", type=int, help="affwild2/cexprdb: keep every Nth frame (default 1)")
    p.add_argument("--label-set", help="folder/csv: label set (default: inferred from the labels)")
    p.add_argument("--split", help="split for datasets without one (train | val | test)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="move this fraction of train to val, deterministically (per video for video data)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad samples, summarise them and write the first "
                   "offenders to MANIFEST.bad.jsonl instead of stopping")
    p.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not open every image to check it decodes (faster on huge frame sets)")
    p.set_defaults(func=run_prepare)

    p = add("compose", help="make compound training faces from basic-labelled aligned faces (no compound labels)",
            description="Region mode joins the upper face of one emotion to the lower face of another at a feathered "
                        "seam (which goes above: from the AU prototypes); mixup blends two whole faces. Writes "
                        "OUT/images/, OUT/manifest.jsonl (provenance per record), OUT/compose.json, a sample sheet.")
    p.add_argument("manifest", type=Path, help="basic-labelled manifest of aligned crops (or records with landmarks)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (new, empty, or an earlier compose)")
    p.add_argument("--label-set", default="rafdb-compound", help="target compound label set (rafdb-compound, cexprdb)")
    p.add_argument("--mode", default="region", choices=["region", "mixup"])
    p.add_argument("--per-class", type=int, default=120, help="composed images per compound class (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", action="append", help="input split(s) to draw faces from (default: train)")
    p.add_argument("--feather", type=float, default=12.0, help="region: seam width in pixels of the 112-px crop")
    p.add_argument("--mix", default="0.4,0.6", help="mixup: range of the first face's weight, LOW,HIGH")
    p.add_argument("--size", type=int, default=112, help="output crop size (default 112)")
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    p.set_defaults(func=run_compose)

    p = add("pseudo-label", help="label basic-labelled or unlabelled frames with a trained compound run",
            description="Keeps a frame as compound class C when C's components include its annotated basic emotion "
                        "(if any), p(C) >= --threshold, and C is the top class of the --window records before and "
                        "after it in its track (same video and face, by frame). Each kept record keeps its split. "
                        "Prints per-class counts and the coverage at several thresholds. RUN must be a compound run.")
    p.add_argument("--run", required=True, type=Path, help="a compound run (cervl train)")
    p.add_argument("--manifest", required=True, type=Path, help="the frames: basic-labelled (Aff-Wild2) or unlabelled")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all; every record keeps its split)")
    p.add_argument("-o", "--out", required=True, type=Path, help="the pseudo-labelled manifest (.jsonl)")
    p.add_argument("--threshold", type=float, default=0.7, help="smallest p(C) kept (default 0.7)")
    p.add_argument("--window", type=int, default=2, help="records of the same track on each side that must agree "
                   "(default 2; 0: off)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--truth", type=Path, help="a manifest of the same images with true compound labels: report "
                   "precision too (for measuring, e.g. on SynthCE)")
    ray_options(p)
    p.set_defaults(func=run_pseudo_label)
    _add_face_parsers(add)


def _add_face_parsers(add) -> None:
    """landmark-error and align: the commands that run a face detector over a dataset."""
    p = add("landmark-error", help="measure a face detector's landmark error on records with true landmarks",
            description="Writes OUT (JSON): the mean normalised error (NME, over the inter-ocular distance), the faces "
                        "missed, and every face's five offsets in the face's frame: the distribution that "
                        "augment.align_noise draws from.")
    p.add_argument("manifest", type=Path, help="a manifest whose records carry landmarks (e.g. SynthCE or RAF-DB "
                   "originals)")
    p.add_argument("-o", "--out", required=True, type=Path, help="errors file (.json)")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all)")
    p.add_argument("--limit", type=int, default=0, help="first N records only")
    face_options(p, video=False)
    p.set_defaults(func=run_landmark_error)

    p = add("align", help="detect faces and write 5-point aligned crops plus a manifest",
            description="INPUT is a folder of images or a manifest (known landmarks are used instead of "
                        "detection), a video file, or with --videos a folder of videos and frame folders "
                        "(OUT/frames/<video>/<frame:05d>.jpg, the Aff-Wild2 cropped_aligned layout).")
    p.add_argument("input", type=Path)
    p.add_argument("--videos", action="store_true", help="INPUT is a folder of videos and frame folders")
    p.add_argument("--every", type=int, default=1, help="videos: align every Nth frame (default 1)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (crops, manifest.jsonl, summary.json)")
    p.add_argument("--size", type=int, default=112, help="crop size (default 112, the 5-point template size)")
    face_options(p)
    p.add_argument("--faces", default="largest", choices=["largest", "all"])
    p.add_argument("--fallback", default="skip", choices=["skip", "center"], help="when no face is found")
    p.add_argument("--label-set", default="basic-7", help="label set of the output records for folder input")
    p.add_argument("--split", default="test", help="split of the output records for folder input")
    p.add_argument("--batch-size", type=int, default=8)
    ray_options(p)
    p.set_defaults(func=run_align)


COMMANDS = {"synth": run_synth, "prepare": run_prepare, "compose": run_compose, "pseudo-label": run_pseudo_label,
            "landmark-error": run_landmark_error, "align": run_align}
