"""Aff-Wild2 EXPR reader: one annotation ``.txt`` per video, one integer per frame.

    ANNOTATIONS/<video>.txt        header ``Neutral,Anger,...,Other`` then one id per frame (-1 = none)
    FRAMES/<video>/<i:05d>.jpg     frame i (1-based), the cropped-aligned faces
"""

from __future__ import annotations

import logging
from pathlib import Path

from cervl.data.base import BadInputs, Reader, parse_int, read_label_lines
from cervl.core.errors import InvalidInput
from cervl.data.manifest import ManifestError, Record
from cervl.core.labels import LabelSet, get_label_set, normalize_name

log = logging.getLogger(__name__)


def check_header(path: Path, header: str, label_set: LabelSet) -> None:
    """The first line must name the label set's classes in id order."""
    names = [normalize_name(h) for h in header.split(",")]
    expected = [normalize_name(c) for c in label_set.classes]
    if names != expected:
        raise ManifestError(f"header {header!r} does not match {','.join(label_set.classes)!r}", file=path,
                            line=1, reason="malformed_line")


def read_frame_annotations(path: Path, label_set: LabelSet, *, header_required: bool, bad: BadInputs):
    """Yield ``(frame_number, label_or_None, line)`` for an annotation file; frame numbers start at 1."""
    lines = read_label_lines(path)
    if lines and not lines[0][1].lstrip("-").isdigit():
        check_header(path, lines[0][1], label_set)
        lines = lines[1:]
    elif header_required:
        raise ManifestError("missing header line", file=path, line=1, reason="malformed_line")
    for frame, (lineno, text) in enumerate(lines, 1):
        try:
            label_id = parse_int(text, file=path, line=lineno)
            if label_id in (-1, label_set.unannotated_id):  # ABAW files mark unannotated frames -1
                yield frame, None, lineno
                continue
            try:
                yield frame, label_set.name_for_id(label_id), lineno
            except KeyError as e:
                raise ManifestError(str(e.args[0]), file=path, line=lineno, field="label",
                                    reason="unknown_label") from None
        except ManifestError as err:
            bad.report(err)


class AffWild2Reader(Reader):
    """``cervl prepare affwild2 ROOT --annotations DIR [--frames DIR] [--every N]``."""

    name = "affwild2"
    label_set_name = "affwild2-expr"
    header_required = True
    options = ("annotations", "frames", "every", "split")

    def __init__(self, root: str | Path, *, annotations: str | Path | None = None, frames: str | Path | None = None,
                 every: int = 1, split: str | None = None, **common):
        super().__init__(root, **common)
        if annotations is None:
            raise InvalidInput(f"{self.name}: --annotations DIR is required (the Train_Set or Validation_Set folder)")
        self.annotations = self.root / annotations  # an absolute path stays absolute
        self.frames = self.root / (frames or "cropped_aligned")
        if every < 1:
            raise InvalidInput(f"--every must be >= 1, got {every}")
        self.every = every
        self.split = split or self.infer_split(self.annotations)
        self.label_set = get_label_set(self.label_set_name)

    @property
    def image_root(self) -> Path:
        """Folder the records' relative image paths start from."""
        return self.frames

    @staticmethod
    def infer_split(folder: Path) -> str:
        name = folder.name.lower()
        return "val" if "valid" in name or name == "val" else "test" if "test" in name else "train"

    def read(self) -> list[Record]:
        if not self.annotations.is_dir():
            raise ManifestError("annotation folder not found", file=self.annotations, reason="missing_file")
        records = []
        for ann in sorted(self.annotations.glob("*.txt")):
            records.extend(self.read_video(ann))
        if self.missing_frames:
            log.warning("%s: %d annotated frames have no image under %s (face not detected in the "
                        "cropped_aligned release); they are not in the manifest", self.name,
                        self.missing_frames, self.frames)
        return records

    def read_video(self, ann: Path) -> list[Record]:
        video = ann.stem  # keeps '_left' / '_right' videos apart
        out = []
        for frame, label, lineno in read_frame_annotations(ann, self.label_set, header_required=self.header_required,
                                                           bad=self.bad):
            if label is None and self.label_set.unannotated_id is not None:
                continue  # -1: frame not annotated
            if (frame - 1) % self.every:
                continue
            rel = Path(video) / f"{frame:05d}.jpg"
            path = self.frames / rel
            if not path.is_file():
                self.missing_frames += 1
                continue
            if not self.image_ok(path, source=ann, line=lineno):
                continue
            out.append(Record(image=rel.as_posix(), label=label, label_set=self.label_set.name,
                              split=self.split, dataset=self.name, id=f"{video}/{frame:05d}", video=video,
                              frame=frame, variant="aligned"))
        return out
