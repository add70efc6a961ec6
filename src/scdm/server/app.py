"""The FastAPI application of ``scdm serve``, its settings and error answers, and serving it with uvicorn."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import fastapi_offline
import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from scdm.server.config import ServerConfig, ServerState, version
from scdm.server.jobs import JobBoard, JobNotFoundError, remove_abandoned_folders
from scdm.server.routes import UPLOADS_DIR, router
from scdm.server.security import Guard, SecurityPolicy, check_token, is_loopback
from scdm.store import Store, open_store
from scdm.store.errors import (
    DatasetNotFoundError,
    EmbeddingNotFoundError,
    InputDataError,
    ReadOnlyQueryError,
    ScdmError,
    StoreReadOnlyError,
)
from scdm.store.heads import HeadNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["create_app", "serve", "app_from_environment", "status_of"]

PACKAGE_DIR = Path(__file__).resolve().parent
SWAGGER_UI_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
"""swagger-ui-bundle.js and swagger-ui.css (swagger-ui-dist 5, as on FastAPI's CDN), shipped by fastapi-offline."""
CONFIG_ENV = "SCDM_SERVE_CONFIG"
"""Environment variable that hands the settings to uvicorn's worker processes (``--workers`` > 1)."""


# --------------------------------------------------------------------------------------------
# errors: one JSON shape, {"error": message, "status": code}, never a traceback
# --------------------------------------------------------------------------------------------
def status_of(err: Exception) -> int:
    if isinstance(err, (DatasetNotFoundError, EmbeddingNotFoundError, HeadNotFoundError, JobNotFoundError)):
        return 404
    if isinstance(err, (ReadOnlyQueryError, StoreReadOnlyError)):
        return 403
    if isinstance(err, ScdmError):
        return 400
    return 500


def error_response(status: int, message: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


async def _scdm_error(request: Request, err: Exception) -> JSONResponse:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    status = getattr(err, "status", None)  # routes' HttpError carries its own
    return error_response(status if isinstance(status, int) else status_of(err), str(message))


async def _http_error(request: Request, err: Exception) -> JSONResponse:
    assert isinstance(err, StarletteHTTPException)
    message = str(err.detail)
    if err.status_code == 404 and message == "Not Found":
        message = f"No route {request.method} {request.url.path}; the API is described at /openapi.json and /docs."
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; use {allowed}."
    return error_response(err.status_code, message, headers=dict(err.headers) if err.headers else None)


async def _validation_error(request: Request, err: Exception) -> JSONResponse:
    """422 naming each bad parameter, its value and what is allowed (400 for a body that is not JSON)."""
    assert isinstance(err, RequestValidationError)
    errors = list(err.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "The request body is not valid JSON.")
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ())[1:] if not isinstance(p, int)) or "body"
        given = f"={e['input']!r}" if e.get("type") not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], dict) else ""
        what = "unknown parameter (misspelled?)" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}{given}: {what}")
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    return error_response(422, "; ".join(parts), detail=detail)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    logger.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
    return error_response(500, f"Internal error ({type(err).__name__}); the server log has the details.")


