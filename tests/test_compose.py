"""``cervl compose``: composed compound faces from basic-labelled faces (issue 21, item 1)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cervl.data.compose import (UPPER_AUS, ComposeSettings, assignment, compose, join_regions, seam_row)
from cervl.data.manifest import Record, read_manifest, write_manifest
from cervl.data.prepare import prepare_synthce
from cervl.core.facs import PROTOTYPES
from cervl.core.labels import COMPOUND, components


def cervl(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("compose")
    prepare_synthce(base / "synthce", base / "m", per_class=4, seed=6)
    return base


def test_the_assignment_follows_the_au_prototypes():
    # recomputed here from the prototypes, independently of the module's helpers
    def presence(e):
        return {**PROTOTYPES[e].optional, **{a: 1.0 for a in PROTOTYPES[e].required}}

    for c in COMPOUND:
        want = presence(c)

        def score(up, low):
            got = {a: v for a, v in presence(up).items() if a in UPPER_AUS}
            got.update({a: v for a, v in presence(low).items() if a not in UPPER_AUS})
            return sum(v * (2 * want.get(a, 0) - 1) for a, v in got.items())

        a, b = components(c)
        expected = (a, b) if score(a, b) >= score(b, a) else (b, a)
        assert assignment(c) == expected, c
    # the brows and wide eyes of surprise above, the smile below
    assert assignment("Happily Surprised") == ("Surprise", "Happiness")
    assert assignment("Angrily Surprised") == ("Anger", "Surprise")  # lowered brows above, dropped jaw below


def test_the_seam_lies_where_the_landmarks_say():
    assert seam_row(112) == pytest.approx(51.6 + 0.7 * (71.74 - 51.6))
    lm = [[30, 40], [70, 40], [50, 70], [35, 90], [65, 90]]  # eyes at row 40, nose tip at 70
    assert seam_row(112, lm) == pytest.approx(40 + 0.7 * 30)
    black, white = np.zeros((112, 112, 3)), np.full((112, 112, 3), 255.0)
    out = join_regions(black, white, seam=61.0, feather=12)[:, 50, 0].astype(float)
    assert out[:55].max() == 0 and out[67:].min() == 255  # the upper face above, the lower below the feather
    assert abs(np.interp(127.5, out, np.arange(112)) - 61.0) <= 0.5  # half-way exactly at the seam


def _tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".jpg", ".jsonl")}


def test_provenance_reproducibility_and_bad_inputs(synth, tmp_path):
    manifest = synth / "m" / "synthce-basic-aligned.jsonl"
    # a broken image listed among the inputs is skipped and counted, not fatal
    recs = [Record(**{**r.to_json(), "image": str(read_manifest(manifest).image_path(r)), "root": None})
            for r in read_manifest(manifest)]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    recs.append(Record(image=str(tmp_path / "broken.jpg"), label="Fear", label_set="rafdb-basic", split="train",
                       dataset="x"))
    write_manifest(tmp_path / "in.jsonl", recs)
    one = compose(tmp_path / "in.jsonl", tmp_path / "one", ComposeSettings(per_class=6, seed=3), workers=1)
    compose(tmp_path / "in.jsonl", tmp_path / "two", ComposeSettings(per_class=6, seed=3), workers=2)
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two") and one["samples"] == 66
    assert sum(one["bad_inputs"].values()) == 1
    out = read_manifest(tmp_path / "one" / "manifest.jsonl")
    for r in out:
        p = r.provenance
        assert p["mode"] == "region" and Path(p["upper"]).is_file() and Path(p["lower"]).is_file()
        assert p["upper"] != p["lower"] and (p["upper_label"], p["lower_label"]) == assignment(r.label)
        assert out.image_path(r).is_file()
    mix = compose(tmp_path / "in.jsonl", tmp_path / "mix", ComposeSettings(mode="mixup", per_class=2, mix=(0.3, 0.7)))
    weights = [r.provenance["weight_a"] for r in read_manifest(tmp_path / "mix" / "manifest.jsonl")]
    assert mix["samples"] == 22 and all(0.3 <= w <= 0.7 for w in weights) and len(set(weights)) > 1
    assert Image.open(tmp_path / "one" / "sample_sheet.png").size[1] > 11 * 150


def test_a_folder_compose_did_not_write_is_refused(synth, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "compose", synth / "m" / "synthce-basic-aligned.jsonl",
                          "-o", tmp_path / "mine"], capture_output=True, text=True)
    assert res.returncode == 2 and "is not a `cervl compose` output" in res.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_compose_train_eval_end_to_end(synth, tmp_path):
    cervl("compose", synth / "m" / "synthce-basic-aligned.jsonl", "-o", tmp_path / "c", "--per-class", "4")
    cfg = {"model": {"name": "pretrained-tiny"}, "output_dir": str(tmp_path / "run"), "checkpoint_every": 0,
           "stages": [{"name": "composed", "data": [{"manifest": str(tmp_path / "c" / "manifest.jsonl")}],
                       "label_set": "rafdb-compound", "prompt": "minimal", "max_steps": 2, "batch_size": 4,
                       "lr": 1e-3, "lora": {"rank": 4, "alpha": 8}}],
           "test": {"manifest": str(synth / "m" / "synthce-compound-aligned.jsonl"), "splits": ["test"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    res = cervl("train", tmp_path / "r.yaml", "--no-progress")
    assert "test accuracy (rafdb-compound, 11 samples)" in res.stdout
    res = cervl("eval", tmp_path / "run" / "eval" / "test_predictions.jsonl", "-o", tmp_path / "rep")
    assert "(n=11)" in res.stdout
    assert json.loads((tmp_path / "run" / "stages" / "00-composed" / "DONE.json").read_text())["steps"] == 2


def test_a_failed_compose_leaves_the_earlier_output_intact(synth, tmp_path):
    cervl("compose", synth / "m" / "synthce-basic-aligned.jsonl", "-o", tmp_path / "c", "--per-class", "2")
    before = _tree_bytes(tmp_path / "c")
    assert sum(k.startswith("images/") for k in before) == 22
    typo = synth / "m" / "synthce-basic-aligend.jsonl"
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "compose", typo, "-o", tmp_path / "c", "--per-class", "3"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "not found" in res.stderr
    assert _tree_bytes(tmp_path / "c") == before  # the manifest and every image it lists, byte for byte
    m = read_manifest(tmp_path / "c" / "manifest.jsonl")
    assert len(m) == 22 and all(m.image_path(r).is_file() for r in m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no scratch folder left beside it
    # a good run replaces the output as a whole; a file compose did not write stops it before anything changes
    cervl("compose", synth / "m" / "synthce-basic-aligned.jsonl", "-o", tmp_path / "c", "--per-class", "1")
    assert len(read_manifest(tmp_path / "c" / "manifest.jsonl")) == 11
    assert sum(k.startswith("images/") for k in _tree_bytes(tmp_path / "c")) == 11
    (tmp_path / "c" / "notes.txt").write_text("mine")
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "compose", synth / "m" / "synthce-basic-aligned.jsonl",
                          "-o", tmp_path / "c"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "notes.txt" in res.stderr and (tmp_path / "c" / "notes.txt").read_text() == "mine"
