"""The HTTP API (FastAPI): every endpoint, every bad input, auth, batching, video jobs, slow clients."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from cervl.models.loading import build_tiny  # noqa: E402
from cervl.predict import Predictor  # noqa: E402
from cervl.serve.app import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def predictor():
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    return Predictor(model, proc, "minimal", "rafdb-compound")


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_body_bytes=2 * 2**20, max_pixels=4_000_000))) as c:
        yield c


def png(size=(112, 112), mode="RGB", color=(120, 90, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, "PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


def face_jpeg(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def check_prediction(r, classes):
    assert r["pred"] in classes and list(r["probs"]) == classes
    assert abs(sum(r["probs"].values()) - 1) < 1e-4
    assert r["top2"][0][0] == r["pred"] and r["top2"][0][1] >= r["top2"][1][1]
    assert r["latency_ms"] > 0


def test_health_ready_model_and_page(client, predictor):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    m = client.get("/v1/model").json()
    assert m["label_set"] == "rafdb-compound" and m["classes"] == list(predictor.label_set.classes)
    assert m["prompt"] == "minimal"
    page = client.get("/")
    assert page.status_code == 200 and "<title>cervl" in page.text
    assert client.get("/static/app.js").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_multipart_json_and_raw_agree(client, predictor):
    classes = list(predictor.label_set.classes)
    img = face_jpeg()
    a = client.post("/v1/predict", files={"file": ("a.jpg", img, "image/jpeg")})
    b = client.post("/v1/predict", json={"image_base64": base64.b64encode(img).decode()})
    c = client.post("/v1/predict", content=img, headers={"Content-Type": "image/jpeg"})
    for r in (a, b, c):
        assert r.status_code == 200, r.text
        check_prediction(r.json(), classes)
    assert a.json()["probs"] == b.json()["probs"] == c.json()["probs"]
    expected = predictor.score([Image.open(io.BytesIO(img)).convert("RGB")])[0]
    np.testing.assert_allclose(list(a.json()["probs"].values()), expected, atol=2e-6)


def test_batch_endpoint(client, predictor):
    files = [("files", (f"{i}.jpg", face_jpeg(i), "image/jpeg")) for i in range(3)]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for res in results:
        check_prediction(res, list(predictor.label_set.classes))
    j = client.post("/v1/predict/batch", json={"images": [base64.b64encode(face_jpeg(i)).decode() for i in range(3)]})
    assert [x["probs"] for x in j.json()["results"]] == [x["probs"] for x in results]


@pytest.mark.parametrize("body,ctype,status,words", [
    (b"definitely not an image", "image/jpeg", 400, "not an image"),
    (face_jpeg()[:300], "image/jpeg", 400, "cannot decode"),
    (b"", "image/jpeg", 400, "empty"),
    (b"hello", "text/plain", 415, "unsupported content type"),
    (b"x" * (3 * 2**20), "image/jpeg", 413, "exceeds the limit"),
    (png((2000, 3)), "image/png", 400, "aspect ratio"),
    (png((13000, 13000), mode="L"), "image/png", 413, "pixels exceeds"),
])
def test_bad_inputs_get_4xx_json(client, body, ctype, status, words):
    r = client.post("/v1/predict", content=body, headers={"Content-Type": ctype})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_bad_json_and_bad_align_value(client):
    r = client.post("/v1/predict", json={"image": "x"})
    assert r.status_code == 400 and "image_base64" in r.json()["error"]
    r = client.post("/v1/predict?align=maybe", content=face_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and "align" in r.json()["error"]


@pytest.mark.parametrize("mode,color", [("L", 128), ("RGBA", (10, 200, 30, 128)), ("CMYK", (0, 50, 100, 0))])
def test_grayscale_alpha_and_cmyk_are_converted(client, mode, color):
    buf = io.BytesIO()
    Image.new(mode, (112, 112), color).save(buf, "JPEG" if mode == "CMYK" else "PNG")
    r = client.post("/v1/predict", files={"file": ("x", buf.getvalue(), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["pred"]


def test_align_reports_the_face_box(client):
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG")
    r = client.post("/v1/predict?align=true", files={"file": ("astronaut.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200, r.text
    face = r.json()["face"]
    assert face["status"] in ("ok", "multiple") and len(face["box"]) == 4
    x0, y0, x1, y1 = face["box"]
    assert 120 < (x0 + x1) / 2 < 320 and 40 < (y0 + y1) / 2 < 240  # Eileen Collins' face, not the flag
    blank = client.post("/v1/predict?align=true", content=png((300, 300)), headers={"Content-Type": "image/png"})
    assert blank.json()["pred"] is None and blank.json()["face"]["status"] == "no_face"


def test_metrics_report_requests_batches_and_errors(client):
    client.post("/v1/predict", content=face_jpeg(), headers={"Content-Type": "image/jpeg"})
    client.post("/v1/predict", content=b"", headers={"Content-Type": "image/jpeg"})
    text = client.get("/metrics").text
    assert 'cervl_requests_total{endpoint="/v1/predict",status="200"}' in text
    assert 'cervl_requests_total{endpoint="/v1/predict",status="400"}' in text
    assert "cervl_batch_size_bucket" in text and 'cervl_errors_total{kind="client"}' in text
    assert "cervl_request_latency_seconds_count" in text


def test_server_fault_is_a_logged_500(predictor, caplog):
    class Broken:
        label_set, style = predictor.label_set, predictor.style

        def score(self, images, **kw):
            raise RuntimeError("boom")

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", content=face_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 500 and "internal" in r.json()["error"]
    assert any("boom" in (rec.exc_text or "") or "batch" in rec.getMessage() for rec in caplog.records)


def test_api_key(predictor):
    with TestClient(create_app(predictor, ServeSettings(api_key="s3cret"))) as c:
        img = {"content": face_jpeg(), "headers": {"Content-Type": "image/jpeg"}}
        assert c.post("/v1/predict", **img).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        ok = c.post("/v1/predict", content=img["content"],
                    headers={**img["headers"], "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.post("/v1/predict", content=img["content"],
                      headers={**img["headers"], "X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/predict", content=img["content"],
                      headers={**img["headers"], "X-API-Key": "wrong"}).status_code == 401


def test_non_loopback_host_needs_a_key(predictor):
    from cervl.core.errors import InvalidInput
    from cervl.serve import is_loopback, serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(InvalidInput, match="API key"):
        serve(predictor, host="0.0.0.0", port=0)


# --- a real server on 127.0.0.1 (uvicorn in a thread) ------------------------------------------

class LiveServer:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_concurrent_requests_share_model_calls_and_match_unbatched(predictor):
    app = create_app(predictor, ServeSettings(max_batch=32, max_wait_ms=300))
    images = [face_jpeg(100 + i) for i in range(16)]
    with LiveServer(app) as url, httpx.Client(timeout=60) as http:
        http.get(url + "/health")
        before = app.state.metrics.model_calls

        def post(img):
            return http.post(url + "/v1/predict", content=img, headers={"Content-Type": "image/jpeg"}).json()

        with ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(post, images))
        calls = app.state.metrics.model_calls - before
    # a lone first request is answered at once; the 15 that queue behind it share one or two model calls
    assert calls <= 4, calls
    single = np.stack([predictor.score([Image.open(io.BytesIO(b)).convert("RGB")])[0] for b in images])
    got = np.array([[r["probs"][c] for c in predictor.label_set.classes] for r in rows])
    np.testing.assert_allclose(got, single, atol=2e-6)  # responses carry 6 decimals


def test_a_stalled_client_does_not_block_the_others(predictor):
    app = create_app(predictor)
    with LiveServer(app) as url:
        stalled = []
        for _ in range(20):  # connections that send half a request and then nothing
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            stalled.append(s)
        try:
            t0 = time.perf_counter()
            r = httpx.get(url + "/health", timeout=5)
            assert r.status_code == 200 and time.perf_counter() - t0 < 2
            r = httpx.post(url + "/v1/predict", content=face_jpeg(), headers={"Content-Type": "image/jpeg"}, timeout=30)
            assert r.status_code == 200
        finally:
            for s in stalled:
                s.close()


def _clip(tmp_path):
    """An 8-frame, 10 frames/s MJPG clip of a face moving right; frame 5 has no face."""
    cv2 = pytest.importorskip("cv2")
    from skimage import data

    face = np.asarray(Image.fromarray(data.astronaut()).crop((140, 20, 320, 220)).resize((150, 166)))
    path = tmp_path / "clip.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for i in range(1, 9):
        canvas = np.full((240, 320, 3), 110, np.uint8)
        if i != 5:
            canvas[30:196, 20 + 8 * i: 170 + 8 * i] = face
        vw.write(np.ascontiguousarray(canvas[:, :, ::-1]))
    vw.release()
    return path


def _post_video(c, path):
    return c.post("/v1/predict/video", files={"file": ("clip.avi", path.read_bytes(), "video/x-msvideo")})


def _finished(c, url) -> dict:
    for _ in range(300):
        job = c.get(url).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job['status']}")


def test_video_job_end_to_end(predictor, tmp_path):
    path = _clip(tmp_path)
    with TestClient(create_app(predictor)) as c:
        r = _post_video(c, path)
        assert r.status_code == 202, r.text
        job = _finished(c, r.json()["status_url"])
        assert job["status"] == "done", job
        assert job["frames_total"] == 8 and len(job["rows"]) == 8 and len(job["timeline"]["smoothed"]) == 8
        assert [r["status"] for r in job["rows"]][4] == "lost" and job["summary"]["frames_with_face"] == 7
        assert sum(s["frames"] for s in job["segments"]) == 8 and job["summary"]["dominant"] in job["classes"]
        bad = c.post("/v1/predict/video", files={"file": ("x.avi", b"not a video", "video/x-msvideo")})
        assert bad.status_code == 400 and "cannot" in bad.json()["error"]
        assert c.get("/v1/jobs/nope").status_code == 404
    with TestClient(create_app(predictor, ServeSettings(max_video_seconds=0.5))) as c:  # 0.8 s of video
        r = c.post("/v1/predict/video", files={"file": ("clip.avi", path.read_bytes(), "video/x-msvideo")})
        assert r.status_code == 413 and "exceeds" in r.json()["error"]


def test_cli_serve_refuses_open_host_without_key(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "cervl.cli", "serve", "--run", str(tmp_path), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "API key" in res.stderr and "Traceback" not in res.stderr


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    # before: {"detail": "Not Found"}, while every other error is {"error": ...}
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"error": "no such route: GET /v1/nope (routes: /docs)"}
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.json()["error"].startswith("method GET not allowed")


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(predictor):
    # 19.1: each image passed its own 40-MP check, the request as a whole had no limit
    settings = ServeSettings(max_pixels=1_000_000, max_request_pixels=2_000_000)
    with TestClient(create_app(predictor, settings)) as c:
        files = [("files", (f"{i}.png", png((1000, 1000)), "image/png")) for i in range(3)]
        r = c.post("/v1/predict/batch", files=files)
        assert r.status_code == 413 and "3 images of 3000000 pixels in all exceed" in r.json()["error"]
        r = c.post("/v1/predict/batch", files=files[:2])
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        # /v1/predict scores the first part only, so it decodes only that one (a broken second part is ignored)
        r = c.post("/v1/predict", files=[("file", ("a.png", png(), "image/png")),
                                         ("file", ("b.png", b"\x89PNG broken", "image/png"))])
        assert r.status_code == 200 and r.json()["pred"] in predictor.label_set.classes
        assert c.app.state.service.pixels.used == 0  # every request gave its pixels back


def test_the_server_wide_pixel_budget_makes_requests_wait_then_503():
    import asyncio

    from cervl.serve.batcher import PixelBudget

    async def scenario():
        budget = PixelBudget(3_000_000, wait_s=0.2)
        first = await budget.acquire(2_000_000)
        with pytest.raises(PixelBudget.Busy, match="2000000 of 3000000 pixels"):
            await budget.acquire(2_000_000)  # does not fit: waits 0.2 s, then busy (the server answers 503)
        waiter = asyncio.ensure_future(PixelBudget.acquire(budget, 2_000_000))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await budget.release(first)  # room again: the waiting request goes on
        assert await asyncio.wait_for(waiter, 1.0) == 2_000_000 and budget.used == 2_000_000

    asyncio.run(scenario())


SERVER = """import sys
import uvicorn
from cervl.models.loading import build_tiny
from cervl.predict import Predictor
from cervl.serve.app import create_app
model, proc = build_tiny("tiny-qwen2-vl", seed=0)
app = create_app(Predictor(model, proc, "minimal", "rafdb-compound"))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_three_attackers_with_flat_38mp_pngs_leave_the_server_up(tmp_path):
    # 19.1, as measured: 3 concurrent batches of 64 flat 38-MP PNGs drove the demo server from 0.5 to 24 GB
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.post(url + "/v1/predict", files={"file": ("a.png", png(), "image/png")}).status_code == 200
        before = _peak_rss_mb(server.pid)
        buf = io.BytesIO()
        Image.new("RGB", (7000, 5430), (120, 90, 80)).save(buf, "PNG")  # 38 MP, flat: compresses to ~110 KB
        bomb = buf.getvalue()
        files = [("files", (f"{i}.png", bomb, "image/png")) for i in range(64)]

        def attack(_):
            return httpx.post(url + "/v1/predict/batch", files=files, timeout=120)

        with ThreadPoolExecutor(3) as ex:
            answers = list(ex.map(attack, range(3)))
        assert [r.status_code for r in answers] == [413] * 3, [r.text for r in answers]
        assert "exceed this server's limit" in answers[0].json()["error"]
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
        growth = _peak_rss_mb(server.pid) - before
        print(f"peak RSS {before:.0f} MB -> +{growth:.0f} MB under 3 x 64 flat 38-MP PNGs ({len(bomb)} B each)")
        assert growth < 1024
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_video_jobs_are_capped_and_their_uploads_removed_on_every_path(predictor, tmp_path):
    # 19.2: no cap on queued jobs (each holding a 200 MB upload); files left behind on refusals
    import threading

    path = _clip(tmp_path)
    with TestClient(create_app(predictor, ServeSettings(max_video_jobs=1))) as c:
        jobs = c.app.state.service.jobs
        gate = threading.Event()
        jobs.pool.submit(gate.wait)  # the job thread is busy: the next job stays queued
        first = _post_video(c, path)
        assert first.status_code == 202 and first.json()["status"] == "queued"
        second = _post_video(c, path)
        assert second.status_code == 429 and "1 video jobs are already queued or running" in second.json()["error"]
        assert len(list(jobs.tmp.iterdir())) == 1  # the queued job's upload only
        gate.set()
        assert _finished(c, first.json()["status_url"])["status"] == "done"
        assert list(jobs.tmp.iterdir()) == []  # removed when its job ended
        third = _post_video(c, path)
        assert third.status_code == 202  # room again
        assert _finished(c, third.json()["status_url"])["status"] == "done"
        bad = c.post("/v1/predict/video", files={"file": ("x.avi", b"not a video", "video/x-msvideo")})
        assert bad.status_code == 400 and list(jobs.tmp.iterdir()) == []  # a refused upload leaves nothing


