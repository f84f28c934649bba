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
# cervl demo
# ----------------------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded default end to end (SynthCE, offline)")
    p.add_argument("-o", "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--per-class", type=int, default=100)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    data = args.out / "synthce"
    if not (data / "synthce.json").is_file():
        _run_synth(build_parser().parse_args(["synth", "-o", str(data), "--per-class", str(args.per_class)]))
    for subset in ("basic", "compound"):
        for variant in ("aligned", "original"):
            out = args.out / "manifests" / f"synthce-{subset}-{variant}.jsonl"
            _run_prepare(build_parser().parse_args(
                ["prepare", "rafdb", str(data / subset), "--subset", subset, "--variant", variant,
                 "-o", str(out), "--val-fraction", "0.1"]))
    print(f"demo data and manifests are in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cervl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_prepare, _add_labels, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    from cervl.data.manifest import ManifestError

    try:
        return args.func(args)
    except (ManifestError, ValueError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
