"""Saliency maps (issue 23): the methods on a hand-built scorer, the Qwen-VL adapter, the sanity check, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cervl.data.prepare import prepare_synthce
from cervl.explain.maps import (Explainer, ImageScorer, VLMScorer, gradient_maps, occlusion_maps, rank_correlation,
                                reinitialized)
from cervl.explain.regions import au_masks, class_region, energy_ratio, pointing_hit, score_maps
from cervl.predict import Predictor

SIZE, R0, R1 = 64, 24, 40  # the hand-built scorer looks at rows and columns R0..R1 only


class RegionScorer(ImageScorer):
    """p(class 0) = sigmoid(4 * mean normalised brightness of one square): nothing else can matter."""

    classes = ("looks", "other")
    fill = (128, 128, 128)
    patch = 1

    def to_tensor(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1

    def probs_tensor(self, x):
        z = 4 * x[:, :, R0:R1, R0:R1].mean(dim=(1, 2, 3))
        return torch.softmax(torch.stack([z, torch.zeros_like(z)], 1), dim=1)

    def probs(self, images):
        with torch.no_grad():
            return self.probs_tensor(torch.stack([self.to_tensor(im) for im in images])).numpy()


def bright_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(150, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_occlusion_puts_the_whole_map_in_the_region_the_scorer_reads():
    probs, maps = occlusion_maps(RegionScorer(), bright_image(), patch=4, stride=4)
    m = maps[0]
    inside = np.zeros_like(m, dtype=bool)
    inside[R0:R1, R0:R1] = True
    assert probs[0] > 0.5
    assert np.all(m[~inside] == 0) and np.all(m[inside] > 0)  # every patch outside changes nothing
    assert np.allclose(maps[1], -maps[0])  # two classes: what one gains the other loses
    # the default geometry (24-px patches) still peaks inside and keeps most mass there
    _, wide = occlusion_maps(RegionScorer(), bright_image(), patch=8, stride=2)
    assert inside.flat[int(np.argmax(wide[0]))] and wide[0][inside].sum() / wide[0].sum() > 0.4


def test_gradient_and_occlusion_agree_in_rank_on_the_hand_built_scorer():
    img = bright_image(1)
    _, occ = occlusion_maps(RegionScorer(), img, patch=4, stride=4)
    probs, classes, grads = gradient_maps(RegionScorer(), [img], [[0]])
    g = grads[0][0]
    assert g.shape == (SIZE, SIZE) and classes == [[0]]
    outside = np.ones_like(g, dtype=bool)
    outside[R0:R1, R0:R1] = False
    assert np.all(g[outside] == 0) and np.all(g[~outside] > 0)
    assert rank_correlation(occ[0], g) > 0.8


def test_explainer_picks_top2_all_or_named_classes():
    e = Explainer(RegionScorer(), "occlusion", patch=8, stride=8)
    assert e.explain([bright_image()], "top2")[0].classes == [0, 1]
    assert e.explain([bright_image()], ["other"])[0].classes == [1]
    assert Explainer(RegionScorer(), "gradient").explain([bright_image()], "all")[0].maps.shape == (2, SIZE, SIZE)
    with pytest.raises(Exception, match="did you mean 'occlusion'"):
        Explainer(RegionScorer(), "oclusion")


@pytest.fixture(scope="module")
def tiny():
    return Predictor.from_model("pretrained-tiny", prompt="minimal", label_set="rafdb-compound")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("explain")
    prepare_synthce(base / "synthce", base / "m", per_class=2, seed=5, val_fraction=0.0)
    return base / "m" / "synthce-compound-aligned.jsonl"


def test_vlm_scorer_round_trips_pixels_and_scores_like_the_exact_scorer(tiny, synth):
    from cervl.predict.predictor import items_from_manifest

    images = [Image.open(i.image).convert("RGB") for i in items_from_manifest(synth, ["train"])[:3]]
    s = VLMScorer(tiny)
    enc = tiny.processor.image_processor(images[:1], return_tensors="pt")
    x = s.to_tensor(images[0])
    assert x.shape == (3, 112, 112) and torch.equal(s.patchify(x), enc["pixel_values"])
    with torch.no_grad():
        by_tensor = s.probs_tensor(torch.stack([s.to_tensor(im) for im in images])).numpy()
    assert np.allclose(by_tensor, tiny.score(images), atol=1e-5)


def test_reinitialised_model_gives_different_maps(tiny, synth):
    from cervl.predict.predictor import items_from_manifest

    items = items_from_manifest(synth, ["train"])[:3]
    images = [Image.open(i.image).convert("RGB") for i in items]
    trained = Explainer(VLMScorer(tiny), "gradient").explain(images, [i.label for i in items][:1])
    random = Explainer(VLMScorer(reinitialized(tiny)), "gradient").explain(images, [i.label for i in items][:1])
    corr = [rank_correlation(a.maps[0], b.maps[0]) for a, b in zip(trained, random)]
    assert np.nanmedian(corr) < 0.3, corr
    assert not torch.equal(next(tiny.model.parameters()), next(reinitialized(tiny).model.parameters()))


def test_au_regions_come_from_the_generator_and_score_maps():
    masks = au_masks()
    # brows above eyes above mouth above jaw, as the drawing code moves them
    centre = {au: np.nonzero(m)[0].mean() for au, m in masks.items()}
    assert centre[4] < centre[5] < centre[12] < centre[26]
    region = class_region("Happily Surprised")
    assert 0.03 < region.mean() < 0.15 and not class_region("Neutral").any()
    inside = np.where(region, 1.0, 0.0)
    assert pointing_hit(inside, region) and energy_ratio(inside, region) == pytest.approx(1 / region.mean())
    plateau = np.zeros((112, 112))
    ys, xs = np.nonzero(region)
    plateau[ys[0], :] = 1.0  # a flat maximum along one row that crosses the region: ties count in expectation
    assert pointing_hit(plateau, region) == pytest.approx(region[ys[0]].mean())
    uniform = np.ones((56, 56))
    assert energy_ratio(uniform, region) == pytest.approx(1.0, abs=0.05)
    scores = score_maps([("Happily Surprised", inside), ("Happily Surprised", -inside)])
    assert scores["overall"]["n"] == 2 and scores["Happily Surprised"]["pointing"] == 0.5


def cervl(*args):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_explain_cli_writes_maps_report_section_and_au_check(tmp_path, synth):
    out = tmp_path / "ex"
    res = cervl("explain", "--model", "pretrained-tiny", "--manifest", synth, "--split", "train", "-o", out,
                "--method", "gradient", "--au-check")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "explain.json").read_text())
    assert summary["n"] == 22 and len(summary["images"]) == 22 and "AU regions (SynthCE)" in res.stdout
    first = np.load(out / summary["images"][0]["npz"])
    assert first["maps"].shape == (2, 112, 112) and first["probs"].shape == (11,) and len(first["classes"]) == 2
    assert (out / summary["images"][0]["png"]).is_file() and (out / "class_means.png").is_file()
    assert 0 <= summary["au_regions"]["pointing"] <= 1 and summary["au_regions"]["n"] == 22
    section = (out / "where_it_looks.html").read_text()
    assert "Where the model looks" in section and "class_means.png" in section
    # cervl eval embeds the section
    preds = tmp_path / "p.jsonl"
    assert cervl("predict", "--model", "pretrained-tiny", "--manifest", synth, "--split", "train", "-o", preds
                 ).returncode == 0
    res = cervl("eval", preds, "-o", tmp_path / "rep", "--explain", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Where the model looks" in (tmp_path / "rep" / "report.html").read_text()
    res = cervl("eval", preds, "-o", tmp_path / "rep2", "--explain", tmp_path)
    assert res.returncode == 2 and "no where_it_looks.html" in res.stderr


@pytest.mark.slow
def test_explain_cli_on_a_raw_photo_with_align_and_on_video_frames(tmp_path):
    import cv2
    from skimage import data as skdata

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=92)
    Image.new("RGB", (200, 200), (90, 140, 200)).save(tmp_path / "sky.jpg")
    vw = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 240))
    frame = cv2.cvtColor(cv2.resize(skdata.astronaut(), (320, 320))[:240], cv2.COLOR_RGB2BGR)
    for t in range(6):
        vw.write(np.roll(frame, 3 * t, axis=1))
    vw.release()
    out = tmp_path / "ex"
    res = cervl("explain", "--model", "pretrained-tiny", photo, tmp_path / "sky.jpg", tmp_path / "clip.avi",
                "--align", "--every", "2", "--method", "gradient", "--classes", "all", "-o", out)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "explain.json").read_text())
    ids = [r["id"] for r in summary["images"]]
    assert ids == ["astronaut.jpg", "clip/00001", "clip/00003", "clip/00005"], ids
    assert [f["id"] for f in summary["failed"]] == ["sky.jpg"] and "1 without a face" in res.stdout
    maps = np.load(out / summary["images"][0]["npz"])["maps"]
    assert maps.shape == (11, 112, 112)  # --classes all, over the aligned crop
