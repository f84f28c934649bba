"""Video jobs for the server: an uploaded video is tracked, aligned and scored in a background thread;
clients poll ``GET /v1/jobs/{id}`` for progress and then the result.

The result holds the per-frame rows (the same tracking and smoothing as ``cervl predict``), the
smoothed timeline, the segments (runs of one predicted class) and a per-video summary. Uploaded files
live in a temporary folder this server created, and are removed once their job ends.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    name: str
    status: str = "queued"  # queued | running | done | failed
    frames_total: int | None = None
    frames_done: int = 0
    created: float = field(default_factory=time.time)
    result: dict | None = None
    error: str | None = None

    def to_json(self) -> dict:
        out = {"job": self.id, "name": self.name, "status": self.status, "frames_done": self.frames_done,
               "frames_total": self.frames_total}
        if self.frames_total:
            out["progress"] = round(min(1.0, self.frames_done / self.frames_total), 4)
        if self.error:
            out["error"] = self.error
        if self.result is not None:
            out.update(self.result)
        return out


def segments(rows: list[dict]) -> list[dict]:
    """Runs of consecutive frames with the same (smoothed) prediction."""
    out: list[dict] = []
    for r in rows:
        if r.get("pred") is None:
            continue
        if out and out[-1]["pred"] == r["pred"] and out[-1]["end_frame"] < r["frame"]:
            seg = out[-1]
            seg["end_frame"], seg["frames"] = r["frame"], seg["frames"] + 1
            seg["_sum"] += r["probs_smoothed"][r["pred"]]
        else:
            out.append({"pred": r["pred"], "start_frame": r["frame"], "end_frame": r["frame"], "frames": 1,
                        "_sum": r["probs_smoothed"][r["pred"]]})
    for seg in out:
        seg["mean_prob"] = round(seg.pop("_sum") / seg["frames"], 4)
    return out


def summarize(rows: list[dict], classes: tuple) -> dict:
    scored = [r for r in rows if r.get("probs_smoothed")]
    mean = {c: round(sum(r["probs_smoothed"][c] for r in scored) / len(scored), 6) for c in classes} if scored else {}
    return {"frames": len(rows), "frames_with_face": sum(r["status"] != "lost" for r in rows),
            "dominant": max(mean, key=mean.get) if mean else None, "mean_probs": mean}


class JobsFull(Exception):
    """Too many video jobs are queued or running (the server answers 429)."""


class VideoJobs:
    """Runs video jobs one at a time in a background thread (their scoring shares the model thread).

    At most ``max_pending`` jobs are queued or running; each holds its upload on disk, never in memory.
    """

    def __init__(self, predictor, *, every: int = 1, keep: int = 100, max_pending: int = 4):
        self.predictor, self.every, self.keep, self.max_pending = predictor, every, keep, max_pending
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cervl-video")
        self.tmp = Path(tempfile.mkdtemp(prefix="cervl-serve-videos-"))

    def pending(self) -> int:
        with self.lock:
            return sum(j.status in ("queued", "running") for j in self.jobs.values())

    def check_room(self) -> None:
        """Raise :class:`JobsFull` when no new job may start (checked before an upload is read, and again)."""
        if self.pending() >= self.max_pending:
            raise JobsFull(f"{self.max_pending} video jobs are already queued or running; retry when one is done")

    def submit(self, src, name: str, max_seconds: float) -> Job:
        """Start a job for the video in ``src`` (bytes or a binary file object, copied to disk in chunks)."""
        job = Job(uuid.uuid4().hex[:16], Path(name).name)
        path = self.tmp / f"{job.id}{Path(name).suffix.lower() or '.mp4'}"
        try:  # the upload's file is removed on every path that does not hand it to a running job
            with path.open("wb") as fh:
                if isinstance(src, (bytes, bytearray)):
                    fh.write(src)
                else:
                    shutil.copyfileobj(src, fh, 1 << 20)
            if path.stat().st_size == 0:
                raise ValueError("empty video file")
            job.frames_total, fps = probe(path, max_seconds)
            with self.lock:
                if sum(j.status in ("queued", "running") for j in self.jobs.values()) >= self.max_pending:
                    raise JobsFull(f"{self.max_pending} video jobs are already queued or running; retry when one "
                                   f"is done")
                self.jobs[job.id] = job
                for old in sorted(self.jobs.values(), key=lambda j: j.created)[:-self.keep]:
                    if old.status in ("done", "failed"):
                        del self.jobs[old.id]
            self.pool.submit(self._run, job, path, max_frames(fps, max_seconds))
        except BaseException:
            path.unlink(missing_ok=True)
            with self.lock:
                self.jobs.pop(job.id, None)
            raise
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def _run(self, job: Job, path: Path, frame_limit: int) -> None:
        from cervl.faces.detect import make_detector
        from cervl.predict.video import predict_video

        def frame_seen(f) -> None:
            if f.frame > frame_limit:  # the container's length can be missing or wrong: count while decoding
                raise ValueError(f"{job.name}: longer than this server's limit ({frame_limit} frames decoded)")
            job.frames_done = f.frame  # frames of the video passed, so progress reaches 1 with every > 1 too

        job.status = "running"
        try:
            rows = predict_video(self.predictor, path, make_detector("mtcnn"), every=self.every, batch_size=16,
                                 name=job.name, on_frame=frame_seen, progress=False)
            classes = self.predictor.label_set.classes
            job.result = {"classes": list(classes), "rows": rows, "segments": segments(rows),
                          "summary": summarize(rows, classes),
                          "timeline": {"frames": [r["frame"] for r in rows],
                                       "smoothed": [[r["probs_smoothed"][c] for c in classes]
                                                    if r.get("probs_smoothed") else None for r in rows],
                                       "raw": [[r["probs"][c] for c in classes] if r.get("probs") else None
                                               for r in rows]}}
            job.status = "done"
        except Exception as e:  # a broken video fails its job, never the server
            log.warning("video job %s (%s) failed: %s", job.id, job.name, e)
            job.status, job.error = "failed", str(e)
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)  # created by this server, for its uploads only


def max_frames(fps: float, max_seconds: float) -> int:
    """How many frames ``max_seconds`` of video may hold (30 frames/s assumed when the file does not say)."""
    return int(max_seconds * (fps if fps and fps > 0 else 30.0)) + 1


def probe(path: Path, max_seconds: float) -> tuple[int | None, float]:
    """``(frame count or None when the container does not say, fps)`` of a video file; ValueError if it
    cannot be opened or its header says it is longer than ``max_seconds`` (the length is checked again
    while decoding, since streamed or fragmented files report 0 or negative counts)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path.name}: cannot open the video (corrupt file or unsupported codec)")
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        ok, _ = cap.read()
        if not ok:
            raise ValueError(f"{path.name}: cannot decode any frame (corrupt file or unsupported codec)")
    finally:
        cap.release()
    if frames > 0 and frames / fps > max_seconds:
        raise ValueError(f"{path.name}: {frames / fps:.0f} s of video exceeds this server's limit of {max_seconds:g} s")
    return (frames if frames > 0 else None), fps
