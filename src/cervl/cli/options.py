"""Option groups several commands share, and turning them into library arguments."""

from __future__ import annotations

from pathlib import Path

from cervl.core.errors import UserError

REPO_CONFIGS = Path("configs")  # relative: `make demo` runs from the repository root; elsewhere pass --config


def face_options(p, *, video: bool = True) -> None:
    """Detector options shared by predict, abaw and align."""
    p.add_argument("--detector", default="mtcnn", help="face detector: mtcnn (default, offline) or yunet")
    p.add_argument("--detect-side", type=int, default=640, help="mtcnn: search faces on a copy with this longest "
                   "side (landmarks still come from the full-resolution image); 0 = full size. Default 640")
    p.add_argument("--min-face", type=int, default=20, help="mtcnn: smallest face, in pixels of that copy")
    p.add_argument("--face-search", default="all", choices=["all", "largest"],
                   help="mtcnn: 'all' searches every face size (default); 'largest' stops once the largest face is "
                        "certain (same largest face, 2-10x faster on photos with large faces)")
    p.add_argument("--detector-model", help="yunet: path of face_detection_yunet_2023mar.onnx")
    p.add_argument("--landmarks", default="single", choices=["single", "flip"],
                   help="flip: also detect on the mirrored image and average the landmarks (closer alignment, "
                        "about twice the detection time; see cervl landmark-error)")
    p.add_argument("--workers", type=int, default=1, help="preprocess in this many processes, one core each: photos "
                   "are aligned in parallel; videos are decoded, tracked and aligned one per process")
    if video:
        p.add_argument("--redetect-every", type=int, default=120,
                       help="videos: full face detection every N sampled frames (and whenever the face is lost)")
        p.add_argument("--verify-every", type=int, default=10, help="videos: re-locate the face with O-Net every N "
                       "frames; optical flow in between (1 = O-Net on every frame)")


def zero_shot_options(p) -> None:
    """--model/--prompt/--label-set: score with a base model and no run folder (instead of --run)."""
    g = p.add_argument_group("zero-shot (instead of --run)")
    g.add_argument("--model", help="a base model: hub id, local folder, or pretrained-tiny (the shipped tiny base)")
    g.add_argument("--prompt", default="minimal", help="prompt style with --model (minimal, context, au-caption)")
    g.add_argument("--label-set", dest="zs_label_set", default="rafdb-compound", help="label set with --model")


def ray_options(p, *, output_format: bool = False) -> None:
    """--engine ray and its options (predict, align, abaw); see README "Scale out"."""
    g = p.add_argument_group("scale-out (Ray)")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this machine (--workers processes); ray: a Ray cluster (pip install 'cervl[ray]')")
    g.add_argument("--ray-address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local one)")
    g.add_argument("--actors", type=int, help="ray: fixed number of predictor actors")
    g.add_argument("--min-actors", type=int, help="ray: autoscaling pool, fewest actors (default 1)")
    g.add_argument("--max-actors", type=int, help="ray: autoscaling pool, most actors (default 2)")
    g.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="ray: GPUs per actor (0 on CPU)")
    g.add_argument("--cpus-per-actor", type=float, help="ray: CPUs per actor (default: 1 with GPUs; else the "
                   "cluster's CPUs left after one decode task, shared by the actors)")
    g.add_argument("--cpus-per-task", type=float, default=0.5, help="ray: CPUs per decode/align task (default 0.5)")
    g.add_argument("--shard-size", type=int, default=64, help="ray: images per shard, the unit of retry and resume")
    g.add_argument("--ship-run", action="store_true", help="ray: send the run's weights through the object store "
                   "(small runs) instead of reading --run on every node")
    if output_format:
        g.add_argument("--format", default="jsonl", choices=["jsonl", "parquet"],
                       help="ray: output JSON Lines (default) or a Parquet dataset folder")


def detector_options(args) -> dict:
    if args.detector == "mtcnn":
        return {"max_side": args.detect_side or None, "min_face_size": args.min_face, "search": args.face_search,
                "landmarks": args.landmarks}
    return {"model_path": args.detector_model, "landmarks": args.landmarks}


def face_kwargs(args) -> dict:
    return {"detector": args.detector, "detector_options": detector_options(args), "workers": args.workers}


def tracking(args) -> dict:
    return {"redetect_every": args.redetect_every, "verify_every": args.verify_every}


def check_model_choice(args) -> None:
    """Exactly one of --run (a trained run) and --model (zero-shot); a run must exist and be finished."""
    from cervl.run import RunMeta

    if bool(args.run) == bool(args.model):
        raise UserError("give --run RUN (a run written by cervl train) or --model NAME (a base model, zero-shot), "
                        "not both" if args.run else "give --run RUN (a run written by cervl train) or --model NAME "
                        "(a base model, zero-shot)")
    if args.run:
        RunMeta.read(args.run)


def load_predictor(args):
    from cervl.predict import Predictor

    if args.run:
        return Predictor.from_run(args.run)
    return Predictor.from_model(args.model, prompt=args.prompt, label_set=args.zs_label_set)
