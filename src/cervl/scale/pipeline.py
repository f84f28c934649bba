"""The driver side of ``--engine ray``: plan shards, stream them through Ray Data, write, resume.

Rows equal the one-machine path's row for row: shards start at multiples of the batch size (and of
the aligner's chunk of 8), videos are scored in the same batches, and the same functions build the
rows (:meth:`Predictor.predict`, :func:`cervl.predict.video.video_rows`).
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from cervl.core.errors import InvalidInput
from cervl.scale.cluster import RayOptions, actor_threads, connect
from cervl.scale.shards import ShardStore, fingerprint, shard_key

log = logging.getLogger(__name__)


@dataclass
class RaySummary:
    """What a Ray run did: output, counts, time and the start-up overhead."""

    out: Path
    items: int = 0
    videos: int = 0
    rows: int = 0
    errors: int = 0
    resumed_shards: int = 0
    shards: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0
    first_output_seconds: float | None = None  # when the first shard was written: actor start and model load
    steady_rows: int = 0  # rows written after the first shard...
    steady_seconds: float = 0.0  # ...and the time they took: the rate once the pipeline is full
    failed: list[str] = field(default_factory=list)

    def steady_rate(self) -> float | None:
        return self.steady_rows / self.steady_seconds if self.steady_seconds > 0 else None

    def line(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        steady = self.steady_rate()
        return (f"{self.rows} rows ({self.items} images, {self.videos} videos, {self.errors} errors) in "
                f"{self.seconds:.1f} s = {rate:.1f} rows/s" + (f" ({steady:.1f} rows/s after the first shard)"
                                                              if steady else "")
                + f"; {self.shards} shards, {self.resumed_shards} kept from an earlier run; Ray start-up "
                f"{self.startup_seconds:.1f} s" + (f", first shard after {self.first_output_seconds:.1f} s"
                                                  if self.first_output_seconds is not None else ""))


def shard_size(requested: int, *multiples: int) -> int:
    """``requested`` rounded up to a multiple of every number in ``multiples``."""
    step = math.lcm(*[max(1, m) for m in multiples])
    return max(step, -(-requested // step) * step)


def image_shards(jobs: list, size: int) -> list[dict]:
    """Ray rows of image work: ``size`` jobs per shard, keyed in input order."""
    return [{"key": shard_key("img", s // size), "kind": "img", "payload": pickle.dumps(jobs[s:s + size])}
            for s in range(0, len(jobs), size)]


def video_shards(paths: list) -> list[dict]:
    """Ray rows of video work: one per video (tracking is sequential within a video)."""
    return [{"key": shard_key("vid", i), "kind": "vid", "payload": pickle.dumps({"index": i, "path": str(p)})}
            for i, p in enumerate(paths)]


def frames_with(chunks: list[dict], key: str) -> Iterator[tuple]:
    """Each frame of a video's chunks, in order, with its entry of ``key`` (``crops`` or ``raw``): a frame had
    a crop, and so a score, exactly when a face was found; others get None."""
    for c in chunks:
        values = iter(c.get(key, ()))
        for f in c["frames"]:
            yield f, (next(values) if f.box is not None else None)


def _dataset(ray, rows: list[dict]):
    # one block per shard: every shard is its own task, so the pipeline streams and retries per shard
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def _pool(ray, options: RayOptions):
    lo, hi = options.pool_size()
    cpus = options.resolve(float(ray.cluster_resources().get("CPU", 1)))
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), cpus


def _stream(ds) -> Iterator[tuple[str, str, object]]:
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        for key, kind, payload in zip(batch["key"], batch["kind"], batch["payload"]):
            yield str(key), str(kind), pickle.loads(payload)


class _VideoAssembler:
    """Collects each video's chunks (in any order; a chunk delivered twice by a retried task counts
    once) and hands them over, in order, when the last one is in."""

    def __init__(self):
        self.chunks: dict[int, dict[int, dict]] = {}
        self.finished: set[int] = set()

    def add(self, chunk: dict) -> list[dict] | None:
        if chunk["video"] in self.finished:
            return None
        got = self.chunks.setdefault(chunk["video"], {})
        got.setdefault(chunk["seq"], chunk)
        last = next((c for c in got.values() if c["last"]), None)
        if last is None or len(got) < last["seq"] + 1:
            return None
        del self.chunks[chunk["video"]]
        self.finished.add(chunk["video"])
        return [got[s] for s in range(last["seq"] + 1)]


def _video_result(chunks: list[dict], classes, smoothing: str, window: int, sigma: float, name: str):
    """Rows of one video from its scored chunks (as :class:`~cervl.predict.video.VideoScorer` builds
    them), or its error text."""
    from cervl.predict.video import video_rows

    if "error" in chunks[-1]:
        return chunks[-1]["error"]
    pairs = list(frames_with(chunks, "raw"))
    frames = [f for f, _ in pairs]
    raw = [np.full(len(classes), np.nan) if p is None else p for _, p in pairs]
    if not frames:
        return f"{name}: no frames decoded"
    return video_rows(name, frames, raw, classes, smoothing, window, sigma)


# --- predict -------------------------------------------------------------------------------------

@dataclass
class PredictJob:
    """Everything that decides a prediction run's rows (and so its resume fingerprint)."""

    run: Path
    items: list
    videos: list[Path] = field(default_factory=list)
    mode: str = "score"
    normalize: str = "sum"
    batch_size: int = 8
    align: dict | None = None  # {"detector": ..., "options": {...}} to detect and align photos
    detector: dict | None = None  # the video face detector, same form
    video_options: dict = field(default_factory=dict)  # every, size, redetect_every, verify_every
    smoothing: str = "gaussian"
    window: int = 5
    sigma: float = 1.5
    video_batch_size: int | None = None  # default: batch_size (cervl abaw scores videos in batches of 16)

    def shards(self, size: int) -> list[dict]:
        """Ray rows: image shards of ``size`` items, then one row per video."""
        return image_shards(self.items, size) + video_shards(self.videos)

    def fingerprint(self, size: int, fmt: str) -> str:
        from cervl.run import final_dir

        final = final_dir(self.run)
        stamp = final.stat().st_mtime_ns if final.exists() else None
        return fingerprint({"run": str(Path(self.run).resolve()), "weights": stamp, "fmt": fmt, "size": size,
                            "items": [(i.id, str(i.image), i.label, i.video, i.frame) for i in self.items],
                            "videos": [str(v) for v in self.videos],
                            **{k: getattr(self, k) for k in ("mode", "normalize", "batch_size", "align", "detector",
                                                             "video_options", "smoothing", "window", "sigma",
                                                             "video_batch_size")}})


