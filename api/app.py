"""The FastAPI application: routes, the error shape, body limits, API key, CORS and request metrics.

``create_app(settings, detectors=None)`` builds an app; ``detectors`` (name -> detector object) bypasses loading
from ``settings.models`` (tests, embedding). ``app`` at module level is what ``uvicorn api.app:app`` serves,
configured from the environment.

Decisions:

* Every error, ours (:class:`detect.errors.DetectError`), FastAPI's validation errors, Starlette's 404/405 and
  any unexpected exception, leaves as ``{"error": {"code", "message"}}``. Unexpected exceptions are logged
  once, with their traceback, by :class:`MetricsMiddleware` (which counts them as 500) and answer a bare
  ``internal_error``; nothing re-raises them to uvicorn for a second traceback. Errors the HTTP parser meets
  before the app is reached (malformed requests, oversized or stalled headers) get the same shape from
  :mod:`api.server`.
* The request body is guarded by :class:`BodyGuard`, an ASGI wrapper around ``receive``: it counts the bytes as
  they arrive, so a chunked upload or a lying ``Content-Length`` is stopped at the limit (413; a declared
  ``Content-Length`` above it is refused before reading anything); the whole body must arrive within
  ``body_timeout_s`` (408 ``body_timeout``); and an answer given before the body was read to the end carries
  ``Connection: close``, so the server closes the connection instead of reading the rest of the upload.
* Under overload the answer must stay cheap: ``POST /detect`` finding the queue full (or the service not ready)
  answers 503 before reading the body, so neither the upload nor its parsing is paid for (the connection then
  closes, see :class:`BodyGuard`).
* A client that disconnects before its body has arrived is no server error: one log line, and ``/metrics``
  counts it under status 499 (nginx's "client closed request"); nothing is sent.
* ``POST /detect`` takes ``multipart/form-data`` (files, plus parameters as form fields; ``classes`` repeated or
  comma-separated), ``application/json`` (:class:`api.schemas.DetectJSONRequest`, base64 images), or one raw
  image as an ``image/*`` body (parameters in the query string, the optional ``X-Image-Id`` header echoed as its
  id). A JSON ``{"url": "https://...", <parameters>}`` body makes the server fetch the image, only when
  ``url_inputs`` is set (off by default: 422 ``url_refused``), with the URL guards of :mod:`detect.sources`.
  Anything else is 415. Every file part of a form is an image. The image limit (:attr:`api.settings.Settings.image_limit`)
  is one limit with one answer, 413 ``too_many_images``, for JSON and multipart at any count: the form parser
  stops at the first file past it.
* The API key is compared as UTF-8 bytes with the header's raw bytes, in constant time. When one is set it
  guards ``/docs``, ``/redoc`` and ``/openapi.json`` (which describe the service to whoever reads them) and
  ``/metrics`` as well, unless ``DETECT_PUBLIC_DOCS`` / ``DETECT_PUBLIC_METRICS`` open them (:class:`KeyGuard`;
  a browser cannot send the header, so a team that wants Swagger UI in a browser opens the docs). The probes
  stay open for orchestrators.
* A refused CORS preflight answers in the error shape (400 ``cors_refused``), not Starlette's plain text.
* ``POST /detect`` takes its parameters in the body: a query parameter it does not know is 422
  ``invalid_request`` (it used to be ignored silently, so a misspelt option did nothing without a word).
* ``GET /`` is a web page for people (``api/static/``: plain HTML, CSS and JavaScript, no build step, nothing
  fetched from elsewhere). It uses the public ``GET /models`` and ``POST /detect`` like any client, with the API
  key typed into it. ``/docs`` (Swagger UI) and ``/redoc`` load their scripts from this app too, from the assets
  the ``fastapi-offline`` package ships (MIT), so they work where the service has no internet; ReDoc's Google
  fonts are left out, and a Content-Security-Policy keeps these pages from loading anything from elsewhere
  (ReDoc's footer logo would come from its CDN). The page and its assets are open like the probes (they hold no
  data and ask for the key themselves); the docs follow the key rule above.
* The OpenAPI document describes what the route really accepts: JSON fields may be ``null`` (meaning omitted);
  form fields are text, so in ``multipart/form-data`` they are not nullable (omit one instead), and ``images``
  is required with at most ``image_limit`` files.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import DetectJSONRequest, DetectParams, DetectResponse, ErrorResponse, Health, ImageIn, ModelsResponse
from api.service import DetectionService, too_many_images
from api.settings import Settings
from detect import __version__
from detect.errors import (
    DetectError,
    NotReadyError,
    PayloadTooLargeError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    UrlRefusedError,
)
from detect.sources import fetch_url

log = logging.getLogger("detect.api")

CLIENT_CLOSED = 499  # nginx's status for "client closed request": counted in /metrics, never sent
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}
_KNOWN_PATHS = frozenset({"/", "/detect", "/models", "/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"})
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page and the docs pages may load nothing from elsewhere (ReDoc would fetch a logo from its CDN otherwise).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:"
)
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 503, 504)
}
_MAX_FORM_FIELDS = 64
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# POST /detect's parameters travel in its body, except for a raw image/* body, whose parameters are the query
# string: so the known query parameters are DetectParams' fields, for a raw body only; anything else is 422.
DETECT_QUERY_PARAMETERS: frozenset[str] = frozenset(DetectParams.model_fields)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyTimeout(Exception):
    """The request body did not arrive within ``body_timeout_s`` (408 ``body_timeout``)."""


class BodyGuard:
    """The request body's size limit (413), its deadline (408) and ``Connection: close`` on answers given before
    it was read to the end (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        body_done = not chunked and declared in ("", "0")
        seen, deadline = 0, None

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal seen, deadline, body_done
            if body_done:  # after the body only a disconnect can come: no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.limit:
                    raise PayloadTooLargeError(f"the request body is larger than {self.limit} bytes")
            return message

        if declared.isdigit() and int(declared) > self.limit:
            refusal = error_response(413, PayloadTooLargeError.code, f"the request body is larger than {self.limit} bytes")
            return await refusal(scope, receive, guarded_send)
        await self.app(scope, guarded_receive, guarded_send)


def key_matches(given: bytes, key: SecretStr) -> bool:
    """The header's raw bytes against the key's UTF-8 bytes, in constant time."""
    return hmac.compare_digest(given, key.get_secret_value().encode("utf-8"))


class KeyGuard:
    """401 ``unauthorized`` on ``paths`` without the right ``X-API-Key``: the routes FastAPI adds itself (the
    docs) and ``/metrics``, when the key is set and they are not opened (see the module docstring)."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], key: SecretStr) -> None:
        self.app, self.paths, self.key = app, paths, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            given = next((value for name, value in scope["headers"] if name == b"x-api-key"), b"")
            if not key_matches(given, self.key):
                refusal = error_response(401, UnauthorizedError.code, "a valid X-API-Key header is required")
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, but a refused preflight answers 400 in the error shape (its CORS headers kept)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. "origin, method"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        message = f"CORS preflight refused: this origin, method or header is not allowed ({refused})"
        return error_response(response.status_code, "cors_refused", message, headers)


def refuse_unknown_query(request: Request, known: frozenset[str]) -> None:
    """422 ``invalid_request`` naming the first query parameter not in ``known``."""
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        where = f"takes {', '.join(sorted(known))}" if known else "takes its parameters in the body"
        raise RequestValidationError(
            [{"loc": ("query", unknown[0]), "msg": f"unknown query parameter ({request.method} {request.url.path} {where})", "type": "extra_forbidden"}]
        )


class MetricsMiddleware:
    """Counts requests by path and status, and times them (``/metrics`` itself included). The outermost of our
    middlewares: an exception nothing handled is logged here once, with its traceback, and answers 500."""

    def __init__(self, app: ASGIApp, service: DetectionService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, started, start = 500, False, time.perf_counter()

        async def recorded(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                # the app's own time up to its answer (RFC 8941 Server-Timing), so a client, a proxy or a
                # benchmark can tell the time spent here from the time spent reaching us
                app_ms = (time.perf_counter() - start) * 1e3
                timing = (b"server-timing", f"app;dur={app_ms:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", []), timing]}
            await send(message)

        self.service.metrics.request_started()
        try:
            await self.app(scope, receive, recorded)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:  # an answer already started can only be cut off, which uvicorn does when we return
                await error_response(500, "internal_error", "internal server error")(scope, receive, recorded)
        finally:
            path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
            self.service.metrics.request_finished(path, status, time.perf_counter() - start)


def create_app(settings: Settings | None = None, detectors: dict[str, Any] | None = None) -> FastAPI:
    settings = settings or Settings()
    service = DetectionService(settings, detectors)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="detect", version=__version__, lifespan=lifespan, responses=_ERROR_RESPONSES, docs_url=None, redoc_url=None
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service, settings)
    _add_pages(app)
    guarded = (frozenset() if settings.public_docs else DOCS_PATHS) | (frozenset() if settings.public_metrics else {"/metrics"})
    if settings.api_key is not None and guarded:
        app.add_middleware(KeyGuard, paths=guarded, key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(JSONCORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyGuard, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, service=service)
    _document_detect_body(app, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DetectError)
    async def detect_error(request: Request, err: DetectError) -> JSONResponse:
        retry = err.details.get("retry_after")
        return error_response(err.http_status, err.code, err.message, {"Retry-After": str(retry)} if retry is not None else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, _HTTP_CODES.get(err.status_code, "http_error"), str(err.detail), err.headers)

    @app.exception_handler(BodyTimeout)
    async def body_timeout(request: Request, err: BodyTimeout) -> JSONResponse:
        log.info("%s %s: %s", request.method, request.url.path, err)
        return error_response(408, "body_timeout", str(err))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, err: ClientDisconnect) -> JSONResponse:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s disconnected before its %s %s request arrived whole", client, request.method, request.url.path)
        return error_response(CLIENT_CLOSED, "client_closed_request", "the client closed the connection")


def _describe(errors: Sequence[dict]) -> str:
    """``field.path: message; ...`` for the first few validation errors (never the input values)."""
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5]]
    return "; ".join(parts) or "invalid request"


def _add_routes(app: FastAPI, service: DetectionService, settings: Settings) -> None:
    async def require_api_key(request: Request) -> None:  # async: FastAPI would run a plain def in a thread
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key", "").encode("latin-1")  # Starlette decodes as Latin-1: the raw bytes
        if not key_matches(given, settings.api_key):
            raise UnauthorizedError("a valid X-API-Key header is required")

    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> dict:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["probes"])
    async def readyz() -> dict:
        """503 until every model is loaded and warmed up."""
        if not service.ready:
            raise NotReadyError(f"not ready: {service.not_ready_reason}", retry_after=settings.retry_after_s)
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse, tags=["probes"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(service.metrics.render(service.queue_depth()), media_type="text/plain; version=0.0.4")

    @app.get("/models", response_model=ModelsResponse, dependencies=[Depends(require_api_key)])
    async def models() -> dict:
        """The loaded detectors, their classes and device."""
        return {
            "default": service.default_model,
            "models": [
                {
                    "name": m.name,
                    "detector": str(getattr(m.detector, "name", type(m.detector).__name__)),
                    "version": m.version,
                    "class_names": list(m.detector.class_names),
                    "proposals": list(m.proposals),
                    "device": service.device,
                }
                for m in service.models.values()
            ],
        }

    @app.post("/detect", response_model=DetectResponse, dependencies=[Depends(require_api_key)], name="detect")
    async def detect(request: Request) -> dict:
        """Detect objects in one or several images (multipart files, or JSON with base64 data)."""
        raw_image = request.headers.get("content-type", "").strip().lower().startswith("image/")
        refuse_unknown_query(request, DETECT_QUERY_PARAMETERS if raw_image else frozenset())
        service.admit()  # a full queue or a service not ready refuses before the body is read
        params, sources = await _read_detect_request(request, settings, service)
        return await service.detect(params, sources)


def _add_pages(app: FastAPI) -> None:
    """The web page at ``/`` and the offline ``/docs`` and ``/redoc`` (see the module docstring)."""
    import fastapi_offline

    docs_assets = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _same_origin_only(get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title="detect - Swagger UI",
            swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs-assets/favicon.png",
        ))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _same_origin_only(get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title="detect - ReDoc",
            redoc_js_url=f"{root}/docs-assets/redoc.standalone.js",
            redoc_favicon_url=f"{root}/docs-assets/favicon.png",
            with_google_fonts=False,
        ))


def _same_origin_only(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


async def _read_detect_request(
    request: Request, settings: Settings, service: DetectionService
) -> tuple[DetectParams, list[tuple[str | None, bytes | str]]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        from_url = await _url_request(raw, settings, service)
        if from_url is not None:
            return from_url
        try:
            body = DetectJSONRequest.model_validate_json(raw)
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_input=False)) from None
        params = DetectParams.model_validate(body.model_dump(exclude={"images"}))
        return params, [(image.id, image.data) for image in body.images]
    if content_type.startswith("image/"):  # the raw image as the body; parameters in the query string
        params = _validated(_fields(request.query_params.multi_items()))
        return params, [(request.headers.get("x-image-id"), await request.body())]
    if content_type == "multipart/form-data":
        form = await _read_form(request, settings.image_limit)
        try:
            files = [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
        finally:
            await form.close()
        params = _validated(_fields((k, v) for k, v in form.multi_items() if isinstance(v, str)))
        if not files:
            raise RequestValidationError([{"loc": ("images",), "msg": "no image file in the form", "type": "missing"}])
        return params, files
    raise UnsupportedMediaTypeError(
        f"content type {content_type or 'none'!r}: send multipart/form-data, application/json or an image/* body"
    )


def _fields(items: Any) -> dict[str, Any]:
    """Text fields (a form's, a query string's) as :class:`DetectParams` input; ``classes`` repeated or
    comma-separated."""
    fields: dict[str, Any] = {}
    for key, value in items:
        if key == "classes":
            fields.setdefault("classes", []).extend(c for c in value.split(",") if c.strip())
        else:
            fields[key] = value
    return fields


def _validated(fields: dict[str, Any]) -> DetectParams:
    try:
        return DetectParams.model_validate(fields)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_input=False)) from None


async def _url_request(body: bytes, settings: Settings, service: DetectionService) -> tuple[DetectParams, list[tuple[str | None, bytes]]] | None:
    """A JSON ``{"url": "https://...", <parameters>}`` body: ``None`` when the body is not one (no ``url`` key, or
    not a JSON object); refused with 422 unless ``url_inputs`` is set; else the image fetched within the URL
    guards (:func:`detect.sources.fetch_url`: public addresses only unless ``url_allow_private``, every redirect
    checked, ``url_timeout_s``, ``max_body_bytes``), in a worker thread."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or "url" not in data:
        return None
    if not settings.url_inputs:
        raise UrlRefusedError("url inputs are disabled on this server (DETECT_URL_INPUTS); send the image itself")
    url = data.pop("url")
    if not isinstance(url, str) or not url:
        raise RequestValidationError([{"loc": ("url",), "msg": "url must be a non-empty string", "type": "string_type"}])
    params = _validated(data)
    image = await anyio.to_thread.run_sync(fetch_url, url, service.url_policy())
    return params, [(url, image)]


class _ImageFormParser(MultiPartParser):
    """Starlette's multipart parser where every file part is an image: the first one past ``image_limit`` stops
    the parse with :class:`TooManyImagesError` (Starlette's own ``max_files`` answers 400 in its own words)."""

    def __init__(self, headers: Any, stream: Any, image_limit: int) -> None:
        super().__init__(headers, stream, max_files=math.inf, max_fields=_MAX_FORM_FIELDS)
        self.image_limit, self.images = image_limit, 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None:
            self.images += 1
            if self.images > self.image_limit:
                raise too_many_images(self.image_limit)


async def _read_form(request: Request, image_limit: int) -> FormData:
    try:
        async with aclosing(request.stream()) as stream:
            return await _ImageFormParser(request.headers, stream, image_limit).parse()
    except MultiPartException as err:
        raise StarletteHTTPException(400, f"invalid multipart body: {err.message}") from None


def _document_detect_body(app: FastAPI, settings: Settings) -> None:
    """Describe ``POST /detect``'s two body types in the OpenAPI document (the route reads the raw request)."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        ref = "#/components/schemas/{model}"
        json_schema = DetectJSONRequest.model_json_schema(ref_template=ref)
        json_schema["properties"]["images"]["maxItems"] = settings.image_limit
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(json_schema.pop("$defs", {}))
        components["DetectJSONRequest"] = json_schema
        components["ImageIn"] = ImageIn.model_json_schema(ref_template=ref)
        schema["paths"]["/detect"]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": ref.format(model="DetectJSONRequest")}},
                "multipart/form-data": {"schema": _form_schema(settings.image_limit, ref)},
            },
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _form_schema(image_limit: int, ref: str) -> dict:
    """:class:`DetectParams` as form fields: text, so never ``null`` (a field is omitted instead), and ``classes``
    items name something (blank comma-separated entries are dropped); plus the required image files."""
    form = DetectParams.model_json_schema(ref_template=ref)
    for field in form["properties"].values():
        if "anyOf" in field:
            options = [option for option in field.pop("anyOf") if option.get("type") != "null"]
            field.update(options[0] if len(options) == 1 else {"anyOf": options})
        if "default" in field and field["default"] is None:
            del field["default"]
    form["properties"]["classes"]["items"]["pattern"] = r"[^,\s]"
    form["properties"]["images"] = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "maxItems": image_limit,
        "description": "the image files (every file part of the form counts as an image)",
    }
    form["required"] = ["images"]
    return form


def __getattr__(name: str) -> Any:
    """``api.app:app`` is built on first access, so importing this module reads no environment."""
    if name == "app":
        globals()["app"] = built = create_app()
        return built
    raise AttributeError(name)
