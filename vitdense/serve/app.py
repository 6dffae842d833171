"""The HTTP routes of ``vitdense serve`` (Starlette): each parses its request, calls one method of
:class:`vitdense.serve.service.Service` and shapes the answer. Errors are one-line JSON ``{"error": ...}``
with the status of :class:`vitdense.serve.security.RequestError`, never a traceback.

    GET  /                    the search page (static HTML/JS/CSS from this package, nothing from a CDN)
    GET  /health              {"status": "ok", "images", "generation"}   (needs no token)
    GET  /stats               index size, backbone, queries served, latency percentiles, batching
    GET  /search?id=ID&k=K    nearest images of an indexed image (its stored descriptor)
    POST /search?k=K          nearest images of an uploaded image (raw body, or multipart field "image")
    GET  /image/ID            the indexed image file
    GET  /thumb/ID            a JPEG thumbnail (cached in memory)
    POST /correspond          best-buddy pairs + side-by-side picture of a and b (ids or uploads)
    POST /heatmap             similarity of point (x, y) of a to every point of b, drawn over b
"""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Sequence

from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import VitdenseError
from .security import Limits, RequestError, decode_upload, form_parts, read_body, token_ok
from .service import MAX_K, Service, data_uri, png_bytes, upload_key

LOG = logging.getLogger("vitdense.serve")

STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
}


def static_files() -> dict[str, bytes]:
    """The page's files, read once from the package (a fixed set of names: no path ever reaches the disk)."""
    folder = resources.files("vitdense.serve") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_TYPES}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _k(request: Request, default: int) -> int:
    raw = request.query_params.get("k")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_K:
        raise RequestError(422, f"k={raw[:20]}: must be a whole number in 1..{MAX_K}")
    return int(raw)


def _coordinate(value: str | None, name: str) -> float:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(422, f"{name}: give a number (pixels of image a)") from None
    if out != out or abs(out) > 1e6:
        raise RequestError(422, f"{name}: out of range")
    return out


