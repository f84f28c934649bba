"""``--engine ray``: the same rows as the one-machine path, on one local Ray cluster shared by these tests.

The cluster is ``ray.init(num_cpus=2)`` in this process; the commands run as real subprocesses that
join it through ``RAY_ADDRESS``. The model is a run trained two steps from the shipped tiny base.
"""

import glob
import json
import os
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
from test_video import write_video

ray = pytest.importorskip("ray")
cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def cervl(*args, address=None, timeout=600):
    # One torch thread, as in each Ray actor here: fp32 GEMMs block differently with another thread
    # count, which moves the 6th decimal of a probability; with the same count the rows are bitwise equal.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"RAY_ADDRESS": address} if address else {})}
    return subprocess.run([sys.executable, "-m", "cervl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A run trained from the shipped tiny base (two steps), SynthCE manifests, two videos, bad files."""
    base = tmp_path_factory.mktemp("ray")
    prepare_synthce(base / "synthce", base / "m", per_class=2, seed=3)
    train_quick(base, base / "m" / "synthce-compound-aligned.jsonl", model="pretrained-tiny")
    videos = base / "videos"
    videos.mkdir()
    write_video(videos / "clip1.avi", face_frames(9, blank=(4, 5)))
    write_video(videos / "clip2.avi", face_frames(6, blank=(), shift=3))
    photos = base / "photos"
    photos.mkdir()
    face = Image.fromarray(skimage_data.astronaut())
    for i in range(10):
        face.crop((100 + 3 * i, 0, 380 + 3 * i, 300)).resize((200, 214)).save(photos / f"p{i:02d}.jpg")
    Image.new("RGB", (200, 200), (90, 90, 90)).save(photos / "zz_noface.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return base


def face_frames(n, blank=(), shift=8):
    face = np.asarray(Image.fromarray(skimage_data.astronaut()).crop((140, 20, 320, 220)).resize((150, 166)))
    out = []
    for i in range(1, n + 1):
        canvas = np.full((240, 320, 3), 110, np.uint8)
        if i not in blank:
            canvas[30:196, 20 + shift * i:170 + shift * i] = face
        out.append(canvas)
    return out


def rows(path):
    out = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for r in out:
        r.pop("latency_ms", None)  # wall-clock, not a prediction
    return out


def both(demo, tmp_path, address, *args):
    """Run ``cervl predict ARGS`` on the local engine and on Ray; return both outputs' rows."""
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    res = cervl("predict", "--run", demo / "run", *args, "-o", local)
    assert res.returncode == 0, res.stderr[-3000:]
    res = cervl("predict", "--run", demo / "run", *args, "-o", remote, "--engine", "ray", "--shard-size", "8",
                address=address)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ray: " in res.stdout
    assert not Path(str(remote) + ".parts").exists()  # the shards became the output and were removed
    return rows(local), rows(remote)


def test_manifest_rows_equal_the_local_engine(demo, tmp_path, cluster):
    local, remote = both(demo, tmp_path, cluster, "--manifest", demo / "m" / "synthce-compound-aligned.jsonl")
    assert len(local) == 22 and remote == local  # every row, in order, every probability to 6 decimals
    # the same meta file, so that `cervl eval` reads Ray output as it reads local output
    meta = {k: json.loads(Path(f"{tmp_path / k}.jsonl.meta.json").read_text()) for k in ("local", "ray")}
    assert meta["ray"].pop("engine") == "ray" and meta["ray"] == meta["local"]
    assert meta["local"]["label_set"] == "rafdb-compound"
    res = subprocess.run([sys.executable, "-m", "cervl.cli", "eval", tmp_path / "ray.jsonl", "-o", tmp_path / "rep"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "accuracy" in res.stdout, res.stderr[-2000:]


def test_folder_with_align_and_a_corrupt_file(demo, tmp_path, cluster):
    local, remote = both(demo, tmp_path, cluster, demo / "photos", "--align")
    assert remote == local and len(remote) == 12
    by_id = {r["id"]: r for r in remote}
    assert by_id["broken.jpg"]["pred"] is None and "broken.jpg" in by_id["broken.jpg"]["error"]
    assert by_id["zz_noface.jpg"]["error"].startswith("no face found")
    assert sum(r["pred"] is not None for r in remote) == 10  # the rest succeed


def test_two_videos_frame_by_frame(demo, tmp_path, cluster):
    local, remote = both(demo, tmp_path, cluster, demo / "videos" / "clip1.avi", demo / "videos" / "clip2.avi",
                         "--batch-size", "4")
    assert [(r["video"], r["frame"]) for r in remote] == [("clip1", n) for n in range(1, 10)] + \
        [("clip2", n) for n in range(1, 7)]
    assert [r["status"] for r in remote][3:5] == ["lost", "lost"]
    assert remote == local


def test_abaw_submission_is_byte_identical(demo, tmp_path, cluster):
    res = cervl("abaw", demo / "videos", "--run", demo / "run", "-o", tmp_path / "local.txt", "--every", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cervl("abaw", demo / "videos", "--run", demo / "run", "-o", tmp_path / "ray.txt", "--every", "2",
                "--engine", "ray", address=cluster)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "ray.txt").read_bytes() == (tmp_path / "local.txt").read_bytes()
    assert len((tmp_path / "ray.txt").read_text().splitlines()) == 1 + 9 + 6


def test_align_writes_the_same_crops(demo, tmp_path, cluster):
    for engine in ("local", "ray"):
        res = cervl("align", demo / "photos", "-o", tmp_path / engine, "--engine", engine, address=cluster)
        assert res.returncode == 0, res.stderr[-3000:]
        res = cervl("align", demo / "videos", "--videos", "-o", tmp_path / f"{engine}-v", "--engine", engine,
                    address=cluster)
        assert res.returncode == 0, res.stderr[-3000:]
    for a, b in (("local", "ray"), ("local-v", "ray-v")):
        files = sorted(p.relative_to(tmp_path / a) for p in (tmp_path / a).rglob("*.jpg"))
        assert files and files == sorted(p.relative_to(tmp_path / b) for p in (tmp_path / b).rglob("*.jpg"))
        assert all((tmp_path / a / f).read_bytes() == (tmp_path / b / f).read_bytes() for f in files)
        assert (tmp_path / a / "manifest.jsonl").read_text() == (tmp_path / b / "manifest.jsonl").read_text()


def _many_images(folder: Path, n: int) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")
    return folder


def _actor_pids() -> list[int]:
    pids = []
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmd = Path(p).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::MapWorker(MapBatches(PredictorActor))"):
            pids.append(int(p.split("/")[2]))
    return pids


def test_a_killed_actor_still_gives_complete_output(demo, tmp_path, cluster):
    from cervl.predict.predictor import items_from_paths
    from cervl.scale import RayOptions
    from cervl.scale.pipeline import PredictJob, ray_predict

    folder = _many_images(tmp_path / "imgs", 160)
    out = tmp_path / "ray.jsonl"
    killed = []

    def killer():  # kill a scoring actor once the first shards are written: mid-run
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            parts = list(Path(str(out) + ".parts").glob("a-*.jsonl"))
            pids = _actor_pids()
            if len(parts) >= 2 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append((pids[0], len(parts)))
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    summary = ray_predict(PredictJob(demo / "run", items_from_paths([folder])), out,
                          RayOptions(actors=2, shard_size=8))
    t.join()
    assert killed and killed[0][1] < 20, "the actor was not killed mid-run"
    got = rows(out)
    assert summary.rows == 160 and [r["id"] for r in got] == [f"img{i:04d}.png" for i in range(160)]
    res = cervl("predict", "--run", demo / "run", folder, "-o", tmp_path / "local.jsonl")
    assert res.returncode == 0 and rows(tmp_path / "local.jsonl") == got


def _driver_after_shards(demo, tmp_path, cluster, shards: int, stderr=subprocess.DEVNULL):
    """Start a Ray ``cervl predict`` over 160 images; return (process, folder, output) once ``shards`` are written."""
    folder = _many_images(tmp_path / "imgs", 160)
    out = tmp_path / "ray.jsonl"
    args = [sys.executable, "-m", "cervl.cli", "predict", "--run", str(demo / "run"), str(folder), "-o", str(out),
            "--engine", "ray", "--shard-size", "8", "--actors", "1"]
    proc = subprocess.Popen(args, env={**os.environ, "RAY_ADDRESS": cluster}, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)
    parts = Path(str(out) + ".parts")
    deadline = time.time() + 180
    while time.time() < deadline and len(list(parts.glob("a-*.jsonl"))) < shards:
        time.sleep(0.05)
    return proc, folder, out


def test_an_interrupted_run_resumes_without_duplicates(demo, tmp_path, cluster):
    proc, folder, out = _driver_after_shards(demo, tmp_path, cluster, 3)
    parts = Path(str(out) + ".parts")
    proc.send_signal(signal.SIGKILL)  # the driver dies mid-run
    proc.wait()
    kept = len(list(parts.glob("a-*.jsonl")))
    assert 3 <= kept < 20 and not out.exists()
    res = cervl("predict", "--run", demo / "run", folder, "-o", out, "--engine", "ray", "--shard-size", "8",
                address=cluster)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{kept} kept from an earlier run" in res.stdout
    got = rows(out)
    assert [r["id"] for r in got] == [f"img{i:04d}.png" for i in range(160)]  # complete, each once, in order
    res = cervl("predict", "--run", demo / "run", folder, "-o", tmp_path / "local.jsonl")
    assert res.returncode == 0 and rows(tmp_path / "local.jsonl") == got


def test_ctrl_c_on_the_driver_prints_one_line_and_keeps_the_shards(demo, tmp_path, cluster):
    proc, _, out = _driver_after_shards(demo, tmp_path, cluster, 2, stderr=subprocess.PIPE)
    parts = Path(str(out) + ".parts")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "finished shards are kept" in lines[0] and len(list(parts.glob("a-*.jsonl"))) >= 2


def test_parquet_output_shipped_run_and_a_changed_resume_is_refused(demo, tmp_path, cluster):
    pq = pytest.importorskip("pyarrow.parquet")
    man = demo / "m" / "synthce-compound-aligned.jsonl"
    res = cervl("predict", "--run", demo / "run", "--manifest", man, "-o", tmp_path / "pq", "--engine", "ray",
                "--format", "parquet", "--shard-size", "8", "--ship-run", address=cluster)  # weights via object store
    assert res.returncode == 0, res.stderr[-3000:]
    table = pq.read_table(tmp_path / "pq").to_pylist()
    res = cervl("predict", "--run", demo / "run", "--manifest", man, "-o", tmp_path / "l.jsonl")
    local = rows(tmp_path / "l.jsonl")
    assert [r["id"] for r in table] == [r["id"] for r in local]
    assert [r["pred"] for r in table] == [r["pred"] for r in local]
    assert all(np.allclose(list(a["probs"].values()), list(b["probs"].values())) for a, b in zip(table, local))
    same = ["predict", "--run", demo / "run", "--manifest", man, "-o", tmp_path / "pq", "--engine", "ray",
            "--format", "parquet", "--shard-size", "8", "--ship-run"]
    for change in (["--normalize", "mean"], ["--batch-size", "4"]):  # one setting changed at a time
        res = cervl(*same, *change, address=cluster)
        assert res.returncode == 2 and "other inputs or settings" in res.stderr, (change, res.stderr[-2000:])


def test_without_ray_the_error_says_how_to_install(demo, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\nfrom cervl.cli import main\n"
            f"sys.exit(main(['predict', '--run', {str(demo / 'run')!r}, {str(demo / 'photos')!r}, '-o', "
            f"{str(tmp_path / 'x.jsonl')!r}, '--engine', 'ray']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "pip install 'cervl[ray]'" in res.stderr


def test_parquet_parts_get_the_umask_mode_not_0600(tmp_path):
    # 19.9: mkstemp's 0600 stayed on every part, unreadable to the group that reads the output
    from cervl.data.manifest import new_file_mode
    from cervl.scale.shards import ShardStore

    store = ShardStore(tmp_path / "out", "parquet", "fp")
    store.write("a-00000", [{"id": "x", "pred": "Sadly Angry"}])
    parts = list((tmp_path / "out").glob("*.parquet"))
    assert len(parts) == 1 and stat_mode(parts[0]) == new_file_mode() != 0o600


def stat_mode(path):
    return path.stat().st_mode & 0o777


def test_the_driver_joins_200k_rows_without_holding_them(tmp_path):
    # 19.9: ray_predict read every shard back into dicts and built the JSONL output as one string
    import tracemalloc

    from cervl.scale.shards import ShardStore

    store = ShardStore(tmp_path / "out.jsonl", "jsonl", "fp")
    keys = [f"a-{i:05d}" for i in range(100)]
    for s, key in enumerate(keys):
        store.write(key, [{"id": f"{s}-{i}", "pred": "Sadly Angry", "label": None, "error": None}
                          for i in range(2000)])
    seen = 0

    def counted():
        nonlocal seen
        for r in store.rows(keys):
            seen += 1
            yield r

    tracemalloc.start()
    store.finish(keys, {"label_set": "rafdb-compound"}, counted())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert seen == len(lines) == 200_000 and lines[-1].startswith('{"id": "99-1999"')
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # one shard of 2,000 rows, not 200,000
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_pseudo_label_on_ray_equals_the_local_engine(demo, tmp_path, cluster):
    man = demo / "m" / "synthce-compound-aligned.jsonl"
    common = ["--run", demo / "run", "--manifest", man, "--threshold", "0.05", "--window", "0"]
    res = cervl("pseudo-label", *common, "-o", tmp_path / "local.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    res = cervl("pseudo-label", *common, "-o", tmp_path / "ray.jsonl", "--engine", "ray", "--shard-size", "8",
                address=cluster)
    assert res.returncode == 0, res.stderr[-3000:]
    local, remote = (tmp_path / "local.jsonl").read_text(), (tmp_path / "ray.jsonl").read_text()
    assert remote == local and len(local.splitlines()) > 0
