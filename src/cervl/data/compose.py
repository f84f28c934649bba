"""Composed compound faces from basic-labelled aligned faces: ``cervl compose``.

A compound expression is two basic emotions on different parts of the face (Du et al., PNAS 2014). Aligned
faces share one 5-point template, so the upper face of one (brows, eyes) and the lower face of another (nose
down: mouth, jaw) can be joined at a known line:

* **region** mode: the upper face of an emotion-A face over the lower face of an emotion-B face, joined by a
  feathered seam between the eye line and the nose tip. Which emotion goes above is chosen per compound
  class from the AU prototypes (:func:`assignment`): the arrangement whose AUs best match the compound's.
* **mixup** mode: a pixel blend of two whole faces, the weight drawn from a range (the 7th-ABAW winner's
  composition, arXiv 2503.07969).

Pairs come from the same person where the data says who that is (``video`` or ``subject``), else from the
faces with the most similar landmark geometry, else at random; an image is never paired with itself. Every
output record names its two sources, the mode and the weights (``provenance``). The same seed gives the same
bytes with any number of workers: each sample draws from its own random stream.

Every input is checked before anything is written (the manifest, each image, each record's landmarks, taken in
the frame of the image opened: :meth:`~cervl.data.manifest.Record.landmarks_for_image`); the output is built in
a scratch folder of its own beside ``OUT`` and replaces ``OUT`` as a whole at the end, so a failed run leaves
an earlier output as it was.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cervl.core.images import load_rgb
from cervl.data.manifest import ManifestError, Record, atomic_write_text, read_manifest, write_manifest
from cervl.core.errors import InvalidInput
from cervl.core.facs import PROTOTYPES
from cervl.faces.align import align_face, apply_affine, fit_similarity
from cervl.core.fsio import swap_in
from cervl.core.labels import LabelSet, components, get_label_set
from cervl.core.workers import ignore_interrupts, start_workers

log = logging.getLogger(__name__)

UPPER_AUS = frozenset({1, 2, 4, 5, 6, 7})  # FACS upper-face units (brows, lids, cheeks); the rest act below
TEMPLATE_EYE_Y, TEMPLATE_NOSE_Y = 51.6, 71.74  # the 5-point template's eye line and nose tip in a 112-px crop
SEAM_AT = 0.7  # the seam lies 70% of the way from the eye line to the nose tip: under the lids, above the nostrils
MODES = ("region", "mixup")
MARKER = "compose.json"
OUTPUTS = ("images", "manifest.jsonl", MARKER, "sample_sheet.png")  # everything a compose output holds
SCRATCH_MARKER = ".cervl-compose-scratch"


def _presence(emotion: str) -> dict[int, float]:
    """How likely each AU is on a face of ``emotion``: 1 for required AUs, the subjects' share for optional ones."""
    p = PROTOTYPES[emotion]
    return {**p.optional, **{au: 1.0 for au in p.required}}


def arrangement_score(compound: str, upper: str, lower: str) -> float:
    """How well ``upper``'s upper-face AUs plus ``lower``'s lower-face AUs match ``compound``'s prototype:
    each expected AU counts +w where the compound uses it with weight w (1 if required) and -(1 - w) where
    not, so AUs the compound lacks cost as much as the ones it has earn."""
    want = _presence(compound)
    got = {au: v for au, v in _presence(upper).items() if au in UPPER_AUS}
    got.update({au: v for au, v in _presence(lower).items() if au not in UPPER_AUS})
    return float(sum(v * (2 * want.get(au, 0.0) - 1) for au, v in got.items()))


def assignment(compound: str) -> tuple[str, str]:
    """``(upper emotion, lower emotion)`` for a compound class: the better of its two arrangements (ties keep
    the name's order, its adverb above)."""
    a, b = components(compound)
    return (a, b) if arrangement_score(compound, a, b) >= arrangement_score(compound, b, a) else (b, a)


def assignment_table(label_set: LabelSet) -> list[dict]:
    """The choice and both scores for every compound class of ``label_set``."""
    rows = []
    for c in label_set.classes:
        a, b = components(c)
        up, low = assignment(c)
        rows.append({"class": c, "upper": up, "lower": low, "score": round(arrangement_score(c, up, low), 3),
                     "other": round(arrangement_score(c, low, up), 3)})
    return rows


