"""Zero-shot scoring with a base model and no run folder (issue 22, item 3)."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from cervl.models.loading import TINY_BASE, load_model
from cervl.predict import Predictor
from cervl.predict.predictor import items_from_paths


def cervl(*args):
    # offline, as tests must be: an unknown hub id fails at once instead of after the hub client's retries
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_zero_shot_predict_equals_a_predictor_built_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    res = cervl("predict", "--model", "pretrained-tiny", "--prompt", "minimal", "--label-set", "rafdb-basic",
                tmp_path / "imgs", "-o", tmp_path / "zs.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "zs.jsonl").read_text().splitlines()]
    model, processor = load_model(TINY_BASE, dtype="fp32")
    by_hand = list(Predictor(model, processor, "minimal", "rafdb-basic").predict(items_from_paths([tmp_path / "imgs"]),
                                                                                progress=False))
    for r in rows + by_hand:
        r.pop("latency_ms")
    assert rows == by_hand and len(rows) == 3
    meta = json.loads((tmp_path / "zs.jsonl.meta.json").read_text())
    assert meta["label_set"] == "rafdb-basic" and meta["prompt"] == "minimal" and meta["run"] == "zero-shot:pretrained-tiny"
    res = cervl("eval", tmp_path / "zs.jsonl", "-o", tmp_path / "rep")  # no labels: refused in one line
    assert res.returncode == 2 and "no predictions with a true label" in res.stderr


def test_zero_shot_errors_name_the_model(tmp_path):
    Image.new("RGB", (112, 112), (120, 90, 80)).save(tmp_path / "face.png")
    res = cervl("predict", "--model", "nobody/no-such-model", tmp_path, "-o", tmp_path / "x.jsonl")
    assert res.returncode == 2 and "cannot load model 'nobody/no-such-model'" in res.stderr
    assert "Traceback" not in res.stderr
    res = cervl("predict", tmp_path, "-o", tmp_path / "x.jsonl")
    assert res.returncode == 2 and "give --run RUN" in res.stderr
    res = cervl("predict", "--model", "pretrained-tiny", "--run", tmp_path, tmp_path, "-o", tmp_path / "x.jsonl")
    assert res.returncode == 2 and "not both" in res.stderr
