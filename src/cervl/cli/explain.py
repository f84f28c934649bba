"""``cervl explain``: argument handling and printing; the work is in :mod:`cervl.explain.analysis`."""

from __future__ import annotations

from pathlib import Path

from cervl.cli.options import (check_model_choice, detector_options, face_options, load_predictor, tracking,
                               zero_shot_options)
from cervl.core.errors import UserError


def run_explain(args) -> int:
    from cervl.explain.analysis import explain_items, video_items
    from cervl.explain.maps import Explainer, VLMScorer
    from cervl.faces.video import is_video
    from cervl.predict.predictor import align_items, items_from_manifest, items_from_paths

    check_model_choice(args)
    videos = [p for p in args.inputs if p.is_file() and is_video(p)]
    items = items_from_manifest(args.manifest, args.split) if args.manifest else []
    items += items_from_paths([p for p in args.inputs if p not in videos])
    if items and args.align:
        align_items(items, detector=args.detector, detector_options=detector_options(args), workers=args.workers)
    for v in videos:
        items += video_items(v, detector=args.detector, detector_options=detector_options(args), every=args.every,
                             **tracking(args))
    if not items:
        raise UserError("nothing to explain: give image files/folders, videos or --manifest")
    classes = args.classes[0] if args.classes in (["top2"], ["all"]) else args.classes
    explainer = Explainer(VLMScorer(load_predictor(args), batch_size=args.batch_size), args.method,
                          patch=args.patch, stride=args.stride, batch_size=args.batch_size)
    summary = explain_items(explainer, items, args.out, classes=classes, au_check=args.au_check)
    print(f"explained {summary['n']} images with {summary['method']} ({len(summary['failed'])} without a face or "
          f"unreadable): {Path(args.out)}")
    if "confused_pairs" in summary:
        pairs = ", ".join(f"{p['a']} / {p['b']} ({p['mistakes']})" for p in summary["confused_pairs"])
        print(f"per-class means: {args.out / 'class_means.png'}; most-confused pairs: {pairs or 'none'}")
        print(f"report section: {args.out / 'where_it_looks.html'}")
    if "au_regions" in summary:
        o = summary["au_regions"]
        print(f"AU regions (SynthCE): pointing {o['pointing']:.1%} ± {o['pointing_se']:.1%} (n={o['n']}, region area "
              f"{o['area']:.1%}), median energy ratio {o['energy_median']:.2f}")
    return 0


def add_parsers(add) -> None:
    """The explain sub-commands: arguments, and which function runs each."""
    p = add("explain", help="saliency maps: where on the face each class's probability comes from",
            description="Per image: OUT/<id>.png (the face, then its classes' maps) and OUT/<id>.npz. With a labelled "
                        "--manifest also the mean map per true class, the most-confused pairs' difference maps and "
                        "OUT/where_it_looks.html (embed it with cervl eval --explain OUT).")
    p.add_argument("inputs", nargs="*", type=Path, help="image files, folders of images, or videos")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    zero_shot_options(p)
    p.add_argument("--manifest", type=Path, help="explain the records of a manifest")
    p.add_argument("--split", action="append", help="manifest split(s) (default: all)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--method", default="occlusion", help="occlusion (exact, default) or gradient (cheap)")
    p.add_argument("--classes", nargs="+", default=["top2"], metavar="CLASS",
                   help="top2 (default), all, or class names to explain")
    p.add_argument("--patch", type=int, help="occlusion patch side in pixels (default 24 on a 112-px crop, scaled)")
    p.add_argument("--stride", type=int, help="occlusion stride in pixels (default 8 on a 112-px crop, scaled)")
    p.add_argument("--batch-size", type=int, default=64, help="occluded images per model call")
    p.add_argument("--align", action="store_true", help="detect and align faces in photos first")
    p.add_argument("--every", type=int, default=1, help="videos: explain every Nth frame")
    p.add_argument("--au-check", action="store_true", help="SynthCE only: score the maps against the generator's "
                   "action-unit regions (pointing game, energy ratio)")
    face_options(p)
    p.set_defaults(func=run_explain)


COMMANDS = {"explain": run_explain}
