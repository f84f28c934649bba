"""The real commands end to end on a tiny run: train -> predict -> eval -> compare, align, abaw."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cervl.data.prepare import prepare_synthce as _prepare_synth
from helpers import train_quick


def cervl(*args):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    _prepare_synth(base / "synthce", base / "m", per_class=3, seed=9, val_fraction=0.0)
    train_quick(base, base / "m" / "synthce-compound-aligned.jsonl")
    return base


def test_predict_eval_compare(run):
    m = run / "m"
    for variant in ("aligned", "original"):
        res = cervl("predict", "--run", run / "run", "--manifest", m / f"synthce-compound-{variant}.jsonl",
                    "--split", "test", "-o", run / f"{variant}.jsonl")
        assert res.returncode == 0, res.stderr[-2000:]
        rows = [json.loads(l) for l in (run / f"{variant}.jsonl").read_text().splitlines()]
        assert len(rows) == 11 and all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)
        res = cervl("eval", run / f"{variant}.jsonl", "-o", run / f"rep-{variant}")
        assert res.returncode == 0 and "report:" in res.stdout, res.stderr[-2000:]
        metrics = json.loads((run / f"rep-{variant}" / "metrics.json").read_text())
        acc = np.mean([r["pred"] == r["label"] for r in rows])
        assert metrics["accuracy"] == pytest.approx(acc) and metrics["n"] == 11
    res = cervl("compare", run / "rep-aligned", run / "rep-original", "-o", run / "cmp")
    assert res.returncode == 0 and "| accuracy |" in res.stdout
    gen = cervl("predict", "--run", run / "run", "--manifest", m / "synthce-compound-aligned.jsonl", "--split",
                "test", "--mode", "generate", "-o", run / "gen.jsonl")
    assert gen.returncode == 0 and "invalid answers" in gen.stdout, gen.stderr[-2000:]


def test_predict_reports_corrupt_images_and_goes_on(run, tmp_path):
    Image.new("RGB", (112, 112), (120, 90, 80)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = cervl("predict", "--run", run / "run", tmp_path, "-o", tmp_path / "p.jsonl")
    assert res.returncode == 0 and "1 unreadable images" in res.stdout
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    assert rows["broken.jpg"]["pred"] is None and "error" in rows["broken.jpg"]
    assert rows["ok.jpg"]["pred"] is not None


def test_align_folder_and_manifest_with_landmarks(run, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(photos / "astronaut.jpg")
    Image.new("RGB", (200, 150), (40, 120, 200)).save(photos / "sky.jpg")
    res = cervl("align", photos, "-o", tmp_path / "al")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "al" / "summary.json").read_text())
    # the JPEG-compressed astronaut also gives a weak second detection (score 0.87, on the suit's
    # badge): the status says "multiple" and the largest face is the one aligned
    faces = summary["status"].get("ok", 0) + summary["status"].get("multiple", 0)
    assert faces == 1 and summary["status"]["no_face"] == 1 and summary["crops"] == 1
    rec = json.loads((tmp_path / "al" / "manifest.jsonl").read_text().splitlines()[0])
    assert rec["source"].endswith("astronaut.jpg") and len(rec["landmarks"]) == 5
    x1, y1, x2, y2 = rec["bbox"]
    assert 160 < x1 < 200 and 40 < y1 < 80 and 250 < x2 < 290 and 160 < y2 < 200  # the face, not the badge
    assert Image.open(tmp_path / "al" / rec["image"]).size == (112, 112)
    # two worker processes give the same crops, in the same order; an unreadable file is reported
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(skimage_data.astronaut()).save(photos / "b_astronaut.jpg")
    res = cervl("align", photos, "-o", tmp_path / "al_w2", "--workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "al_w2" / "summary.json").read_text())
    faces = summary["status"].get("ok", 0) + summary["status"].get("multiple", 0)
    assert faces == 2 and summary["status"]["no_face"] == summary["status"]["unreadable"] == 1
    assert summary["workers"] == 2
    recs = [json.loads(x) for x in (tmp_path / "al_w2" / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["astronaut.jpg", "b_astronaut.jpg"]
    assert recs[0]["landmarks"] == recs[1]["landmarks"] == rec["landmarks"]
    # a manifest with known landmarks (SynthCE originals) is aligned without detection
    res = cervl("align", run / "m" / "synthce-compound-original.jsonl", "-o", tmp_path / "al2")
    assert res.returncode == 0
    assert json.loads((tmp_path / "al2" / "summary.json").read_text())["status"] == {"given_landmarks": 33}


def test_abaw_command_on_frame_folders(run, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    face = Image.fromarray(skimage_data.astronaut()).crop((140, 20, 320, 220))
    for video, n in (("v1", 3), ("v2", 2)):
        (tmp_path / "videos" / video).mkdir(parents=True)
        for i in range(1, n + 1):
            canvas = Image.new("RGB", (320, 240), (110, 110, 110))
            canvas.paste(face, (40 + 5 * i, 20))
            canvas.save(tmp_path / "videos" / video / f"{i:05d}.jpg")
    # two worker processes, one video each: lines still come in video order
    res = cervl("abaw", tmp_path / "videos", "--run", run / "run", "-o", tmp_path / "sub.txt", "--workers", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (tmp_path / "sub.txt").read_text().splitlines()
    assert lines[0].startswith("image_location,Fearfully_Surprised")
    assert [l.split(",")[0] for l in lines[1:]] == ["v1/00001.jpg", "v1/00002.jpg", "v1/00003.jpg", "v2/00001.jpg",
                                                    "v2/00002.jpg"]
    assert all(0 <= int(l.split(",")[1]) <= 6 for l in lines[1:])


def test_predict_videos_bad_file_reported_and_others_go_on(run, tmp_path):
    cv2 = pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data")
    face = np.asarray(Image.fromarray(skimage_data.astronaut()).crop((140, 20, 320, 220)))
    vw = cv2.VideoWriter(str(tmp_path / "good.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 240))
    for i in range(4):
        canvas = np.full((240, 320, 3), 100, np.uint8)
        canvas[20:220, 40 + 4 * i:220 + 4 * i] = face
        vw.write(np.ascontiguousarray(canvas[:, :, ::-1]))
    vw.release()
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
    res = cervl("predict", "--run", run / "run", tmp_path / "broken.mp4", tmp_path / "good.avi", "--every", "2",
                "--plot", "-o", tmp_path / "v.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "broken.mp4" in res.stderr and "cannot open" in res.stderr
    rows = [json.loads(l) for l in (tmp_path / "v.jsonl").read_text().splitlines()]
    good = [r for r in rows if r.get("video") == "good" and "frame" in r]
    assert [r["frame"] for r in good] == [1, 3] and all(r["pred"] for r in good)
    assert any(r.get("error") and r["video"] == "broken" for r in rows)
    assert (tmp_path / "v.jsonl.good.png").is_file()


def test_align_videos_writes_tracked_frames_and_reports_broken_ones(tmp_path):
    """`cervl align --videos`: Aff-Wild2-style frames/<video>/<frame:05d>.jpg, a manifest with the
    tracked boxes and landmarks, frames without a face counted, a broken video reported."""
    cv2 = pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data")
    face = np.asarray(Image.fromarray(skimage_data.astronaut()).crop((140, 20, 320, 220)))
    videos = tmp_path / "videos"
    videos.mkdir()
    vw = cv2.VideoWriter(str(videos / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (320, 240))
    for i in range(1, 7):
        canvas = np.full((240, 320, 3), 100, np.uint8)
        if i != 4:  # frame 4 shows no face
            canvas[20:220, 40 + 4 * i:220 + 4 * i] = face
        vw.write(np.ascontiguousarray(canvas[:, :, ::-1]))
    vw.release()
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 cut short")
    res = cervl("align", videos, "--videos", "-o", tmp_path / "out", "--workers", "2", "--every", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "broken.mp4" in res.stderr
    crops = sorted(p.name for p in (tmp_path / "out" / "frames" / "clip").iterdir())
    assert crops == ["00001.jpg", "00002.jpg", "00003.jpg", "00005.jpg", "00006.jpg"]
    assert Image.open(tmp_path / "out" / "frames" / "clip" / "00001.jpg").size == (112, 112)
    assert not (tmp_path / "out" / "frames" / "broken").exists()
    rows = [json.loads(l) for l in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["video"], r["frame"]) for r in rows] == [("clip", n) for n in (1, 2, 3, 5, 6)]
    # the face moves 4 px right per frame; the tracked box follows it
    x = [(r["bbox"][0] + r["bbox"][2]) / 2 for r in rows]
    assert np.allclose(np.diff(x) / np.diff([1, 2, 3, 5, 6]), 4, atol=1.5), x
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["per_video"]["clip"]["frames"] == 6 and summary["per_video"]["clip"]["lost"] == 1
    assert list(summary["failed"]) == [str(videos / "broken.mp4")] and summary["crops"] == 5
