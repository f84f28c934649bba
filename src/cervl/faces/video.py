"""Videos -> per-frame aligned face crops: decoding (OpenCV), face tracking, alignment.

Frames are numbered from 1, as in Aff-Wild2/C-EXPR-DB (``<video>/<frame:05d>.jpg``). A folder of
frame images is accepted too; its frame numbers come from the file names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cervl.core.images import load_rgb
from cervl.core.errors import InvalidInput, UserError
from cervl.faces.align import align_face
from cervl.faces.detect import Face, FaceDetector
from cervl.faces.track import FaceTracker, LandmarkFlow, moved_box
from cervl.core.workers import WorkersDied, died_message, ignore_interrupts, start_workers

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
_DIGITS = re.compile(r"(\d+)")


class VideoError(UserError, RuntimeError):
    """A video that cannot be decoded (corrupt, truncated, unsupported codec, no frames)."""


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_frames(path: str | Path, every: int = 1) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(frame_number, RGB image)`` for frames 1, 1+every, ... of a video file or frame folder."""
    for n, rgb in read_frame_arrays(path, every):
        yield n, Image.fromarray(rgb)


def read_frame_arrays(path: str | Path, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """Like :func:`read_frames`, as RGB uint8 arrays (no PIL round trip: cheaper per frame)."""
    path = Path(path)
    if every < 1:
        raise InvalidInput(f"every must be >= 1, got {every}")
    if path.is_dir():
        for n, p in _numbered_files(path):
            if (n - 1) % every == 0:
                yield n, np.asarray(load_rgb(p))
        return
    import cv2

    if not path.is_file():
        raise VideoError(f"{path}: file not found")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot open (corrupt file or unsupported codec)")
    n = 0
    try:
        while True:
            # grab() skips decoding work for frames that are not sampled
            if not cap.grab():
                break
            n += 1
            if (n - 1) % every == 0:
                ok, frame = cap.retrieve()
                if not ok:
                    log.warning("%s: frame %d could not be decoded; stopping there", path, n)
                    break
                yield n, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames (empty, truncated or unsupported codec)")


def frame_numbers(path: str | Path) -> list[int]:
    """All frame numbers of a video file (grabbed, not decoded to RGB) or frame folder."""
    path = Path(path)
    if path.is_dir():
        return [n for n, _ in _numbered_files(path)]
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: cannot open (corrupt file or unsupported codec)")
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return list(range(1, n + 1))


def _numbered_files(folder: Path) -> list[tuple[int, Path]]:
    from cervl.core.images import IMAGE_SUFFIXES

    files = []
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            digits = _DIGITS.findall(p.stem)
            if digits:
                files.append((int(digits[-1]), p))
    if not files:
        raise VideoError(f"{folder}: no numbered frame images")
    return sorted(files)


@dataclass
class FrameFace:
    frame: int
    status: str  # tracked | lost (no face in this frame) | switched (track re-acquired elsewhere)
    crop: Image.Image | None
    box: list[float] | None
    landmarks: list[list[float]] | None


def video_faces(path: str | Path, detector: FaceDetector, *, every: int = 1, size: int = 112,
                redetect_every: int = 120, verify_every: int = 10) -> Iterator[FrameFace]:
    """Decode, detect, track and align; one result per sampled frame (see :func:`track_faces`)."""
    yield from track_faces(read_frame_arrays(path, every), detector, size=size, redetect_every=redetect_every,
                           verify_every=verify_every)


# ----------------------------------------------------------------------------------------------
# Many videos at once: one process per video, frames streamed back in chunks
# ----------------------------------------------------------------------------------------------

def _video_events(i: int, path, det: FaceDetector, options: dict, chunk: int) -> Iterator[tuple[str, int, object]]:
    """One video's events (see :func:`many_video_faces`): chunks of frames, then done or error."""
    try:
        buf = []
        for f in video_faces(path, det, **options):
            buf.append(f)
            if len(buf) >= chunk:
                yield "frames", i, buf
                buf = []
        if buf:
            yield "frames", i, buf
        yield "done", i, None
    except Exception as e:  # noqa: BLE001 - reported per video, the other videos go on
        yield "error", i, video_error_text(path, e)


def video_error_text(path, e: Exception) -> str:
    """The error row text of a video that failed: the decoder's own message, or the path and the exception."""
    return str(e) if isinstance(e, (VideoError, ValueError)) else f"{path}: {type(e).__name__}: {e}"


def _video_worker(tasks, results, paths, detector: str, detector_options: dict, options: dict, chunk: int) -> None:
    """Worker process: take video indices from ``tasks`` until None, stream their faces to ``results``."""
    import torch

    from cervl.faces.detect import make_detector

    ignore_interrupts()
    torch.set_num_threads(1)  # one core per process: the processes give the parallelism
    det = make_detector(detector, **detector_options)
    while (i := tasks.get()) is not None:
        results.put(("start", i, os.getpid()))
        for event in _video_events(i, paths[i], det, options, chunk):
            results.put(event)


def many_video_faces(paths: list, *, detector: str = "mtcnn", detector_options: dict | None = None,
                     workers: int = 1, chunk: int = 32, **options) -> Iterator[tuple[str, int, object]]:
    """:func:`video_faces` for many videos (files or frame folders), as a stream of events.

    ``("frames", i, [FrameFace, ...])``: the next chunk of video ``i``'s frames, in frame order;
    then ``("done", i, None)`` or ``("error", i, text)`` (discard what a failed video sent). Every
    video ends with exactly one of the two, and a broken video never stops the others. With
    ``workers > 1`` the videos run in that many processes and their events interleave
    (:func:`parallel_video_faces`); with one, in this process, one video after the other.
    ``options``: ``every``, ``size``, ``redetect_every``, ``verify_every`` of :func:`video_faces`.
    """
    from cervl.faces.detect import make_detector

    if workers > 1 and len(paths) > 1:
        yield from parallel_video_faces(paths, detector=detector, detector_options=detector_options,
                                        workers=workers, chunk=chunk, **options)
        return
    det = make_detector(detector, **(detector_options or {}))
    for i, path in enumerate(paths):
        yield from _video_events(i, path, det, options, chunk)


def parallel_video_faces(paths: list, *, detector: str = "mtcnn", detector_options: dict | None = None,
                         workers: int = 2, chunk: int = 32, **options) -> Iterator[tuple[str, int, object]]:
    """:func:`many_video_faces` in ``workers`` processes (one core and one video each, spawned).

    Events arrive as the workers produce them, videos interleaved. Every video ends with exactly one
    ``done`` or ``error``, also when a worker process dies. The results queue is bounded, so
    workers wait when the consumer (e.g. the model on a GPU) is slower: memory stays flat.
    """
    import queue

    from cervl.faces.detect import make_detector

    make_detector(detector, **(detector_options or {}))  # a bad name or option fails here, not in every worker
    paths = [str(p) for p in paths]
    with start_workers() as ctx:
        tasks, results = ctx.Queue(), ctx.Queue(maxsize=4 * max(1, workers))
        for i in range(len(paths)):
            tasks.put(i)
        procs = []
        for _ in range(max(1, min(workers, len(paths)))):
            tasks.put(None)
            procs.append(ctx.Process(target=_video_worker, daemon=True,
                                     args=(tasks, results, paths, detector, detector_options or {}, options, chunk)))
        for p in procs:
            p.start()
    running: dict[int, int] = {}  # video -> pid of the worker decoding it
    finished: set[int] = set()
    try:
        while len(finished) < len(paths):
            try:
                kind, i, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = {p.pid for p in procs if not p.is_alive()}
                for i, pid in list(running.items()):  # a worker died (crash in a decoder, out of memory)
                    if pid in dead:
                        del running[i]
                        finished.add(i)
                        yield "error", i, f"{paths[i]}: the worker process decoding this video died"
                if len(dead) == len(procs) and results.empty() and len(finished) < len(paths):
                    raise WorkersDied(died_message(procs, f"processing {len(paths) - len(finished)} of "
                                                          f"{len(paths)} videos"))
                continue
            if kind == "start":
                running[i] = payload
                continue
            if kind in ("done", "error"):
                running.pop(i, None)
                finished.add(i)
            yield kind, i, payload
    finally:
        tasks.cancel_join_thread()  # unread task ids must not keep this process from exiting
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)