def seam_row(size: int, landmarks: list | None = None) -> float:
    """The seam's row in a ``size``-px aligned crop: from the face's landmarks (eyes and nose tip) when given,
    else from the template."""
    if landmarks is not None:
        lm = np.asarray(landmarks, dtype=float)
        eye_y, nose_y = lm[:2, 1].mean(), lm[2, 1]
    else:
        eye_y, nose_y = TEMPLATE_EYE_Y * size / 112, TEMPLATE_NOSE_Y * size / 112
    return float(eye_y + SEAM_AT * (nose_y - eye_y))


def join_regions(upper: np.ndarray, lower: np.ndarray, seam: float, feather: float) -> np.ndarray:
    """``upper`` above the row ``seam``, ``lower`` below it, blended linearly over ``feather`` rows."""
    rows = np.arange(upper.shape[0], dtype=np.float64)[:, None, None]
    w = np.clip((rows - (seam - feather / 2)) / max(feather, 1e-6), 0.0, 1.0)  # 0: upper face, 1: lower face
    return np.clip(upper * (1 - w) + lower * w + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Face:
    """One usable input face."""

    path: str
    label: str
    person: str | None  # video or subject
    geometry: tuple | None  # landmarks normalised by the eye centre and distance
    landmarks: list | None  # in the aligned crop's pixels (seam row), when the record gives them for an aligned crop
    align_from: list | None = None  # landmarks of an unaligned image: it is aligned to the template first


def _geometry(landmarks) -> tuple | None:
    if landmarks is None:
        return None
    lm = np.asarray(landmarks, dtype=float)
    centre, dist = lm[:2].mean(0), np.linalg.norm(lm[1] - lm[0]) or 1.0
    return tuple(((lm - centre) / dist).ravel().round(4))


def partner(face: Face, pool: list[Face], rng: np.random.Generator) -> tuple[Face, str]:
    """The face of the other emotion to join with ``face``, and how it was chosen."""
    pool = [f for f in pool if f.path != face.path]  # never an image with itself
    same = [f for f in pool if face.person is not None and f.person == face.person]
    if same:
        return same[int(rng.integers(len(same)))], "same person"
    if face.geometry is not None and any(f.geometry is not None for f in pool):
        g = np.asarray(face.geometry)
        scored = [(float(np.abs(np.asarray(f.geometry) - g).sum()), i) for i, f in enumerate(pool)
                  if f.geometry is not None]
        near = [pool[i] for _, i in sorted(scored)[:5]]  # among the 5 most similar: variety, still alike
        return near[int(rng.integers(len(near)))], "similar landmarks"
    return pool[int(rng.integers(len(pool)))], "random"


@dataclass(frozen=True)
class ComposeSettings:
    label_set: str = "rafdb-compound"
    mode: str = "region"
    per_class: int = 120
    seed: int = 0
    feather: float = 12.0
    mix: tuple[float, float] = (0.4, 0.6)
    size: int = 112
    quality: int = 95


def _jobs(faces: dict[str, list[Face]], s: ComposeSettings, target: LabelSet) -> list[tuple]:
    """Every sample to make, with its two sources: a pure function of the inputs and the seed."""
    jobs = []
    for ci, c in enumerate(target.classes):
        up, low = assignment(c) if s.mode == "region" else components(c)
        if not faces.get(up) or not faces.get(low):
            continue
        for k in range(s.per_class):
            rng = np.random.default_rng([s.seed, ci, k])
            first = faces[up][int(rng.integers(len(faces[up])))]
            second, how = partner(first, faces[low], rng)
            weight = float(rng.uniform(*s.mix)) if s.mode == "mixup" else None
            jobs.append((c, k, first, second, how, weight))
    return jobs


def _make(job: tuple, s: ComposeSettings, out: str) -> dict:
    """Write one composed image; returns its record (as JSON)."""
    c, k, first, second, how, weight = job
    (a, lm_a), (b, lm_b) = _aligned(first, s.size), _aligned(second, s.size)
    if s.mode == "region":
        seams = [seam_row(s.size, lm) for lm in (lm_a, lm_b) if lm is not None]
        seam = float(np.mean(seams)) if seams else seam_row(s.size)
        pixels = join_regions(a, b, seam, s.feather)
        prov = {"mode": "region", "upper": first.path, "upper_label": first.label, "lower": second.path,
                "lower_label": second.label, "seam_row": round(seam, 2), "feather": s.feather, "pairing": how}
    else:
        pixels = np.clip(a * weight + b * (1 - weight) + 0.5, 0, 255).astype(np.uint8)
        prov = {"mode": "mixup", "a": first.path, "a_label": first.label, "b": second.path, "b_label": second.label,
                "weight_a": round(weight, 4), "pairing": how}
    rel = f"images/{_slug(c)}/{k:05d}.jpg"
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=s.quality)
    (Path(out) / rel).parent.mkdir(parents=True, exist_ok=True)
    (Path(out) / rel).write_bytes(buf.getvalue())
    return Record(image=rel, label=c, label_set=s.label_set, split="train", dataset="composed",
                  id=f"composed/{_slug(c)}/{k:05d}", variant="aligned", provenance=prov).to_json()


