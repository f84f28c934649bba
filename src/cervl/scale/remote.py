"""What runs on the Ray cluster: decode/align tasks, per-video tracking tasks, the predictor actor.

Every function here takes and returns Ray Data batches of one shard per row: ``key`` (the shard's
output key), ``kind`` (``img`` or ``vid``) and ``payload`` (the shard's data, pickled: Ray's own
transport between trusted processes of one job; nothing here reads a pickle from disk). Images
travel as RGB uint8 arrays, which round-trip to exactly the pixels the one-machine path scores.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_CACHE: dict[str, object] = {}  # per worker process: detectors and aligners load once, not per task


def _cached(kind: str, spec: dict, build):
    key = kind + json.dumps(spec, sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _aligner(spec: dict):
    from cervl.faces.pipeline import FaceAligner

    return _cached("aligner", spec, lambda: FaceAligner(spec["detector"], **spec.get("aligner", {}),
                                                        **spec.get("options", {})))


def _detector(spec: dict):
    from cervl.faces.detect import make_detector

    return _cached("detector", spec, lambda: make_detector(spec["detector"], **spec.get("options", {})))


def _out(keys, kinds, payloads) -> dict:
    return {"key": list(keys), "kind": list(kinds), "payload": [pickle.dumps(p, protocol=5) for p in payloads]}


# --- CPU tasks ---------------------------------------------------------------------------------

def align_chunks(aligner, jobs: list[tuple[int, str, list | None]], chunk: int) -> list:
    """``(index, [AlignResult] | error)`` for each job, aligned in the same chunks as
    :func:`cervl.faces.pipeline.align_files`, with crops as arrays."""
    from cervl.faces.pipeline import _align_chunk

    out = []
    for s in range(0, len(jobs), chunk):
        for i, res in _align_chunk(aligner, jobs[s:s + chunk]):
            if not isinstance(res, str):
                res = [replace(r, crop=None if r.crop is None else np.asarray(r.crop)) for r in res]
            out.append((i, res))
    return out


def decode_shard(items: list, align: dict | None) -> list:
    """Read (and with ``align``, detect and align) a shard's images; failures set ``item.error``."""
    from cervl.core.images import load_rgb
    from cervl.core.errors import InvalidInput
    from cervl.predict.predictor import apply_alignment

    if align:
        jobs = [(k, str(item.image), None) for k, item in enumerate(items)]
        for k, res in align_chunks(_aligner(align), jobs, 8):  # 8: align_items' chunk size
            apply_alignment(items[k], res)
        return items
    for item in items:
        try:
            item.crop = np.asarray(load_rgb(item.image))
        except InvalidInput as e:  # the same error row as the one-machine path
            item.error = str(e)
    return items


def video_chunks(spec: dict, detector: dict, options: dict, chunk_crops: int):
    """One video's tracked, aligned frames in chunks of ``chunk_crops`` crops (the scorer's batches
    then fall exactly where the one-machine path puts them); the last chunk has ``last: True``, and
    a video that fails ends with an ``error`` chunk instead."""
    from cervl.faces.video import video_error_text, video_faces

    seq, frames, crops = 0, [], []
    try:
        for f in video_faces(spec["path"], _detector(detector), **options):
            frames.append(replace(f, crop=None))
            if f.crop is not None:
                crops.append(np.asarray(f.crop))
            if len(crops) == chunk_crops:
                yield {"video": spec["index"], "seq": seq, "frames": frames, "crops": crops, "last": False}
                seq, frames, crops = seq + 1, [], []
        yield {"video": spec["index"], "seq": seq, "frames": frames, "crops": crops, "last": True}
    except Exception as e:  # noqa: BLE001 - reported per video, the other videos go on
        yield {"video": spec["index"], "seq": seq, "error": video_error_text(spec["path"], e), "last": True}


