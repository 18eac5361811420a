"""The HTTP API around a `Predictor`: limits checked before any work, errors as one-line JSON, and
concurrent requests sharing forward passes through the micro-batcher.

Plain Python (no Hydra), so a notebook or a test can serve a model it has in memory:

    from lightning_project.inference import Predictor, checkpoint_paths
    from lightning_project.serving import create_app
    app = create_app(Predictor.load(checkpoint_paths("best.ckpt")), api_key="s3cret", max_batch_size=16)
    uvicorn.run(app, port=8000)
    # in-process, no socket: async with app.router.lifespan_context(app), httpx.AsyncClient(
    #     transport=httpx.ASGITransport(app=app), base_url="http://app") as client: ...

A request goes: API key (middleware, every route but /health) -> Content-Length present and under
max_upload_mb, a known Content-Type, a free place among max_queue requests in progress (all from the
headers, before the body is read) -> body read -> image opened, its size checked against max_pixels,
decoded and preprocessed in a worker thread -> micro-batcher -> one forward pass per batch.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException

from lightning_project.data.images import upright, to_rgb
from lightning_project.errors import UserError
from lightning_project.inference.predictor import Predictor, top_classes
from lightning_project.serving.batcher import Busy, MicroBatcher

log = logging.getLogger("lightning_project")
MB = 1 << 20
ROUTES = "GET /health, GET /metadata and POST /predict"
SEND = 'send multipart/form-data with the image file in the field `file`, or JSON {"image": "<base64 of the file>"}'


# ---- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """What the API enforces; conf/serve.yaml documents each value."""

    api_key: str | None = None      # None: no key needed
    max_upload_mb: float = 10.0     # request body, as sent (base64 JSON is a third larger than the file)
    max_pixels: int = 25_000_000    # width x height, checked from the header before decoding
    max_batch_size: int = 32        # images per forward pass
    batch_timeout_ms: float = 5.0   # how long the first request of a batch waits for others
    max_queue: int = 256            # prediction requests in progress at once; more get 503
    top_classes: int = 3            # classes in each answer's "top"

    def __post_init__(self) -> None:
        check_settings(asdict(self))

    def limits(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "api_key"} | {"api_key_required": bool(self.api_key)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(values: dict, prefix: str = "") -> None:
    """One UserError naming the first bad value as `<prefix><key>` (serve.py passes 'serve.')."""
    def bad(key: str, want: str) -> UserError:
        return UserError(f"{prefix}{key}={values[key]!r}: {want}")

    key = values.get("api_key")
    if key is not None and (not isinstance(key, str) or not key or not key.isascii() or not key.isprintable()
                            or any(c.isspace() for c in key)):
        # the key itself is never echoed: it would land in logs and terminals
        raise UserError(f"{prefix}api_key: give printable ASCII without spaces (it travels in an HTTP header), "
                        "or null for no key")
    for name in ("max_pixels", "max_batch_size", "max_queue", "top_classes"):
        if not _whole(values[name]) or values[name] < 1:
            raise bad(name, "give a whole number >= 1")
    if not _number(values["max_upload_mb"]) or values["max_upload_mb"] <= 0:
        raise bad("max_upload_mb", "give a number of megabytes > 0")
    if not _number(values["batch_timeout_ms"]) or values["batch_timeout_ms"] < 0:
        raise bad("batch_timeout_ms", "give a number of milliseconds >= 0")


# ---- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer other than 200: the status and one line saying what is wrong and the fix."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every answer but 200 is {"error": "..."}; no traceback ever reaches a client."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        path = request.url.path
        if e.status_code == 404:
            message = f"no route {path}: this API has {ROUTES}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {path}: use {allowed or 'another method'} ({ROUTES})"
        else:
            message = str(e.detail)
        return error(e.status_code, message, e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server log gets the traceback
        return error(500, f"internal error ({type(e).__name__}) on the server: its log has the details")


class ApiKeyGuard:
    """ASGI middleware: every route but the open ones needs `X-API-Key: K` or `Authorization: Bearer K`.

    A middleware rather than a route dependency so that unknown routes (404) and /docs are guarded
    too: without the key a caller learns nothing, not even which paths exist.
    """

    def __init__(self, app, api_key: str, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app, self.key, self.open_paths = app, api_key.encode("ascii"), open_paths

    def given_key(self, headers: Headers) -> str | None:
        if "x-api-key" in headers:
            return headers["x-api-key"].strip()
        scheme, _, token = headers.get("authorization", "").strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = self.given_key(Headers(scope=scope))
        if given is not None and hmac.compare_digest(given.encode("latin-1"), self.key):  # constant time
            return await self.app(scope, receive, send)
        how = "send the header `X-API-Key: <key>` or `Authorization: Bearer <key>`"
        message = f"no API key: {how}" if given is None else f"wrong API key: {how} with the key of this server"
        await error(401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)


# ---- reading the image ----------------------------------------------------------------------------
async def image_bytes(request: Request, media_type: str, limit: int) -> bytes:
    """The image file's bytes from a multipart field `file` or a JSON {"image": base64}."""
    if media_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=limit)
        except HTTPException as e:  # python-multipart's complaint, e.g. no boundary
            raise ApiError(400, f"the multipart body does not parse ({e.detail}): {SEND}") from None
        try:
            upload = form.get("file")
            if upload is None:
                fields = ", ".join(f"`{k}`" for k in form.keys()) or "none"
                raise ApiError(400, f"no field `file` in the multipart body (fields: {fields}): {SEND}")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, f"the field `file` is text, not a file: {SEND} (curl -F file=@photo.jpg)")
            data = await upload.read()
        finally:
            await form.close()
    else:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, f"the body is not valid JSON: {SEND}") from None
        if not isinstance(payload, dict) or "image" not in payload:
            raise ApiError(400, f'no field "image" in the JSON body: {SEND}')
        data = decode_base64(payload["image"])
    if not data:
        raise ApiError(400, f"the image is empty (0 bytes): {SEND}")
    return data


