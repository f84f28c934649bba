"""``cervl synth``, ``prepare`` and ``compose``: the data commands (arguments in, summary lines out)."""

from __future__ import annotations

from cervl.errors import UserError


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
    from cervl.pseudo import compound_labels, pseudo_label

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

    from cervl.cli import _detector_options
    from cervl.data.manifest import atomic_write_text
    from cervl.faces.detect import make_detector
    from cervl.faces.landmarks import measure_landmark_error

    det = make_detector(args.detector, **_detector_options(args))
    try:
        result = measure_landmark_error(args.manifest, det, splits=args.split, limit=args.limit)
    except ValueError as e:
        raise UserError(str(e)) from None
    atomic_write_text(args.out, json.dumps(result) + "\n")
    print(f"{result['detector']} on {result['n']} faces of {args.manifest}: NME {result['nme_mean']:.4f} ± "
          f"{result['nme_se']:.4f} (median {result['nme_median']:.4f}), {result['missed']} missed; wrote {args.out}")
    return 0

