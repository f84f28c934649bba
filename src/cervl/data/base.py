"""Shared machinery of the dataset readers: the bad-input policy and image checks."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cervl.data.manifest import ManifestError, Record, atomic_write_text
from cervl.core.errors import InvalidInput
from cervl.core.registry import suggest

log = logging.getLogger(__name__)

MAX_SIDECAR_OFFENDERS = 20
from cervl.core.images import IMAGE_SUFFIXES  # noqa: E402,F401  (re-exported: the readers use it)


@dataclass
class BadInputs:
    """Collects bad samples. With ``skip=False`` the first one raises (the default, fail loud)."""

    skip: bool = False
    counts: Counter = field(default_factory=Counter)
    offenders: list[dict] = field(default_factory=list)

    def report(self, err: ManifestError) -> None:
        """Raise ``err``, or (with ``skip``) count it by reason and remember the first few."""
        if not self.skip:
            raise err
        self.counts[err.reason] += 1
        if len(self.offenders) < MAX_SIDECAR_OFFENDERS:
            self.offenders.append({"reason": err.reason, "file": err.file, "line": err.line,
                                   "field": err.field, "message": str(err)})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad samples"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} bad samples: {parts}"

    def write_sidecar(self, manifest_path: str | Path) -> Path | None:
        """Write the first offenders to ``<manifest>.bad.jsonl``; return its path if any."""
        if not self.offenders:
            return None
        path = Path(str(manifest_path) + ".bad.jsonl")
        atomic_write_text(path, "".join(json.dumps(o) + "\n" for o in self.offenders))
        return path


class Reader:
    """Base of the dataset readers (``cervl prepare DATASET``): ``Reader(root, **options).read() -> records``.

    ``options`` declares the keyword options a reader takes (the ``cervl prepare`` flags that apply to
    it); :func:`cervl.data.make_reader` rejects any other option instead of ignoring it.
    ``missing_frames`` counts annotated frames without an image file (video datasets).
    """

    name = ""
    options: tuple[str, ...] = ()

    def __init__(self, root: str | Path, *, check_images: bool = True, bad: BadInputs | None = None):
        self.root = Path(root)
        self.check_images, self.bad = check_images, bad or BadInputs()
        self.missing_frames = 0

    @property
    def image_root(self) -> Path:
        """Folder the records' relative image paths start from."""
        return self.root

    def read(self) -> list[Record]:
        raise NotImplementedError

    def image_ok(self, path: Path, *, source: str | Path | None = None, line: int | None = None) -> bool:
        """Check that an image decodes (unless ``check_images`` is off); a bad one is reported to
        :attr:`bad` (which raises, or counts it with ``--skip-bad``) and False is returned."""
        if not self.check_images:
            return True
        try:
            check_image(path, source=source, line=line)
        except ManifestError as err:
            self.bad.report(err)
            return False
        return True

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse options this reader does not take, naming the ones it does."""
        for key in options:
            if key not in cls.options:
                takes = ", ".join(cls.options) or "none"
                raise InvalidInput(f"dataset {cls.name!r} does not take option {key!r} (its options: {takes})"
                                   f"{suggest(key, cls.options)}")


def check_image(path: Path, *, source: str | Path | None = None, line: int | None = None) -> None:
    """Raise :class:`ManifestError` if ``path`` is missing or not a decodable image header.

    ``source``/``line`` name the annotation that referred to the image, for the message.
    """
    if not path.is_file():
        raise ManifestError(f"image not found: {path}", file=source or path, line=line, field="image",
                            reason="missing_file")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        raise ManifestError(f"unreadable image {path}: {e}", file=source or path, line=line, field="image",
                            reason="unreadable_image") from None


def assign_val(records: list[Record], fraction: float) -> None:
    """Move a deterministic ``fraction`` of train records to ``val`` (hash of the sample id).

    Video frames are assigned per video so that frames of one clip never straddle splits.
    """
    if fraction <= 0:
        return
    for rec in records:
        if rec.split != "train":
            continue
        key = rec.video if rec.video else rec.sample_id
        h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if h < fraction:
            rec.split = "val"


def read_label_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a text annotation file with their 1-based line numbers."""
    if not path.is_file():
        raise ManifestError("annotation file not found", file=path, reason="missing_file")
    with path.open(encoding="utf-8", errors="replace") as fh:
        return [(i, s.strip()) for i, s in enumerate(fh, 1) if s.strip()]


def parse_int(text: str, *, file: Path, line: int, field_name: str = "label") -> int:
    try:
        return int(text)
    except ValueError:
        raise ManifestError(f"malformed line: expected an integer, got {text!r}", file=file, line=line,
                            field=field_name, reason="malformed_line") from None
