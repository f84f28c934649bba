"""Ray scale-out on this machine: 1 vs 2 predictor actors against the one-process path, side by side.

    .venv/bin/python benchmarks/ray_scale.py [--run runs/demo/run] [--images 4000] [--videos 6 --frames 150]

One local Ray cluster (``ray.init(num_cpus=2)``) serves every measurement. Each actor gets one torch
thread; the one-process path runs with one thread and with the machine's default. Workloads:

* images: SynthCE aligned test images (repeated to ``--images``), demo model, score mode;
* videos: ``--videos`` synthetic clips of ``--frames`` frames each, tracked and aligned (MTCNN +
  optical flow) in one CPU task per video, scored by the actors.

Ray's fixed costs: ``ray.init`` (once per cluster), and per run the actor start, model load and
pipeline set-up, found by timing a small and a large job: their difference gives the marginal rate
with the fixed cost cancelled. Writes ``OUT/ray_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def images(run_root: Path, n: int):
    from cervl.predict.predictor import items_from_manifest

    man = run_root / "manifests" / "synthce-compound-aligned.jsonl"
    base = items_from_manifest(man)
    items = []
    for i in range(n):
        it = base[i % len(base)]
        items.append(type(it)(id=f"{i:06d}", image=it.image, label=it.label))
    return items


def clips(folder: Path, n: int, frames: int) -> list[Path]:
    import cv2
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    face = np.asarray(Image.fromarray(data.astronaut()).crop((140, 20, 320, 220)).resize((150, 166)))
    paths = []
    for v in range(n):
        path = folder / f"clip{v}.avi"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (320, 240))
        for i in range(frames):
            canvas = np.full((240, 320, 3), 100 + 10 * v, np.uint8)
            x = int(60 + 40 * np.sin(i / 15 + v))
            canvas[30:196, x:x + 150] = face
            w.write(np.ascontiguousarray(canvas[:, :, ::-1]))
        w.release()
        paths.append(path)
    return paths


def fresh(out: Path) -> Path:
    """``out`` with this benchmark's earlier output removed, so that nothing is resumed."""
    import shutil

    from cervl.scale.shards import MARKER

    parts = Path(str(out) + ".parts")
    if (parts / MARKER).is_file():  # shards of an interrupted earlier run (written by cervl)
        shutil.rmtree(parts)
    for f in (out, Path(str(out) + ".meta.json")):
        f.unlink(missing_ok=True)
    return out


def one_process(run: Path, items, videos, threads: int) -> float:
    import torch

    from cervl.predict import Predictor
    from cervl.predict.video import predict_videos

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pred = Predictor.from_run(run)
    n = sum(1 for _ in pred.predict(items, batch_size=8, progress=False)) if items else 0
    for _, rows in predict_videos(pred, videos, batch_size=8, detector="mtcnn") if videos else ():
        n += len(rows)
    return n / (time.perf_counter() - t0)


def on_ray(run: Path, items, videos, actors: int, out: Path, shard: int = 64, cpus: float = 0.75):
    """(wall-clock rows/s, rows/s after the first shard, rows, seconds to the first shard)."""
    from cervl.scale import RayOptions
    from cervl.scale.pipeline import PredictJob, ray_predict

    t0 = time.perf_counter()
    s = ray_predict(PredictJob(run, items, videos, detector={"detector": "mtcnn", "options": {}}), out,
                    RayOptions(actors=actors, cpus_per_actor=cpus, cpus_per_task=0.5, shard_size=shard))
    return s.rows / (time.perf_counter() - t0), s.steady_rate() or float("nan"), s.rows, s.first_output_seconds


def _child(run: str, n: int) -> None:
    """Child process of :func:`ceiling`: load the model, then score ``n`` images with one thread once
    the shared start time (argv[4]) arrives; print the scoring start and end (wall clock)."""
    import torch

    from cervl.predict import Predictor

    torch.set_num_threads(1)
    items, pred = images(Path(run).parent, n), Predictor.from_run(run)
    time.sleep(max(0.0, float(sys.argv[4]) - time.time()))
    t0 = time.time()
    for _ in pred.predict(items, batch_size=8, progress=False):
        pass
    print(t0, time.time(), flush=True)


