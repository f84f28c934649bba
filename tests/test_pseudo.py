"""``cervl pseudo-label``: which frames become compound labels (issue 21, item 2)."""

import json
from collections import Counter
import subprocess
import sys

import pytest

from cervl.data.manifest import Record, read_manifest, write_manifest
from cervl.data.prepare import prepare_synthce
from cervl.core.labels import get_label_set
from cervl.predict.pseudo import Frame, coverage, select, stable
from helpers import train_quick

COMPOUND = get_label_set("rafdb-compound")


def frame(n, top, p, basic="Happiness", video="v", face="", split="train"):
    probs = {c: (1 - p) / (len(COMPOUND) - 1) for c in COMPOUND.classes}
    probs[top] = p
    rec = Record(image=f"{video}/{n:05d}{face}.jpg", label=basic, label_set="rafdb-basic", split=split, dataset="aw",
                 id=f"{video}/{n:05d}{face}", video=video, frame=n)
    return Frame(rec, f"/data/{video}/{n:05d}{face}.jpg", probs)


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


def test_cli_pseudo_label_keeps_splits_and_says_so(run, tmp_path):
    manifest = run / "m" / "synthce-compound-aligned.jsonl"
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "pseudo-label", "--run", run / "run", "--manifest",
                          manifest, "-o", tmp_path / "p.jsonl", "--threshold", "0.01"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_manifest(manifest)
    split_of = {str(m.image_path(r)): r.split for r in m}
    kept = read_manifest(tmp_path / "p.jsonl")
    counts = Counter(r.split for r in m)
    assert len(kept) == len(m) and set(counts) == {"train", "val", "test"}
    assert all(r.split == split_of[r.image] for r in kept)  # val and test frames do not become training data
    summary = json.loads((tmp_path / "p.jsonl.summary.json").read_text())
    assert summary["splits"] == ["test", "train", "val"] and summary["per_split"] == dict(sorted(counts.items()))
    assert f"test: {counts['test']}" in res.stdout and "keeps its own" in res.stdout


def test_a_basic_run_is_refused_in_one_line(run, tmp_path):
    basic = train_quick(tmp_path, run / "m" / "synthce-basic-aligned.jsonl", label_set="rafdb-basic", name="basic")
    m = read_manifest(run / "m" / "synthce-basic-aligned.jsonl")
    write_manifest(tmp_path / "unlabelled.jsonl",
                   [Record(**{**r.to_json(), "image": str(m.image_path(r)), "root": None, "label": None}) for r in m])
    for frames in (run / "m" / "synthce-basic-aligned.jsonl", tmp_path / "unlabelled.jsonl"):  # labelled, unlabelled
        res = subprocess.run([sys.executable, "-m", "cervl.cli", "pseudo-label", "--run", basic, "--manifest", frames,
                              "-o", tmp_path / "p.jsonl", "--threshold", "0.01"], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        assert "needs a compound run" in res.stderr and "rafdb-basic" in res.stderr
        assert not (tmp_path / "p.jsonl").exists()


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


def test_the_window_counts_records_of_the_same_track_not_frame_numbers():
    hs, sa = "Happily Surprised", "Sadly Angry"
    # frames prepared --every 3: the middle frame flickers, and its neighbours are 3 frame numbers away
    every3 = [frame(n, sa if n == 7 else hs, 0.9) for n in (1, 4, 7, 10, 13)]
    assert stable(every3, 1) == [True, False, False, False, True]
    assert [r.frame for r in select(every3, COMPOUND, threshold=0.7, window=1, run="r")] == [1, 13]
    # two faces in each frame (cervl align --faces all names the second "#face1"): a steady face beside a
    # flickering one; each is judged on its own track
    two = [f for n in range(1, 5) for f in (frame(n, hs, 0.9), frame(n, (sa, hs)[n % 2], 0.9, face="#face1"))]
    assert stable(two, 1) == [True, False] * 4
    # records out of frame order are ordered by frame within their track
    assert stable(list(reversed(every3)), 1) == [True, False, False, False, True]


def test_each_kept_record_keeps_its_split():
    hs = "Happily Surprised"
    seq = [frame(1, hs, 0.9, split="train"), frame(2, hs, 0.9, split="val", video="w"),
           frame(3, hs, 0.9, split="test", video="x")]
    assert [r.split for r in select(seq, COMPOUND, threshold=0.7, window=2, run="r")] == ["train", "val", "test"]