def track_faces(frames: Iterable[tuple[int, np.ndarray]], detector: FaceDetector, *, size: int = 112,
                redetect_every: int = 120, verify_every: int = 10) -> Iterator[FrameFace]:
    """Detect, track and align one person over ``(frame_number, RGB array)`` pairs.

    Cost is spread over three tools, from cheap to dear:

    * between checks, the five landmarks move with Lucas-Kanade optical flow (:class:`LandmarkFlow`);
    * every ``verify_every`` sampled frames, or when the flow fails, a detector with a ``refine``
      method (MTCNN's O-Net) re-locates the face around its predicted box, which confirms it is still
      a face and removes any drift; ``verify_every=1`` runs O-Net on every frame (no flow);
    * every ``redetect_every`` sampled frames, or when the face is lost, a full detection runs and
      :class:`FaceTracker` keeps the same person. ``redetect_every=1`` detects on every frame.
    """
    import cv2

    if redetect_every < 1 or verify_every < 1:
        raise InvalidInput("redetect_every and verify_every must be >= 1")
    tracker, flow = FaceTracker(), LandmarkFlow()
    face: Face | None = None
    prev_gray = None
    since_detect = since_verify = 0
    for n, rgb in frames:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        status = "tracked"
        if face is not None and since_detect < redetect_every:
            moved = flow.track(prev_gray, gray, face.landmarks, face.box) if verify_every > 1 else None
            if moved is not None and since_verify + 1 < verify_every:
                face = Face(moved_box(face.box, face.landmarks, moved), face.score, moved)
                since_verify += 1
            else:
                guess = face.box if moved is None else moved_box(face.box, face.landmarks, moved)
                face = detector.refine([rgb], [guess])[0]
                since_verify = 0
            since_detect += 1
        else:
            face = None
        if face is None:
            face, status = tracker.choose(detector.detect([rgb])[0])
            since_detect, since_verify = 1, 0  # this frame counts as the first since the detection
        prev_gray = gray
        if face is None:
            yield FrameFace(n, status, None, None, None)
        else:
            tracker.last = face.box
            crop, _ = align_face(rgb, face.landmarks, size)
            yield FrameFace(n, status, crop, face.box.round(2).tolist(), face.landmarks.round(2).tolist())


def list_videos(folder: str | Path) -> list[Path]:
    """The videos (files) and frame folders (sub-folders) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder of videos")
    videos = sorted(p for p in folder.iterdir() if (p.is_file() and is_video(p)) or p.is_dir())
    if not videos:
        raise InvalidInput(f"no videos or frame folders in {folder}")
    return videos


def video_name(path) -> str:
    """A video's id in outputs: the file's stem, or a frame folder's name."""
    return Path(path).stem if Path(path).is_file() else Path(path).name
