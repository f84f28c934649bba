"""Dataset preparation as plain functions: a dataset in its real layout -> a validated manifest.

:func:`prepare_dataset` is ``cervl prepare``; :func:`prepare_synthce` generates SynthCE and its four
manifests (basic/compound x aligned/original), for ``cervl demo`` and ``cervl pretrain-tiny``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cervl.data import BadInputs, make_reader, write_manifest
from cervl.data.base import assign_val
from cervl.data.manifest import ManifestError, Record
from cervl.core.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What :func:`prepare_dataset` wrote."""

    manifest: Path
    records: int
    splits: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    missing_frames: int = 0
    bad: BadInputs = field(default_factory=BadInputs)
    sidecar: Path | None = None
    duplicates_dropped: int = 0


def prepare_dataset(dataset: str, root: str | Path, out: str | Path, *, skip_bad: bool = False,
                    val_fraction: float = 0.0, check_images: bool = True, **options) -> Prepared:
    """Read ``dataset`` (a reader name) at ``root`` and write the manifest ``out``.

    ``options`` are the reader's own (``subset``, ``variant``, ``annotations``...; None = not given).
    With ``skip_bad``, bad samples are skipped, counted by reason, and the first ones listed in
    ``OUT.bad.jsonl``; a clean run removes a stale sidecar of an earlier run.
    """
    if not (isinstance(val_fraction, (int, float)) and math.isfinite(val_fraction) and 0 <= val_fraction < 1):
        raise InvalidInput(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.is_dir():
        raise InvalidInput(f"-o {out} is a folder; give the manifest's file name, e.g. {out / 'manifest.jsonl'}")
    bad = BadInputs(skip=skip_bad)
    reader = make_reader(dataset, root, check_images=check_images, bad=bad, **options)
    records = reader.read()
    records, dropped = drop_duplicates(records, bad, source=root)
    if not records:
        raise InvalidInput(f"no samples found in {root} for dataset {dataset!r}"
                           + (f" ({bad.summary()})" if bad.total else ""))
    assign_val(records, val_fraction)
    n = write_manifest(out, records, root=reader.image_root)
    sidecar = bad.write_sidecar(out) if bad.total else None
    stale = Path(str(out) + ".bad.jsonl")
    if sidecar is None and stale.is_file():
        stale.unlink()  # cervl wrote it for an earlier run of this manifest; it no longer applies
    return Prepared(out, n, dict(Counter(r.split for r in records)), dict(Counter(r.label for r in records)),
                    reader.missing_frames, bad, sidecar, dropped)


def drop_duplicates(records: list[Record], bad: BadInputs, *, source) -> tuple[list[Record], int]:
    """Drop exact duplicates (same image, label and split) with a warning; the same image with two
    labels is an error naming both (with ``--skip-bad`` both are dropped and counted)."""
    first: dict[tuple, Record] = {}
    conflicts, keep, dropped = set(), [], 0
    for rec in records:
        key = (rec.root, rec.image, rec.video, rec.frame)
        seen = first.get(key)
        if seen is None:
            first[key] = rec
            keep.append(rec)
        elif (seen.label, seen.split) == (rec.label, rec.split):
            dropped += 1
        else:
            bad.report(ManifestError(f"image {rec.image} is listed twice with different labels: {seen.label!r} "
                                     f"(sample {seen.sample_id}) and {rec.label!r} (sample {rec.sample_id})",
                                     file=source, field="label", reason="conflicting_duplicate"))
            conflicts.add(key)
    if dropped:
        log.warning("%s: dropped %d exact duplicate samples", source, dropped)
    if conflicts:
        keep = [r for r in keep if (r.root, r.image, r.video, r.frame) not in conflicts]
    return keep, dropped


def prepare_synthce(data: Path, manifests: Path, *, per_class: int, seed: int, prefix: str = "synthce-",
                    val_fraction: float = 0.1, workers: int = 1) -> dict:
    """Generate SynthCE into ``data`` (unless it is there with the same settings) and write its four
    manifests ``{prefix}{basic,compound}-{aligned,original}.jsonl`` into ``manifests``."""
    from cervl.data.synth import generate

    meta = Path(data) / "synthce.json"
    summary = None
    if not meta.is_file() or {k: json.loads(meta.read_text()).get(k, True) for k in ("per_class", "seed", "complete")} \
            != {"per_class": per_class, "seed": seed, "complete": True}:
        summary = generate(data, per_class=per_class, seed=seed, workers=workers)
    written = {}
    for subset in ("basic", "compound"):
        for variant in ("aligned", "original"):
            out = Path(manifests) / f"{prefix}{subset}-{variant}.jsonl"
            written[out] = prepare_dataset("rafdb", Path(data) / subset, out, subset=subset, variant=variant,
                                           val_fraction=val_fraction)
    return {"generated": summary, "manifests": written}
