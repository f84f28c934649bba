"""Every reader on small fixtures in the dataset's real layout, and every bad-input path."""

import json
import subprocess
import sys

import pytest

from cervl.data import BadInputs, ManifestError, make_reader, read_manifest


def cervl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


# ---------------------------------------------------------------- RAF-DB

def make_rafdb(root, jpg, lines, variant_dirs=("aligned", "original"), landmarks=True):
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(l + "\n" for l in lines))
    for i, line in enumerate(lines):
        name = line.split()[0]
        stem = name.rsplit(".", 1)[0]
        if "aligned" in variant_dirs:
            jpg(root / "Image" / "aligned" / f"{stem}_aligned.jpg", i)
        if "original" in variant_dirs:
            jpg(root / "Image" / "original" / name, i)
        if landmarks:
            (root / "Annotation" / "manual").mkdir(parents=True, exist_ok=True)
            (root / "Annotation" / "manual" / f"{stem}_manu_attri.txt").write_text(
                "10.5\t20.0\n30 20.5\n20 30\n12 40\n28 40\n0\n1\n2\n")
    return root


def test_rafdb_basic_aligned(tmp_path, jpg):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00001.jpg 5", "test_00001.jpg 1", "train_00002.jpg 7"])
    recs = make_reader("rafdb", root, subset="basic", variant="aligned").read()
    assert [(r.image, r.label, r.split) for r in recs] == [
        ("Image/aligned/train_00001_aligned.jpg", "Sadness", "train"),
        ("Image/aligned/test_00001_aligned.jpg", "Surprise", "test"),
        ("Image/aligned/train_00002_aligned.jpg", "Neutral", "train")]
    assert all(r.landmarks is None for r in recs)  # manual landmarks are original-image coordinates


def test_rafdb_compound_original_reads_landmarks(tmp_path, jpg):
    root = make_rafdb(tmp_path / "compound", jpg, ["train_00001.jpg 11", "test_00003.jpg 4"])
    recs = make_reader("rafdb", root, subset="compound", variant="original").read()
    assert [r.label for r in recs] == ["Disgustedly Surprised", "Sadly Angry"]
    assert recs[0].image == "Image/original/train_00001.jpg"
    assert recs[0].landmarks == [[10.5, 20.0], [30, 20.5], [20, 30], [12, 40], [28, 40]]


@pytest.mark.parametrize("line, reason, field", [
    ("train_00001.jpg 9", "unknown_label", "label"),
    ("train_00001.jpg", "malformed_line", None),
    ("train_00001.jpg five", "malformed_line", "label"),
    ("val_00001.jpg 1", "malformed_line", "split"),
])
def test_rafdb_bad_lines(tmp_path, jpg, line, reason, field):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00002.jpg 1", line])
    (root / "Image" / "aligned" / "val_00001_aligned.jpg").write_bytes(b"")
    with pytest.raises(ManifestError) as err:
        make_reader("rafdb", root).read()
    assert (err.value.reason, err.value.line, err.value.field) == (reason, 2, field)
    assert "list_patition_label.txt:2" in str(err.value)


