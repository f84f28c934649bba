"""A stage's training data: manifests filtered by split, checked against the label set, mixed by weight.

The sample order is a pure function of (seed, epoch), so a resumed run sees exactly the samples
an uninterrupted one would: sample ``k`` of the stream is position ``k % N`` of epoch ``k // N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cervl.core.errors import InvalidInput
from cervl.data.manifest import Manifest, Record, read_manifest
from cervl.core.labels import LabelSet


@dataclass
class Sample:
    record: Record
    path: Path

    @property
    def name(self) -> str:
        return f"{self.record.sample_id} ({self.path})"


class DataError(InvalidInput):
    """Training or evaluation data that cannot be used (missing manifest, empty split, foreign label)."""


def load_samples(manifest: str | Path, splits: list[str], label_set: LabelSet, *, need_labels: bool = True,
                 need_aus: bool = False) -> list[Sample]:
    """Records of ``manifest`` in ``splits``; every label must belong to ``label_set``.

    ``need_aus``: every record must carry AUs (AU-caption answers); ``need_labels=False``: labels are not
    used (``au-describe`` answers), so they are not checked.
    """
    if not Path(manifest).is_file():
        demo = "runs/demo/manifests/" in Path(manifest).as_posix()
        raise DataError(f"manifest not found: {manifest}" + ("; `cervl demo --data-only` (or `make demo`) writes the "
                                                             "SynthCE demo manifests" if demo else ""))
    m: Manifest = read_manifest(manifest)
    chosen = [r for r in m if r.split in splits]
    if not chosen:
        present = sorted({r.split for r in m})
        raise DataError(f"{manifest}: no records in split(s) {splits} (present: {present})")
    out = []
    for r in chosen:
        if need_labels and r.label is None:
            raise DataError(f"{manifest}: sample {r.sample_id!r} has no label but this stage trains on labels")
        if need_labels and r.label not in label_set:
            raise DataError(f"{manifest}: sample {r.sample_id!r} has label {r.label!r}, which is not in the "
                            f"stage's label set {label_set.name!r} {list(label_set.classes)}")
        if need_aus and r.aus is None:
            raise DataError(f"{manifest}: sample {r.sample_id!r} has no 'aus' but the prompt answers with AUs")
        out.append(Sample(r, m.image_path(r)))
    return out


def class_probabilities(samples: list[Sample], sampling: str) -> np.ndarray:
    """Per-sample draw probabilities giving each class a share ~ count ** (1 - alpha): alpha 1 for
    ``balanced`` (every class equally often), 0.5 for ``sqrt``, 0 for ``natural``."""
    alpha = {"natural": 0.0, "sqrt": 0.5, "balanced": 1.0}[sampling]
    labels = [s.record.label for s in samples]
    counts: dict = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    p = np.array([counts[label] ** -alpha for label in labels], dtype=np.float64)
    return p / p.sum()


class Mixture:
    """Weighted union of sources. A weight ``w`` draws ``round(w * n)`` samples of a source per epoch
    (with repetition when ``w > 1``), chosen afresh each epoch.

    With ``group > 0`` (length-grouped batching), each run of ``group`` consecutive samples of an
    epoch's shuffled order is sorted by ``length(sample)``, longest first, so a batch holds images of
    similar size (less padding). The order stays a pure function of (seed, epoch): resuming is exact.
    """

    def __init__(self, sources: list[tuple], seed: int, *, group: int = 0, length=None):
        # (samples, weight) or (samples, weight, sampling): natural | balanced | sqrt
        self.sources = [(s[0], s[1], s[2] if len(s) > 2 else "natural") for s in sources]
        self.seed = seed
        self.group, self.length = group, length
        self._lengths: dict = {}
        self._cache: dict[int, list[Sample]] = {}
        self.per_epoch = sum(int(round(w * len(s))) for s, w, _ in self.sources)
        if self.per_epoch == 0:
            raise DataError("the stage's data mix draws no samples (all weights round to 0)")

    def epoch(self, epoch: int) -> list[Sample]:
        rng = np.random.default_rng([self.seed, epoch])
        chosen = []
        for samples, w, sampling in self.sources:
            k = int(round(w * len(samples)))
            if sampling == "natural":
                full, rest = divmod(k, len(samples))
                idx = list(np.tile(np.arange(len(samples)), full)) + list(rng.permutation(len(samples))[:rest])
            else:  # class-aware: p(sample) ~ count(class) ** -alpha, drawn with replacement
                idx = list(rng.choice(len(samples), size=k, p=class_probabilities(samples, sampling)))
            chosen += [samples[i] for i in idx]
        order = rng.permutation(len(chosen))
        shuffled = [chosen[i] for i in order]
        if self.group > 1 and self.length is not None:
            shuffled = [s for start in range(0, len(shuffled), self.group)
                        for s in sorted(shuffled[start:start + self.group], key=self._length, reverse=True)]
        return shuffled

    def _length(self, sample: Sample) -> int:
        if sample.path not in self._lengths:
            self._lengths[sample.path] = self.length(sample)
        return self._lengths[sample.path]

    def take(self, start: int, count: int) -> list[Sample]:
        """Samples ``start .. start+count-1`` of the endless stream of epochs."""
        out, k = [], start
        while len(out) < count:
            e, pos = divmod(k, self.per_epoch)
            if e not in self._cache:
                self._cache = {e: self.epoch(e), **{k2: v for k2, v in self._cache.items() if k2 == e - 1}}
            out.append(self._cache[e][pos])
            k += 1
        return out
