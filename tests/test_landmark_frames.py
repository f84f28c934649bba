"""Landmark frames (issue 28, defect 2): `cervl align` stores the photo's landmarks beside the aligned crop; every
consumer (compose, alignment noise, pseudo-label) must use them in the pixels of the image it opens."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from cervl.core.images import load_rgb
from cervl.data.manifest import ManifestError, Record, read_manifest, write_manifest
from cervl.data.prepare import prepare_synthce
from cervl.faces.align import apply_affine, fit_similarity, template
from helpers import train_quick

skimage_data = pytest.importorskip("skimage.data")
cbook = pytest.importorskip("matplotlib.cbook")

# which basic emotion each photo's face is labelled with (the labels are made up; the faces are real)
LABELS = {"astronaut": "Surprise", "astronaut_mirrored": "Surprise", "hopper": "Happiness",
          "hopper_mirrored": "Happiness"}


def cervl(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def crop_landmarks(rec: dict) -> np.ndarray:
    """A record's photo-frame landmarks mapped into its 112-px crop, by align's own transform."""
    lm = np.asarray(rec["landmarks"], dtype=float)
    return apply_affine(fit_similarity(lm, template(112)), lm)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """`cervl align` on four real photos (two people, each also mirrored), then a labelled manifest of its records."""
    base = tmp_path_factory.mktemp("frames")
    photos = base / "photos"
    photos.mkdir()
    astronaut = Image.fromarray(skimage_data.astronaut())
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    for name, im in (("astronaut", astronaut), ("hopper", hopper)):
        im.save(photos / f"{name}.jpg", quality=92)
        ImageOps.mirror(im).save(photos / f"{name}_mirrored.jpg", quality=92)
    cervl("align", photos, "-o", base / "al")
    m = read_manifest(base / "al" / "manifest.jsonl")
    raw = [json.loads(line) for line in (base / "al" / "manifest.jsonl").read_text().splitlines()]
    assert len(raw) == 4 and all(r["landmarks_frame"] == "source" for r in raw)  # align says which frame
    recs = [Record(**{**r.to_json(), "image": str(m.image_path(r)), "root": None,
                      "label": LABELS[r.sample_id.split(".")[0]], "label_set": "rafdb-basic", "split": "train",
                      "aus": {"AU12": 0.5 + i / 10}}) for i, r in enumerate(m)]
    write_manifest(base / "labelled.jsonl", recs)
    # the same records as a manifest written before the field existed: the frame follows from `source`
    old = [{k: v for k, v in r.to_json().items() if k != "landmarks_frame"} for r in recs]
    (base / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    return base


def test_a_record_gives_its_landmarks_in_the_pixels_of_its_image(aligned):
    raw = json.loads((aligned / "al" / "manifest.jsonl").read_text().splitlines()[0])
    photo_lm = np.asarray(raw["landmarks"])
    assert photo_lm[2:, 1].min() > 112  # the photo's pixels: nose and mouth past the crop's bottom row
    for name in ("labelled.jsonl", "old.jsonl"):
        r = next(iter(read_manifest(aligned / name)))
        assert r.frame_of_landmarks == "source"
        lm = r.landmarks_for_image((112, 112))
        assert np.allclose(lm, crop_landmarks(raw)) and np.abs(lm - template(112)).max() < 8  # near the template
    plain = Record(image="x.jpg", label=None, label_set="basic-7", split="test", dataset="d", landmarks=raw["landmarks"])
    assert plain.frame_of_landmarks == "image" and np.allclose(plain.landmarks_for_image((512, 512)), photo_lm)
    with pytest.raises(ManifestError, match="not a square aligned crop"):
        Record(**{**raw, "variant": "original"}).landmarks_for_image((112, 112))
    with pytest.raises(ManifestError, match="landmarks_frame"):
        from cervl.data.manifest import validate_record
        validate_record({**raw, "source": None, "landmarks_frame": "source"})


def test_compose_seam_lies_between_the_eyes_and_the_mouth_of_the_crop(aligned, tmp_path):
    cervl("compose", aligned / "labelled.jsonl", "-o", tmp_path / "c", "--per-class", "3", "--feather", "6")
    out = read_manifest(tmp_path / "c" / "manifest.jsonl")
    assert len(out) == 3 and {r.label for r in out} == {"Happily Surprised"}
    by_crop = {str(read_manifest(aligned / "labelled.jsonl").image_path(r)): r
               for r in read_manifest(aligned / "labelled.jsonl")}
    for r in out:
        p = r.provenance
        lms = [crop_landmarks(by_crop[p[k]].to_json()) for k in ("upper", "lower")]
        eyes, noses, mouths = ([lm[:2, 1].mean() for lm in lms], [lm[2, 1] for lm in lms],
                               [lm[3:, 1].mean() for lm in lms])
        want = np.mean([e + 0.7 * (n - e) for e, n in zip(eyes, noses)])
        assert max(eyes) < p["seam_row"] < min(mouths) and p["seam_row"] == pytest.approx(want, abs=0.01)
        # the pixels: the upper crop above the seam, the lower crop below it
        img = np.asarray(load_rgb(out.image_path(r)), dtype=float)
        upper, lower = (np.asarray(load_rgb(p[k]), dtype=float) for k in ("upper", "lower"))
        top, bottom = int(p["seam_row"] - 5), int(p["seam_row"] + 6)
        assert np.abs(img[:top] - upper[:top]).mean() < 4 < np.abs(img[:top] - lower[:top]).mean()
        assert np.abs(img[bottom:] - lower[bottom:]).mean() < 4 < np.abs(img[bottom:] - upper[bottom:]).mean()


def _stage_data(aligned, tmp_path, offsets):
    from cervl.train.config import load_config
    from cervl.models.loading import build_tiny
    from cervl.train.stage_data import StageData

    (tmp_path / "err.json").write_text(json.dumps({"offsets": [offsets]}))
    cfg = {"model": {"name": "tiny-qwen2-vl"}, "output_dir": str(tmp_path / "run"), "checkpoint_every": 0,
           "stages": [{"name": "s", "data": [{"manifest": str(aligned / "labelled.jsonl")}], "label_set": "rafdb-basic",
                       "prompt": "minimal", "max_steps": 1, "batch_size": 4, "lr": 1e-3,
                       "augment": {"align_noise": {"file": str(tmp_path / "err.json")}}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    cfg = load_config(tmp_path / "r.yaml")
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    return StageData(proc, cfg, cfg.stages[0], set(), world=1, rank=0, image_token_id=model.config.image_token_id)


def test_an_align_noise_view_with_zero_noise_is_the_aligned_crop(aligned, tmp_path):
    data = _stage_data(aligned, tmp_path, [[0.0, 0.0]] * 5)  # a detector with no error
    samples = data.mixture.take(0, 4)
    for i, s in enumerate(samples):
        view = np.asarray(data.view(i, s)[0], dtype=float)
        crop = np.asarray(load_rgb(s.path), dtype=float)
        assert view.shape == crop.shape and np.abs(view - crop).mean() < 0.5 and np.abs(view - crop).max() <= 8
    # every point 0.1 iod to the face's right: the face moves left by ~0.1 of the crop's eye distance (~3.5 px)
    data = _stage_data(aligned, tmp_path, [[0.1, 0.0]] * 5)
    s = samples[0]
    ref, moved = (np.asarray(im, dtype=float).mean(2) for im in (load_rgb(s.path), data.view(0, s)[0]))
    err = [np.abs(np.roll(ref, -dx, axis=1)[:, 10:-10] - moved[:, 10:-10]).mean() for dx in range(7)]
    assert int(np.argmin(err)) in (3, 4)


def test_pseudo_label_keeps_source_bbox_aus_and_the_frame(aligned, tmp_path):
    prepare_synthce(tmp_path / "synthce", tmp_path / "m", per_class=2, seed=4)
    run = train_quick(tmp_path, tmp_path / "m" / "synthce-compound-aligned.jsonl")
    unlabelled = [Record(**{**r.to_json(), "label": None}) for r in read_manifest(aligned / "labelled.jsonl")]
    write_manifest(tmp_path / "frames.jsonl", unlabelled)
    cervl("pseudo-label", "--run", run, "--manifest", tmp_path / "frames.jsonl", "-o", tmp_path / "p.jsonl",
          "--threshold", "0.01")
    kept = {r.provenance["from"]: r for r in read_manifest(tmp_path / "p.jsonl")}
    assert len(kept) == 4
    for r in unlabelled:
        k = kept[r.image]
        assert (k.source, k.bbox, k.aus, k.landmarks) == (r.source, r.bbox, r.aus, r.landmarks)
        assert k.source is not None and k.landmarks_frame == "source"
        assert np.allclose(k.landmarks_for_image((112, 112)), r.landmarks_for_image((112, 112)))


def test_landmark_error_compares_points_in_the_image_the_detector_sees(aligned):
    from cervl.faces.detect import Face, FaceDetector
    from cervl.evaluate.landmarks import measure_landmark_error

    class OnTemplate(FaceDetector):  # finds every 112-px crop's face exactly on the template
        name = "template"

        def detect(self, images):
            return [[Face(np.array([20.0, 20, 92, 100]), 0.99, template(112))] for _ in images]

    res = measure_landmark_error(aligned / "labelled.jsonl", OnTemplate(), progress=False)
    # the truth is align's points mapped into the crop: within a few percent of the template, none missed
    assert res["found"] == 4 and res["missed"] == 0 and res["nme_mean"] < 0.1