def test_rafdb_missing_and_unreadable_images(tmp_path, jpg):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00001.jpg 1", "train_00002.jpg 2", "train_00003.jpg 3"])
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    (root / "Image" / "aligned" / "train_00003_aligned.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ManifestError, match=r"list_patition_label.txt:2: field 'image': image not found"):
        make_reader("rafdb", root).read()
    bad = BadInputs(skip=True)
    recs = make_reader("rafdb", root, bad=bad).read()
    assert [r.id for r in recs] == ["train_00001"]
    assert bad.counts == {"missing_file": 1, "unreadable_image": 1}


def test_rafdb_malformed_landmark_file(tmp_path, jpg):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00001.jpg 1"])
    (root / "Annotation" / "manual" / "train_00001_manu_attri.txt").write_text("1 2\n3 x\n5 6\n7 8\n9 10\n")
    with pytest.raises(ManifestError, match=r"train_00001_manu_attri.txt:2: field 'landmarks'"):
        make_reader("rafdb", root, variant="original").read()


def test_cli_prepare_skip_bad_writes_summary_and_sidecar(tmp_path, jpg):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00001.jpg 1", "train_00002.jpg 9", "train_00009.jpg 1 extra",
                                               "test_00001.jpg 2"])
    out = tmp_path / "m.jsonl"
    res = cervl("prepare", "rafdb", root, "-o", out)
    assert res.returncode == 2 and "list_patition_label.txt:2: field 'label': unknown label id 9" in res.stderr
    assert not out.exists()
    res = cervl("prepare", "rafdb", root, "-o", out, "--skip-bad")
    assert res.returncode == 0, res.stderr
    assert "skipped 2 bad samples: 1 unknown_label, 1 malformed_line" in res.stdout
    assert len(read_manifest(out)) == 2
    offenders = [json.loads(l) for l in (tmp_path / "m.jsonl.bad.jsonl").read_text().splitlines()]
    assert [(o["line"], o["reason"]) for o in offenders] == [(2, "unknown_label"), (3, "malformed_line")]


def test_cli_failure_keeps_existing_manifest(tmp_path, jpg):
    root = make_rafdb(tmp_path / "basic", jpg, ["train_00001.jpg 1"])
    out = tmp_path / "m.jsonl"
    assert cervl("prepare", "rafdb", root, "-o", out).returncode == 0
    before = out.read_bytes()
    (root / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 1\ntrain_00002.jpg 1\n")
    res = cervl("prepare", "rafdb", root, "-o", out)
    assert res.returncode == 2 and "image not found" in res.stderr
    assert out.read_bytes() == before


# ---------------------------------------------------------------- Aff-Wild2

HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"


def make_affwild2(root, jpg, videos, missing=()):
    ann = root / "Train_Set"
    ann.mkdir(parents=True)
    for video, labels in videos.items():
        (ann / f"{video}.txt").write_text(HEADER + "\n" + "".join(f"{l}\n" for l in labels))
        for i in range(1, len(labels) + 1):
            if (video, i) not in missing:
                jpg(root / "cropped_aligned" / video / f"{i:05d}.jpg", i, 8)
    return root


def test_affwild2_reader(tmp_path, jpg):
    root = make_affwild2(tmp_path, jpg, {"10-60-1280x720_left": [0, -1, 4, 6], "10-60-1280x720_right": [7, 5]},
                         missing={("10-60-1280x720_left", 4)})
    reader = make_reader("affwild2", root, annotations="Train_Set")
    recs = reader.read()
    assert [(r.video, r.frame, r.label) for r in recs] == [
        ("10-60-1280x720_left", 1, "Neutral"), ("10-60-1280x720_left", 3, "Happiness"),
        ("10-60-1280x720_right", 1, "Other"), ("10-60-1280x720_right", 2, "Sadness")]
    assert recs[1].image == "10-60-1280x720_left/00003.jpg" and recs[0].split == "train"
    assert reader.missing_frames == 1
    every2 = make_reader("affwild2", root, annotations="Train_Set", every=2).read()
    assert [(r.video, r.frame) for r in every2] == [("10-60-1280x720_left", 1), ("10-60-1280x720_left", 3),
                                                    ("10-60-1280x720_right", 1)]


def test_affwild2_bad_header_and_label(tmp_path, jpg):
    root = make_affwild2(tmp_path, jpg, {"v1": [0, 9]})
    with pytest.raises(ManifestError, match=r"v1.txt:3: field 'label': unknown label id 9") as err:
        make_reader("affwild2", root, annotations="Train_Set").read()
    assert err.value.reason == "unknown_label"
    (root / "Train_Set" / "v1.txt").write_text("Neutral,Angry\n0\n")
    with pytest.raises(ManifestError, match=r"v1.txt:1: header"):
        make_reader("affwild2", root, annotations="Train_Set").read()


def test_cli_prepare_affwild2_reports_missing_frames(tmp_path, jpg):
    root = make_affwild2(tmp_path, jpg, {"v1": [0, 1, 2]}, missing={("v1", 2)})
    out = tmp_path / "aw.jsonl"
    res = cervl("prepare", "affwild2", root, "--annotations", "Train_Set", "-o", out, "--val-fraction", "0")
    assert res.returncode == 0, res.stderr
    assert "1 annotated frames had no image file" in res.stdout
    m = read_manifest(out)
    assert [r.frame for r in m] == [1, 3] and m.image_path(m.records[0]).is_file()


# ---------------------------------------------------------------- C-EXPR-DB

def test_cexprdb_unlabelled_and_labelled(tmp_path, jpg):
    for v in ("001", "002"):
        for i in (1, 2, 3):
            jpg(tmp_path / "videos" / v / f"{i:05d}.jpg", i, 8)
    recs = make_reader("cexprdb", tmp_path / "videos").read()
    assert len(recs) == 6 and all(r.label is None and r.split == "test" for r in recs)
    assert recs[4].id == "002/00002"
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "001.txt").write_text("0\n6\n-1\n")
    recs = make_reader("cexprdb", tmp_path / "videos", annotations=str(ann)).read()
    assert [(r.video, r.frame, r.label) for r in recs] == [("001", 1, "Fearfully Surprised"),
                                                           ("001", 2, "Sadly Angry")]


