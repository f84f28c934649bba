"""``cervl pseudo-label``: which frames become compound labels (issue 21, item 2)."""

import json
import subprocess
import sys

import pytest

from cervl.data.manifest import Record, read_manifest
from cervl.data.prepare import prepare_synthce
from cervl.labels import get_label_set
from cervl.pseudo import Frame, coverage, select, stable
from helpers import train_quick

COMPOUND = get_label_set("rafdb-compound")


def frame(n, top, p, basic="Happiness", video="v"):
    probs = {c: (1 - p) / (len(COMPOUND) - 1) for c in COMPOUND.classes}
    probs[top] = p
    rec = Record(image=f"{video}/{n:05d}.jpg", label=basic, label_set="rafdb-basic", split="train", dataset="aw",
                 video=video, frame=n)
    return Frame(rec, f"/data/{video}/{n:05d}.jpg", probs)


def test_the_right_frames_are_kept_on_a_hand_made_sequence():
    hs, sa = "Happily Surprised", "Sadly Angry"
    seq = [frame(1, hs, 0.9), frame(2, hs, 0.9, basic="Sadness"), frame(3, hs, 0.6), frame(4, hs, 0.9),
           frame(5, hs, 0.9), frame(6, sa, 0.95), frame(7, hs, 0.9), frame(1, sa, 0.8, basic=None, video="w")]
    assert stable(seq, 1) == [True, True, True, True, False, False, False, True]
    kept = select(seq, COMPOUND, threshold=0.7, window=1, run="r")
    # 1: kept; 2: annotated Sadness is no component of Happily Surprised; 3: p below the threshold;
    # 4: kept; 5 and 7: a neighbour's top class differs; 6: Happiness is no component of Sadly Angry;
    # w/1: unlabelled, alone in its video, p 0.8: kept
    assert [(r.video, r.frame, r.label) for r in kept] == [("v", 1, hs), ("v", 4, hs), ("w", 1, sa)]
    assert kept[0].provenance == {"mode": "pseudo-label", "from": "/data/v/00001.jpg", "p": 0.9,
                                  "annotated": "Happiness", "run": "r", "threshold": 0.7, "window": 1}
    # without the temporal check frames 5 and 7 pass too; a lower threshold lets frame 3 in
    assert len(select(seq, COMPOUND, threshold=0.7, window=0, run="r")) == 5
    table = coverage(seq, window=1, thresholds=(0.5, 0.7, 0.85),
                     truth={"/data/v/00001.jpg": hs, "/data/v/00004.jpg": "Sadly Fearful", "/data/w/00001.jpg": sa})
    assert [(r["threshold"], r["kept"], r["precision"]) for r in table] == [(0.5, 4, 0.5), (0.7, 3, 2 / 3),
                                                                          (0.85, 2, 0.5)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pseudo")
    prepare_synthce(base / "synthce", base / "m", per_class=3, seed=9)
    train_quick(base, base / "m" / "synthce-compound-aligned.jsonl")
    return base


def test_cli_pseudo_label_with_truth(run, tmp_path):
    manifest = run / "m" / "synthce-compound-aligned.jsonl"
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "pseudo-label", "--run", run / "run", "--manifest",
                          manifest, "--split", "train", "-o", tmp_path / "p.jsonl", "--threshold", "0.05",
                          "--truth", manifest], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "p.jsonl.summary.json").read_text())
    n = sum(r.split == "train" for r in read_manifest(manifest))
    assert summary["scored"] == n and "precision" in res.stdout
    kept = read_manifest(tmp_path / "p.jsonl")
    assert len(kept) == summary["kept"]
    assert all(r.provenance["p"] >= 0.05 and r.label in COMPOUND for r in kept)
    assert [r["threshold"] for r in summary["coverage"]] == [0.5, 0.6, 0.7, 0.8, 0.9]
