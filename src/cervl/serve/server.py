"""``cervl serve --run RUN``: JSON predictions over HTTP.

Endpoints:

* ``GET /health`` -> ``{"status": "ok", "label_set": ..., "prompt": ..., "classes": [...]}``
* ``POST /predict`` with the raw image bytes as the body (any PIL-readable format), or JSON
  ``{"image_base64": "..."}``; ``?align=1`` detects and aligns the largest face first.
  -> ``{"pred": ..., "probs": {...}, "latency_ms": ..., "face": "ok" | "no_face" | ...}``

Requests are served one at a time through a lock (the model is not re-entrant); errors are JSON
with an HTTP status (400 for a bad image, 413 for a body over ``max_bytes``).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cervl.data.images import load_rgb
from cervl.errors import InvalidInput

log = logging.getLogger(__name__)


def make_server(predictor, *, host: str = "127.0.0.1", port: int = 8000, max_bytes: int = 20 * 2**20,
                aligner=None) -> ThreadingHTTPServer:
    """Build (not start) the server around a :class:`cervl.predict.Predictor`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # route through logging instead of stderr
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if urlparse(self.path).path != "/health":
                return self._send(404, {"error": "not found; use GET /health or POST /predict"})
            self._send(200, {"status": "ok", "label_set": predictor.label_set.name, "prompt": predictor.style.name,
                             "classes": list(predictor.label_set.classes)})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/predict":
                return self._send(404, {"error": "not found; use POST /predict"})
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._send(400, {"error": "Content-Length is not a number"})
            if length <= 0:
                return self._send(400, {"error": "empty body: send image bytes or {\"image_base64\": ...}"})
            if length > max_bytes:
                return self._send(413, {"error": f"body of {length} bytes exceeds {max_bytes}"})
            body = self.rfile.read(length)
            try:
                if (self.headers.get("Content-Type") or "").startswith("application/json"):
                    body = base64.b64decode(json.loads(body)["image_base64"])
                image = load_rgb(body)  # upright (EXIF), RGB, a size Qwen-VL takes
            except (InvalidInput, ValueError, KeyError) as e:  # ImageError, bad JSON, bad base64
                return self._send(400, {"error": f"cannot read the image: {e}"})
            face = None
            if parse_qs(url.query).get("align", ["0"])[0] in ("1", "true"):
                if aligner is None:
                    return self._send(400, {"error": "alignment is not enabled on this server (--align)"})
                res = aligner.align(image)[0]
                face = res.status
                if res.crop is None:
                    return self._send(200, {"pred": None, "probs": None, "face": face})
                image = res.crop
            t0 = time.perf_counter()
            with lock:
                probs = predictor.score([image], batch_size=1)[0]
            classes = predictor.label_set.classes
            self._send(200, {"pred": classes[int(probs.argmax())],
                             "probs": {c: round(float(p), 6) for c, p in zip(classes, probs)},
                             "latency_ms": round((time.perf_counter() - t0) * 1000, 2), "face": face})

    return ThreadingHTTPServer((host, port), Handler)


def serve(predictor, *, host: str = "127.0.0.1", port: int = 8000, aligner=None) -> None:
    try:
        server = make_server(predictor, host=host, port=port, aligner=aligner)
    except OSError as e:  # port in use, no permission for a low port, unknown address
        raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    log.info("serving %s on http://%s:%d (GET /health, POST /predict)", predictor.label_set.name, host,
             server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
