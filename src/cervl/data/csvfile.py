"""CSV reader: columns ``image,label[,split]``; ROOT is the CSV file, images are relative to it.

Labels may be class names (matched tolerantly) or the label set's integer ids; an empty label
means unlabelled.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cervl.data.base import Reader, check_image
from cervl.data.manifest import SPLITS, ManifestError, Record
from cervl.core.labels import LabelSet, get_label_set, label_set_containing, resolve_name


def read_utf8(path: Path) -> str:
    """A text file as UTF-8 (a byte-order mark is accepted); any other encoding is one clear error."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError("the file is UTF-16 (it starts with a UTF-16 byte-order mark); re-save it as UTF-8",
                            file=path, line=1, reason="bad_encoding")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"not UTF-8: byte 0x{data[e.start]:02x} at byte position {e.start} cannot be decoded "
                            f"(latin-1 or another encoding?); re-save the file as UTF-8", file=path, line=line,
                            reason="bad_encoding") from None


class CsvReader(Reader):
    """``cervl prepare csv FILE.csv``: columns ``image,label[,split]``; images relative to the CSV's folder."""

    name = "csv"
    options = ("label_set", "split")

    def __init__(self, root: str | Path, *, label_set: str | None = None, split: str | None = None, **common):
        super().__init__(root, **common)
        self.path, self.split, self.label_set_name = self.root, split or "train", label_set

    @property
    def image_root(self) -> Path:
        """Folder the records' relative image paths start from."""
        return self.path.parent

    def read(self) -> list[Record]:
        if not self.path.is_file():
            raise ManifestError("CSV file not found", file=self.path, reason="missing_file")
        rows = list(csv.reader(io.StringIO(read_utf8(self.path), newline="")))
        if not rows:
            raise ManifestError("empty CSV file", file=self.path, line=1, reason="malformed_line")
        header = [h.strip().lower() for h in rows[0]]
        for col in ("image", "label"):
            if col not in header:
                raise ManifestError(f"missing column {col!r} in header {rows[0]}", file=self.path, line=1,
                                    field=col, reason="malformed_line")
        body = [(i, dict(zip(header, r))) for i, r in enumerate(rows[1:], 2) if any(c.strip() for c in r)]
        label_set = self._label_set(body)
        records = []
        for lineno, row in body:
            try:
                records.append(self._record(lineno, row, len(header), label_set))
            except ManifestError as err:
                self.bad.report(err)
        return records

    def _label_set(self, body: list[tuple[int, dict]]) -> LabelSet:
        if self.label_set_name:
            return get_label_set(self.label_set_name)
        names = {resolve_name(r.get("label", "")) for _, r in body if r.get("label", "").strip()}
        if None in names or not names:
            raise ManifestError("cannot infer the label set from these labels; pass --label-set", file=self.path,
                                field="label", reason="unknown_label")
        return label_set_containing(names)

    def _record(self, lineno: int, row: dict, ncols: int, label_set: LabelSet) -> Record:
        def fail(field: str, msg: str, reason: str) -> ManifestError:
            return ManifestError(msg, file=self.path, line=lineno, field=field, reason=reason)

        if len(row) < ncols or not row.get("image", "").strip():
            raise fail("image", "malformed line: missing image column", "malformed_line")
        text = row["label"].strip()
        label = None
        if text:
            try:
                label = label_set.name_for_id(int(text)) if text.lstrip("-").isdigit() else label_set.resolve(text)
            except KeyError as e:
                raise fail("label", str(e.args[0]), "unknown_label") from None
        split = (row.get("split") or "").strip() or self.split
        if split not in SPLITS:
            raise fail("split", f"{split!r} is not one of {SPLITS}", "malformed_line")
        image = row["image"].strip()
        if self.check_images:
            check_image(self.path.parent / image, source=self.path, line=lineno)
        return Record(image=image, label=label, label_set=label_set.name, split=split, dataset=self.name)
