"""Reliability: cervl never deletes a user's files, never trains on NaN, and one bad input never sinks a run.

Each test names the case of the reliability issue it covers (case N).
"""

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cervl.data.prepare import prepare_synthce


def cervl(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)


def one_line_error(res) -> str:
    """The stderr of a command that failed with one ``error:`` line and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return res.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("safety")
    prepare_synthce(base / "synthce", base / "m", per_class=2, seed=3, val_fraction=0.0)
    return base


def recipe(tmp_path, data, manifest=None, **top) -> Path:
    manifest = manifest or data / "m" / "synthce-compound-aligned.jsonl"
    cfg = {"model": {"name": "tiny-qwen2-vl"}, "output_dir": str(tmp_path / "run"), "checkpoint_every": 2,
           "log_every": 1, "stages": [{"name": "compound", "data": [{"manifest": str(manifest)}],
                                       "label_set": "rafdb-compound", "prompt": "minimal", "max_steps": 4,
                                       "batch_size": 4, "lr": 1e-3, "lora": {"rank": 4, "alpha": 8}}]}
    cfg.update(top)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def copy_manifest(data, tmp_path, edit) -> Path:
    """The compound manifest with absolute image paths, after ``edit(records)``."""
    from cervl.data.manifest import read_manifest

    m = read_manifest(data / "m" / "synthce-compound-aligned.jsonl")
    rows = [{**r.to_json(), "image": str(m.image_path(r)), "root": None} for r in m]
    rows = edit([{k: v for k, v in r.items() if v is not None} for r in rows])
    out = tmp_path / "m.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# --- data loss (cases 1, 2) ------------------------------------------------------------------

def test_case1_train_refuses_a_folder_that_is_not_a_cervl_run(tmp_path, data):
    target = tmp_path / "mine"
    (target / "final").mkdir(parents=True)
    (target / "final" / "thesis.tex").write_text("years of work")
    res = cervl("train", recipe(tmp_path, data), f"output_dir={target}", "--no-progress")
    assert "not a cervl run folder" in one_line_error(res)
    assert (target / "final" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in target.iterdir()) == ["final"]


def test_a_users_config_stages_and_base_are_not_adopted_as_an_old_run(tmp_path, data):
    # 19.8: config.json + stages/ used to be enough to count as a run from before the marker; check_config
    # then overwrote the config and removed base/
    target = tmp_path / "mine"
    (target / "stages" / "notes").mkdir(parents=True)
    (target / "stages" / "notes" / "a.txt").write_text("notes")
    (target / "base").mkdir()
    (target / "base" / "weights.bin").write_bytes(b"my weights")
    (target / "config.json").write_text('{"model": {"name": "mine"}, "stages": ["mine"]}')
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    res = cervl("train", recipe(tmp_path, data), f"output_dir={target}", "--no-progress")
    assert "not a cervl run folder" in one_line_error(res)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_case2_pretrain_tiny_refuses_a_foreign_out_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = cervl("pretrain-tiny", "--out", out, "--per-class", "1")
    assert "not a tiny base written by cervl pretrain-tiny" in one_line_error(res)
    assert (out / "notes.txt").read_text() == "mine"


# --- remote code (case 3) --------------------------------------------------------------------

def test_case3_remote_code_in_a_run_folder_is_never_run(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "cervl.json").write_text(json.dumps({"prompt": "minimal", "label_set": "rafdb-compound",
                                                          "lineage": [], "save": "merged"}))
    (run / "final" / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    marker = tmp_path / "EVIL_RAN"
    (run / "final" / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.jpg")
    res = cervl("predict", "--run", run, tmp_path / "x.jpg", "-o", tmp_path / "p.jsonl")
    assert "unknown model_type 'evil'" in one_line_error(res)
    assert not marker.exists()
    from cervl.core.errors import UserError
    from cervl.predict import Predictor

    with pytest.raises(UserError, match="model_type"):
        Predictor.from_run(run)
    assert not marker.exists()


# --- bad images (cases 4, 5, 8) --------------------------------------------------------------

def test_case4_extreme_aspect_ratio_is_an_error_row_naming_the_file(tmp_path, data):
    from cervl.core.images import ImageError, load_rgb

    Image.new("RGB", (2000, 3), (128, 90, 80)).save(tmp_path / "strip.png")
    with pytest.raises(ImageError, match="strip.png.*2000x3"):
        load_rgb(tmp_path / "strip.png")
    res = cervl("train", recipe(tmp_path, data), "--no-progress", "stages.0.max_steps=1", "checkpoint_every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    Image.new("RGB", (112, 112), (128, 90, 80)).save(tmp_path / "ok.png")
    res = cervl("predict", "--run", tmp_path / "run", tmp_path / "strip.png", tmp_path / "ok.png",
                "-o", tmp_path / "p.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "p.jsonl").open())}
    assert rows["strip.png"]["pred"] is None and "aspect ratio" in rows["strip.png"]["error"]
    assert rows["ok.png"]["pred"] is not None


def test_case4_server_answers_400_for_extreme_aspect_and_bad_length(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cervl.models.loading import build_tiny
    from cervl.predict import Predictor
    from cervl.serve.app import create_app

    model, proc = build_tiny("tiny-qwen2-vl")
    buf = io.BytesIO()
    Image.new("RGB", (2000, 3)).save(buf, "PNG")
    with TestClient(create_app(Predictor(model, proc, "minimal", "rafdb-compound"))) as client:
        r = client.post("/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "aspect ratio" in r.json()["error"]
        r = client.post("/v1/predict", content=b"x", headers={"Content-Type": "image/png", "Content-Length": "abc"})
        assert r.status_code == 400 and "Content-Length" in r.json()["error"]


def test_case5_bad_training_images_are_all_reported_before_step_0(tmp_path, data):
    def truncate(rows):
        for r in rows[:2]:
            blob = Path(r["image"]).read_bytes()
            bad = tmp_path / f"truncated_{Path(r['image']).name}"
            bad.write_bytes(blob[: len(blob) // 3])
            r["image"] = str(bad)
        return rows

    manifest = copy_manifest(data, tmp_path, truncate)
    res = cervl("train", recipe(tmp_path, data, manifest), "--no-progress")
    err = res.stderr
    assert res.returncode == 2 and "2 of" in err and err.count("truncated_") == 2, err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # nothing written
    res = cervl("train", recipe(tmp_path, data, manifest), "--no-progress", "--skip-bad")
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = json.loads((tmp_path / "run" / "bad_samples.json").read_text())
    assert len(skipped) == 2 and all("truncated_" in p for p, _ in skipped)


def test_case8_exif_orientation_is_applied_everywhere(tmp_path):
    from skimage import data as skdata

    from cervl.core.images import load_rgb
    from cervl.faces.pipeline import align_files

    upright = Image.fromarray(skdata.astronaut())
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CW to view": the pixels are stored rotated 90 degrees counter-clockwise
    upright.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    a, b = np.asarray(load_rgb(tmp_path / "upright.jpg"), float), np.asarray(load_rgb(tmp_path / "phone.jpg"), float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3
    crops = dict(align_files([tmp_path / "upright.jpg", tmp_path / "phone.jpg"]))
    ca, cb = (np.asarray(crops[i][0].crop, float) for i in (0, 1))
    assert np.abs(ca - cb).mean() < 12  # the same upright face, not a sideways one
    assert np.abs(ca - np.rot90(cb)).mean() > 2 * np.abs(ca - cb).mean()


# --- NaN (case 6) ----------------------------------------------------------------------------

def test_case6_non_finite_loss_stops_training_and_nothing_diverged_is_saved(tmp_path, data):
    res = cervl("train", recipe(tmp_path, data), "--no-progress", "stages.0.lr=1e30", "checkpoint_every=1")
    err = one_line_error(res)
    assert "stage compound, step" in err and "non-finite" in err and "e+29" in err  # the scheduled lr
    assert not (tmp_path / "run" / "final").exists()
    assert (tmp_path / "run" / "stages" / "00-compound" / "checkpoint").is_dir()  # the last good one
    res = cervl("train", recipe(tmp_path / "skip", data), "--no-progress", "stages.0.lr=1e30", "nan_policy=skip_step")
    if res.returncode == 0:  # skipped steps leave finite weights: they are saved, and predictions stay valid JSON
        rows = (tmp_path / "skip" / "run" / "stages" / "00-compound" / "metrics.csv").read_text()
        assert "skipped_steps" in rows
    else:
        assert "non-finite weight" in one_line_error(res)


def test_case6_predictions_never_contain_nan(tmp_path):
    import torch

    from cervl.models.loading import build_tiny
    from cervl.predict import Item, Predictor, write_predictions

    model, proc = build_tiny("tiny-qwen2-vl")
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    rows = list(Predictor(model, proc, "minimal", "rafdb-compound").predict([Item("a", tmp_path / "a.png")],
                                                                               progress=False))
    assert rows[0]["pred"] is None and "non-finite" in rows[0]["error"]
    write_predictions(tmp_path / "p.jsonl", rows, {})
    assert json.loads((tmp_path / "p.jsonl").read_text())["error"]


@pytest.mark.parametrize("override", ["stages.0.lr=.inf", "stages.0.lr=.nan", "model.dtype=fp8", "log_every=0",
                                      "checkpoint_every=-1", "stages.0.lora.dropout=1.5"])
def test_case6_7_14_bad_values_are_rejected_before_anything_is_written(tmp_path, data, override):
    res = cervl("train", recipe(tmp_path, data), "--no-progress", override)
    assert override.split("=")[0].split(".")[-1] in one_line_error(res)
    assert not (tmp_path / "run").exists()


# --- failed starts (case 7) ------------------------------------------------------------------

def test_case7_a_failed_start_does_not_poison_the_output_folder(tmp_path, data):
    cfg = recipe(tmp_path, data)
    res = cervl("train", cfg, "--no-progress", "stages.0.data.0.manifest=/no/such/manifest.jsonl")
    assert "manifest not found" in one_line_error(res) and not (tmp_path / "run").exists()
    res = cervl("train", cfg, "--no-progress", "model.name=/no/such/model")  # fails after config.json
    assert "cannot load model" in one_line_error(res) and (tmp_path / "run" / "config.json").is_file()
    res = cervl("train", cfg, "--no-progress", "stages.0.max_steps=1", "checkpoint_every=0")
    assert res.returncode == 0, res.stderr[-2000:]


# --- files and permissions (cases 9, 13) -----------------------------------------------------

def test_case9_atomic_writes_keep_permissions(tmp_path):
    from cervl.data.manifest import atomic_write_text

    old = tmp_path / "shared.jsonl"
    old.write_text("x")
    old.chmod(0o644)
    atomic_write_text(old, "y")
    assert stat.S_IMODE(old.stat().st_mode) == 0o644 and old.read_text() == "y"
    old.chmod(0o640)
    atomic_write_text(old, "z")
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644


def test_case13_no_leftovers_checkpoints_metrics_sidecars(tmp_path, data):
    cfg = recipe(tmp_path, data)
    res = cervl("train", cfg, "--no-progress", env={"CERVL_CRASH_AT": "checkpoint:2"})
    assert res.returncode == -signal.SIGKILL
    res = cervl("train", cfg, "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    stage = tmp_path / "run" / "stages" / "00-compound"
    steps = [ln.split(",")[2] for ln in (stage / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]  # no duplicate rows after the resume
    assert not any((stage / n).exists() for n in ("checkpoint", ".checkpoint.old", ".checkpoint.tmp"))
    # a checkpoint left beside DONE.json (kill between the two) is cleaned when the stage is reused
    (stage / "checkpoint").mkdir()
    assert cervl("train", cfg, "--no-progress").returncode == 0 and not (stage / "checkpoint").exists()


def test_case13_clean_prepare_removes_a_stale_bad_sidecar(tmp_path, data):
    csv = tmp_path / "labels.csv"
    good = sorted((data / "synthce" / "compound" / "Image" / "aligned").glob("*.jpg"))[:3]
    csv.write_text("image,label\n" + "".join(f"{p},Sadly Angry\n" for p in good) + "missing.jpg,Sadly Angry\n")
    out = tmp_path / "m.jsonl"
    assert cervl("prepare", "csv", csv, "-o", out, "--skip-bad").returncode == 0
    assert Path(f"{out}.bad.jsonl").is_file()
    csv.write_text("image,label\n" + "".join(f"{p},Sadly Angry\n" for p in good))
    assert cervl("prepare", "csv", csv, "-o", out, "--skip-bad").returncode == 0
    assert not Path(f"{out}.bad.jsonl").exists()


def test_final_replacement_survives_a_kill_between_its_renames(tmp_path, data):
    cfg = recipe(tmp_path, data, checkpoint_every=0)
    assert cervl("train", cfg, "--no-progress").returncode == 0
    before = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    res = cervl("train", cfg, "--no-progress", env={"CERVL_CRASH_AT": "final-swap"})
    assert res.returncode == -signal.SIGKILL and not (tmp_path / "run" / "final").exists()
    assert (tmp_path / "run" / ".final.old" / "model.safetensors").read_bytes() == before  # nothing lost
    from cervl.predict import Predictor

    assert Predictor.from_run(tmp_path / "run").label_set.name == "rafdb-compound"  # loads from the old copy
    assert cervl("train", cfg, "--no-progress").returncode == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == before


# --- readers (cases 10, 11, 14) --------------------------------------------------------------

def test_case10_duplicates_with_conflicting_labels(tmp_path, data):
    imgs = sorted((data / "synthce" / "compound" / "Image" / "aligned").glob("*.jpg"))[:3]
    csv = tmp_path / "dup.csv"
    csv.write_text(f"image,label\n{imgs[0]},Sadly Angry\n{imgs[1]},Sadly Fearful\n{imgs[0]},Happily Surprised\n"
                   f"{imgs[2]},Sadly Angry\n{imgs[2]},Sadly Angry\n")
    err = one_line_error(cervl("prepare", "csv", csv, "-o", tmp_path / "m.jsonl"))
    assert "'Sadly Angry'" in err and "'Happily Surprised'" in err and imgs[0].name in err
    res = cervl("prepare", "csv", csv, "-o", tmp_path / "m.jsonl", "--skip-bad")
    assert res.returncode == 0 and "dropped 1 exact duplicate" in res.stdout, res.stderr
    kept = [json.loads(ln)["image"] for ln in (tmp_path / "m.jsonl").open()]
    assert sorted(Path(k).name for k in kept) == sorted([imgs[1].name, imgs[2].name])


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "latin-1"])
def test_case11_csv_encodings(tmp_path, data, encoding):
    img = sorted((data / "synthce" / "compound" / "Image" / "aligned").glob("*.jpg"))[0]
    csv = tmp_path / "l.csv"
    csv.write_bytes(f"image,label,note\n{img},Sadly Angry,café\n".encode(encoding))
    res = cervl("prepare", "csv", csv, "-o", tmp_path / "m.jsonl")
    if encoding == "utf-8-sig":
        assert res.returncode == 0, res.stderr
    else:
        err = one_line_error(res)
        assert str(csv) in err and "UTF-8" in err
        if encoding == "latin-1":
            assert "byte position" in err


@pytest.mark.parametrize("value", ["1.5", "-1", "nan"])
def test_case14_val_fraction_out_of_range(tmp_path, data, value):
    res = cervl("prepare", "rafdb", data / "synthce" / "compound", "--subset", "compound", "-o", tmp_path / "m.jsonl",
                f"--val-fraction={value}")
    assert "--val-fraction must be in [0, 1)" in one_line_error(res)


# --- one-line errors (case 12) ---------------------------------------------------------------

@pytest.mark.parametrize("override,expect", [("stages.0.lr=[1,", "not valid YAML"),
                                             ("stages.0.lr=!!python/object:os.system x", "not valid YAML")])
def test_case12_bad_overrides_are_one_line_errors(tmp_path, data, override, expect):
    assert expect in one_line_error(cervl("train", recipe(tmp_path, data), override))


def test_case12_operating_system_errors_are_one_line(tmp_path, data, monkeypatch, capsys):
    from cervl import cli

    for err in (PermissionError(13, "Permission denied", "labels.txt"), OSError(28, "No space left on device")):
        def raise_it(args, err=err):
            raise err

        monkeypatch.setitem(cli.COMMANDS, "labels", raise_it)
        assert cli.main(["labels"]) == 2
        assert capsys.readouterr().err.strip() == f"error: {'labels.txt: ' if err.filename else ''}{err.strerror}"
    # a label file that is a folder: the reader's OSError, not a traceback (with --skip-bad too)
    root = tmp_path / "raf"
    (root / "EmoLabel" / "list_patition_label.txt").mkdir(parents=True)
    assert "list_patition_label.txt" in one_line_error(cervl("prepare", "rafdb", root, "-o", tmp_path / "m.jsonl",
                                                             "--skip-bad"))


def test_case12_output_is_a_folder_port_in_use_and_pickled_adapter(tmp_path, data):
    res = cervl("train", recipe(tmp_path, data), "--no-progress", "stages.0.max_steps=1", "checkpoint_every=0",
                "save=adapter")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    Image.new("RGB", (112, 112)).save(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    assert "is a folder" in one_line_error(cervl("predict", "--run", run, tmp_path / "a.png", "-o", tmp_path / "out"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(cervl("serve", "--run", run, "--port", port))
        assert f"cannot listen on 127.0.0.1:{port}" in err
    adapter = run / "stages" / "00-compound" / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert "never pickled" in one_line_error(cervl("predict", "--run", run, tmp_path / "a.png", "-o",
                                                   tmp_path / "p.jsonl"))


# --- locks (case 15) -------------------------------------------------------------------------

HOLD_LOCK = """import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
print("locked", flush=True)
time.sleep(60)
"""

TAKE_LOCK = """import sys, time
from cervl.core.errors import UserError
from cervl.run import RunLock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with RunLock(sys.argv[1]):
        time.sleep(1.0)
        print("held", flush=True)