def _aligned(face: Face, size: int) -> tuple[np.ndarray, list | None]:
    """The face as a ``size``-px aligned crop (resized if it is one, aligned from its landmarks if not) and its
    landmarks in that crop when the record gives them (None: the template's)."""
    image = load_rgb(face.path)
    if face.align_from is not None:
        points = np.asarray(face.align_from, dtype=np.float64)
        crop, m = align_face(image, points, size)
        return np.asarray(crop, dtype=np.float64), apply_affine(m, points).tolist()
    scale = size / image.size[0]
    lm = None if face.landmarks is None else (np.asarray(face.landmarks, dtype=float) * scale).tolist()
    return np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float64), lm


def _make_many(args: tuple) -> list[dict]:
    jobs, s, out = args
    return [_make(j, s, out) for j in jobs]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_faces(manifest: str | Path, splits: list[str]) -> tuple[dict[str, list[Face]], Counter]:
    """The usable basic-labelled faces of ``manifest`` by emotion, and the unreadable images counted by reason.

    Landmarks are taken in the pixels of the image each record names (``cervl align`` stores the photo's);
    landmarks that cannot be used there are the manifest's error, raised naming the file and the record.
    """
    m = read_manifest(manifest)
    faces: dict[str, list[Face]] = {}
    bad: Counter = Counter()
    for r in m:
        if r.split not in splits or r.label is None:
            continue
        path = str(m.image_path(r))
        try:
            image = load_rgb(path)
        except InvalidInput as e:
            bad[str(e).split(": ", 1)[-1].split(" (")[0][:60]] += 1
            continue
        lm = _usable_landmarks(r, image.size, m.path)
        aligned = r.variant == "aligned" or lm is None
        faces.setdefault(r.label, []).append(Face(path, r.label, r.video or r.subject, _geometry(lm),
                                                  lm if aligned else None, None if aligned else lm))
    return faces, bad


def _usable_landmarks(r: Record, size: tuple[int, int], file) -> list | None:
    """``r``'s landmarks in the pixels of its image (of ``size``), checked to define an alignment."""
    try:
        lm = r.landmarks_for_image(size)
        if lm is not None:
            fit_similarity(lm, lm)  # five coincident points define no face
    except ManifestError as e:
        raise ManifestError(e.detail, file=file, field=e.field) from None
    except ValueError as e:
        raise ManifestError(f"record {r.sample_id!r}: landmarks {e}", file=file, field="landmarks") from None
    return None if lm is None else lm.tolist()


def compose(manifest: str | Path, out: str | Path, settings: ComposeSettings, *, splits: list[str] | None = None,
            workers: int = 1) -> dict:
    """Write composed compound faces, ``manifest.jsonl``, ``compose.json`` and a sample sheet into ``out``."""
    if settings.mode not in MODES:
        raise InvalidInput(f"--mode must be one of {MODES}, got {settings.mode!r}")
    if settings.per_class < 1 or not 0 <= settings.mix[0] <= settings.mix[1] <= 1:
        raise InvalidInput("--per-class must be >= 1 and the mixup range within [0, 1], low <= high")
    out, target = Path(os.path.abspath(out)), get_label_set(settings.label_set)  # "." or "a/..": a real name
    _check_out(out)  # before reading anything, and it deletes nothing
    faces, bad = load_faces(manifest, splits or ["train"])
    jobs = _jobs(faces, settings, target)
    if not jobs:
        raise InvalidInput(f"{manifest}: no compound class of {target.name!r} has both of its components among "
                           f"the labels found ({sorted(faces)})")
    new, old = _scratch(out, "new"), _scratch(out, "old")
    try:
        summary = _build(new, jobs, settings, target, workers)
        summary.update(manifest=str(manifest), bad_inputs=dict(bad))
        atomic_write_text(new / MARKER, json.dumps(summary, indent=2) + "\n")
        (new / SCRATCH_MARKER).unlink()
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # our own scratch folder; OUT is untouched
        raise
    swap_in(new, out, old)  # OUT is replaced as a whole: never half old, half new
    return summary


