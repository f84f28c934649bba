"""Aligning a dataset: photos or videos -> aligned face crops, a manifest and a summary (``cervl align``).

:func:`align_images` takes a folder of photos or a manifest (known landmarks in a manifest, e.g.
RAF-DB's manual annotations, are used instead of detection) and writes ``OUT/crops/*.jpg``.
:func:`align_videos` takes video files or frame folders and writes
``OUT/frames/<video>/<frame:05d>.jpg`` (the Aff-Wild2 ``cropped_aligned`` layout), one tracked face
per frame. Both write ``OUT/manifest.jsonl`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from cervl.core.images import IMAGE_SUFFIXES
from cervl.data.manifest import Record, atomic_write_text, read_manifest, write_manifest
from cervl.core.errors import InputNotFound, InvalidInput
from cervl.faces.pipeline import align_files
from cervl.faces.video import list_videos, many_video_faces, video_name

log = logging.getLogger(__name__)


def image_jobs(source: Path, *, label_set: str, split: str) -> list[tuple[Record, Path, list | None]]:
    """(record, image path, known landmarks) for every photo below a folder, or every manifest record."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(Record(image=str(f.relative_to(source)), label=None, label_set=label_set, split=split,
                        dataset="folder", id=str(f.relative_to(source))), f, None) for f in files]
    if source.is_file():
        m = read_manifest(source)
        # known landmarks describe the image the record names only in the image frame (not an earlier crop's)
        return [(r, m.image_path(r), r.landmarks if r.frame_of_landmarks == "image" else None) for r in m]
    raise InputNotFound(f"input not found: {source}")


def align_images(source: Path, out: Path, *, label_set: str = "basic-7", split: str = "test", size: int = 112,
                 faces: str = "largest", fallback: str = "skip", detector: str = "mtcnn",
                 detector_options: dict | None = None, workers: int = 1, batch_size: int = 8, align_fn=None) -> dict:
    """Align every photo of ``source``; returns the summary (also written to ``OUT/summary.json``).

    ``align_fn``: what aligns the files, :func:`~cervl.faces.pipeline.align_files` by default (the
    Ray engine passes its own, with the same signature and results).
    """
    out = Path(out)
    jobs = image_jobs(source, label_set=label_set, split=split)
    if not jobs:
        raise InvalidInput(f"no images in {source}")
    crops_dir = out / "crops"
    crops_dir.mkdir(parents=True, exist_ok=True)
    records, statuses, log_rows = [], Counter(), []
    aligned = (align_fn or align_files)([path for _, path, _ in jobs], [lm for _, _, lm in jobs], detector=detector,
                          detector_options=detector_options, workers=workers, chunk_size=batch_size, size=size,
                          faces=faces, fallback=fallback)
    for i, results in tqdm(aligned, total=len(jobs), desc="align", unit="img"):
        rec, path, lm = jobs[i]
        if isinstance(results, str):
            statuses["unreadable"] += 1
            log_rows.append({"image": str(path), "status": "unreadable", "error": results})
            continue
        for res in results:
            statuses[res.status] += 1
            log_rows.append({"image": str(path), "status": res.status, "faces": res.n_faces, "box": res.box,
                             "score": res.score})
            if res.crop is None:
                continue
            name = f"{len(records):06d}_{Path(rec.sample_id).stem}" + (f"_f{res.face_index}" if res.face_index else "")
            res.crop.save(crops_dir / f"{name}.jpg", quality=95)
            records.append(Record(image=f"crops/{name}.jpg", label=rec.label, label_set=rec.label_set,
                                  split=rec.split, dataset=rec.dataset,
                                  id=rec.sample_id + (f"#face{res.face_index}" if res.face_index else ""),
                                  landmarks=res.landmarks or (lm if lm else None), bbox=res.box,
                                  video=rec.video, frame=rec.frame, variant="aligned", source=str(path),
                                  landmarks_frame="source"))  # the points (and bbox) are the photo's pixels
    write_manifest(out / "manifest.jsonl", records, root=out)
    atomic_write_text(out / "align_log.jsonl", "".join(json.dumps(r) + "\n" for r in log_rows))
    summary = {"inputs": len(jobs), "crops": len(records), "status": dict(statuses), "detector": detector,
               **(detector_options or {}), "workers": workers, "size": size, "faces": faces, "fallback": fallback}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def list_video_inputs(source: Path) -> list[Path]:
    """A video file, or the videos (files) and frame folders (sub-folders) directly inside ``source``."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputNotFound(f"input not found: {source}")
    return list_videos(source)


def align_videos(videos: list[Path], out: Path, *, label_set: str = "basic-7", split: str = "test",
                 size: int = 112, every: int = 1, detector: str = "mtcnn", detector_options: dict | None = None,
                 workers: int = 1, events_fn=None, **tracking) -> dict:
    """Tracked, aligned face crops per frame of every video, a manifest and a summary.

    A video's crops and records are kept only once it is fully processed: a video that fails half
    way is reported (summary, log) and its partial folder removed, and the other videos go on.
    ``tracking``: ``redetect_every`` and ``verify_every`` of :func:`cervl.faces.video.track_faces`.
    ``events_fn``: the event source, :func:`~cervl.faces.video.many_video_faces` by default.
    """
    out = Path(out)
    names = [video_name(v) for v in videos]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise InvalidInput(f"several inputs would write the same video folder: {clash}")
    records: dict[int, list[Record]] = {i: [] for i in range(len(videos))}
    counts: dict[int, Counter] = {i: Counter() for i in range(len(videos))}
    failed: dict[str, str] = {}
    events = (events_fn or many_video_faces)(videos, detector=detector, detector_options=detector_options, workers=workers,
                              every=every, size=size, **tracking)
    for kind, i, payload in tqdm(events, desc="align videos", unit="chunk"):
        folder = out / "frames" / names[i]
        if kind == "frames":
            folder.mkdir(parents=True, exist_ok=True)
            for f in payload:
                counts[i][f.status] += 1
                if f.crop is None:
                    continue
                f.crop.save(folder / f"{f.frame:05d}.jpg", quality=95)
                records[i].append(Record(image=f"frames/{names[i]}/{f.frame:05d}.jpg", label=None, label_set=label_set,
                                         split=split, dataset="video", id=f"{names[i]}/{f.frame:05d}",
                                         landmarks=f.landmarks, bbox=f.box, video=names[i], frame=f.frame,
                                         variant="aligned", source=str(videos[i]), landmarks_frame="source"))
        elif kind == "error":
            log.error("%s", payload)
            failed[str(videos[i])] = payload
            records[i], counts[i] = [], Counter()
            shutil.rmtree(folder, ignore_errors=True)  # this call wrote it, for this video
    kept = [r for i in range(len(videos)) for r in records[i]]
    write_manifest(out / "manifest.jsonl", kept, root=out)
    per_video = {names[i]: {"frames": sum(counts[i].values()), "crops": len(records[i]), **dict(counts[i])}
                 for i in range(len(videos)) if str(videos[i]) not in failed}
    summary = {"videos": len(videos), "crops": len(kept), "failed": failed, "per_video": per_video,
               "detector": detector, **(detector_options or {}), "every": every, **tracking, "workers": workers,
               "size": size}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
