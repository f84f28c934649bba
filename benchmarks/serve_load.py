"""Load test of ``cervl serve`` on 127.0.0.1 only: dynamic batching vs ``--max-batch 1``, side by side.

    .venv/bin/python benchmarks/serve_load.py [--run runs/demo/run] [--requests 40] [--soak 5000]

Starts the server twice (batching on, then off) as separate processes on free loopback ports, sends
SynthCE test images from 1, 8 and 32 concurrent clients (each a fixed number of requests: the loops
are bounded), and reports throughput, p50/p95/p99 latency and responses by status. Then a soak of
``--soak`` requests at 32 clients against the batching server, with its RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cervl.cli", "-q", "serve", "--run", str(run), "--host", "127.0.0.1",
                             "--port", str(port), "--max-batch", str(max_batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, images: list[bytes], clients: int, per_client: int) -> dict:
    """``clients`` threads, each sending ``per_client`` requests back to back."""

    def client(k: int):
        out = []
        with httpx.Client(timeout=120) as http:
            for i in range(per_client):
                body = images[(k * per_client + i) % len(images)]
                t0 = time.perf_counter()
                try:
                    status = http.post(url + "/v1/predict", content=body, headers={"Content-Type": "image/jpeg"}
                                       ).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                out.append((status, time.perf_counter() - t0))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = np.array([dt for _, dt in results]) * 1000
    statuses: dict = {}
    for s, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    return {"clients": clients, "requests": len(results), "throughput": len(results) / wall,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "status": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "run")
    ap.add_argument("--images", type=Path, default=ROOT / "runs" / "demo" / "synthce" / "compound" / "Image" / "aligned")
    ap.add_argument("--requests", type=int, default=40, help="requests per client per level")
    ap.add_argument("--soak", type=int, default=5000)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if not (args.run / "final").is_dir():
        sys.exit(f"no run at {args.run}: run `make demo` first")
    images = [p.read_bytes() for p in sorted(args.images.glob("test_*.jpg"))[:200]]
    results = {}
    for name, max_batch in (("batching", 32), ("no batching", 1)):
        proc, url = start_server(args.run, max_batch)
        try:
            load(url, images, 4, 5)  # warm-up
            for clients in (1, 8, 32):
                r = load(url, images, clients, max(args.requests, 1) if clients > 1 else 2 * args.requests)
                results[(name, clients)] = r
                print(f"{name:12s} {clients:3d} clients: {r['throughput']:6.1f} req/s  p50 {r['p50']:7.1f} ms  "
                      f"p95 {r['p95']:7.1f} ms  p99 {r['p99']:7.1f} ms  status {r['status']}", flush=True)
            if name == "batching" and args.soak:
                before = rss_mb(proc.pid)
                soak = load(url, images, 32, args.soak // 32)
                after = rss_mb(proc.pid)
                results["soak"] = {**soak, "rss_start_mb": before, "rss_end_mb": after}
                print(f"soak: {soak['requests']} requests at 32 clients, {soak['throughput']:.1f} req/s, status "
                      f"{soak['status']}, RSS {before:.0f} -> {after:.0f} MB ({after - before:+.1f} MB)", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    b32, n32, b1 = results[("batching", 32)], results[("no batching", 32)], results[("batching", 1)]
    five = sum(v for r in results.values() for s, v in r["status"].items() if s.startswith("5"))
    print(f"\nthroughput at 32 clients, batching / no batching: {b32['throughput'] / n32['throughput']:.2f}x (target >= 3)")
    print(f"p95 at 32 clients / single-client p95 (batching): {b32['p95'] / b1['p95']:.2f}x (target <= 2)")
    print(f"5xx responses: {five} (target 0)")
    if "soak" in results:
        print(f"RSS growth over the soak: {results['soak']['rss_end_mb'] - results['soak']['rss_start_mb']:+.1f} MB "
              f"(target < 50)")
    if args.out:
        args.out.write_text(json.dumps({f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in results.items()},
                                       indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
