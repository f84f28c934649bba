"""C-EXPR-DB reader: per-video frame folders, optional per-video annotation files (7 classes).

    ROOT/<video>/<frame>.jpg               frame numbers are read from the file names
    ANNOTATIONS/<video>.txt (optional)     one class index 0-6 per frame, optional header, -1 = none

Without annotations the records are unlabelled (``label: null``), for test-set prediction.
"""

from __future__ import annotations

import re
from pathlib import Path

from cervl.data.affwild2 import read_frame_annotations
from cervl.data.base import IMAGE_SUFFIXES, Reader
from cervl.core.errors import InvalidInput
from cervl.data.manifest import ManifestError, Record
from cervl.core.labels import get_label_set

_DIGITS = re.compile(r"(\d+)")


def frame_number(path: Path) -> int | None:
    """The last run of digits in a frame file's stem (``00042.jpg`` -> 42)."""
    found = _DIGITS.findall(path.stem)
    return int(found[-1]) if found else None


class CexprdbReader(Reader):
    """``cervl prepare cexprdb ROOT [--annotations DIR] [--every N] [--split test]``."""

    name = "cexprdb"
    options = ("annotations", "every", "split")

    def __init__(self, root: str | Path, *, annotations: str | Path | None = None, every: int = 1,
                 split: str | None = None, **common):
        super().__init__(root, **common)
        if every < 1:
            raise InvalidInput(f"--every must be >= 1, got {every}")
        self.annotations = self.root / annotations if annotations else None
        self.every, self.split = every, split or "test"
        self.label_set = get_label_set("cexprdb")

    def read(self) -> list[Record]:
        if not self.root.is_dir():
            raise ManifestError("dataset folder not found", file=self.root, reason="missing_file")
        videos = sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.annotations)
        records = []
        for vdir in videos:
            labels = self._labels(vdir.name)
            if self.annotations is not None and labels is None:
                continue  # video without an annotation file: not part of the labelled split
            frames = sorted((frame_number(p), p) for p in vdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for frame, path in frames:
                if frame is None:
                    self.bad.report(ManifestError("frame file name has no frame number", file=path,
                                                  field="frame", reason="malformed_line"))
                    continue
                if (frame - 1) % self.every:
                    continue
                label = None
                if labels is not None:
                    if frame not in labels or labels[frame] is None:
                        continue
                    label = labels[frame]
                if not self.image_ok(path):
                    continue
                records.append(Record(image=path.relative_to(self.root).as_posix(), label=label,
                                      label_set="cexprdb", split=self.split, dataset=self.name,
                                      id=f"{vdir.name}/{frame:05d}", video=vdir.name, frame=frame))
        return records

    def _labels(self, video: str) -> dict[int, str | None] | None:
        if self.annotations is None:
            return None
        ann = self.annotations / f"{video}.txt"
        if not ann.is_file():
            return None
        return {frame: label for frame, label, _ in
                read_frame_annotations(ann, self.label_set, header_required=False, bad=self.bad)}