def _build(new: Path, jobs: list[tuple], settings: ComposeSettings, target: LabelSet, workers: int) -> dict:
    """Write the composed images, the manifest and the sample sheet into the scratch folder ``new``."""
    chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
    if workers > 1:
        with start_workers() as ctx:
            pool = ctx.Pool(workers, initializer=ignore_interrupts)
        with pool:
            records = [r for part in pool.imap(_make_many, [(ch, settings, str(new)) for ch in chunks]) for r in part]
    else:
        records = [r for ch in chunks for r in _make_many((ch, settings, str(new)))]
    write_manifest(new / "manifest.jsonl", [Record(**r) for r in records])
    write_sheet(new / "sample_sheet.png", new, records, target.classes)
    return {"format": "cervl-compose", "manifest": None, "settings": settings.__dict__ | {"mix": list(settings.mix)},
            "samples": len(records), "per_class": dict(Counter(r["label"] for r in records)),
            "skipped_classes": [c for c in target.classes if c not in {r["label"] for r in records}],
            "bad_inputs": {}, "assignment": assignment_table(target) if settings.mode == "region" else None}


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier ``cervl compose`` output holding only what compose writes (it is
    replaced as a whole, so anything else in it would be lost)."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"-o {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise InvalidInput(f"-o {out} is not empty and is not a `cervl compose` output (no {MARKER}): choose a new "
                           f"or empty folder")
    foreign = [p for p in out.iterdir() if p.name not in OUTPUTS]
    if (out / "images").is_dir():
        foreign += [p for p in (out / "images").rglob("*") if p.is_file() and not re.fullmatch(r"\d{5}\.jpg", p.name)]
    if foreign:
        raise InvalidInput(f"-o {out} is a `cervl compose` output that also holds {foreign[0]}, which compose did not "
                           f"write and replacing the output would delete: move it, or choose a new folder")


def _scratch(out: Path, kind: str) -> Path:
    """The scratch folder ``new`` (made here, empty) or ``old`` (the name swap_in moves ``out`` to) beside
    ``out``. A leftover of an interrupted run must be recognisably compose's own; a leftover ``new`` is removed,
    a leftover ``old`` is kept until the new output is in place (it may be the only complete copy)."""
    path = out.parent / f".{out.name}.compose-{kind}"
    if path.exists() and not ((path / SCRATCH_MARKER).is_file() or (path / MARKER).is_file()):
        raise InvalidInput(f"{path} exists and is not a `cervl compose` scratch folder: move it away")
    if kind == "new":
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        (path / SCRATCH_MARKER).write_text("cervl compose builds its output here, then moves it in place\n")
    return path


def write_sheet(path: Path, out: Path, records: list[dict], classes: tuple[str, ...], cell: int = 150) -> None:
    """One composed image per class beside its two sources, labelled, as a PNG."""
    from PIL import ImageDraw, ImageFont

    first = {}
    for r in records:
        first.setdefault(r["label"], r)
    rows = [first[c] for c in classes if c in first]
    text_h, pad = 34, 6
    sheet = Image.new("RGB", (3 * (cell + pad) + pad, len(rows) * (cell + text_h + pad) + pad + 22), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    draw.text((pad, 4), "composed | source 1 | source 2", fill="black", font=font)
    for i, r in enumerate(rows):
        p = r["provenance"]
        y = 22 + pad + i * (cell + text_h + pad)
        srcs = (p["upper"], p["lower"]) if p["mode"] == "region" else (p["a"], p["b"])
        for j, img in enumerate((out / r["image"], *srcs)):
            with Image.open(img) as im:
                sheet.paste(im.convert("RGB").resize((cell, cell), Image.BICUBIC), (pad + j * (cell + pad), y))
        how = (f"upper: {p['upper_label']}, lower: {p['lower_label']} (seam row {p['seam_row']})"
               if p["mode"] == "region" else f"{p['weight_a']:.2f} x {p['a_label']} + {1 - p['weight_a']:.2f} x "
                                             f"{p['b_label']}")
        draw.text((pad, y + cell + 2), f"{r['label']}: {how}", fill="black", font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    path.write_bytes(buf.getvalue())


__all__ = ["ComposeSettings", "arrangement_score", "assignment", "assignment_table", "compose", "join_regions",
           "partner", "seam_row"]