# ---------------------------------------------------------------- folder / csv

def test_folder_reader_with_split_dirs_and_tolerant_names(tmp_path, jpg):
    jpg(tmp_path / "train" / "happily_surprised" / "a.jpg")
    jpg(tmp_path / "train" / "Sadly-Angry" / "b.png")
    jpg(tmp_path / "test" / "sadly angry" / "c.jpg")
    recs = make_reader("folder", tmp_path).read()
    assert {(r.image, r.label, r.split, r.label_set) for r in recs} == {
        ("train/happily_surprised/a.jpg", "Happily Surprised", "train", "cexprdb"),
        ("train/Sadly-Angry/b.png", "Sadly Angry", "train", "cexprdb"),
        ("test/sadly angry/c.jpg", "Sadly Angry", "test", "cexprdb")}


def test_folder_reader_unknown_class(tmp_path, jpg):
    jpg(tmp_path / "Grumpy" / "a.jpg")
    with pytest.raises(ManifestError, match="'Grumpy' is not a known class"):
        make_reader("folder", tmp_path).read()


def test_csv_reader(tmp_path, jpg):
    jpg(tmp_path / "img" / "a.jpg")
    jpg(tmp_path / "img" / "b.jpg")
    jpg(tmp_path / "img" / "c.jpg")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label,split\nimg/a.jpg,happily surprised,train\nimg/b.jpg,4,test\nimg/c.jpg,,test\n")
    recs = make_reader("csv", csv_path, label_set="rafdb-compound").read()
    assert [(r.label, r.split) for r in recs] == [("Happily Surprised", "train"), ("Sadly Angry", "test"),
                                                 (None, "test")]
    csv_path.write_text("image,label\nimg/a.jpg,Grumpy\n")
    with pytest.raises(ManifestError, match=r"labels.csv:2: field 'label'"):
        make_reader("csv", csv_path, label_set="rafdb-compound").read()
    csv_path.write_text("img,label\n")
    with pytest.raises(ManifestError, match="missing column 'image'"):
        make_reader("csv", csv_path).read()


def test_unknown_dataset_is_a_clear_cli_error(tmp_path):
    res = cervl("prepare", "affectnet", tmp_path, "-o", tmp_path / "m.jsonl")
    assert res.returncode == 2 and "unknown dataset 'affectnet'" in res.stderr
