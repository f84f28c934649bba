"""Image-folder reader: ``ROOT/<class name>/*.jpg`` or ``ROOT/<split>/<class name>/*.jpg``."""

from __future__ import annotations

from pathlib import Path

from cervl.data.base import IMAGE_SUFFIXES, Reader
from cervl.data.manifest import SPLITS, ManifestError, Record
from cervl.core.labels import get_label_set, label_set_containing, resolve_name


class FolderReader(Reader):
    """Class names are matched tolerantly ("happily_surprised" works); the label set is inferred."""

    name = "folder"
    options = ("label_set", "split")

    def __init__(self, root: str | Path, *, label_set: str | None = None, split: str | None = None, **common):
        super().__init__(root, **common)
        self.split, self.label_set_name = split or "train", label_set

    def read(self) -> list[Record]:
        if not self.root.is_dir():
            raise ManifestError("dataset folder not found", file=self.root, reason="missing_file")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir())
        if subdirs and all(p.name in SPLITS for p in subdirs):
            groups = [(p.name, d) for p in subdirs for d in sorted(x for x in p.iterdir() if x.is_dir())]
        else:
            groups = [(self.split, d) for d in subdirs]
        if not groups:
            raise ManifestError("no class folders found", file=self.root, reason="missing_file")
        names = {}
        for _, d in groups:
            name = resolve_name(d.name)
            if name is None:
                raise ManifestError(f"folder name {d.name!r} is not a known class", file=d, field="label",
                                    reason="unknown_label")
            names[d] = name
        label_set = (get_label_set(self.label_set_name) if self.label_set_name
                     else label_set_containing(set(names.values())))
        records = []
        for split, d in groups:
            label = names[d]
            if label not in label_set:
                raise ManifestError(f"class {label!r} is not in label set {label_set.name!r}", file=d,
                                    field="label", reason="unknown_label")
            for path in sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                if not self.image_ok(path):
                    continue
                records.append(Record(image=path.relative_to(self.root).as_posix(), label=label,
                                      label_set=label_set.name, split=split, dataset=self.name))
        return records
