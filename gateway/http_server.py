"""The KServe V2 HTTP/REST door: a Starlette app served by uvicorn in the gateway process.

Endpoints of the required API (health, server and model metadata, inference with JSON tensors and
the binary tensor data extension) plus Triton's statistics extension. Errors are ``{"error": msg}``
with the pool's status (400, 404, 429, 500, 501, 503, 504); nothing reaches a client as a traceback.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Awaitable, Callable

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from modelpool.client.errors import InvalidInput, PoolError, Unavailable
from modelpool.client.protocol import quote
from modelpool.gateway import v2
from modelpool.gateway.backend import Backend, status_of

log = logging.getLogger(__name__)

JSON = "application/json"
BINARY = "application/octet-stream"
Handler = Callable[[Any, Request], Awaitable[Response]]


def json_response(doc: Any, status: int = 200) -> Response:
    """A JSON answer encoded by orjson."""
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


def error_response(message: str, status: int) -> Response:
    """The V2 error object with an HTTP status."""
    return Response(v2.error_json(message), status_code=status, media_type=JSON)


def _answers_errors(handler: Handler) -> Handler:
    """Pool errors become their status with the pool's message; anything else a logged 500."""

    @functools.wraps(handler)
    async def run(self: Any, request: Request) -> Response:
        try:
            return await handler(self, request)
        except PoolError as exc:
            return error_response(str(exc), status_of(exc))
        except ClientDisconnect:
            return Response(status_code=400)
        except Exception as exc:  # a bug of ours: logged with its traceback, the client gets one line
            log.exception("gateway error on %s %s", request.method, request.url.path)
            return error_response(f"internal error in the gateway ({type(exc).__name__}); see the pool's log", 500)

    return run


class BodyTimeout(InvalidInput):
    """The client sent its body too slowly: HTTP 408 (an HTTP-only status; never on the wire)."""

    status = b"408"


def _health(ok: bool) -> Response:
    # V2: 200 means true and a 4xx false, with an empty body.
    return Response(status_code=200 if ok else 400)


async def _probe(probe: Callable[[], Awaitable[bool]]) -> Response:
    try:
        return _health(await probe())
    except PoolError as exc:
        raise Unavailable(f"the broker does not answer: {exc}") from None


