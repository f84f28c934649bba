"""The HTTP server: health, raw-bytes and base64 predictions, bad input, localhost default."""

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cervl.models import build_tiny
from cervl.predict import Predictor
from cervl.serve import make_server


@pytest.fixture(scope="module")
def server():
    model, proc = build_tiny("tiny-qwen2-vl", seed=0)
    srv = make_server(Predictor(model, proc, "minimal", "cexprdb"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.shutdown()


def _post(url, data, ctype):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_binds_localhost_by_default(server):
    assert server[1].server_address[0] == "127.0.0.1"


def test_health_and_predictions(server):
    url = server[0]
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["label_set"] == "cexprdb" and len(health["classes"]) == 7
    status, out = _post(url + "/predict", _jpeg(), "image/jpeg")
    assert status == 200 and out["pred"] in health["classes"]
    assert abs(sum(out["probs"].values()) - 1) < 1e-4
    status, out2 = _post(url + "/predict", json.dumps({"image_base64": base64.b64encode(_jpeg()).decode()}).encode(),
                         "application/json")
    assert status == 200 and out2["probs"] == out["probs"]


def test_bad_requests(server):
    url = server[0]
    status, out = _post(url + "/predict", b"not an image", "image/jpeg")
    assert status == 400 and "cannot read the image" in out["error"]
    status, out = _post(url + "/predict?align=1", _jpeg(), "image/jpeg")
    assert status == 400 and "alignment is not enabled" in out["error"]
    status, _ = _post(url + "/nope", _jpeg(), "image/jpeg")
    assert status == 404