def prepare(batch: dict, *, align: dict | None = None, detector: dict | None = None, video_options: dict | None = None,
            chunk_crops: int = 64):
    """The CPU stage: image shards are read/aligned; videos are decoded and tracked, streamed in chunks."""
    for key, kind, payload in zip(batch["key"], batch["kind"], batch["payload"]):
        data = pickle.loads(payload)
        if kind == "img":
            yield _out([key], [kind], [decode_shard(data, align)])
        else:
            for chunk in video_chunks(data, detector, video_options or {}, chunk_crops):
                yield _out([key], [kind], [chunk])


def align_image_shard(batch: dict, *, spec: dict, chunk: int) -> dict:
    """``cervl align`` on Ray: one shard of ``(index, path, landmarks)`` jobs -> alignment results."""
    keys, kinds, out = [], [], []
    for key, kind, payload in zip(batch["key"], batch["kind"], batch["payload"]):
        keys.append(key), kinds.append(kind), out.append(align_chunks(_aligner(spec), pickle.loads(payload), chunk))
    return _out(keys, kinds, out)


def track_videos(batch: dict, *, detector: dict, video_options: dict, chunk_crops: int):
    """``cervl align --videos`` on Ray: one task per video, chunks of frames as they are tracked."""
    for key, kind, payload in zip(batch["key"], batch["kind"], batch["payload"]):
        for chunk in video_chunks(pickle.loads(payload), detector, video_options, chunk_crops):
            yield _out([key], [kind], [chunk])


# --- the actor ----------------------------------------------------------------------------------

def pack_run(run_dir: Path, limit: int = 2 * 2**30) -> dict[str, bytes]:
    """A merged run's files needed for prediction (``cervl-run.json`` and ``final/``), for the object store."""
    from cervl.core.errors import InvalidInput
    from cervl.run import MARKER, RunMeta, final_dir

    run_dir = Path(run_dir)
    if RunMeta.read(run_dir).save != "merged":
        raise InvalidInput(f"--ship-run needs a run saved with save: merged ({run_dir} keeps adapters over a base "
                           f"that the actors must read themselves); put the run on a shared file system instead")
    files = [run_dir / MARKER] + sorted(p for p in final_dir(run_dir).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    if size > limit:
        raise InvalidInput(f"--ship-run: {run_dir} holds {size / 2**30:.1f} GiB; the object store path is for small "
                           f"runs (< {limit / 2**30:.0f} GiB). Put the run on a file system all nodes can read")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


class PredictorActor:
    """One :class:`~cervl.predict.Predictor` per actor; scores image shards and video chunks."""

    def __init__(self, run: str, *, mode: str, normalize: str, batch_size: int, video_batch_size: int, threads: int,
                 gpu: bool, shipped: dict | None = None):
        import torch

        from cervl.predict.predictor import Predictor

        torch.set_num_threads(threads)
        self.tmp = None
        if shipped is not None:  # the run came through the object store: materialise it locally
            self.tmp = tempfile.mkdtemp(prefix="cervl-run-")
            for rel, data in shipped.items():
                (Path(self.tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(self.tmp) / rel).write_bytes(data)
            run = self.tmp
        self.predictor = Predictor.from_run(run, device="cuda" if gpu and torch.cuda.is_available() else None)
        self.mode, self.normalize, self.batch_size, self.video_batch_size = mode, normalize, batch_size, video_batch_size

    def __call__(self, batch: dict) -> dict:
        out = []
        for kind, payload in zip(batch["kind"], batch["payload"]):
            data = pickle.loads(payload)
            out.append(self._images(data) if kind == "img" else self._video_chunk(data))
        return _out(batch["key"], batch["kind"], out)

    def _images(self, items: list) -> list[dict]:
        for item in items:
            if item.crop is not None:
                item.crop = Image.fromarray(item.crop)
        return list(self.predictor.predict(items, mode=self.mode, batch_size=self.batch_size,
                                           normalize=self.normalize, progress=False))

    def _video_chunk(self, chunk: dict) -> dict:
        crops = chunk.pop("crops", None)
        if crops:
            chunk["raw"] = self.predictor.score([Image.fromarray(c) for c in crops], batch_size=self.video_batch_size)
        return chunk

    def __del__(self):
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)  # the copy this actor wrote
