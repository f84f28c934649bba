"""The production HTTP API (FastAPI): ``cervl serve --run RUN``.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

* ``POST /v1/predict``: one image (multipart field ``file``, JSON ``{"image_base64": ...}``, or raw
  ``image/*`` bytes), ``align=true|false``; returns the face status and box, the predicted class, every
  class probability in label-set order, the top-2 and the latency.
* ``POST /v1/predict/batch``: up to ``max_batch_images`` images (multipart ``files`` or JSON ``{"images": [...]}``).
* ``POST /v1/predict/video``: an uploaded video becomes a job; ``GET /v1/jobs/{id}`` polls it (progress,
  then per-frame rows, the smoothed timeline, segments and a summary).
* ``GET /v1/model``, ``GET /health``, ``GET /ready``, ``GET /metrics`` (Prometheus text), ``GET /`` (web page).

Concurrent image requests share model calls (:mod:`cervl.serve.batcher`). Every bad input is a 4xx
with a JSON ``{"error": ...}``; a 5xx is a server fault, logged with its traceback.
"""

import asyncio
import base64
import binascii
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from cervl.core.images import ImageError, to_rgb
from cervl.serve.batcher import MicroBatcher, ModelWorker, PixelBudget, SerialPredictor
from cervl.serve.explain import MapMaker, trained_on
from cervl.serve.jobs import JobsFull, VideoJobs
from cervl.serve.metrics import Metrics

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """Limits and behaviour of one server."""

    max_batch: int = 32  # images per model call (dynamic batching); 1 turns batching off
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    align: bool = False  # default of the per-request ``align`` parameter
    api_key: str | None = None  # required as "Authorization: Bearer KEY" or "X-API-Key" on /v1 and /metrics
    max_body_bytes: int = 20 * 2**20
    max_video_bytes: int = 200 * 2**20
    max_pixels: int = 40_000_000  # decoded pixels per image (decompression bombs)
    max_request_pixels: int = 80_000_000  # decoded pixels per request, all its images together
    max_inflight_pixels: int = 160_000_000  # decoded pixels held by all requests at once (~0.5-0.7 GB as RGB)
    busy_wait_s: float = 10.0  # how long a request waits for room in that budget before a 503
    max_batch_images: int = 64
    max_video_seconds: float = 600.0
    request_timeout_s: float = 60.0
    video_every: int = 1
    max_video_jobs: int = 4  # queued or running at once; more get 429


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def open_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Bytes -> a PIL image whose header has been read and checked, no pixel decoded yet; 4xx errors for
    empty, non-image or oversized images. :func:`decode_opened` decodes it."""
    if not data:
        raise HTTPError(400, f"{name}: empty body (0 bytes); send an image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise HTTPError(400, f"{name}: not an image (or a format PIL cannot read)") from None
    except Image.DecompressionBombError as e:
        raise HTTPError(413, f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # a header cut short or corrupt
        raise HTTPError(400, f"{name}: cannot decode image: {e}") from None
    w, h = im.size
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded
        raise HTTPError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds this server's limit of {max_pixels}")
    return im


def decode_opened(im: Image.Image, name: str = "image") -> Image.Image:
    """An image from :func:`open_image` -> upright RGB; 400 for a truncated or unusable one."""
    try:
        return to_rgb(im, name)
    except ImageError as e:
        raise HTTPError(400, str(e)) from None


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413) by header, or while streaming."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _json_asgi(send, 400, "Content-Length is not a number")
            if declared > limit:
                return await _json_asgi(send, 413, f"body of {declared} bytes exceeds the limit of {limit}")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPError(413, f"body exceeds the limit of {limit} bytes")
            return message

        return await self.app(scope, limited, send)


async def _json_asgi(send, status: int, message: str) -> None:
    import json

    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Service:
    """The server's state and request handlers (the routes are registered by :func:`create_app`)."""

    def __init__(self, predictor, settings: ServeSettings, run_info: dict | None):
        self.predictor, self.settings, self.run_info = predictor, settings, run_info or {}
        self.metrics, self.worker = Metrics(), ModelWorker()
        self.pixels = PixelBudget(settings.max_inflight_pixels, settings.busy_wait_s)
        self.batcher = MicroBatcher(predictor, self.worker, max_batch=settings.max_batch,
                                    max_wait_ms=settings.max_wait_ms, metrics=self.metrics)
        self.jobs = VideoJobs(SerialPredictor(predictor, self.worker, self.metrics), every=settings.video_every,
                              max_pending=settings.max_video_jobs)
        self.ready, self.aligner = False, None
        self.classes = list(predictor.label_set.classes)
        self.maps = MapMaker(predictor)  # explain=true: the predicted class's gradient map

    @asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        self.ready = True
        yield
        self.ready = False
        await self.batcher.stop()
        self.jobs.close()
        self.worker.close()

    async def auth_and_metrics(self, request: Request, call_next):
        t0, path = time.perf_counter(), request.url.path
        protected = path.startswith("/v1/") or path == "/metrics"
        if self.settings.api_key and protected and not _authorized(request, self.settings.api_key):
            response = JSONResponse({"error": "missing or wrong API key (Authorization: Bearer KEY or X-API-Key)"},
                                    status_code=401)
        else:
            try:
                response = await call_next(request)
            except HTTPError as e:  # raised by the body limit while streaming
                response = JSONResponse({"error": e.message}, status_code=e.status)
        route = request.scope.get("route")
        self.metrics.request(route.path if route else "other", response.status_code, time.perf_counter() - t0)
        return response

    # --- scoring ------------------------------------------------------------------------------
    async def score_one(self, image: Image.Image, align: bool, explain: bool = False) -> dict:
        t0 = time.perf_counter()
        face, landmarks, photo_size = None, None, image.size
        if align:
            image, face, landmarks = await self._align(image)
            if image is None:
                return {"face": face, "pred": None, "probs": None, "top2": None,
                        "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}
        try:
            probs = await asyncio.wait_for(self.batcher.score(image), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the model did not answer within {self.settings.request_timeout_s:g} s") from None
        order, classes = probs.argsort()[::-1], self.classes
        out = {"face": face, "pred": classes[int(order[0])],
               "probs": {c: round(float(p), 6) for c, p in zip(classes, probs)},
               "top2": [[classes[int(i)], round(float(probs[i]), 6)] for i in order[:2]]}
        if explain:  # on the model thread, like every model call; the map is of the predicted class
            job = self.worker.submit(self.maps, image, photo_size, landmarks, out["pred"])
            out["explain"] = await asyncio.wrap_future(job)
        out["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return out

    async def _align(self, image):
        from cervl.faces.pipeline import FaceAligner

        if self.aligner is None:
            # only the largest face is scored: the largest-first search finds it with less work
            self.aligner = FaceAligner("mtcnn", search="largest")
        res = (await asyncio.to_thread(self.aligner.align, image))[0]
        return res.crop, {"status": res.status, "box": res.box, "faces": res.n_faces}, res.landmarks

    @asynccontextmanager
    async def arriving(self):
        """While a request is read and decoded, a forming batch may wait for it (see MicroBatcher)."""
        self.batcher.arriving += 1
        try:
            yield
        finally:
            self.batcher.arriving -= 1

    # --- reading requests ---------------------------------------------------------------------
    @asynccontextmanager
    async def decoded(self, request: Request, *, many: bool):
        """``(images, align, fields)`` of a request, decoded within the pixel budgets, which it holds until scored.

        Every header is read and the request's total is checked before any pixel is decoded: a body of
        64 flat 38-MP PNGs (~100 KB each) would otherwise decode to ~7 GB.
        """
        s = self.settings
        async with self.arriving():
            blobs, fields = await _request_blobs(request, many, s.max_batch_images)
            if not blobs:
                raise HTTPError(400, "no image in the request (multipart field 'file'/'files')")
            if len(blobs) > s.max_batch_images:
                raise HTTPError(413, f"{len(blobs)} images exceed the limit of {s.max_batch_images} per request")
            names = [f"image {i}" if many else "image" for i in range(len(blobs))]
            opened = await asyncio.to_thread(lambda: [open_image(b, s.max_pixels, n) for b, n in zip(blobs, names)])
            total = sum(im.size[0] * im.size[1] for im in opened)
            if total > s.max_request_pixels:
                raise HTTPError(413, f"{len(opened)} images of {total} pixels in all exceed this server's limit of "
                                     f"{s.max_request_pixels} decoded pixels per request; send fewer or smaller images")
            align = self.align_flag(request, fields)
            try:
                held = await self.pixels.acquire(total)
            except PixelBudget.Busy as e:
                raise HTTPError(503, f"server busy ({e}); retry in a moment") from None
            try:
                images = await asyncio.to_thread(lambda: [decode_opened(im, n) for im, n in zip(opened, names)])
            except BaseException:
                await self.pixels.release(held)
                raise
        try:
            yield images, align, fields
        finally:
            await self.pixels.release(held)

    def align_flag(self, request: Request, fields: dict) -> bool:
        return _bool_param(request, fields, "align", self.settings.align)

    # --- endpoints ----------------------------------------------------------------------------
    async def predict(self, request: Request):
        """Predict one image."""
        async with self.decoded(request, many=False) as (images, align, fields):
            explain = _bool_param(request, fields, "explain", False)
            return await self.score_one(images[0], align, explain)

    async def predict_batch(self, request: Request):
        """Predict several images."""
        async with self.decoded(request, many=True) as (images, align, _):
            return {"results": list(await asyncio.gather(*(self.score_one(im, align) for im in images)))}

    async def predict_video(self, request: Request):
        """Start a video job; poll GET /v1/jobs/{id}."""
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            raise HTTPError(415, "send the video as multipart/form-data, field 'file'")
        try:
            self.jobs.check_room()  # before the upload is read
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPError(400, "no video in the request (multipart field 'file')")
            # copied from starlette's spooled file to the job's own, in chunks: never whole in memory
            job = await asyncio.to_thread(self.jobs.submit, upload.file, getattr(upload, "filename", None) or "video",
                                          self.settings.max_video_seconds)
        except JobsFull as e:
            raise HTTPError(429, str(e)) from None
        except ValueError as e:
            raise HTTPError(413 if "exceeds" in str(e) else 400, str(e)) from None
        return JSONResponse({"job": job.id, "status": job.status, "status_url": f"/v1/jobs/{job.id}"},
                            status_code=202)

    async def job_status(self, job_id: str):
        """A video job's progress, then its result."""
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPError(404, f"no job {job_id!r}")
        return job.to_json()

    async def model_info(self):
        """The model: label set, prompt style, lineage, base model."""
        info = self.run_info
        return {"label_set": self.predictor.label_set.name, "classes": self.classes,
                "prompt": self.predictor.style.name, "base_model": info.get("base_model"),
                "lineage": info.get("lineage", []), "run": info.get("run"), "max_batch": self.settings.max_batch,
                "align_default": self.settings.align, **trained_on(info)}

    async def health(self):
        return {"status": "ok"}

    async def ready_(self):
        if not self.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready", "label_set": self.predictor.label_set.name}

    async def prometheus(self):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def page(self):
        return FileResponse(STATIC / "index.html")


def _bool_param(request: Request, fields: dict, name: str, default: bool) -> bool:
    """A true/false query parameter or form field (the query wins)."""
    value = request.query_params.get(name, fields.get(name))
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false", "1", "0"):
        raise HTTPError(400, f"{name} must be true or false, got {value!r}")
    return str(value).lower() in ("true", "1")


async def _request_blobs(request: Request, many: bool, max_files: int) -> tuple[list[bytes], dict]:
    """The image bytes of a request: multipart (``file``/``files``), JSON base64, or a raw image body."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:  # one file over the limit is parsed, so that the refusal can say how many came
            form = await request.form(max_files=max_files + 1, max_fields=16)
        except StarletteHTTPException as e:
            if "Too many files" in str(e.detail):
                raise HTTPError(413, f"more than {max_files + 1} images exceed the limit of {max_files} per "
                                     f"request") from None
            raise
        uploads = form.getlist("files" if many else "file") or form.getlist("file") or form.getlist("files")
        uploads = [u for u in uploads if hasattr(u, "read")][: None if many else 1]  # only what is scored
        return [await u.read() for u in uploads], {k: v for k, v in form.items()
                                                                          if isinstance(v, str)}
    if ctype == "application/json":
        key = "images" if many else "image_base64"
        try:
            payload = await request.json()
            raw = payload["images"] if many else [payload["image_base64"]]
            return [base64.b64decode(b, validate=True) for b in raw], {k: v for k, v in payload.items()
                                                                       if k == "align"}
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise HTTPError(400, f"JSON body must be {{\"{key}\": ...}} with base64 image data ({e})") from None
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [await request.body()], {}
    raise HTTPError(415, f"unsupported content type {ctype or '(none)'!r}; send multipart/form-data, "
                         f"application/json or image/*")


async def _http_error(request, exc: HTTPError):
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _starlette_error(request, exc: StarletteHTTPException):
    # unknown routes (404) and wrong methods (405) answer in the same {"error": ...} shape as the rest
    text = {404: f"no such route: {request.method} {request.url.path} (routes: /docs)",
            405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse({"error": text}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _validation_error(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)


async def _server_fault(request, exc):
    log.exception("server fault on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal server error (logged)"}, status_code=500)


def create_app(predictor, settings: ServeSettings | None = None, *, run_info: dict | None = None) -> FastAPI:
    """The FastAPI app around a :class:`cervl.predict.Predictor` (model calls in one worker thread)."""
    settings = settings or ServeSettings()
    svc = Service(predictor, settings, run_info)
    # /docs serves Swagger UI from the fastapi-offline package, not a CDN: it renders with no network
    app = FastAPIOffline(title="cervl", version="1", lifespan=svc.lifespan, redoc_url=None,
                         description="Compound expression recognition with a fine-tuned Qwen-VL: exact class "
                                     "probabilities.")
    app.state.service, app.state.metrics = svc, svc.metrics
    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _starlette_error)
    app.add_exception_handler(Exception, _server_fault)
    app.middleware("http")(svc.auth_and_metrics)
    for path, endpoint, method, summary in (
            ("/v1/predict", svc.predict, "POST", "Predict one image (?align=true|false; ?explain=true adds the predicted class's saliency map)"),
            ("/v1/predict/batch", svc.predict_batch, "POST", "Predict several images"),
            ("/v1/predict/video", svc.predict_video, "POST", "Start a video job (poll GET /v1/jobs/{id})"),
            ("/v1/jobs/{job_id}", svc.job_status, "GET", "A video job's progress or result"),
            ("/v1/model", svc.model_info, "GET", "The model: label set, prompt style, lineage, base model"),
            ("/health", svc.health, "GET", "Liveness"),
            ("/ready", svc.ready_, "GET", "Readiness"),
            ("/metrics", svc.prometheus, "GET", "Prometheus metrics")):
        app.add_api_route(path, endpoint, methods=[method], summary=summary)
    app.add_api_route("/", svc.page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    limits = {"/v1/predict/video": settings.max_video_bytes}
    app.add_middleware(BodyLimit, limit_for=lambda path: limits.get(path, settings.max_body_bytes))
    return app


def _authorized(request, key: str) -> bool:
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), key.encode())


def run_summary(run_dir: Path) -> dict:
    """What ``GET /v1/model`` reports about a run folder."""
    from cervl.run import RunMeta, StageRecord

    meta = RunMeta.read(Path(run_dir))
    lineage = [StageRecord.from_dict(e) for e in meta.lineage]
    return {"run": str(run_dir), "base_model": lineage[0].source if lineage else None,
            "lineage": [{"stage": r.stage, "kind": r.kind, "rank": r.rank, "label_set": r.label_set,
                         "prompt": r.prompt, "steps": r.steps,
                         "data": [d["manifest"] for d in r.data or [] if isinstance(d, dict) and "manifest" in d]}
                        for r in lineage]}
