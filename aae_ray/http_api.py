"""The HTTP routes, on FastAPI: POST /score, GET /health, GET /model over a `ScoringService`, every refusal
answered as `{"error": "..."}` with the status of DESIGN.md's table.

FastAPI routes and answers 404/405 (with `Allow`); the bodies are read by `aae_ray.http_input`, not by Starlette's
`request.form()`, because the limits must hold before a body is held: Starlette's form parser caps a field's
size but neither the whole body nor a file part (it spools files to disk whatever their size), and it knows
neither JSON base64 nor raw image bodies. Measured against the hand-written router this replaced
(bench/results/serve_load.md, the `router` column): the same throughput within the spread between runs.

Any ASGI server can run `http_api(...)`: Ray Serve does (serve/app.py, `@serve.ingress`), and so does the bare
uvicorn baseline of bench/serve_load.py. Nothing here imports Ray.
"""

# No `from __future__ import annotations`: FastAPI reads a route's parameter types at run time.
import logging
from collections.abc import Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from aae_ray.http_input import RequestError
from aae_ray.serving import ROUTES, Reply, ScoreFn, ScoringService

log = logging.getLogger(__name__)


def http_api(current: Callable[[], tuple[ScoringService, ScoreFn]]) -> FastAPI:
    """The three routes; `current()` gives the service that answers and the function that scores one image
    (batched by the caller, or not). A callable because under Serve the replica exists only after the app."""
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/health")
    async def health() -> JSONResponse:
        return _json(current()[0].health())

    @api.get("/model")
    async def model(request: Request) -> JSONResponse:
        return _json(current()[0].model_info(request.headers.get("authorization")))

    @api.post("/score")
    async def score(request: Request) -> JSONResponse:
        service, score_one = current()
        return _json(await service.score_request(request.headers, request.query_params, request.stream(),
                                                 score_one))

    api.add_exception_handler(HTTPException, _routing_error)
    api.add_exception_handler(RequestError, _bad_request)
    api.add_exception_handler(Exception, _bug)
    return api


def _json(reply: Reply) -> JSONResponse:
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


async def _routing_error(request: Request, exc: HTTPException) -> JSONResponse:
    path = request.url.path[len(request.scope.get("root_path", "")):] or "/"
    if exc.status_code == 404:
        message = f"no such path {path[:80]!r}; paths: POST /score, GET /health, GET /model"
    elif exc.status_code == 405 and path in ROUTES:
        message = f"{path} takes {ROUTES[path]}"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _bug(request: Request, exc: Exception) -> JSONResponse:  # a bug costs one request, not the replica
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)
