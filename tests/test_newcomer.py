"""The path a newcomer takes through README: its Python example, messages, Ctrl-C, small gaps (issue 24)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cervl.data.prepare import prepare_synthce
from helpers import train_quick

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
README = Path(__file__).resolve().parents[1] / "README.md"


def cervl(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A two-step run on SynthCE, its manifests, a photo with a face, one without, and a clip."""
    from test_video import face_frames, write_video

    base = tmp_path_factory.mktemp("newcomer")
    prepare_synthce(base / "synthce", base / "m", per_class=4, seed=5)
    train_quick(base, base / "m" / "synthce-compound-aligned.jsonl")
    Image.fromarray(skimage_data.astronaut()).save(base / "photo.jpg")
    Image.new("RGB", (200, 160), (40, 120, 200)).save(base / "sky.jpg")
    write_video(base / "clip.avi", face_frames(6, blank=()))
    frames = base / "frames_dir"
    frames.mkdir()
    for i, f in enumerate(face_frames(4, blank=()), 1):
        Image.fromarray(f).save(frames / f"{i:05d}.jpg")
    return base


def readme_python_block() -> str:
    text = README.read_text()
    start = text.index("### Python API")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize("photo", ["photo.jpg", "sky.jpg"])
def test_readme_python_example_runs_as_a_plain_script(demo, tmp_path, photo):
    # 24.1: verbatim, with workers=2 and no __main__ guard; only the paths point at this test's files
    code = readme_python_block()
    assert "workers=2" in code and "__main__" not in code
    code = code.replace('"runs/demo/run"', repr(str(demo / "run"))).replace('"photo.jpg"', repr(str(demo / photo)))
    code = code.replace('"clip.mp4"', repr(str(demo / "clip.avi"))).replace('"frames_dir/"', repr(str(demo / "frames_dir")))
    (tmp_path / "example.py").write_text(code)
    res = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "bootstrapping" not in res.stderr and "died" not in res.stdout
    lines = res.stdout.splitlines()
    if photo == "photo.jpg":
        status, cls = lines[0].split(" ", 1)
        assert status in ("ok", "multiple") and cls in _classes()
    else:
        assert lines[0] == "no_face"
    assert [ln.split(" ", 1)[0] for ln in lines[1:]] == ["0", "1"]  # both videos, their first frame's row
    assert all("'frame': 1" in ln and "'pred'" in ln for ln in lines[1:])


def _classes():
    from cervl.core.labels import get_label_set

    return get_label_set("rafdb-compound").classes


def test_score_refuses_a_missing_face(demo):
    from cervl.core.errors import InvalidInput
    from cervl.predict import Predictor

    predictor = Predictor.from_run(demo / "run")
    with pytest.raises(InvalidInput, match="image 1 of 2 is None: no face was found"):
        predictor.score([Image.new("RGB", (112, 112)), None])


def test_every_worker_dying_is_an_exception_with_the_cause(tmp_path):
    # 24.1: before, the loop yielded "not processed: all worker processes died" rows and the script exited 0
    import multiprocessing as mp

    from cervl.faces.video import parallel_video_faces
    from cervl.core.workers import WorkersDied

    stuck = []
    for k in range(3):  # frame folders whose first frame never arrives: the two workers hang in read()
        stuck.append(tmp_path / f"stuck{k}")
        stuck[-1].mkdir()
        os.mkfifo(stuck[-1] / "00001.jpg")
    timer = threading.Timer(4.0, lambda: [p.kill() for p in mp.active_children()])
    timer.start()
    events = []
    with pytest.raises(WorkersDied, match=r"all 2 worker processes died before processing 1 of 3 videos "
                                          r"\(exit codes \[-9\]: killed by signal 9"):
        for event in parallel_video_faces(stuck, workers=2):
            events.append(event)
    timer.cancel()
    assert sorted(i for kind, i, _ in events if kind == "error") == [0, 1]  # the two being decoded


def test_ray_engine_writes_the_same_meta_as_the_local_engine():
    # 24.2: checked end to end in tests/test_ray.py; here the shared builder both engines call
    from cervl.core.labels import get_label_set
    from cervl.predict.predictor import prediction_meta
    from cervl.models.prompts import get_prompt_style

    meta = prediction_meta("r", get_label_set("rafdb-compound"), get_prompt_style("minimal"), mode="score",
                           normalize="sum", manifest=None)
    assert meta["label_set"] == "rafdb-compound" and meta["prompt"] == "minimal"


