"""The manifest: one validated JSON Lines record per sample, written atomically.

A record's ``image`` is absolute, or relative to its ``root``; ``root`` itself is absolute or
relative to the manifest file's folder (so a dataset and its manifest can move together).
``landmarks`` and ``bbox`` are in the pixel coordinates of the image ``landmarks_frame`` names: ``image``
or ``source`` (``cervl align`` writes crops whose ``source`` is the photo the face was found in, with the
points in the photo's pixels, and says so). A record without the field (manifests written before it) is read
by the old rule: ``source`` when the record has a source, else ``image``. Consumers never read ``landmarks``
raw: :meth:`Record.landmarks_for_image` gives them in the pixels of the image the consumer opens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from cervl.core.fsio import atomic_write_lines, atomic_write_text, new_file_mode  # noqa: F401  (re-exported)
from cervl.core.errors import InvalidInput
from cervl.core.labels import get_label_set
from cervl.core.registry import suggest

SPLITS = ("train", "val", "test")
VARIANTS = ("aligned", "original")
LANDMARK_FRAMES = ("image", "source")


class ManifestError(InvalidInput):
    """A bad manifest record or dataset file; the message names file, line and field."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None, reason: str = "invalid"):
        self.file, self.line, self.field, self.reason = (str(file) if file else None), line, field, reason
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        field_part = f"field '{field}': " if field else ""
        super().__init__(f"{prefix}{field_part}{message}")
        self.detail = message


@dataclass
class Record:
    """One sample. Only ``image``, ``label_set``, ``split`` and ``dataset`` are required."""

    image: str
    label: str | None
    label_set: str
    split: str
    dataset: str
    root: str | None = None
    id: str | None = None
    landmarks: list[list[float]] | None = None
    bbox: list[float] | None = None
    video: str | None = None
    frame: int | None = None
    aus: dict[str, float] | None = None
    variant: str | None = None
    source: str | None = None
    subject: str | None = None  # who the face belongs to, where the dataset says (pairs faces of one person)
    provenance: dict | None = None  # how a made sample was made (cervl compose, cervl pseudo-label)
    landmarks_frame: str | None = None  # the image landmarks and bbox are in: image | source (None: see frame_of_landmarks)

    @property
    def sample_id(self) -> str:
        """A stable id: the explicit ``id`` or the image path."""
        return self.id or self.image

    @property
    def frame_of_landmarks(self) -> str:
        """Which image ``landmarks`` and ``bbox`` are in: the recorded ``landmarks_frame``, else the rule of
        manifests written before the field (``source`` when the record has a source, else ``image``)."""
        return self.landmarks_frame or ("source" if self.source is not None else "image")

    def landmarks_for_image(self, image_size: tuple[int, int]) -> np.ndarray | None:
        """The five landmarks in the pixels of the record's ``image`` (of ``image_size``, width x height), the
        image every consumer opens; None without landmarks.

        Points in the ``source`` frame of an aligned crop are mapped into the crop through the similarity that
        made it, the least-squares fit of the points to the template of the crop's size
        (:func:`cervl.faces.align.align_face`, what ``cervl align`` ran). Any other ``source``-frame record
        cannot be mapped: :class:`ManifestError`.
        """
        if self.landmarks is None:
            return None
        points = np.asarray(self.landmarks, dtype=np.float64)
        if self.frame_of_landmarks == "image":
            return points
        from cervl.faces.align import apply_affine, fit_similarity, template

        w, h = image_size
        if self.variant != "aligned" or w != h:
            raise ManifestError(f"record {self.sample_id!r}: its landmarks are in the pixels of its source "
                                f"{self.source!r}, and its image ({w}x{h}, variant {self.variant!r}) is not a square "
                                f"aligned crop they can be mapped into", field="landmarks_frame")
        try:
            m = fit_similarity(points, template(w))
        except ValueError as e:  # five coincident points
            raise ManifestError(f"record {self.sample_id!r}: {e}", field="landmarks") from None
        return apply_affine(m, points)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "label"}