def ray_predict(job: PredictJob, out: str | Path, options: RayOptions, *, fmt: str = "jsonl",
                meta: dict | None = None) -> RaySummary:
    """Predict ``job`` on a Ray cluster; the output equals the one-machine path's, row for row.

    Shards already written by an interrupted run with the same output path are kept.
    """
    t0 = time.perf_counter()
    size = shard_size(options.shard_size, job.batch_size, 8)
    store = ShardStore(out, fmt, job.fingerprint(size, fmt))
    keys, summary = _execute(job, store, options, size)
    summary.rows = summary.errors = 0

    def counted():  # the join streams shard by shard: the driver never holds all rows
        for r in store.rows(keys):
            summary.rows += 1
            if r.get("error"):
                summary.errors += 1
                if "frame" not in r and r.get("video") is not None:
                    summary.failed.append(r["image"])
            yield r

    store.finish(keys, {**(meta or {}), "engine": "ray", "mode": job.mode, "normalize": job.normalize}, counted())
    summary.seconds = time.perf_counter() - t0
    return summary


def _execute(job: PredictJob, store: ShardStore, options: RayOptions, size: int) -> tuple[list[str], RaySummary]:
    """Run the shards ``store`` does not hold yet; returns every shard key in output order."""
    from cervl.run import RunMeta

    if job.videos and job.mode != "score":
        raise InvalidInput("video prediction uses --mode score (per-frame probabilities are smoothed over time)")
    classes = RunMeta.read(job.run).labels.classes
    rows = job.shards(size)
    done = store.done()
    todo = [r for r in rows if r["key"] not in done]
    summary = RaySummary(store.out, items=len(job.items), videos=len(job.videos), shards=len(rows),
                         resumed_shards=len(rows) - len(todo))
    names = [Path(v).stem if Path(v).is_file() else Path(v).name for v in job.videos]
    schema = _parquet_schema(classes) if store.fmt == "parquet" else None
    if not todo:
        return [r["key"] for r in rows], summary
    t0 = time.perf_counter()
    ray = connect(options)
    summary.startup_seconds = time.perf_counter() - t0  # ~0 when the cluster was already up
    videos = _VideoAssembler()
    for key, kind, result in _stream(_predict_dataset(ray, job, todo, options)):
        _timing(summary, t0, kind, result)
        if kind == "img":
            store.write(key, result, schema)
            continue
        chunks = videos.add(result)
        if chunks is None:
            continue
        i = chunks[0]["video"]
        res = _video_result(chunks, classes, job.smoothing, job.window, job.sigma, names[i])
        if isinstance(res, str):
            log.error("video %s: %s", job.videos[i], res)
            res = [{"video": names[i], "image": str(job.videos[i]), "pred": None, "error": res}]
        else:
            res = [{**r, "image": str(job.videos[i])} for r in res]
        store.write(key, res, schema)
    return [r["key"] for r in rows], summary


