"""``cervl explain``: argument handling and printing; the work is in :mod:`cervl.explain.analysis`."""

from __future__ import annotations

from pathlib import Path

from cervl.errors import UserError


def run_explain(args) -> int:
    from cervl.cli import _check_model_choice, _detector_options, _load_predictor, _tracking
    from cervl.explain.analysis import explain_items, video_items
    from cervl.explain.maps import Explainer, VLMScorer
    from cervl.faces.video import is_video
    from cervl.predict.predictor import align_items, items_from_manifest, items_from_paths

    _check_model_choice(args)
    videos = [p for p in args.inputs if p.is_file() and is_video(p)]
    items = items_from_manifest(args.manifest, args.split) if args.manifest else []
    items += items_from_paths([p for p in args.inputs if p not in videos])
    if items and args.align:
        align_items(items, detector=args.detector, detector_options=_detector_options(args), workers=args.workers)
    for v in videos:
        items += video_items(v, detector=args.detector, detector_options=_detector_options(args), every=args.every,
                             **_tracking(args))
    if not items:
        raise UserError("nothing to explain: give image files/folders, videos or --manifest")
    classes = args.classes[0] if args.classes in (["top2"], ["all"]) else args.classes
    explainer = Explainer(VLMScorer(_load_predictor(args), batch_size=args.batch_size), args.method,
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