def test_video_length_is_enforced_while_decoding_and_progress_reaches_one(predictor, tmp_path, monkeypatch):
    # 19.2: streamed or fragmented files report 0 frames, so the header check let any length through
    import cervl.serve.jobs as jobs_mod

    path = _clip(tmp_path)  # 0.8 s at 10 frames/s
    monkeypatch.setattr(jobs_mod, "probe", lambda p, s: (None, 10.0))  # what such a container reports
    with TestClient(create_app(predictor, ServeSettings(max_video_seconds=0.5))) as c:
        r = _post_video(c, path)
        assert r.status_code == 202 and r.json().get("frames_total") is None
        job = _finished(c, r.json()["status_url"])
        assert job["status"] == "failed" and "longer than this server's limit (6 frames decoded)" in job["error"]
        assert list(c.app.state.service.jobs.tmp.iterdir()) == []
    monkeypatch.undo()
    with TestClient(create_app(predictor, ServeSettings(video_every=3))) as c:  # frames 1, 4, 7 scored
        job = _finished(c, _post_video(c, path).json()["status_url"])
        assert job["status"] == "done" and len(job["rows"]) == 3
        assert job["frames_done"] >= 7 and job["progress"] >= 7 / 8  # before: 3 of 8, stuck at 0.375


class SlowPredictor:
    """A predictor whose every model call takes ``delay`` seconds (a stuck GPU, a huge batch)."""

    def __init__(self, predictor, delay: float):
        self.inner, self.delay = predictor, delay
        self.label_set, self.style = predictor.label_set, predictor.style

    def score(self, images, **kw):
        time.sleep(self.delay)
        return self.inner.score(images, **kw)