def _timing(summary: RaySummary, t0: float, kind: str, result) -> None:
    now = time.perf_counter() - t0
    n = len(result) if kind == "img" else len(result.get("frames", ()))
    if summary.first_output_seconds is None:
        summary.first_output_seconds = now
    else:
        summary.steady_rows += n
        summary.steady_seconds = now - summary.first_output_seconds


def _predict_dataset(ray, job: PredictJob, todo: list[dict], options: RayOptions):
    from cervl.scale.remote import PredictorActor, pack_run, prepare

    pool, cpus = _pool(ray, options)
    vbatch = job.video_batch_size or job.batch_size
    ds = _dataset(ray, todo).map_batches(
        prepare, batch_size=1, num_cpus=options.cpus_per_task,
        fn_kwargs={"align": job.align, "detector": job.detector, "video_options": job.video_options,
                   "chunk_crops": shard_size(options.shard_size, vbatch)})
    return ds.map_batches(
        PredictorActor, batch_size=1, compute=pool, num_cpus=cpus, num_gpus=options.gpus_per_actor or None,
        fn_constructor_kwargs={"run": str(Path(job.run).resolve()), "mode": job.mode, "normalize": job.normalize,
                               "batch_size": job.batch_size, "video_batch_size": vbatch,
                               "threads": actor_threads(cpus), "gpu": bool(options.gpus_per_actor),
                               # small runs travel through the object store: Ray Data puts constructor
                               # arguments there, and every actor (also a restarted one) reads them back
                               "shipped": pack_run(job.run) if options.ship_run else None})


def _parquet_schema(classes):
    import pyarrow as pa

    probs = pa.struct([(c, pa.float64()) for c in classes])
    return pa.schema([("id", pa.string()), ("image", pa.string()), ("label", pa.string()), ("video", pa.string()),
                      ("frame", pa.int64()), ("face", pa.string()), ("status", pa.string()),
                      ("box", pa.list_(pa.float64())), ("pred", pa.string()), ("probs", probs),
                      ("probs_smoothed", probs), ("raw", pa.string()), ("latency_ms", pa.float64()),
                      ("error", pa.string())])


# --- ABAW and alignment ----------------------------------------------------------------------------

