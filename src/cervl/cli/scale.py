"""``--engine ray`` for ``cervl predict``, ``align`` and ``abaw``: options in, summary lines out."""

from __future__ import annotations

import functools
from pathlib import Path

from cervl.core.errors import UserError


def ray_options(args):
    """:class:`~cervl.scale.RayOptions` from the command line."""
    from cervl.scale import RayOptions, require_ray

    require_ray()  # before anything is listed or loaded: say how to install it
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    return RayOptions(address=args.ray_address, actors=args.actors, min_actors=args.min_actors,
                      max_actors=args.max_actors, gpus_per_actor=args.num_gpus_per_actor,
                      cpus_per_actor=args.cpus_per_actor, cpus_per_task=args.cpus_per_task,
                      shard_size=args.shard_size, ship_run=getattr(args, "ship_run", False))


def predict(args, items: list, videos: list[Path], detector: dict, tracking: dict) -> int:
    """``cervl predict --engine ray``."""
    from cervl.predict.predictor import prediction_meta
    from cervl.run import RunMeta
    from cervl.scale.pipeline import PredictJob, ray_predict

    if args.plot:
        raise UserError("--plot is not available with --engine ray (plot from the predictions file instead)")
    job = PredictJob(Path(args.run), items, list(videos), mode=args.mode, normalize=args.normalize,
                     batch_size=args.batch_size, align=detector if args.align else None, detector=detector,
                     video_options={"every": args.every, **tracking}, smoothing=args.smoothing, window=args.window,
                     sigma=args.sigma)
    run = RunMeta.read(args.run)  # the same meta file as the local engine's, so `cervl eval` reads both
    meta = prediction_meta(args.run, run.labels, run.style, mode=args.mode, normalize=args.normalize,
                           manifest=args.manifest)
    s = ray_predict(job, args.out, ray_options(args), fmt=args.format, meta=meta)
    print(f"wrote {s.rows} predictions to {args.out} ({s.errors} error rows)")
    print(f"ray: {s.line()}")
    if s.failed:  # videos that could not be decoded at all, as the local engine logs them
        print(f"videos that failed: {', '.join(s.failed)}")
    return 0


def abaw(args, detector: dict, tracking: dict) -> int:
    """``cervl abaw --engine ray``."""
    from cervl.scale.pipeline import ray_abaw

    sub, s = ray_abaw(args.run, args.root, args.out, ray_options(args), every=args.every, smoothing=args.smoothing,
                      detector=detector, video_options=tracking)
    print(f"wrote {sub.rows} frame predictions for {sub.videos} videos to {sub.path}")
    print(f"ray: {s.line()}")
    if sub.failed:
        print(f"failed: {sub.failed}")
    return 0 if not sub.failed else 1


def align_hooks(args) -> dict:
    """The ``align_fn``/``events_fn`` that put ``cervl align`` on Ray (empty for the local engine)."""
    if args.engine != "ray":
        return {}
    from cervl.scale.pipeline import ray_align_files, ray_video_events

    opts = ray_options(args)
    return {"align_fn": functools.partial(ray_align_files, options=opts),
            "events_fn": functools.partial(ray_video_events, options=opts)}