def test_messages_that_point_the_right_way(demo, tmp_path):
    # 24.3, one case each
    err = one_line_error(cervl("predict", "--run", tmp_path / "runs" / "demo" / "run", "-o", tmp_path / "p.jsonl",
                               demo / "photo.jpg"))
    assert "run folder not found" in err and "`make demo` creates it" in err
    cfg = tmp_path / "q.yaml"
    cfg.write_text("model: {name: tiny-qwen2-vl}\noutput_dir: out\nstages:\n- name: s\n  data: "
                   "[{manifest: runs/demo/manifests/synthce-basic-aligned.jsonl}]\n  label_set: basic-7\n")
    err = one_line_error(cervl("train", cfg, cwd=tmp_path))
    assert "manifest not found" in err and "cervl demo --data-only" in err
    manifest = demo / "m" / "synthce-compound-aligned.jsonl"
    err = one_line_error(cervl("predict", "--run", demo / "run", "--manifest", manifest, "--split", "tset",
                               "-o", tmp_path / "p.jsonl"))
    assert "no records in split 'tset' (the manifest has ['test', 'train', 'val'])" in err and "'test'?" in err
    err = one_line_error(cervl("eval", manifest, "-o", tmp_path / "rep"))
    assert "not a predictions file" in err and not (tmp_path / "rep").exists()
    (tmp_path / "x.jsonl").write_text('{"id": "a", "pred": "Sadly Angry", "label": "Sadly Angry"}\n')
    err = one_line_error(cervl("eval", tmp_path / "x.jsonl", "-o", tmp_path / "rep"))
    assert "there is no x.jsonl.meta.json beside it" in err
    (tmp_path / "x.jsonl.meta.json").write_text("{}")
    assert "x.jsonl.meta.json has no 'label_set' key" in one_line_error(cervl("eval", tmp_path / "x.jsonl", "-o",
                                                                               tmp_path / "rep"))
    res = cervl("predcit")
    assert res.returncode == 2 and "did you mean 'predict'?" in res.stderr
    res = cervl("predict", "--run", demo / "run", "--manifset", manifest, "-o", tmp_path / "p.jsonl")
    assert res.returncode == 2 and "did you mean '--manifest'?" in res.stderr
    err = one_line_error(cervl("compare", tmp_path / "nope1", tmp_path / "nope2", "-o", tmp_path / "cmp"))
    assert "no metrics.json" in err and not (tmp_path / "cmp").exists()


def test_version():
    from cervl import __version__

    res = cervl("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"cervl {__version__}"


def _interrupt(args, marker: str, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``cervl ARGS``, send SIGINT once the regular expression ``marker`` matches stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "cervl.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd)
    err = b""
    deadline = time.monotonic() + timeout
    while not re.search(marker.encode(), err):
        chunk = proc.stderr.read1(4096)
        assert chunk and time.monotonic() < deadline, err.decode()[-3000:]
        err += chunk
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), (err + rest).decode())


def test_ctrl_c_prints_one_line_not_a_traceback(demo, tmp_path):
    # 24.4: predict (local) and synth with worker processes
    res = _interrupt(["predict", "--run", demo / "run", demo / "synthce", "-o", tmp_path / "p.jsonl"],
                     r"predict \(score\)")
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "nothing was written" in lines[0] and not (tmp_path / "p.jsonl").exists()
    out = tmp_path / "syn"
    res = _interrupt(["synth", "-o", out, "--per-class", "60", "--workers", "2"], r"SynthCE basic: .*\| [1-9]\d*/")
    assert res.returncode == 130 and "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, \
        res.stderr[-3000:]
    assert sum(ln.startswith("interrupted:") for ln in res.stderr.splitlines()) == 1
    written = len(list((out / "basic" / "Image" / "original").iterdir()))
    assert written > 0 and json.loads((out / "synthce.json").read_text())["complete"] is False
    # re-run smaller: what the interrupted run wrote is gone, what is listed is exactly what is there
    res = cervl("synth", "-o", out, "--per-class", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    for subset, k in (("basic", 7), ("compound", 11)):
        listed = (out / subset / "EmoLabel" / "list_patition_label.txt").read_text().split()[::2]
        assert sorted(listed) == sorted(p.name for p in (out / subset / "Image" / "original").iterdir())
        assert len(listed) == 2 * k == len(list((out / subset / "Annotation" / "manual").iterdir()))
    assert json.loads((out / "synthce.json").read_text())["complete"] is True


def test_synth_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "data" / "basic" / "Image" / "original"
    mine.mkdir(parents=True)
    (mine / "holiday.jpg").write_bytes(b"mine")
    err = one_line_error(cervl("synth", "-o", tmp_path / "data", "--per-class", "1"))
    assert "holds files that cervl did not write" in err and (mine / "holiday.jpg").read_bytes() == b"mine"


def test_predict_align_rows_carry_the_face_box(demo, tmp_path):
    # 24.6: as the server returns it
    res = cervl("predict", "--run", demo / "run", demo / "photo.jpg", demo / "sky.jpg", "--align",
                "-o", tmp_path / "p.jsonl")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {Path(r["image"]).name: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    x0, y0, x1, y1 = rows["photo.jpg"]["face_box"]
    assert 150 < x0 < x1 < 350 and 0 < y0 < y1 < 250  # the astronaut's face, in the photo's pixels
    assert "face_box" not in rows["sky.jpg"] and rows["sky.jpg"]["error"].startswith("no face found")


def test_rotated_astronaut_is_one_face():
    # 24.6: the second detection was a 21-px strap buckle on the suit (score 0.75-0.84): not a rival face
    from skimage import transform

    from cervl.faces.detect import make_detector
    from cervl.faces.pipeline import FaceAligner, rival_face

    img = Image.fromarray((transform.rotate(skimage_data.astronaut(), 30) * 255).astype(np.uint8))
    det = make_detector("mtcnn")
    faces = det.detect([img])[0]
    assert len(faces) == 2 and faces[1].score < 0.9 and np.sqrt(faces[1].area / faces[0].area) < 0.25
    assert not rival_face(faces[1], faces[0])
    res = FaceAligner(det).align(img)[0]
    assert res.status == "ok" and res.n_faces == 1


def test_class_colours_are_distinct_for_eleven_classes():
    # 24.5: the 10-colour cycle gave the 1st and the 11th class the same blue
    from cervl.core.plotting import class_style

    styles = [tuple(sorted(class_style(i).items())) for i in range(20)]
    assert len(set(styles)) == 20 and len({class_style(i)["color"] for i in range(11)}) == 11
