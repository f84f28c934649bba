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
