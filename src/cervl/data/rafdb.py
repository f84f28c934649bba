"""RAF-DB reader (basic or compound subset), in the dataset's real directory layout.

    ROOT/EmoLabel/list_patition_label.txt      lines like ``train_00001.jpg 5``
    ROOT/Image/aligned/train_00001_aligned.jpg
    ROOT/Image/original/train_00001.jpg
    ROOT/Annotation/manual/train_00001_manu_attri.txt   5 lines ``x y``, then gender, race, age
"""

from __future__ import annotations

from pathlib import Path

from cervl.data.base import Reader, check_image, parse_int, read_label_lines
from cervl.core.errors import InvalidInput
from cervl.data.manifest import ManifestError, Record
from cervl.core.labels import get_label_set

LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"  # sic: the real file name
AU_FILE = Path("Annotation") / "aus.csv"  # SynthCE's ground-truth AU intensities (not in real RAF-DB)


def read_au_table(path: Path) -> dict[str, dict[str, float]]:
    """``image,AU01,...`` rows -> {image name: {AU: intensity}}; empty when the file is absent."""
    if not path.is_file():
        return {}
    lines = read_label_lines(path)
    header = lines[0][1].split(",")
    table = {}
    for lineno, text in lines[1:]:
        cells = text.split(",")
        try:
            table[cells[0]] = {k: float(v) for k, v in zip(header[1:], cells[1:], strict=True)}
        except ValueError:
            raise ManifestError(f"malformed AU row {text!r}", file=path, line=lineno, field="aus",
                                reason="malformed_line") from None
    return table


def read_manual_landmarks(path: Path) -> list[list[float]]:
    """Read the 5 manual landmarks (left eye, right eye, nose, mouth corners) of one image."""
    lines = read_label_lines(path)
    if len(lines) < 5:
        raise ManifestError(f"expected 5 landmark lines, found {len(lines)}", file=path, field="landmarks",
                            reason="malformed_line")
    points = []
    for lineno, text in lines[:5]:
        parts = text.split()
        try:
            x, y = (float(v) for v in parts)
        except ValueError:
            raise ManifestError(f"malformed landmark line {text!r}: expected 'x y'", file=path, line=lineno,
                                field="landmarks", reason="malformed_line") from None
        points.append([x, y])
    return points


class RafdbReader(Reader):
    """``cervl prepare rafdb ROOT --subset basic|compound --variant aligned|original``."""

    name = "rafdb"
    options = ("subset", "variant")

    def __init__(self, root: str | Path, *, subset: str = "basic", variant: str = "aligned", **common):
        super().__init__(root, **common)
        if subset not in ("basic", "compound"):
            raise InvalidInput(f"--subset must be 'basic' or 'compound', got {subset!r}")
        if variant not in ("aligned", "original"):
            raise InvalidInput(f"--variant must be 'aligned' or 'original', got {variant!r}")
        self.subset, self.variant = subset, variant
        self.label_set = get_label_set(f"rafdb-{subset}")

    def image_relpath(self, name: str) -> Path:
        stem = Path(name).stem
        if self.variant == "aligned":
            return Path("Image") / "aligned" / f"{stem}_aligned.jpg"
        return Path("Image") / "original" / name

    def read(self) -> list[Record]:
        label_file = self.root / LABEL_FILE
        self._aus = read_au_table(self.root / AU_FILE)
        records = []
        for lineno, text in read_label_lines(label_file):
            try:
                records.append(self._record(label_file, lineno, text))
            except ManifestError as err:
                self.bad.report(err)
        return records

    def _record(self, label_file: Path, lineno: int, text: str) -> Record:
        parts = text.split()
        if len(parts) != 2:
            raise ManifestError(f"malformed line {text!r}: expected '<image> <label id>'", file=label_file,
                                line=lineno, reason="malformed_line")
        name, id_text = parts
        label_id = parse_int(id_text, file=label_file, line=lineno)
        try:
            label = self.label_set.name_for_id(label_id)
        except KeyError as e:
            raise ManifestError(str(e.args[0]), file=label_file, line=lineno, field="label",
                                reason="unknown_label") from None
        split = "train" if name.startswith("train_") else "test" if name.startswith("test_") else None
        if split is None:
            raise ManifestError(f"image name {name!r} has neither a 'train_' nor a 'test_' prefix",
                                file=label_file, line=lineno, field="split", reason="malformed_line")
        rel = self.image_relpath(name)
        if self.check_images:
            check_image(self.root / rel, source=label_file, line=lineno)
        landmarks = None
        # Manual landmarks are in original-image coordinates, so they only describe the original variant.
        lm_path = self.root / "Annotation" / "manual" / f"{Path(name).stem}_manu_attri.txt"
        if self.variant == "original" and lm_path.is_file():
            landmarks = read_manual_landmarks(lm_path)
        return Record(image=rel.as_posix(), label=label, label_set=self.label_set.name, split=split,
                      dataset=f"rafdb-{self.subset}", id=Path(name).stem, landmarks=landmarks,
                      aus=self._aus.get(name), variant=self.variant)