class HttpDoor:
    """Route handlers over one Backend; ``app`` is the Starlette application."""

    def __init__(self, backend: Backend, *, max_body: int, default_timeout: float, max_reading: int | None = None,
                 read_timeout: float | None = None) -> None:
        self.backend = backend
        self.max_body = max_body
        self.default_timeout = default_timeout
        # Bodies still arriving are held here before the broker (and its max_queued_bytes) sees them:
        # slow senders together may hold at most max_reading bytes, each for at most read_timeout seconds.
        self.max_reading = max_reading if max_reading is not None else 8 * max_body
        self.read_timeout = read_timeout if read_timeout is not None else default_timeout
        self.reading = 0
        self.app = Starlette(routes=self._routes(), exception_handlers={HTTPException: self._http_error,
                                                                        Exception: self._internal_error})

    def _routes(self) -> list[Route]:
        m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
        get, post = ["GET"], ["POST"]
        return [
            Route("/v2/health/live", self.live, methods=get),
            Route("/v2/health/ready", self.ready, methods=get),
            Route("/v2", self.server_metadata, methods=get),
            Route("/v2/models/stats", self.statistics, methods=get),
            *(Route(p + "/stats", self.statistics, methods=get) for p in (m, mv)),
            *(Route(p + "/ready", self.model_ready, methods=get) for p in (m, mv)),
            *(Route(p + "/infer", self.infer, methods=post) for p in (m, mv)),
            *(Route(p, self.model_metadata, methods=get) for p in (m, mv)),
            Route("/v2/repository/index", self.repository_index, methods=post),
            Route("/v2/repository/models/{model}/load", self.load_model, methods=post),
            Route("/v2/repository/models/{model}/unload", self.unload_model, methods=post),
        ]

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(f"no such endpoint: {request.method} {request.url.path} (KServe V2 paths start "
                                  "with /v2)", 404)
        if exc.status_code == 405:
            return error_response(f"{request.url.path} does not take {request.method}", 405)
        return error_response(str(exc.detail), exc.status_code)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("gateway error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(f"internal error in the gateway ({type(exc).__name__}); see the pool's log", 500)

    @_answers_errors
    async def live(self, request: Request) -> Response:
        return await _probe(self.backend.live)

    @_answers_errors
    async def ready(self, request: Request) -> Response:
        return await _probe(self.backend.ready)

    @_answers_errors
    async def model_ready(self, request: Request) -> Response:
        model, version = _path(request)
        await self.backend.entry(model, version)  # 404 for an unknown model or version
        return _health(await self.backend.model_ready(model, version))

    @_answers_errors
    async def server_metadata(self, request: Request) -> Response:
        return json_response(self.backend.server_metadata())

    @_answers_errors
    async def model_metadata(self, request: Request) -> Response:
        return json_response(await self.backend.model_metadata(*_path(request)))

    @_answers_errors
    async def statistics(self, request: Request) -> Response:
        model, version = _path(request)
        return json_response(await self.backend.statistics(model, version))

    @_answers_errors
    async def infer(self, request: Request) -> Response:
        model, version = _path(request)
        body = await self._body(request)
        json_part, binary = v2.split_body(body, request.headers.get(v2.HEADER_LENGTH))
        infer = v2.parse_http_infer(v2.parse_json(json_part), binary, self.max_body)
        reply = await self.backend.infer(model, version, infer.header, infer.tensors, self._timeout(request, infer))
        head, buffers, header_length = v2.http_reply(infer, reply)
        if header_length is None:
            return Response(head, media_type=JSON)
        return Response(b"".join([head, *buffers]), media_type=BINARY,
                        headers={"Inference-Header-Content-Length": str(header_length)})

    @_answers_errors
    async def repository_index(self, request: Request) -> Response:
        options = await self._options(request)
        return json_response(await self.backend.repository_index(ready_only=options.get("ready") is True))

    @_answers_errors
    async def load_model(self, request: Request) -> Response:
        await self._options(request)
        await self.backend.load_model(_path(request)[0], self.default_timeout)
        return json_response({})

    @_answers_errors
    async def unload_model(self, request: Request) -> Response:
        await self._options(request)
        await self.backend.unload_model(_path(request)[0])
        return json_response({})

    async def _options(self, request: Request) -> dict:
        """The JSON object of a repository request's body ({} when there is none). Triton's load
        parameters that carry a config or model files are refused: the repository holds the models."""
        body = await self._body(request)
        options = v2.parse_json(body) if body.strip() else {}
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("parameters must be a JSON object")
        if any(key == "config" or key.startswith("file:") for key in parameters):
            raise InvalidInput("load parameters that carry a config or model files are not supported: put the "
                               "model in the pool's model repository and load it by name")
        return options

    async def _body(self, request: Request) -> bytes:
        """The request body, refused past the pool's message limit before it is all read, and 408 when it
        does not arrive within read_timeout."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            raise InvalidInput(f"request body of {declared} bytes is over the pool's {self.max_body}-byte message "
                               "limit; send fewer rows per request")
        chunks: list[bytes] = []
        held = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.stream():
                    held += len(chunk)
                    self.reading += len(chunk)
                    if held > self.max_body:
                        raise InvalidInput(f"request body is over the pool's {self.max_body}-byte message limit; "
                                           "send fewer rows per request")
                    if self.reading > self.max_reading:
                        raise Unavailable(f"the gateway is receiving {self.reading} bytes of request bodies at once "
                                          f"(at most {self.max_reading}); retry later")
                    chunks.append(chunk)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.read_timeout:g} s ({held} bytes "
                              "received)") from None
        finally:
            self.reading -= held
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return v2.decompress(body, request.headers.get("content-encoding"), self.max_body)

    def _timeout(self, request: Request, infer: v2.InferRequest) -> float:
        """The request's deadline: the smaller of parameters.timeout and the Inference-Timeout-Ms header."""
        candidates = [infer.timeout] if infer.timeout else []
        header = request.headers.get(v2.TIMEOUT_HEADER)
        if header is not None:
            try:
                millis = float(header)
            except ValueError:
                millis = -1.0
            if not 0 < millis < float("inf"):
                raise InvalidInput(f"Inference-Timeout-Ms must be a positive number of milliseconds, got "
                                   f"{quote(header)}")
            candidates.append(millis / 1000)
        return min(candidates) if candidates else self.default_timeout


def _path(request: Request) -> tuple[str, str]:
    params = request.path_params
    return params.get("model", ""), params.get("version", "")