def ceiling(run: Path, n: int) -> dict:
    """The machine's own limit, without Ray: one plain process scoring alone vs two at once (one thread
    each). Two cores in a VM share caches and memory bandwidth, so two scorers do not give 2x."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def spans(k: int) -> list[tuple[float, float]]:
        cmd = [sys.executable, __file__, "--child", str(run), str(n), str(time.time() + 25)]  # after model loads
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
        return [tuple(map(float, p.communicate()[0].split()[-2:])) for p in procs]

    (a0, a1), = spans(1)
    both = spans(2)
    alone, pair = n / (a1 - a0), 2 * n / (max(e for _, e in both) - min(s for s, _ in both))
    return {"one_process": round(alone, 1), "two_processes": round(pair, 1), "ratio": round(pair / alone, 2)}


def marginal(run: Path, small, large, actors: int, out: Path, cpus: float, name: str) -> dict:
    """Wall-clock of a small and a large job; their difference gives the rate with Ray's fixed per-run
    cost (actor start, model load, pipeline set-up) cancelled out, and that cost itself."""
    t = {}
    for size, (items, videos) in (("small", small), ("large", large)):
        t0 = time.perf_counter()
        _, _, rows, _ = on_ray(run, items, videos, actors, fresh(out / f"{name}-{actors}-{size}.jsonl"), cpus=cpus)
        t[size] = (rows, time.perf_counter() - t0)
    (n1, t1), (n2, t2) = t["small"], t["large"]
    rate = (n2 - n1) / (t2 - t1)
    return {"rows": n2, "wall": n2 / t2, "marginal": rate, "fixed_s": t1 - n1 / rate}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return _child(sys.argv[2], int(sys.argv[3]))
    if sys.argv[1:2] == ["--ceiling"]:
        return print(ceiling(ROOT / "runs/demo/run", int(sys.argv[2])))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs/demo/run")
    ap.add_argument("--images", type=int, default=4000, help="the large image job (the small one is a quarter)")
    ap.add_argument("--videos", type=int, default=6, help="the large video job (the small one is a third)")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--out", type=Path, default=ROOT / "runs/bench-ray")
    args = ap.parse_args()
    if not (args.run / "final").is_dir():
        sys.exit(f"{args.run} is not a finished run: run `make demo` first (or pass --run)")
    import ray
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"cores": os.cpu_count(), "images": args.images, "videos": args.videos, "frames": args.frames}
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res["ray_init_s"] = round(time.perf_counter() - t0, 2)
    items = images(args.run.parent, args.images)
    vids = clips(args.out / "clips", args.videos, args.frames)
    threads = torch.get_num_threads()
    res["ceiling"] = ceiling(args.run, args.images // 2)
    table = []
    # videos: actors reserve 0.5 CPU so that two tracking tasks (0.5 each) run beside two actors
    for name, small, large, cpus in (("images", (items[:len(items) // 4], []), (items, []), 0.75),
                                     ("videos", ([], vids[:max(1, len(vids) // 3)]), ([], vids), 0.5)):
        row = {"workload": name, "one_process_1_thread": one_process(args.run, *large, 1),
               "one_process_default_threads": one_process(args.run, *large, threads)}
        torch.set_num_threads(threads)
        for k in (1, 2):
            m = marginal(args.run, small, large, k, args.out, cpus, name)
            row.update({"rows": m["rows"], f"ray_{k}_wall": m["wall"], f"ray_{k}_marginal": m["marginal"],
                        f"ray_{k}_fixed_s": m["fixed_s"]})
        row["scaling_wall"] = row["ray_2_wall"] / row["ray_1_wall"]
        row["scaling_marginal"] = row["ray_2_marginal"] / row["ray_1_marginal"]
        table.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
    res["table"] = table
    (args.out / "ray_scale.json").write_text(json.dumps(res, indent=2) + "\n")
    c = res["ceiling"]
    print(f"ray.init {res['ray_init_s']} s (once per cluster). Machine ceiling without Ray: one scoring process "
          f"{c['one_process']} img/s, two at once {c['two_processes']} img/s = {c['ratio']}x")
    print("| workload | rows | 1 process, 1 thread | 1 process, default threads | Ray 1 actor | Ray 2 actors | 2 vs 1 "
          "| marginal: 1 actor | marginal: 2 actors | marginal 2 vs 1 | fixed cost per run (1 / 2 actors) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['workload']} | {r['rows']} | {r['one_process_1_thread']:.1f} | {r['one_process_default_threads']:.1f}"
              f" | {r['ray_1_wall']:.1f} | {r['ray_2_wall']:.1f} | {r['scaling_wall']:.2f}x | {r['ray_1_marginal']:.1f}"
              f" | {r['ray_2_marginal']:.1f} | {r['scaling_marginal']:.2f}x | {r['ray_1_fixed_s']:.1f} s / "
              f"{r['ray_2_fixed_s']:.1f} s |")
    print("(rows/s. Ray: wall-clock of the large job, and the marginal rate (large - small) / (t_large - t_small),\n"
          " which cancels the fixed per-run cost of starting actors and loading the model)")


if __name__ == "__main__":
    main()