def test_timeout_is_a_504_and_too_many_batch_images_a_413(predictor):
    # 19.11: neither path had a test
    with TestClient(create_app(SlowPredictor(predictor, 1.0), ServeSettings(request_timeout_s=0.2))) as c:
        r = c.post("/v1/predict", files={"file": ("a.png", png(), "image/png")})
        assert r.status_code == 504 and r.json() == {"error": "the model did not answer within 0.2 s"}
    with TestClient(create_app(predictor, ServeSettings(max_batch_images=2))) as c:
        r = c.post("/v1/predict/batch", files=[("files", (f"{i}.png", png(), "image/png")) for i in range(3)])
        assert r.status_code == 413 and r.json() == {"error": "3 images exceed the limit of 2 per request"}


def test_explain_true_returns_the_predicted_class_map_over_the_photo(client):
    from skimage import data

    r = client.post("/v1/predict?explain=true", content=face_jpeg(3), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    ex = body["explain"]
    assert ex["class"] == body["pred"] and ex["method"] == "gradient"
    grid = np.array(ex["grid"])
    assert grid.shape == (28, 28) and np.isfinite(grid).all() and grid.max() == pytest.approx(1.0, abs=1e-3)
    layer = Image.open(io.BytesIO(base64.b64decode(ex["overlay"].split(",", 1)[1])))
    assert layer.mode == "RGBA" and layer.size == (112, 112)
    assert "explain" not in client.post("/v1/predict", content=face_jpeg(3),
                                        headers={"Content-Type": "image/jpeg"}).json()
    bad = client.post("/v1/predict?explain=maybe", content=face_jpeg(3), headers={"Content-Type": "image/jpeg"})
    assert bad.status_code == 400 and "explain must be true or false" in bad.json()["error"]
    # aligned: the crop's map is warped back onto the photo, inside the face box
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG")
    r = client.post("/v1/predict?align=true&explain=true", files={"file": ("a.jpg", buf.getvalue(), "image/jpeg")})
    body = r.json()
    layer = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["explain"]["overlay"].split(",", 1)[1]))))
    assert layer.shape == (512, 512, 4)  # the 512-px photo, at most 512 px
    ys, xs = np.nonzero(layer[..., 3])
    x0, y0, x1, y1 = body["face"]["box"]
    assert x0 - 40 <= xs.min() and xs.max() <= x1 + 40 and y0 - 60 <= ys.min() and ys.max() <= y1 + 60


def test_model_info_says_what_the_model_was_trained_on():
    from cervl.serve.explain import SYNTHETIC_NOTICE, trained_on

    demo = {"base_model": "pretrained-tiny", "lineage": [
        {"stage": "base", "kind": "base"},
        {"stage": "stage2", "kind": "lora", "label_set": "rafdb-compound",
         "data": ["/x/runs/demo/manifests/synthce-compound-aligned.jsonl"]}]}
    t = trained_on(demo)
    assert t["synthetic"] and t["notice"] == SYNTHETIC_NOTICE and t["trained_on"] == ["synthce-compound-aligned.jsonl"]
    real = trained_on({"base_model": "Qwen/Qwen2-VL-7B-Instruct", "lineage": [
        {"stage": "s1", "kind": "lora", "label_set": "rafdb-basic", "data": ["/d/rafdb-basic.jsonl"]}]})
    assert not real["synthetic"] and real["notice"] is None and "s1 (rafdb-basic, lora)" in real["stages_summary"]