def create_app(service: Service, limits: Limits = Limits(), token: str | None = None,
               allowed_hosts: Sequence[str] | None = None, watch: bool = True) -> Starlette:
    """The ASGI app over a :class:`Service`.

    token: required from every client (``Authorization: Bearer TOKEN`` or ``?token=TOKEN``) except on
    /health; allowed_hosts: Host header names accepted (None: any), e.g. the loopback names for a local
    bind, so that a web page cannot reach the service through DNS rebinding; watch: reload on SIGHUP and
    when the index folder's generation changes (polled every ``service.config.poll_s`` seconds).
    """
    page = static_files()

    # ------------------------------------------------------------------ inputs
    async def body(request: Request, uploads: int = 1) -> bytes:
        return await read_body(request.stream(), request.headers.get("content-length"),
                               limits.max_bytes * uploads + (64 << 10 if uploads > 1 else 0))

    async def upload(request: Request) -> bytes:
        """The image of a POST /search: the raw body, or the multipart field "image"."""
        data = await body(request)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            parts = form_parts(data, ctype)
            if "image" not in parts:
                raise RequestError(422, "multipart body without an 'image' field")
            data = parts["image"][0]
        return data

    async def pair(request: Request) -> tuple[dict[str, tuple[str, Image.Image]], dict[str, str]]:
        """Images a and b of /correspond and /heatmap (each an id or an upload) and the other fields."""
        fields: dict[str, str] = {k: v for k, v in request.query_params.items()}
        files: dict[str, bytes] = {}
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            for name, (content, filename) in form_parts(await body(request, uploads=2), ctype).items():
                if filename is not None:
                    files[name] = content
                else:
                    fields[name] = content.decode("utf-8", "replace")[:200]
        snap = service.snapshot
        images: dict[str, tuple[str, Image.Image]] = {}
        for name in ("a", "b"):
            if name in files:
                data = files[name]
                images[name] = (upload_key(data), await asyncio.to_thread(decode_upload, data, limits, name))
            elif name in fields:
                id_ = fields[name]  # checked by the snapshot (an id of either index kind, else 404)
                image = await asyncio.to_thread(service.indexed_image, snap, id_)
                images[name] = (f"id:{snap.generation}:{id_}", image)
            else:
                raise RequestError(422, f"give image '{name}' as an id or an uploaded file")
        return images, fields

    # ------------------------------------------------------------------ routes
    async def index_page(request: Request) -> Response:
        return Response(page["index.html"], media_type=STATIC_TYPES["index.html"])

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in page:
            raise RequestError(404, "not found")
        return Response(page[name], media_type=STATIC_TYPES[name], headers={"Cache-Control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    async def stats(request: Request) -> Response:
        return JSONResponse(service.stats())

    async def search_get(request: Request) -> Response:
        if "id" not in request.query_params:
            raise RequestError(422, "give ?id=ID of an indexed image, or POST an image")
        return JSONResponse(service.search_id(request.query_params["id"], _k(request, service.config.default_k)))

    async def search_post(request: Request) -> Response:
        k = _k(request, service.config.default_k)
        return JSONResponse(await service.search_upload(upload(request), k, limits))

    async def image(request: Request) -> Response:
        data, media = await asyncio.to_thread(service.image_bytes, request.path_params["id"])
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    async def thumb(request: Request) -> Response:
        data = await asyncio.to_thread(service.thumbnail, request.path_params["id"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def picture_response(request: Request, record: dict[str, Any], picture) -> Response:
        png = png_bytes(picture)
        if request.query_params.get("format") == "png":
            return Response(png, media_type="image/png")
        return JSONResponse({**record, "picture": data_uri(png)})

    async def correspond(request: Request) -> Response:
        timer = asyncio.get_running_loop().time()
        images, _ = await pair(request)
        record, picture = await asyncio.to_thread(service.correspond, images["a"][1], images["b"][1])
        service.latency["correspond"].add(1000 * (asyncio.get_running_loop().time() - timer))
        return picture_response(request, record, picture)

    async def heatmap(request: Request) -> Response:
        timer = asyncio.get_running_loop().time()
        images, fields = await pair(request)
        point = (_coordinate(fields.get("y"), "y"), _coordinate(fields.get("x"), "x"))
        (key_a, im_a), (key_b, im_b) = images["a"], images["b"]
        record, picture = await asyncio.to_thread(service.heatmap, key_a, im_a, key_b, im_b, point)
        service.latency["heatmap"].add(1000 * (asyncio.get_running_loop().time() - timer))
        return picture_response(request, record, picture)

    routes = [
        Route("/", index_page), Route("/static/{name}", static),
        Route("/health", health), Route("/stats", stats),
        Route("/search", search_get, methods=["GET"]), Route("/search", search_post, methods=["POST"]),
        Route("/image/{id}", image), Route("/thumb/{id}", thumb),
        Route("/correspond", correspond, methods=["POST"]), Route("/heatmap", heatmap, methods=["POST"]),
    ]

    # ------------------------------------------------------------------ errors
    async def on_request_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestError):
            return _error(exc.status, str(exc))
        return _error(422, str(exc).splitlines()[0])  # another VitdenseError: the input cannot be used

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message)

    async def on_crash(request: Request, exc: Exception) -> Response:
        LOG.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal error (logged by the server)")

    # ------------------------------------------------------------------ lifecycle
    @asynccontextmanager
    async def lifespan(app: Starlette):
        service.batcher.start()
        tasks = []
        loop = asyncio.get_running_loop()
        if watch:
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(
                    asyncio.to_thread(service.reload, True)))
            except (ValueError, RuntimeError, NotImplementedError, AttributeError):
                LOG.info("no SIGHUP handler (not in the main thread); polling the index folder only")
            if service.config.poll_s > 0:
                tasks.append(loop.create_task(_poll(service)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if watch:
                try:
                    loop.remove_signal_handler(signal.SIGHUP)
                except (ValueError, RuntimeError, NotImplementedError, AttributeError):
                    pass
            service.batcher.stop()

    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def guard(request: Request, call_next) -> Response:
        """Host check (DNS rebinding), token check, security headers on every answer."""
        if hosts is not None:
            host = request.headers.get("host", "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in hosts:
                return _error(400, "unexpected Host header (the service answers only to the names it was "
                                   "bound to)")
        if request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else request.query_params.get("token")
            if not token_ok(given, token):
                return _error(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')")
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)],
                    exception_handlers={VitdenseError: on_request_error, HTTPException: on_http_error,
                                        Exception: on_crash})
    app.state.service = service
    return app


async def _poll(service: Service) -> None:
    """Reload whenever the index folder's generation changes (checked every ``poll_s`` seconds)."""
    while True:
        await asyncio.sleep(service.config.poll_s)
        try:
            await asyncio.to_thread(service.reload)
        except Exception:  # noqa: BLE001 - the poller must outlive one failed attempt
            LOG.exception("index reload failed")
