"""Training recipe depth (issue 22): augmentation, class-balanced sampling, alignment noise, flip-averaged landmarks."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cervl.train.augment import AffineSpec, AlignNoiseSpec, Augmenter, AugmentSpec
from cervl.train.config import ConfigError, load_config
from cervl.data.manifest import Record
from cervl.data.mixture import Mixture, Sample
from cervl.data.prepare import prepare_synthce
from test_train import adapter, cervl, recipe

SPEC = AugmentSpec(flip=0.5, affine=AffineSpec(scale=0.1, shift=0.05, rotate=10), color=0.2, blur=0.3, jpeg=[60, 95],
                   erase=0.5)


def face(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))


def test_same_seed_epoch_and_index_give_the_same_bytes_and_epochs_differ():
    aug = Augmenter(SPEC, seed=3)
    a = aug(face(), aug.key("x.jpg", 1, 7))
    b = Augmenter(SPEC, seed=3)(face(), aug.key("x.jpg", 1, 7))
    assert a.tobytes() == b.tobytes() and a.size == (112, 112)
    views = {aug(face(), aug.key("x.jpg", e, 7)).tobytes() for e in range(6)}
    assert len(views) == 6  # every epoch its own view
    assert Augmenter(SPEC, seed=4)(face(), (4, 1, 7)).tobytes() != a.tobytes()
    fixed = Augmenter(AugmentSpec(flip=0.5, color=0.3, views=3), seed=0)
    keys = {fixed.key("x.jpg", e, i) for e in range(20) for i in range(5)}
    assert {k[-1] for k in keys} == {0, 1, 2} and len({k[:2] for k in keys}) == 1  # 3 views of the one image


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    base = tmp_path_factory.mktemp("aug")
    prepare_synthce(base / "synthce", base / "m", per_class=4, seed=6, val_fraction=0.0)
    return base / "m"


def stage_data(tmp_path, manifests, augment, *, hash_images=True):
    from cervl.models.loading import build_tiny
    from cervl.train.stage_data import StageData

    path = recipe(tmp_path, manifests, stages=1, steps=6)
    data = yaml.safe_load(path.read_text())
    data["stages"][0]["augment"] = augment
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    return StageData(proc, cfg, cfg.stages[0], set(), world=1, rank=0, image_token_id=model.config.image_token_id,
                     hash_images=hash_images)


@pytest.mark.parametrize("views", [0, 3])
def test_no_vision_cache_key_is_shared_by_two_different_views(tmp_path, manifests, views):
    data = stage_data(tmp_path, manifests, {"preset": "frame", "erase": 0.3, "views": views})
    seen, fresh = {}, 0
    for step in range(data.total_steps):
        for batch in data.prepare(step):
            grid = batch["image_grid_thw"].prod(-1).tolist()
            starts = np.cumsum([0] + grid)
            for i, h in enumerate(batch["image_hashes"]):
                pixels = batch["pixel_values"][starts[i]:starts[i + 1]]
                if h is None:
                    fresh += 1
                    continue
                if h in seen:  # a cache hit would return the features of seen[h]: it must be this very view
                    assert torch.equal(seen[h], pixels), h
                seen[h] = pixels
    if views == 0:
        assert fresh == data.total_steps * data.global_batch and not seen  # fresh views are never cached
    else:
        assert fresh == 0 and all(":view" in h for h in seen)


def test_vision_cache_stores_nothing_for_a_fresh_view():
    from cervl.models.loading import build_tiny
    from cervl.models.loading import core_and_head
    from cervl.train.objective import VisionCache

    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    cache = VisionCache(model, proc, None, 64)
    enc = proc.image_processor([face(1), face(2)], return_tensors="pt")
    core = core_and_head(model)[0]
    cache.features(core, enc["pixel_values"], enc["image_grid_thw"], ["h1", None])
    assert len(cache.memory) == 1 and cache.misses == 2
    cache.features(core, enc["pixel_values"], enc["image_grid_thw"], ["h1", None])
    assert len(cache.memory) == 1 and cache.hits == 1 and cache.misses == 3


def samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Record(image=f"{c}{i}.jpg", label=c, label_set="rafdb-compound", split="train", dataset="x"),
                   f"{c}{i}.jpg") for c, n in counts.items() for i in range(n)]


def test_balanced_sampling_draws_classes_within_10_percent_of_uniform():
    pool = samples({"Happily Surprised": 500, "Sadly Angry": 150, "Fearfully Angry": 50})  # 10:3:1
    mix = Mixture([(pool, 2000 / len(pool), "balanced")], seed=0)
    drawn = mix.take(0, 2000)
    counts = {c: sum(s.record.label == c for s in drawn) for c in ("Happily Surprised", "Sadly Angry",
                                                                     "Fearfully Angry")}
    assert all(abs(n - 2000 / 3) <= 0.1 * 2000 / 3 for n in counts.values()), counts
    sqrt = Mixture([(pool, 2000 / len(pool), "sqrt")], seed=0).take(0, 2000)
    n_sqrt = {c: sum(s.record.label == c for s in sqrt) for c in counts}
    assert n_sqrt["Happily Surprised"] > n_sqrt["Sadly Angry"] > n_sqrt["Fearfully Angry"] > 150  # in between
    again = Mixture([(pool, 2000 / len(pool), "balanced")], seed=0).take(0, 2000)  # a pure function of (seed, epoch)
    assert [s.path for s in again] == [s.path for s in drawn]


def test_unknown_augmentation_key_and_bad_values_are_named(tmp_path, manifests):
    path = recipe(tmp_path, manifests, stages=1)
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\].augment.flipp'; did you mean 'flip'"):
        load_config(path, ["stages.0.augment={flipp: 0.5}"])
    with pytest.raises(ConfigError, match="did you mean 'rotate'"):
        load_config(path, ["stages.0.augment={affine: {rotation: 5}}"])
    with pytest.raises(ConfigError, match="did you mean 'frame'"):
        load_config(path, ["stages.0.augment={preset: frames}"])
    with pytest.raises(ConfigError, match="did you mean 'balanced'"):
        load_config(path, ["stages.0.data.0.sampling=balance"])
    with pytest.raises(ConfigError, match="probability"):
        load_config(path, ["stages.0.augment={erase: 2}"])


@pytest.mark.slow
def test_augmented_balanced_stage_resumes_bit_identically_and_logs_counts(tmp_path, manifests):
    def make(where):
        path = recipe(where, manifests, stages=1, steps=6)
        data = yaml.safe_load(path.read_text())
        data["stages"][0]["augment"] = {"preset": "frame", "erase": 0.25}
        data["stages"][0]["data"][0]["sampling"] = "balanced"
        path.write_text(yaml.safe_dump(data))
        return path

    assert cervl("train", make(tmp_path / "a"), "--no-progress").returncode == 0
    killed = make(tmp_path / "b")
    assert cervl("train", killed, "--no-progress", env={"CERVL_CRASH_AT": "checkpoint:4"}).returncode == -9
    res = cervl("train", killed, "--no-progress")
    assert res.returncode == 0 and "at step 4/6" in res.stderr, res.stderr[-2000:]
    a, b = adapter(tmp_path / "a" / "run", "compound"), adapter(tmp_path / "b" / "run", "compound")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stage = tmp_path / "a" / "run" / "stages" / "00-compound"
    done = json.loads((stage / "DONE.json").read_text())
    assert done["sampling"]["sources"] == ["balanced"] and sum(done["sampling"]["drawn_per_class"].values()) == 24
    assert done["augment"]["affine"] == {"scale": 0.06, "shift": 0.04, "rotate": 6.0} and done["augment"]["erase"] == 0.25
    assert (stage / "augment.png").is_file()


def test_alignment_noise_realigns_originals_from_perturbed_landmarks(tmp_path, manifests):
    from cervl.data.manifest import read_manifest
    from cervl.faces.align import align_face

    m = read_manifest(manifests / "synthce-compound-original.jsonl")
    r = next(iter(m))
    img = Image.open(m.image_path(r)).convert("RGB")
    errors = tmp_path / "err.json"
    errors.write_text(json.dumps({"offsets": [[[0.0, 0.0]] * 5]}))  # a detector with no error
    exact = Augmenter(AugmentSpec(align_noise=AlignNoiseSpec(file=str(errors))), 0)(img, (0, 0, 0), r.landmarks)
    assert exact.size == (112, 112)
    assert exact.tobytes() == align_face(img, np.asarray(r.landmarks), 112)[0].tobytes()
    errors.write_text(json.dumps({"offsets": [[[0.1, 0.0]] * 5]}))  # every point 0.1 iod to the face's right
    moved = np.asarray(Augmenter(AugmentSpec(align_noise=AlignNoiseSpec(file=str(errors))), 0)(img, (0, 0, 0),
                                                                                                  r.landmarks))
    # the crop follows the shifted landmarks: the face moves left by about 0.1 of the template's eye distance
    ref = np.asarray(exact, dtype=float).mean(2)
    shifts = [np.abs(np.roll(ref, -dx, axis=1)[:, 10:-10] - moved.astype(float).mean(2)[:, 10:-10]).mean()
              for dx in range(0, 7)]
    assert int(np.argmin(shifts)) in (3, 4)  # 0.1 x 35 px eye distance of the 112-px template


def test_flip_averaged_landmarks_cancel_a_detector_bias():
    from cervl.faces.detect import Face, FaceDetector
    from cervl.faces.landmarks import FlipAveraged

    truth = np.array([[40.0, 50], [72, 50], [56, 70], [44, 90], [68, 90]])

    class Biased(FaceDetector):  # always 3 px to the image's right: a bias that does not mirror with the face
        name = "biased"

        def detect(self, images):
            out = []
            for im in images:
                mirrored = np.asarray(im)[0, 0, 0] == 1
                lm = truth.copy()
                if mirrored:
                    lm = lm[[1, 0, 2, 4, 3]]
                    lm[:, 0] = im.size[0] - 1 - lm[:, 0]
                out.append([Face(np.array([30.0, 30, 82, 100]) if not mirrored else
                                 np.array([im.size[0] - 83.0, 30, im.size[0] - 31, 100]), 0.99, lm + [3.0, 0.0])])
            return out

    img = np.zeros((128, 112, 3), np.uint8)
    img[0, -1] = 1  # marks the mirror image (its pixel [0, 0] becomes 1)
    got = FlipAveraged(Biased()).detect([Image.fromarray(img)])[0][0].landmarks
    assert np.allclose(got, truth) and not np.allclose(Biased().detect([Image.fromarray(img)])[0][0].landmarks, truth)