def decode_base64(value) -> bytes:
    """Standard base64, line breaks allowed, a `data:image/...;base64,` prefix dropped."""
    if not isinstance(value, str):
        raise ApiError(400, f'"image" is {type(value).__name__}, not a string: {SEND}')
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f'"image" is not valid base64 (standard alphabet, padded with =): {SEND}') from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB, upright by EXIF, as training saw its images; the pixel count is checked from the header,
    before decoding, so a small file that expands to gigabytes (a decompression bomb) costs nothing."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own, far higher limit
        raise ApiError(413, f"the image has more than {max_pixels:,} pixels: resize it before sending") from None
    except Exception:  # UnidentifiedImageError, or a malformed header Pillow trips over
        raise ApiError(400, "the file is not an image Pillow can read: send a JPEG, PNG, WebP, BMP, GIF or TIFF "
                            "file") from None
    width, height = im.size
    if width * height > max_pixels:
        raise ApiError(413, f"the image is {width}x{height} = {width * height:,} pixels, over this server's limit of "
                            f"{max_pixels:,}: resize it before sending")
    try:
        im.load()
        return to_rgb(upright(im))
    except Exception as e:  # Pillow raises many types for truncated or corrupt data
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ApiError(400, f"the {im.format or 'image'} file does not decode ({reason}): it is truncated or "
                            "corrupt; send the whole file") from None


# ---- the app --------------------------------------------------------------------------------------
def describe(predictor: Predictor) -> dict:
    """The predictor's metadata with checkpoint file names only: server paths are no client's business
    (the sha256 still identifies each file)."""
    meta = predictor.metadata()
    meta["models"] = [{**m, "checkpoint": Path(m["checkpoint"]).name} for m in meta["models"]]
    return meta


