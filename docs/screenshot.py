"""Regenerate docs/serve-page.png: the web page of `cervl serve` on the demo run, in Debian's chromium, with
"show where the model looks" on (the SynthCE notice shows in the header).

    .venv/bin/python docs/screenshot.py [--run runs/demo/run]
"""

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import uvicorn
    from playwright.sync_api import sync_playwright

    from cervl.predict import Predictor
    from cervl.serve.app import create_app, run_summary

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve-page.png")
    args = ap.parse_args()
    app = create_app(Predictor.from_run(args.run), run_info=run_summary(args.run))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    from cervl.data.manifest import read_manifest

    m = read_manifest(ROOT / "runs" / "demo" / "manifests" / "synthce-compound-aligned.jsonl")
    chosen: dict = {}
    for r in m:  # one test photo each of four different classes
        if r.split == "test" and r.label not in chosen and len(chosen) < 4:
            chosen[r.label] = str(m.image_path(r))
    photos = list(chosen.values())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('label set')")
        page.check("#explain")  # the predicted class's map over each photo
        page.set_input_files("#files", photos)
        page.wait_for_function(f"document.querySelectorAll(\".card[data-state='done']\").length == {len(photos)}")
        page.screenshot(path=str(args.out))
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
