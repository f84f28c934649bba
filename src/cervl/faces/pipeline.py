"""Photo -> aligned face crops: detection (or known landmarks), face choice, similarity alignment.

``FaceAligner.align(image, landmarks=None)`` returns one :class:`AlignResult` per chosen face with a
status: ``ok``, ``no_face`` (with ``fallback=center`` a centre crop is returned and the status is
``no_face_center_crop``) or ``multiple`` (more than one face found; the largest is used unless
``faces=all``). Nothing is dropped silently: every input gets a status.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cervl.core.images import load_rgb
from cervl.core.errors import InvalidInput
from cervl.faces.align import align_face
from cervl.faces.detect import FaceDetector, make_detector
from cervl.core.workers import ignore_interrupts, start_workers


@dataclass
class AlignResult:
    status: str  # ok | multiple | no_face | no_face_center_crop | given_landmarks
    crop: Image.Image | None
    box: list[float] | None
    landmarks: list[list[float]] | None
    score: float | None = None
    face_index: int = 0
    n_faces: int = 0


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


RIVAL_MIN_SCORE, RIVAL_MIN_SIDE = 0.9, 0.2


def rival_face(face, largest) -> bool:
    """Whether a second detection makes a photo hold "multiple" faces.

    MTCNN finds real faces at scores of 0.99 and more; its false positives on textured objects score
    lower and are small. On scikit-image's astronaut rotated by 30 degrees (``skimage.transform.rotate``)
    the second detection is a 21-px strap buckle on the suit at 0.75-0.84 beside the 100-px face at 0.999.
    A detection counts when it scores at least 0.9 and its side is at least 0.2 of the largest face's.
    """
    return face.score >= RIVAL_MIN_SCORE and np.sqrt(face.area / largest.area) >= RIVAL_MIN_SIDE


class FaceAligner:
    """Detect + align. ``faces``: ``largest`` or ``all``; ``fallback``: ``skip`` or ``center``."""

    def __init__(self, detector: FaceDetector | str = "mtcnn", *, size: int = 112, faces: str = "largest",
                 fallback: str = "skip", **detector_options):
        if faces not in ("largest", "all") or fallback not in ("skip", "center"):
            raise InvalidInput("faces must be largest|all and fallback skip|center")
        self.detector = make_detector(detector, **detector_options) if isinstance(detector, str) else detector
        self.size, self.faces, self.fallback = size, faces, fallback

    def align(self, image: Image.Image, landmarks=None) -> list[AlignResult]:
        return self.align_batch([image], [landmarks])[0]

    def align_batch(self, images: list[Image.Image], landmarks: list | None = None) -> list[list[AlignResult]]:
        """Align many images; images with known landmarks skip detection."""
        landmarks = landmarks or [None] * len(images)
        need = [i for i, lm in enumerate(landmarks) if lm is None]
        detected = dict(zip(need, self.detector.detect([images[i] for i in need]) if need else []))
        out = []
        for i, image in enumerate(images):
            image = image.convert("RGB")
            if landmarks[i] is not None:
                crop, _ = align_face(image, np.asarray(landmarks[i], dtype=np.float64), self.size)
                out.append([AlignResult("given_landmarks", crop, None, np.asarray(landmarks[i]).tolist(), None, 0, 1)])
                continue
            faces = detected[i]
            if not faces:
                crop = center_crop(image, self.size) if self.fallback == "center" else None
                out.append([AlignResult("no_face_center_crop" if crop else "no_face", crop, None, None, None, 0, 0)])
                continue
            chosen = faces if self.faces == "all" else faces[:1]
            n_faces = 1 + sum(rival_face(f, faces[0]) for f in faces[1:])
            status = "ok" if n_faces == 1 else "multiple"
            res = []
            for k, f in enumerate(chosen):
                crop, _ = align_face(image, f.landmarks, self.size)
                res.append(AlignResult(status, crop, f.box.round(2).tolist(), f.landmarks.round(2).tolist(),
                                       round(f.score, 4), k, n_faces))
            out.append(res)
        return out


# ----------------------------------------------------------------------------------------------
# Parallel alignment of image files
# ----------------------------------------------------------------------------------------------

_WORKER_ALIGNER: FaceAligner | None = None


def _init_worker(detector: str, detector_options: dict, aligner_options: dict) -> None:
    import torch

    global _WORKER_ALIGNER
    ignore_interrupts()
    torch.set_num_threads(1)  # one core per worker: processes, not threads, give the parallelism
    _WORKER_ALIGNER = FaceAligner(detector, **aligner_options, **detector_options)


def _worker_chunk(chunk):
    assert _WORKER_ALIGNER is not None
    return _align_chunk(_WORKER_ALIGNER, chunk)


def _align_chunk(aligner: FaceAligner, chunk: list[tuple[int, str, list | None]]
                 ) -> list[tuple[int, list[AlignResult] | str]]:
    """Read and align a chunk of files; an unreadable file gives its error text."""
    images, ok, out = [], [], []
    for i, path, lm in chunk:
        try:
            images.append(load_rgb(path))  # upright (EXIF), RGB, errors name the file
            ok.append((i, lm))
        except InvalidInput as e:  # reported per file, the others go on
            out.append((i, str(e)))
    if images:
        for (i, _), res in zip(ok, aligner.align_batch(images, [lm for _, lm in ok])):
            out.append((i, res))
    return sorted(out, key=lambda r: r[0])


def align_files(files: list, landmarks: list | None = None, *, detector: str = "mtcnn",
                detector_options: dict | None = None, workers: int = 1, chunk_size: int = 8,
                **aligner_options) -> Iterator[tuple[int, list[AlignResult] | str]]:
    """Align image files, in order, with ``workers`` processes (one core each).

    Yields ``(index, results)`` per file, or ``(index, error text)`` for a file that cannot be read.
    Detection is CPU-bound and per image, so it scales with processes; this is how preprocessing keeps
    up with a GPU at real model size (one core aligns ~20-60 photos/s at 640x480).
    """
    landmarks = landmarks or [None] * len(files)
    jobs = [(i, str(f), lm) for i, (f, lm) in enumerate(zip(files, landmarks))]
    chunks = [jobs[s:s + chunk_size] for s in range(0, len(jobs), chunk_size)]
    init_args = (detector, detector_options or {}, aligner_options)
    if workers <= 1:
        aligner = FaceAligner(detector, **aligner_options, **(detector_options or {}))
        for c in chunks:
            yield from _align_chunk(aligner, c)
        return
    with start_workers() as ctx:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
    with pool:
        for done in pool.imap(_worker_chunk, chunks):
            yield from done