def ray_abaw(run: Path, root: Path, out: Path, options: RayOptions, *, every: int = 1, smoothing: str = "gaussian",
             detector: dict | None = None, video_options: dict | None = None):
    """``cervl abaw`` on Ray: the same submission file, byte for byte (videos scored in batches of 16,
    as :func:`cervl.evaluate.abaw.abaw_submission` does). Finished videos are kept if the run is interrupted."""
    from cervl.evaluate.abaw import challenge_indices, write_submission
    from cervl.faces.video import list_videos
    from cervl.run import RunMeta

    t0 = time.perf_counter()
    label_set = RunMeta.read(run).labels
    challenge_indices(label_set)  # fail before any video is decoded
    inputs = list_videos(root)
    job = PredictJob(run, [], inputs, detector=detector, video_options={**(video_options or {}), "every": every},
                     smoothing=smoothing, video_batch_size=16)
    size = shard_size(options.shard_size, 16)
    store = ShardStore(out, "jsonl", job.fingerprint(size, "abaw"))
    keys, summary = _execute(job, store, options, size)
    results = []
    for i, k in enumerate(keys):
        rows = store.read(k)
        results.append((i, rows[0]["error"] if rows and "error" in rows[0] else rows))
    sub = write_submission(results, inputs, label_set, out, every=every)
    store.cleanup(keys)
    summary.rows, summary.errors = sub.rows, len(sub.failed)
    summary.seconds = time.perf_counter() - t0
    return sub, summary


def ray_align_files(files: list, landmarks: list | None = None, *, options: RayOptions, detector: str = "mtcnn",
                    detector_options: dict | None = None, workers: int = 1, chunk_size: int = 8,
                    **aligner_options) -> Iterator[tuple[int, list | str]]:
    """:func:`cervl.faces.pipeline.align_files` on Ray: CPU tasks align shards; results come back in
    input order (a small reorder buffer), with the same crops, so ``cervl align`` writes the same files."""
    from cervl.scale.remote import align_image_shard

    del workers  # Ray decides the parallelism
    landmarks = landmarks or [None] * len(files)
    jobs = [(i, str(f), lm) for i, (f, lm) in enumerate(zip(files, landmarks))]
    size = shard_size(options.shard_size, chunk_size)
    rows = image_shards(jobs, size)
    ray = connect(options)
    spec = {"detector": detector, "options": detector_options or {}, "aligner": aligner_options}
    ds = _dataset(ray, rows).map_batches(align_image_shard, batch_size=1, num_cpus=options.cpus_per_task,
                                         fn_kwargs={"spec": spec, "chunk": chunk_size})
    waiting: dict[str, list] = {}
    order = iter([r["key"] for r in rows])
    nxt = next(order, None)
    for key, _, results in _stream(ds):
        waiting[key] = results
        while nxt in waiting:
            for i, res in waiting.pop(nxt):
                if not isinstance(res, str):
                    res = [_with_image(r) for r in res]
                yield i, res
            nxt = next(order, None)


def _with_image(result):
    return result if result.crop is None else replace(result, crop=Image.fromarray(result.crop))


def ray_video_events(paths: list, *, options: RayOptions, detector: str = "mtcnn",
                     detector_options: dict | None = None, workers: int = 1, chunk: int = 32,
                     **video_options) -> Iterator[tuple[str, int, object]]:
    """:func:`cervl.faces.video.many_video_faces` on Ray: one task per video (tracking is sequential),
    the same events, each video's frames in order."""
    from cervl.scale.remote import track_videos

    del workers
    rows = video_shards(paths)
    ray = connect(options)
    ds = _dataset(ray, rows).map_batches(
        track_videos, batch_size=1, num_cpus=options.cpus_per_task,
        fn_kwargs={"detector": {"detector": detector, "options": detector_options or {}},
                   "video_options": video_options, "chunk_crops": chunk})
    videos = _VideoAssembler()
    for _, _, c in _stream(ds):
        chunks = videos.add(c)
        if chunks is None:
            continue
        i = chunks[0]["video"]
        if "error" in chunks[-1]:
            yield "error", i, chunks[-1]["error"]
            continue
        for ch in chunks:  # the one-machine path's chunks: the crops back on their frames, as images
            frames = [f if c is None else replace(f, crop=Image.fromarray(c)) for f, c in frames_with([ch], "crops")]
            if frames:
                yield "frames", i, frames
        yield "done", i, None