except UserError as e:
    print("refused", e, flush=True)
"""


def test_two_trainers_finding_a_dead_holder_take_the_lock_once(tmp_path):
    # 19.4: both used to unlink the stale file and both create a new one, so both trained into one folder
    run = tmp_path / "run"
    run.mkdir()
    # a dead holder's record, and an empty file (a trainer killed while writing it: the old code refused both
    # starters forever, "exists and is unreadable")
    stale = [json.dumps({"pid": 999999, "host": socket.gethostname(), "since": "then"})] * 4 + [""] * 2
    for content in stale:
        (run / ".lock").write_text(content)
        start = time.time() + 1.5  # both wake at the same moment, after their imports
        procs = [subprocess.Popen([sys.executable, "-c", TAKE_LOCK, str(run), str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = sorted(p.communicate(timeout=60)[0].split(" ")[0].strip() for p in procs)
        assert outs == ["held", "refused"], outs


def test_case15_one_trainer_per_run_folder(tmp_path, data):
    from cervl.core.errors import UserError
    from cervl.run import RunLock, claim_run_dir

    run = tmp_path / "run"
    claim_run_dir(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = one_line_error(cervl("train", recipe(tmp_path, data), "--no-progress"))
        assert f"pid {holder.pid}" in err and "in use" in err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over
    with RunLock(run):
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use"):
            RunLock(run).__enter__()
    assert not (run / ".lock").exists()
