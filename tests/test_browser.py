"""The web page in a real browser: Playwright driving Debian's chromium against a server on 127.0.0.1.

Screenshots of every state are saved under the test's tmp dir (and, with CERVL_SCREENSHOTS=DIR, there).
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium: apt-get install -y chromium (.ci/run installs it)", allow_module_level=True)

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from cervl.models.loading import build_tiny
    from cervl.predict import Predictor
    from cervl.serve.app import create_app

    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    app = create_app(Predictor(model, proc, "minimal", "rafdb-compound"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, tmp_path):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
    pg = ctx.new_page()
    console_errors = []
    pg.on("pageerror", lambda e: console_errors.append(str(e)))
    pg.goto(server + "/")
    pg.wait_for_function("document.getElementById('model').textContent.includes('label set')")
    yield pg
    ctx.close()
    assert console_errors == []


def shot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("CERVL_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    assert path.stat().st_size > 5000
    return path


def test_photo_upload_shows_bars_summing_to_one_and_a_face_box(page, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=92)
    page.check("#align")
    page.set_input_files("#files", str(photo))
    page.wait_for_selector(".card[data-state='done']", timeout=60000)
    probs = page.eval_on_selector_all(".card .bars .track", "els => els.map(e => parseFloat(e.dataset.prob))")
    assert len(probs) == 11 and abs(sum(probs) - 1) < 1e-3
    box = page.get_attribute(".card canvas", "data-box")
    assert box and len(eval(box)) == 4  # noqa: S307 - a JSON list of 4 numbers written by the page
    assert page.locator(".card .bars .top").count() == 3  # label, bar and value of the top class highlighted
    shot(page, tmp_path, "photo")


def test_webcam_mode_shows_live_updates(page, tmp_path):
    page.click("button[data-tab='webcam']")
    page.uncheck("#align")  # the fake camera shows a test pattern, not a face: score the whole frame
    page.click("#camstart")
    page.wait_for_function("Number(document.getElementById('camstatus').dataset.frames || 0) >= 3", timeout=60000)
    first = page.get_attribute("#camstatus", "data-frames")
    page.wait_for_function(f"Number(document.getElementById('camstatus').dataset.frames) > {first}", timeout=30000)
    probs = page.eval_on_selector_all("#cambars .track", "els => els.map(e => parseFloat(e.dataset.prob))")
    assert len(probs) == 11 and abs(sum(probs) - 1) < 1e-3
    shot(page, tmp_path, "webcam")
    page.click("#camstop")


def test_video_upload_shows_a_timeline_and_segments(page, tmp_path):
    face = np.asarray(Image.fromarray(skdata.astronaut()).crop((140, 20, 320, 220)).resize((150, 166)))
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for i in range(1, 13):
        canvas = np.full((240, 320, 3), 110, np.uint8)
        canvas[30:196, 20 + 8 * i: 170 + 8 * i] = face
        vw.write(np.ascontiguousarray(canvas[:, :, ::-1]))
    vw.release()
    page.click("button[data-tab='video']")
    page.set_input_files("#videofile", str(path))
    page.wait_for_selector("#videostatus[data-done='1']", timeout=120000)
    assert page.get_attribute("#videoplot", "data-frames") == "12"
    assert page.locator("#segments tbody tr").count() >= 1
    assert "12 frames" in page.inner_text("#videosummary")
    shot(page, tmp_path, "video")


def test_a_bad_file_shows_an_error_in_the_page(page, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    page.set_input_files("#files", str(bad))
    page.wait_for_selector(".card[data-state='error']", timeout=30000)
    assert "broken.jpg" in page.inner_text(".card .error")
    assert page.is_visible("#banner") and "not an image" in page.inner_text("#banner") or \
        "cannot decode" in page.inner_text("#banner")
    shot(page, tmp_path, "error")


def test_api_docs_render_with_no_network(browser, server, tmp_path):
    # issue 20: /docs loaded Swagger UI from a CDN and was blank offline; every request off 127.0.0.1 is blocked
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    outside = []

    def only_local(route):
        if route.request.url.startswith(server):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    pg.route("**/*", only_local)
    pg.goto(server + "/docs")
    pg.wait_for_selector(".opblock-summary-path", timeout=20000)  # the operations, rendered from /openapi.json
    paths = pg.locator(".opblock-summary-path").all_inner_texts()
    shot(pg, tmp_path, "docs")
    ctx.close()
    assert outside == [] and "/v1/predict" in paths and "/v1/predict/batch" in paths


def test_explain_toggle_overlays_the_map_on_the_photo(page, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=92)
    page.check("#align")
    page.check("#explain")
    page.set_input_files("#files", str(photo))
    page.wait_for_selector(".card[data-state='done']", timeout=60000)
    heat = page.locator(".card .heat")
    assert heat.count() == 1
    assert heat.get_attribute("data-class") == page.get_attribute(".card .bars", "data-top")
    # drawn exactly over the photo, and a loaded PNG
    canvas_box, heat_box = page.locator(".card canvas").bounding_box(), heat.bounding_box()
    assert all(abs(canvas_box[k] - heat_box[k]) < 1.5 for k in ("x", "y", "width", "height"))
    assert page.evaluate("document.querySelector('.card .heat').naturalWidth") == 512
    assert "model looks" in page.locator("#explain").locator("xpath=..").inner_text()
    shot(page, tmp_path, "explain")
    # the header says what the model learned from (this test model: no lineage, no SynthCE notice)
    assert "trained:" in page.inner_text("[data-testid=trained]")
    assert page.locator("#notice.hidden").count() == 1