# --------------------------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------------------------
def create_app(store: str | os.PathLike[str] | Store | None = None, config: ServerConfig | None = None,
               **settings: Any) -> FastAPI:
    """The ASGI application over ``store``.

    Parameters
    ----------
    store : str, path or Store, optional
        Default: ``$SCDM_STORE`` or ``./scdm-store``.
    config : ServerConfig, optional
        Or its fields as keyword arguments (``token=``, ``max_jobs=``, ...).

    Returns
    -------
    FastAPI
        Serve it with any ASGI server, or use :func:`serve`.
    """
    config = config or ServerConfig(**settings)
    policy = SecurityPolicy(config.token, bytes.fromhex(config.session_key), config.allowed_hosts, config.bind_host)
    st = open_store(store)
    uploads = st.root.resolve() / UPLOADS_DIR
    if not st.read_only:  # uploads of a server (worker) that stopped before their jobs ended
        remove_abandoned_folders(uploads)
    jobs = JobBoard(config.jobs_dir, max_jobs=config.max_jobs,
                    on_dead=None if st.read_only else lambda record: remove_abandoned_folders(uploads, [record.job_id]))
    state = ServerState(store=st, config=config, jobs=jobs, templates=_templates(), policy=policy)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.jobs.shutdown()

    app = FastAPI(title="scdm serve", version=version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Results explorer and prediction API over an scdm store. Errors are JSON "
                              "`{\"error\": message, \"status\": code}`. With a token, send `Authorization: Bearer <token>`; "
                              "state-changing requests need `Content-Type: application/json` "
                              "(`application/octet-stream` for the upload).")
    app.state.scdm = state
    app.include_router(router)
    # Swagger UI of /docs (before /static, which would otherwise take its paths): no CDN, works offline
    app.mount("/static/swagger-ui", StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    app.add_exception_handler(ScdmError, _scdm_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Guard, policy=policy)
    app.openapi = _openapi_with_security(app, token=config.token is not None)  # type: ignore[method-assign]
    return app


def _templates() -> Jinja2Templates:
    """The page's templates, autoescaped whatever their file names."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(PACKAGE_DIR / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return Jinja2Templates(env=env)


def _openapi_with_security(app: FastAPI, *, token: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI's generated document, plus the bearer scheme when the server has a token."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            if token:
                doc.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "session": {"type": "apiKey", "in": "cookie", "name": "scdm_session"}}
                doc["security"] = [{"bearer": []}, {"session": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process: settings from ``$SCDM_SERVE_CONFIG`` (set by :func:`serve`)."""
    data = json.loads(os.environ[CONFIG_ENV])
    store = Store(data.pop("store"), read_only=data.pop("read_only"))
    data["allowed_hosts"] = tuple(data["allowed_hosts"])
    return create_app(store, ServerConfig(**data))


# --------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------
def serve(store: str | os.PathLike[str] | Store | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, root_path: str = "", token: str | None = None, allowed_hosts: tuple[str, ...] = (),
          max_jobs: int = 1, ready: Callable[[str], None] | None = None, access_log: bool = False,
          **settings: Any) -> None:
    """Serve the API and web page with uvicorn until interrupted (Ctrl-C or SIGTERM).

    Parameters
    ----------
    store : str, path or Store
    host : str, default "127.0.0.1"
        Address to bind. Any address other than loopback needs ``token``.
    port : int, default 8000
        0 picks a free port (with one worker; the URL is passed to ``ready``).
    workers : int, default 1
        uvicorn worker processes. They share the job queue and the session key.
    root_path : str, default ""
        Path prefix under which a reverse proxy serves this server (e.g. ``/scdm``).
    token : str, optional
        Bearer token required on every route: at least 16 characters.
    allowed_hosts : tuple of str
        Host names to answer to besides loopback and ``host`` (``*.domain`` patterns; ``*``: any).
    max_jobs : int, default 1
        Jobs running at once; the others queue.
    ready : callable, optional
        Called with the server's URL once its socket listens.
    access_log : bool, default False
        Log every request (uvicorn's access log).
    **settings
        Other :class:`ServerConfig` fields (``max_upload_bytes``, ``sql_max_rows``, ``sql_timeout_s``).

    Raises
    ------
    InputDataError
        A non-loopback ``host`` without ``token``, a blank or short token, ``workers`` < 1, or
        ``port=0`` with several workers.
    """
    import uvicorn

    check_token(token)
    if not is_loopback(host) and token is None:
        msg = (f"Binding to {host!r} exposes the store to the network; pass --token TOKEN to require bearer-token "
               "auth, or bind to 127.0.0.1.")
        raise InputDataError(msg)
    if workers < 1 or (workers > 1 and port == 0):
        msg = f"--workers {workers} with --port {port}: use one worker or more, and a fixed port with several workers."
        raise InputDataError(msg)
    root_path = "/" + root_path.strip("/") if root_path.strip("/") else ""
    st = open_store(store)
    jobs_dir = tempfile.mkdtemp(prefix="scdm-serve-")
    config = ServerConfig(token=token, allowed_hosts=tuple(allowed_hosts), bind_host=host, max_jobs=max_jobs,
                          jobs_dir=jobs_dir, **settings)
    options: dict[str, Any] = {"root_path": root_path, "log_config": None, "access_log": access_log,
                               "server_header": False, "timeout_graceful_shutdown": 5, "lifespan": "on"}
    stop_on_sigterm = _exit_on_sigterm()
    try:
        if workers == 1:
            app = create_app(st, config)
            sock = _listening_socket(host, port)
            url = _url(host, sock.getsockname()[1], root_path)
            logger.info("scdm serve: %s (store %s, auth %s, max %d jobs)", url, st.root, "on" if token else "off", max_jobs)
            if ready is not None:
                ready(url)
            server = uvicorn.Server(uvicorn.Config(app, **options))
            server.run(sockets=[sock])
        else:
            os.environ[CONFIG_ENV] = json.dumps({**asdict(config), "store": str(st.root), "read_only": st.read_only})
            create_app(st, config)  # fail here, once, if the settings or the store are wrong
            url = _url(host, port, root_path)
            if ready is not None:
                ready(url)
            uvicorn.run("scdm.server.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                        **options)
    except KeyboardInterrupt:  # uvicorn stopped gracefully, then re-raised the Ctrl-C it caught
        pass
    finally:
        stop_on_sigterm()
        os.environ.pop(CONFIG_ENV, None)
        shutil.rmtree(jobs_dir, ignore_errors=True)


def _exit_on_sigterm() -> Callable[[], None]:
    """Make the SIGTERM that uvicorn re-raises after its graceful shutdown a normal exit (status 0), so that
    cleanup still runs; returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        msg = f"Cannot listen on {host}:{port} ({err.strerror}); pick another --port (0: any free one) or --host."
        raise InputDataError(msg) from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int, root_path: str) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}{root_path}/"
