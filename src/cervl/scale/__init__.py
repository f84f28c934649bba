"""Scale-out: batch prediction, alignment and ABAW files on a Ray cluster (``--engine ray``).

The one-machine paths (``--workers N``) stay the default. With ``--engine ray`` the same work runs as
a Ray Data streaming pipeline: CPU tasks read, decode and align (one task per video, since tracking is
sequential), an actor pool holding one :class:`~cervl.predict.Predictor` per actor scores, and the
driver writes finished shards atomically so an interrupted run resumes where it stopped.

* :mod:`cervl.scale.cluster`: :class:`RayOptions`, connecting, the actor pool's resources;
* :mod:`cervl.scale.shards`: the shard store (resume, no duplicates, JSONL or Parquet output);
* :mod:`cervl.scale.remote`: what runs remotely, on the cluster (decode/align tasks, video tasks, the predictor
  actor);
* :mod:`cervl.scale.pipeline`: the driver side: ``ray_predict``, ``ray_abaw``, and ``ray_align_files`` and
  ``ray_video_events``, which ``cervl align`` passes to :func:`~cervl.data.aligned.align_images` and
  :func:`~cervl.data.aligned.align_videos`.

Ray is an optional extra: ``pip install 'cervl[ray]'``.

Imports: everything up to ``evaluate``; not ``serve``, ``train`` or ``cli``."""

from cervl.scale.cluster import RayOptions, require_ray

__all__ = ["RayOptions", "require_ray"]