_FIELDS = {f.name for f in fields(Record)}
_REQUIRED = ("image", "label_set", "split", "dataset")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(raw: Any, *, file: str | os.PathLike | None = None, line: int | None = None) -> Record:
    """Check one decoded JSON object and return a :class:`Record`; raise :class:`ManifestError`."""

    def fail(fld: str | None, msg: str) -> ManifestError:
        return ManifestError(msg, file=file, line=line, field=fld)

    if not isinstance(raw, dict):
        raise fail(None, f"expected a JSON object, got {type(raw).__name__}")
    for key in raw:
        if key not in _FIELDS:
            raise fail(key, "unknown field" + suggest(key, _FIELDS))
    for key in _REQUIRED:
        if raw.get(key) in (None, ""):
            raise fail(key, "missing required field")
    for key in ("image", "label_set", "split", "dataset", "root", "id", "video", "source", "subject",
                "landmarks_frame"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise fail(key, f"expected a string, got {raw[key]!r}")
    try:
        label_set = get_label_set(raw["label_set"])
    except KeyError as e:
        raise fail("label_set", str(e.args[0])) from None
    label = raw.get("label")
    if label is not None:
        if not isinstance(label, str) or label not in label_set:
            raise fail("label", f"{label!r} is not a canonical class of {label_set.name!r} {list(label_set.classes)}")
    if raw["split"] not in SPLITS:
        raise fail("split", f"{raw['split']!r} is not one of {SPLITS}")
    lm = raw.get("landmarks")
    if lm is not None and not (
        isinstance(lm, list) and len(lm) == 5
        and all(isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in lm)
    ):
        raise fail("landmarks", "expected five [x, y] number pairs (left eye, right eye, nose, left/right mouth corner)")
    bbox = raw.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                                 and bbox[2] > bbox[0] and bbox[3] > bbox[1]):
        raise fail("bbox", "expected [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
    frame = raw.get("frame")
    if frame is not None and not (isinstance(frame, int) and not isinstance(frame, bool) and frame >= 0):
        raise fail("frame", f"expected a non-negative integer, got {frame!r}")
    aus = raw.get("aus")
    if aus is not None and not (isinstance(aus, dict) and all(isinstance(k, str) and _is_number(v) for k, v in aus.items())):
        raise fail("aus", "expected an object mapping AU names to numbers")
    if raw.get("provenance") is not None and not isinstance(raw["provenance"], dict):
        raise fail("provenance", f"expected an object, got {raw['provenance']!r}")
    variant = raw.get("variant")
    if variant is not None and variant not in VARIANTS:
        raise fail("variant", f"{variant!r} is not one of {VARIANTS}")
    lm_frame = raw.get("landmarks_frame")
    if lm_frame is not None and lm_frame not in LANDMARK_FRAMES:
        raise fail("landmarks_frame", f"{lm_frame!r} is not one of {LANDMARK_FRAMES}")
    if lm_frame == "source" and raw.get("source") is None:
        raise fail("landmarks_frame", "'source' names the record's source image, and the record has no 'source'")
    return Record(**{**raw, "label_set": label_set.name})


@dataclass
class Manifest:
    """Records plus the file they came from (used to resolve relative roots)."""

    records: list[Record]
    path: Path | None = None
    _base: Path = field(default_factory=Path.cwd, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def image_path(self, rec: Record) -> Path:
        """Absolute path of a record's image."""
        image = Path(rec.image)
        if image.is_absolute():
            return image
        root = Path(rec.root) if rec.root else Path(".")
        if not root.is_absolute():
            root = self._base / root
        return Path(os.path.normpath(root / image))

    def split(self, *splits: str) -> "Manifest":
        return Manifest([r for r in self.records if r.split in splits], self.path, self._base)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate every record; the first bad one raises with file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest file not found", file=path, reason="missing_file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ManifestError(f"malformed JSON ({e.msg} at column {e.colno})", file=path, line=lineno,
                                    reason="malformed_line") from None
            records.append(validate_record(raw, file=path, line=lineno))
    return Manifest(records, path, path.resolve().parent)


def write_manifest(path: str | os.PathLike, records: Iterable[Record], *, root: str | os.PathLike | None = None) -> int:
    """Validate and atomically write records; ``root`` (if given) is stored relative to the manifest."""
    path = Path(path)
    root_str = None
    if root is not None:
        root_abs = Path(root).resolve()
        try:
            root_str = os.path.relpath(root_abs, path.resolve().parent)
        except ValueError:  # different drive on Windows
            root_str = str(root_abs)
    lines = []
    for i, rec in enumerate(records, 1):
        if root_str is not None and rec.root is None and not Path(rec.image).is_absolute():
            rec.root = root_str
        data = rec.to_json()
        validate_record(data, file=f"<record {i} for {path}>")
        lines.append(json.dumps(data, ensure_ascii=False, sort_keys=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)