def create_app(predictor: Predictor, settings: Settings | None = None, **overrides) -> FastAPI:
    """The API for `predictor`: `settings` and/or keyword overrides of its fields
    (api_key, max_upload_mb, max_pixels, max_batch_size, batch_timeout_ms, max_queue, top_classes).

    The micro-batcher starts with the app's lifespan: uvicorn runs it, in-process use
    `async with app.router.lifespan_context(app)` (or `with TestClient(app)`).
    """
    settings = replace(settings or Settings(), **overrides)
    classes = predictor.classes

    def predict_batch(items: list[tuple[torch.Tensor, ...]]) -> list[list[tuple[str, float]]]:
        # items: one tuple of per-pipeline tensors per request; stacked per pipeline, one pass for all
        inputs = tuple(torch.stack(views) for views in zip(*items))
        return top_classes(predictor.probabilities(inputs), classes, settings.top_classes)

    def prepare(data: bytes) -> tuple[torch.Tensor, ...]:
        return predictor.preprocess(decode_image(data, settings.max_pixels))

    batcher = MicroBatcher(predict_batch, settings.max_batch_size, settings.batch_timeout_ms / 1000,
                           settings.max_queue)
    state = {"in_progress": 0, "busy": 0}
    # decoding is CPU work that Pillow does outside the GIL: more threads than cores would only add
    # decoded images held in memory at once (each up to max_pixels x 4 bytes)
    decoders = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="lightning_project image classifier", lifespan=lifespan,
                  description=f"Classes: {', '.join(classes)}. {ROUTES}; errors are {{\"error\": \"...\"}}.")
    app.state.settings, app.state.batcher = settings, batcher
    install_error_handlers(app)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)

    def busy() -> ApiError:
        state["busy"] += 1
        return ApiError(503, f"the server is busy ({settings.max_queue} requests in progress): retry in a second",
                        {"Retry-After": "1"})

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the process answers. Never needs the API key."""
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict:
        """Classes, models, input size, limits and batching counters."""
        stats = batcher.stats()  # requests: images that went through the model
        counters = {k: stats[k] for k in ("requests", "batches", "largest_batch")}
        counters |= {"in_progress": state["in_progress"], "rejected_busy": state["busy"] + stats["rejected"]}
        return {**describe(predictor), "limits": settings.limits(), "counters": counters}

    @app.post("/predict", openapi_extra=REQUEST_BODY_DOC)
    async def predict(request: Request) -> dict:
        """The class of one image: {"class", "confidence", "top": [{"class", "probability"}, ...]}."""
        if not batcher.running:  # a programming error, not the client's: a 500 with the traceback in the log
            raise RuntimeError("the app's lifespan has not run: serve it with uvicorn, or in-process enter "
                               "app.router.lifespan_context(app) first")
        length = request.headers.get("content-length")
        if length is None:
            raise ApiError(411, "no Content-Length header: send the body in one piece with its length, not chunked")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a number of bytes")
        if int(length) > settings.max_upload_mb * MB:
            raise ApiError(413, f"the body is {int(length) / MB:.1f} MB, over this server's limit of "
                                f"{settings.max_upload_mb:g} MB: send a smaller (or more compressed) image")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("multipart/form-data", "application/json"):
            raise ApiError(415, f"Content-Type {media_type or '(none)'} is not accepted: {SEND}")
        if state["in_progress"] >= settings.max_queue:  # before reading: a flood holds no bodies in memory
            raise busy()
        state["in_progress"] += 1
        try:
            data = await image_bytes(request, media_type, int(settings.max_upload_mb * MB))
            inputs = await anyio.to_thread.run_sync(prepare, data, limiter=decoders)
            try:
                top = await batcher.submit(inputs)
            except Busy:
                raise busy() from None
            except Exception as e:  # the batcher logged the traceback once for the whole batch
                raise ApiError(500, f"the prediction failed ({type(e).__name__}): the server log has the "
                                    "details") from None
        finally:
            state["in_progress"] -= 1
        return {"class": top[0][0], "confidence": top[0][1],
                "top": [{"class": name, "probability": p} for name, p in top]}

    return app


# the two accepted request bodies, for /docs (the route reads the raw request to check limits first)
REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image"],
                                    "properties": {"image": {"type": "string", "format": "byte",
                                                             "description": "the image file, base64"}}}},
}}}
