"""``scdm serve``: a results explorer and prediction API over one store, standard library only.

One process serves a JSON API (documented at ``/openapi.json``) and a web page (``/``: plain
HTML and a little vanilla JavaScript, no build step) straight from the store:

- datasets, embeddings (provenance and telemetry), the leaderboard with filters, per-task
  results, skipped tasks, read-only SQL (row limit and time limit), trained heads, predictions
  (JSON or CSV);
- ``POST /api/jobs/predict``: predict a stored dataset with a trained head in a background thread;
  ``GET /api/jobs/<id>`` reports its state and progress;
- ``POST /api/upload``: an ``.h5ad`` body (size-limited, name sanitised, written only inside the
  store) is ingested; with a ``head_id`` whose model is a baseline (pca, hvg) it is embedded here
  and predicted, otherwise the answer names the ``scdm embed`` command to run;
- the report (``scdm report``) generated on demand into ``<store>/artifacts/report/``.

Safe by default: it binds 127.0.0.1; ``token`` enables bearer-token auth on every route and is
required for any other address (a browser gets a login form; the token then travels in an
HttpOnly, SameSite=Strict cookie); errors are JSON with a message, never a traceback; request paths
are resolved and must stay inside the store; every catalog access is one short transaction (the
store's connections are opened per call), so evaluation and embedding jobs in other processes can
write while the server reads. This module sits beside ``cli.py`` because it drives both stages.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hmac
import html
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pandas as pd

from store import Store, open_store
from store.errors import (
    DatasetNotFoundError,
    EmbeddingNotFoundError,
    InputDataError,
    QueryError,
    ReadOnlyQueryError,
    ScdmError,
)

__all__ = ["ScdmApp", "ServerConfig", "create_app", "main", "serve"]

logger = logging.getLogger("scdm.server")

UPLOADS_DIR = "uploads"
"""Folder of uploaded ``.h5ad`` files, relative to the store root."""
REPORT_DIR = "artifacts/report"
"""Folder the on-demand report is written to, relative to the store root."""
BASELINE_MODELS = ("pca", "hvg")
"""Models cheap enough to embed uploads with on the server."""
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MAX_JSON_BODY = 1 << 20
_CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'")
_STATUS_TEXT = {200: "OK", 202: "Accepted", 302: "Found", 303: "See Other", 400: "Bad Request", 401: "Unauthorized",
                403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
                411: "Length Required", 413: "Payload Too Large", 500: "Internal Server Error"}


@dataclass(frozen=True)
class ServerConfig:
    """Limits and security settings of the server."""

    token: str | None = None
    """Bearer token required on every route (None: no auth; only allowed on loopback)."""
    max_upload_bytes: int = 512 * 1024 * 1024
    """Largest accepted ``.h5ad`` upload."""
    sql_max_rows: int = 1000
    """Rows returned by one SQL query at most."""
    sql_timeout_s: float = 10.0
    """SQL queries running longer are stopped."""
    page_rows: int = 5000
    """Rows returned by list endpoints at most (``limit`` may ask for fewer)."""


class HttpError(Exception):
    """An error answered as JSON ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Request:
    """The parts of a WSGI request the handlers use."""

    method: str
    path: str
    query: dict[str, str]
    environ: dict[str, Any]
    params: dict[str, str] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, default) or default

    def int_arg(self, name: str, default: int, *, lo: int = 0, hi: int | None = None) -> int:
        raw = self.query.get(name)
        if raw in (None, ""):
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HttpError(400, f"Query parameter {name}={raw!r} is not an integer.") from None
        if value < lo or (hi is not None and value > hi):
            raise HttpError(400, f"Query parameter {name}={value} must lie in [{lo}, {hi if hi is not None else 'inf'}].")
        return value

    def json_body(self) -> dict[str, Any]:
        length = self.content_length()
        if length > _MAX_JSON_BODY:
            raise HttpError(413, f"JSON body of {length} bytes is larger than {_MAX_JSON_BODY} bytes.")
        raw = self.environ["wsgi.input"].read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise HttpError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise HttpError(400, "The request body must be a JSON object.")
        return body

    def content_length(self) -> int:
        raw = self.environ.get("CONTENT_LENGTH") or ""
        if not raw:
            return 0
        try:
            return max(int(raw), 0)
        except ValueError:
            raise HttpError(400, f"Bad Content-Length {raw!r}.") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    """Path with ``{name}`` placeholders (one path segment each)."""
    handler: Callable[[Request], Response]
    summary: str
    query: tuple[str, ...] = ()
    body: str | None = None
    """Description of the request body, if any."""

    def regex(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------
_JSON_COLUMNS = {"params", "telemetry", "audit", "options", "head_params", "train_metrics", "embedding_ids",
                 "datasets", "embedding_params", "config", "definition"}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-ready dicts: NaN -> null, timestamps ISO, JSON text columns parsed."""
    out = json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str))
    for row in out:
        for key in _JSON_COLUMNS & row.keys():
            if isinstance(row[key], str):
                try:
                    row[key] = json.loads(row[key])
                except ValueError:
                    pass
    return out


def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, default=str, allow_nan=False).encode()
    return Response(status, body, "application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message, "status": status}, status)


def _status_of(err: Exception) -> int:
    if isinstance(err, (DatasetNotFoundError, EmbeddingNotFoundError)) or type(err).__name__ == "HeadNotFoundError":
        return 404
    if isinstance(err, ReadOnlyQueryError):
        return 403
    if isinstance(err, (InputDataError, QueryError, ScdmError)):
        return 400
    return 500


# --------------------------------------------------------------------------------------------
# background jobs
# --------------------------------------------------------------------------------------------
@dataclass
class Job:
    job_id: str
    kind: str
    state: str = "queued"
    """queued | running | done | failed | needs_embedding"""
    stage: str = "queued"
    progress: float = 0.0
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "kind": self.kind, "state": self.state, "stage": self.stage,
                "progress": round(self.progress, 3), "message": self.message, "result": self.result,
                "created_at": self.created_at, "finished_at": self.finished_at}


class Jobs:
    """Jobs run one at a time in a worker thread (the catalog has one writer at a time anyway)."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scdm-job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, kind: str, work: Callable[[Job], None]) -> Job:
        job = Job(uuid.uuid4().hex[:12], kind)
        with self._lock:
            self._jobs[job.job_id] = job
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        job.state, job.stage = "running", "started"
        try:
            work(job)
            if job.state == "running":
                job.state, job.progress = "done", 1.0
        except Exception as err:  # noqa: BLE001 - a job's failure is reported in its status, never raised
            job.state = "failed"
            job.message = str(err) if isinstance(err, (ScdmError, HttpError)) else f"{type(err).__name__}: {err}"
            logger.warning("job %s (%s) failed: %s", job.job_id, job.kind, job.message)
            logger.debug("job traceback:\n%s", traceback.format_exc())
        finally:
            job.finished_at = time.time()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise HttpError(404, f"No job {job_id!r}; list jobs with GET /api/jobs.")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# the application
# --------------------------------------------------------------------------------------------
class ScdmApp:
    """The WSGI application: routes, auth, JSON errors."""

    def __init__(self, store: Store, config: ServerConfig | None = None) -> None:
        self.st = store
        self.config = config or ServerConfig()
        self.root = store.root.resolve()
        self.jobs = Jobs()
        self.routes = self._routes()
        self._compiled = [(r, r.regex()) for r in self.routes]

    # ---- WSGI entry point ------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            response = self._dispatch(environ)
        except HttpError as err:
            response = error_response(err.status, err.message)
        except Exception as err:  # noqa: BLE001 - never a traceback to the client
            status = _status_of(err)
            if status == 500:
                logger.error("internal error on %s %s:\n%s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                             traceback.format_exc())
                message = f"Internal error ({type(err).__name__}); the server log has the details."
            else:
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            response = error_response(status, str(message))
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"), *response.headers]
        start_response(f"{response.status} {_STATUS_TEXT.get(response.status, 'Status')}", headers)
        return [response.body]

    def _dispatch(self, environ: dict[str, Any]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "/") or "/"
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        request = Request(method, path, query, environ)
        login = self._check_auth(request)
        if login is not None:
            return login
        allowed = []
        for route, regex in self._compiled:
            match = regex.match(path)
            if match:
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    request.params = match.groupdict()
                    return route.handler(request)
                allowed.append(route.method)
        if path.startswith("/report/"):
            if method != "GET":
                raise HttpError(405, "Only GET is allowed on /report/.")
            return self.report_file(request)
        if allowed:
            raise HttpError(405, f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}.")
        raise HttpError(404, f"No route {method} {path}; the API is documented at /openapi.json.")

    def _check_auth(self, request: Request) -> Response | None:
        token = self.config.token
        if token is None:
            return None
        header = request.environ.get("HTTP_AUTHORIZATION", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else None
        if given is None:
            cookies = request.environ.get("HTTP_COOKIE", "")
            found = re.search(r"(?:^|;\s*)scdm_token=([^;]+)", cookies)
            given = found.group(1) if found else None
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            return None
        # The web page logs in once (the login form, or /?token=...): the token moves to an HttpOnly cookie.
        link_token = request.query.get("token") if request.path == "/" and request.method == "GET" else None
        if link_token is not None and hmac.compare_digest(link_token.encode(), token.encode()):
            return self._logged_in(token, 302)
        if request.path == "/login" and request.method == "POST":
            typed = self._login_form_token(request)
            if typed is not None and hmac.compare_digest(typed.encode(), token.encode()):
                # 303: the browser follows with a GET, so a reload does not post the form again
                return self._logged_in(token, 303)
            return self._login_page("Wrong token; try again." if typed else "Type the token.")
        if request.path == "/" and request.method == "GET" and "text/html" in request.environ.get("HTTP_ACCEPT", ""):
            # a browser gets a form instead of a JSON error; scripts keep the JSON answer below
            return self._login_page("Wrong token in the link; type it here." if "token" in request.query else "")
        return Response(401, json.dumps({"error": "Missing or wrong token: send 'Authorization: Bearer <token>' "
                                                  "(or open /?token=<token> in a browser).", "status": 401}).encode(),
                        "application/json", [("WWW-Authenticate", 'Bearer realm="scdm"')])

    @staticmethod
    def _logged_in(token: str, status: int) -> Response:
        cookie = f"scdm_token={token}; HttpOnly; SameSite=Strict; Path=/"
        return Response(status, b"", "text/plain", [("Location", "/"), ("Set-Cookie", cookie)])

    @staticmethod
    def _login_form_token(request: Request) -> str | None:
        length = request.content_length()
        if length > 4096:
            raise HttpError(413, f"The login form is {length} bytes; a token form is far smaller.")
        raw = request.environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
        typed = parse_qs(raw).get("token", [""])[-1].strip()
        return typed or None

    @staticmethod
    def _login_page(message: str) -> Response:
        note = f'<p class="err" id="login-msg">{html.escape(message)}</p>' if message else ""
        body = _LOGIN_PAGE.replace("{message}", note).encode()
        return Response(401, body, "text/html; charset=utf-8",
                        [("WWW-Authenticate", 'Bearer realm="scdm"'), ("Content-Security-Policy", _CSP)])

    # ---- route table -----------------------------------------------------------------------
    def _routes(self) -> list[Route]:
        lb_filters = ("model", "head", "scenario", "category_type", "category", "metric", "scheme")
        return [
            Route("GET", "/", self.index, "The web page (leaderboard, figures, models, SQL console, predictions)."),
            Route("POST", "/login", self.login, "Log a browser in: form field token (form-urlencoded); sets an HttpOnly cookie."),
            Route("GET", "/openapi.json", self.openapi, "This OpenAPI 3.0 document."),
            Route("GET", "/api/health", self.health, "Liveness and store path."),
            Route("GET", "/api/datasets", self.datasets, "Datasets in the store."),
            Route("GET", "/api/embeddings", self.embeddings, "Embeddings with provenance (params, checkpoint and adapter hashes) and telemetry.",
                  ("status", "model", "dataset")),
            Route("GET", "/api/models", self.models, "Models with embeddings or results."),
            Route("GET", "/api/models/{model}", self.model, "One model: its embeddings, leaderboard (category type all) and trained heads."),
            Route("GET", "/api/leaderboard", self.leaderboard, "Mean and sd over folds per model x head x scenario x category (long format). Comma-separated values filter.",
                  lb_filters),
            Route("GET", "/api/results", self.results, "Per-task (per-fold) metric values from eval_results.",
                  (*lb_filters, "limit", "offset")),
            Route("GET", "/api/skipped", self.skipped, "Tasks and splits that were not fitted, with the reason.", ("limit",)),
            Route("POST", "/api/sql", self.sql, "Read-only SQL on the catalog with a row limit and a time limit.",
                  body='{"query": "SELECT ...", "max_rows": 100}'),
            Route("GET", "/api/heads", self.heads, "Trained heads."),
            Route("GET", "/api/heads/{head_id}", self.head, "One trained head."),
            Route("GET", "/api/predictions", self.predictions, "Per-cell predictions of trained heads.",
                  ("head_id", "dataset", "limit", "offset")),
            Route("GET", "/api/predictions.csv", self.predictions_csv, "Predictions of one head on one dataset as CSV.",
                  ("head_id", "dataset")),
            Route("POST", "/api/jobs/predict", self.submit_predict, "Start a prediction job for a stored dataset and a trained head.",
                  body='{"head_id": "...", "dataset": "..."}'),
            Route("GET", "/api/jobs", self.list_jobs, "Jobs of this server process."),
            Route("GET", "/api/jobs/{job_id}", self.job, "State and progress of a job."),
            Route("POST", "/api/upload", self.upload, "Upload an .h5ad (raw body, size-limited), ingest it and, with head_id and a baseline model, embed and predict it.",
                  ("filename", "name", "label_key", "study", "tissue", "cancer_type", "drug_type", "regimen", "head_id"),
                  body="the .h5ad file bytes (application/octet-stream)"),
            Route("POST", "/api/report", self.make_report, "Generate the HTML report into <store>/artifacts/report/ (a job)."),
            Route("GET", "/api/report/figures", self.report_figures, "Figures of the generated report."),
        ]

    # ---- pages -----------------------------------------------------------------------------
    def index(self, request: Request) -> Response:
        return Response(200, _PAGE.encode(), "text/html; charset=utf-8", [("Content-Security-Policy", _CSP)])

    def login(self, request: Request) -> Response:
        """Reached only with a valid token (or none configured): back to the page."""
        return Response(303, b"", "text/plain", [("Location", "/")])

    def openapi(self, request: Request) -> Response:
        paths: dict[str, dict[str, Any]] = {}
        for route in self.routes:
            op: dict[str, Any] = {"summary": route.summary, "responses": {
                "200": {"description": "OK"}, "400": {"description": "Bad request: JSON {error}"},
                "401": {"description": "Missing or wrong bearer token (when the server has one)"}}}
            parameters = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                          for n in re.findall(r"\{(\w+)\}", route.pattern)]
            parameters += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in route.query]
            if parameters:
                op["parameters"] = parameters
            if route.body:
                kind = "application/octet-stream" if route.pattern == "/api/upload" else "application/json"
                op["requestBody"] = {"required": True, "description": route.body, "content": {kind: {}}}
            paths.setdefault(route.pattern, {})[route.method.lower()] = op
        doc = {
            "openapi": "3.0.3",
            "info": {"title": "scdm serve", "version": _version(),
                     "description": "Results explorer and prediction API over an scdm store."},
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}] if self.config.token else [],
            "paths": paths,
        }
        return json_response(doc)

    def health(self, request: Request) -> Response:
        return json_response({"status": "ok", "store": str(self.root), "auth": self.config.token is not None,
                              "version": _version()})

    # ---- catalog reads ---------------------------------------------------------------------
    def _read(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """One short read-only connection (never a write lock)."""
        with self.st.catalog.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def datasets(self, request: Request) -> Response:
        return json_response(records(self.st.datasets()))

    def embeddings(self, request: Request) -> Response:
        frame = self.st.embeddings(status=request.arg("status"))
        if request.arg("model"):
            frame = frame[frame["model"] == request.arg("model")]
        if request.arg("dataset"):
            frame = frame[(frame["dataset_name"] == request.arg("dataset")) | (frame["dataset_id"] == request.arg("dataset"))]
        return json_response(records(frame))

    def models(self, request: Request) -> Response:
        frame = self._read(
            "SELECT model, count(DISTINCT embedding_id) AS n_embeddings, count(DISTINCT dataset_id) AS n_datasets, "
            "list(DISTINCT variant ORDER BY variant) AS variants FROM embeddings GROUP BY model ORDER BY model")
        evaluated = set(self._read("SELECT DISTINCT model FROM eval_results")["model"])
        out = records(frame)
        for row in out:
            row["evaluated"] = row["model"] in evaluated
        return json_response(out)

    def model(self, request: Request) -> Response:
        from scdm_classify.results import leaderboard

        name = request.params["model"]
        emb = self.st.embeddings()
        emb = emb[emb["model"] == name]
        board = leaderboard(self.st, models=[name], category_types=["all"])
        heads = self._read("SELECT * FROM trained_heads WHERE model = ? ORDER BY created_at DESC", [name])
        if emb.empty and board.empty:
            raise HttpError(404, f"No model {name!r} in this store; GET /api/models lists them.")
        return json_response({"model": name, "embeddings": records(emb), "leaderboard": records(board),
                              "trained_heads": records(heads)})

    @staticmethod
    def _list_arg(request: Request, name: str) -> list[str] | None:
        raw = request.arg(name)
        return [v.strip() for v in raw.split(",") if v.strip()] if raw else None

    def leaderboard(self, request: Request) -> Response:
        from scdm_classify.results import leaderboard

        board = leaderboard(self.st, metrics=self._list_arg(request, "metric"), models=self._list_arg(request, "model"),
                            heads=self._list_arg(request, "head"), scenarios=self._list_arg(request, "scenario"),
                            category_types=self._list_arg(request, "category_type"), scheme=request.arg("scheme"))
        categories = self._list_arg(request, "category")
        if categories is not None:
            board = board[board["category"].isin(categories)]
        return json_response(records(board.head(self.config.page_rows)))

    def results(self, request: Request) -> Response:
        where, args = [], []
        for column, name in (("model", "model"), ("head", "head"), ("scenario", "scenario"), ("category_type", "category_type"),
                             ("category", "category"), ("metric", "metric"), ("scheme", "scheme")):
            values = self._list_arg(request, name)
            if values is not None:
                where.append(f"list_contains(?, {column})")
                args.append(values)
        limit = request.int_arg("limit", self.config.page_rows, lo=1, hi=self.config.page_rows)
        offset = request.int_arg("offset", 0)
        sql = ("SELECT * FROM eval_results" + (" WHERE " + " AND ".join(where) if where else "") +
               " ORDER BY model, head, scenario, category_type, category, metric, fold LIMIT ? OFFSET ?")
        return json_response(records(self._read(sql, [*args, limit, offset])))

    def skipped(self, request: Request) -> Response:
        limit = request.int_arg("limit", self.config.page_rows, lo=1, hi=self.config.page_rows)
        frame = self._read("SELECT * FROM skipped_tasks ORDER BY created_at DESC LIMIT ?", [limit])
        return json_response(records(frame))

    def sql(self, request: Request) -> Response:
        body = request.json_body()
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise HttpError(400, 'Send {"query": "SELECT ..."}; the query is missing or empty.')
        cap = self.config.sql_max_rows
        max_rows = body.get("max_rows", cap)
        if not isinstance(max_rows, int) or max_rows < 1:
            raise HttpError(400, f"max_rows must be a positive integer; got {max_rows!r}.")
        max_rows = min(max_rows, cap)
        t0 = time.perf_counter()
        # one row more than asked tells whether the result was cut
        frame = self.st.sql(query, max_rows=max_rows + 1, timeout_s=self.config.sql_timeout_s)
        truncated = len(frame) > max_rows
        frame = frame.head(max_rows)
        return json_response({"columns": [str(c) for c in frame.columns], "rows": records(frame),
                              "n_rows": len(frame), "truncated": truncated, "max_rows": max_rows,
                              "seconds": round(time.perf_counter() - t0, 4)})

    def heads(self, request: Request) -> Response:
        return json_response(records(self._read("SELECT * FROM trained_heads ORDER BY created_at DESC")))

    def head(self, request: Request) -> Response:
        head_id = request.params["head_id"]
        frame = self._read("SELECT * FROM trained_heads WHERE head_id = ?", [head_id])
        if frame.empty:
            raise HttpError(404, f"No trained head {head_id!r}; GET /api/heads lists them.")
        return json_response(records(frame)[0])

    def _prediction_frame(self, request: Request, *, paged: bool) -> pd.DataFrame:
        where, args = [], []
        if request.arg("head_id"):
            where.append("p.head_id = ?")
            args.append(request.arg("head_id"))
        if request.arg("dataset"):
            ds = self.st.dataset(str(request.arg("dataset")))
            where.append("p.dataset_id = ?")
            args.append(ds.dataset_id)
        sql = ("SELECT p.head_id, d.name AS dataset, p.dataset_id, p.row, c.cell_id, p.proba, p.label, c.response, "
               "p.embedding_id, p.created_at FROM predictions p JOIN datasets d USING (dataset_id) "
               "JOIN cells c ON c.dataset_id = p.dataset_id AND c.row = p.row" +
               (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.head_id, d.name, p.row")
        if paged:
            limit = request.int_arg("limit", self.config.page_rows, lo=1, hi=self.config.page_rows)
            sql += " LIMIT ? OFFSET ?"
            args += [limit, request.int_arg("offset", 0)]
        return self._read(sql, args)

    def predictions(self, request: Request) -> Response:
        return json_response(records(self._prediction_frame(request, paged=True)))

    def predictions_csv(self, request: Request) -> Response:
        if not request.arg("head_id") or not request.arg("dataset"):
            raise HttpError(400, "Give head_id and dataset, e.g. /api/predictions.csv?head_id=ID&dataset=NAME.")
        frame = self._prediction_frame(request, paged=False)
        if frame.empty:
            raise HttpError(404, "No predictions of this head on this dataset; POST /api/jobs/predict first.")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"predictions_{request.arg('dataset')}_{request.arg('head_id')}.csv")
        return Response(200, frame.to_csv(index=False).encode(), "text/csv; charset=utf-8",
                        [("Content-Disposition", f'attachment; filename="{name}"')])

    # ---- jobs ------------------------------------------------------------------------------
    def submit_predict(self, request: Request) -> Response:
        from scdm_classify.trained_heads import _head_row

        body = request.json_body()
        head_id, dataset = body.get("head_id"), body.get("dataset")
        if not isinstance(head_id, str) or not isinstance(dataset, str) or not head_id or not dataset:
            raise HttpError(400, 'Send {"head_id": "...", "dataset": "..."}; both are required strings.')
        _head_row(self.st, head_id)  # unknown ids answer 404 now, not in the job
        self.st.dataset(dataset)
        job = self.jobs.submit("predict", lambda job: self._predict_job(job, head_id, dataset))
        return json_response(job.to_dict() | {"status_url": f"/api/jobs/{job.job_id}"}, 202)

    def _predict_job(self, job: Job, head_id: str, dataset: str) -> None:
        from scdm_classify.trained_heads import predict

        job.stage, job.progress = "predicting", 0.3
        frame = predict(self.st, head_id, dataset)
        job.result = {"head_id": str(frame["head_id"].iloc[0]), "dataset": dataset, "n_cells": len(frame),
                      "n_sensitive": int(frame["label"].sum()), "mean_proba": float(frame["proba"].mean()),
                      "csv_url": _csv_url(str(frame["head_id"].iloc[0]), dataset)}
        job.stage = "done"

    def list_jobs(self, request: Request) -> Response:
        return json_response([j.to_dict() for j in self.jobs.all()])

    def job(self, request: Request) -> Response:
        return json_response(self.jobs.get(request.params["job_id"]).to_dict())

    # ---- upload ----------------------------------------------------------------------------
    def _upload_path(self, filename: str) -> Path:
        """Where an upload named ``filename`` goes; refuses anything that is not a plain file name."""
        base = filename[:-5] if filename.lower().endswith(".h5ad") else None
        if base is None or not _UPLOAD_NAME.match(filename) or ".." in filename:
            raise HttpError(400, f"Upload name {filename!r} is refused: use a plain file name ending in .h5ad "
                                 "(letters, digits, '.', '_', '-'; no folders, no '..').")
        folder = (self.root / UPLOADS_DIR).resolve()
        path = (folder / filename).resolve()
        if path.parent != folder or not path.is_relative_to(self.root):
            raise HttpError(400, f"Upload name {filename!r} would leave the store's upload folder.")
        return path

    def upload(self, request: Request) -> Response:
        filename = request.arg("filename") or ""
        path = self._upload_path(filename)
        if not request.environ.get("CONTENT_LENGTH"):
            raise HttpError(411, "Send the .h5ad as the request body with a Content-Length header.")
        length = request.content_length()
        limit = self.config.max_upload_bytes
        if length > limit:  # refused before a byte of the body is read
            raise HttpError(413, f"The upload is {length} bytes; this server accepts at most {limit} bytes. "
                                 "Ingest large files locally with `scdm ingest`.")
        if length == 0:
            raise HttpError(400, "The upload is empty.")
        name = request.arg("name") or filename[:-5]
        if not _UPLOAD_NAME.match(name):
            raise HttpError(400, f"Dataset name {name!r} is refused: letters, digits, '.', '_', '-' only.")
        head_id = request.arg("head_id")
        if head_id:
            from scdm_classify.trained_heads import _head_row

            _head_row(self.st, head_id)
        self._receive(request, path, length)
        options = {k: request.arg(k) for k in ("label_key", "study", "tissue", "cancer_type", "drug_type", "regimen")
                   if request.arg(k)}
        job = self.jobs.submit("upload", lambda job: self._upload_job(job, path, name, options, head_id))
        return json_response(job.to_dict() | {"status_url": f"/api/jobs/{job.job_id}"}, 202)

    @staticmethod
    def _receive(request: Request, path: Path, length: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        stream = request.environ["wsgi.input"]
        remaining = length
        try:
            with open(tmp, "wb") as fh:
                while remaining:
                    block = stream.read(min(remaining, 1 << 20))
                    if not block:
                        raise HttpError(400, f"The upload ended after {length - remaining} of {length} bytes.")
                    fh.write(block)
                    remaining -= len(block)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _upload_job(self, job: Job, path: Path, name: str, options: dict[str, str], head_id: str | None) -> None:
        job.stage, job.progress = "ingesting", 0.1
        info = self.st.ingest(str(path), name=name, **options)
        job.result = {"dataset": info.name, "dataset_id": info.dataset_id, "n_cells": info.n_cells}
        if not head_id:
            job.stage = "ingested"
            return
        from scdm_classify.trained_heads import _head_row, predict, train_head

        row = _head_row(self.st, head_id)
        if row["model"] not in BASELINE_MODELS:
            job.state, job.stage, job.progress = "needs_embedding", "ingested", 1.0
            job.message = (f"Dataset {info.name!r} is ingested. Head {row['head_id']} reads {row['model']} embeddings, "
                           f"which this server does not compute; run `scdm embed {info.name} --model {row['model']}` "
                           f"(same checkpoint and parameters), then POST /api/jobs/predict.")
            return
        # A pca/hvg baseline is fitted on its datasets, so the upload gets a space of its own
        # unless it is fitted jointly with the head's training datasets; the head is then
        # trained again, on the same cells and settings, in that joint space.
        from scdm_embed.runner import embed_baseline

        training = json.loads(row["datasets"])
        params = json.loads(row["embedding_params"])
        job.stage, job.progress = f"embedding with {row['model']} (jointly with {', '.join(training)})", 0.3
        kwargs = {"n_hvg": params.get("n_hvg_requested", 2000), "target_sum": params.get("target_sum", 1e4),
                  "normalized": params.get("normalized")}
        if row["model"] == "pca":
            kwargs["n_comps"] = params.get("n_comps_requested", 50)
        results = embed_baseline(self.st, [*training, info.name], model=str(row["model"]), progress=False, **kwargs)
        train_ids = [r.embedding_id for r in results[:-1]]
        job.stage, job.progress = "training the head in the joint space", 0.6
        new_head = train_head(self.st, train_ids, str(row["category_type"]), str(row["category"]), str(row["head"]),
                              threshold=float(row["threshold"]), **json.loads(row["head_params"]))
        job.stage, job.progress = "predicting", 0.8
        frame = predict(self.st, new_head, info.name)
        job.result |= {"head_id": new_head, "requested_head_id": str(row["head_id"]), "n_sensitive": int(frame["label"].sum()),
                       "mean_proba": float(frame["proba"].mean()),
                       "csv_url": _csv_url(new_head, info.name)}
        job.stage = "done"

    # ---- report ----------------------------------------------------------------------------
    def make_report(self, request: Request) -> Response:
        def work(job: Job) -> None:
            from scdm_classify.report import write_report

            job.stage, job.progress = "writing report", 0.2
            index = write_report(self.st, self.root / REPORT_DIR)
            job.result = {"index": "/report/index.html", "path": str(index)}

        job = self.jobs.submit("report", work)
        return json_response(job.to_dict() | {"status_url": f"/api/jobs/{job.job_id}"}, 202)

    def report_figures(self, request: Request) -> Response:
        folder = self.root / REPORT_DIR / "figures"
        if not folder.is_dir():
            return json_response({"generated": False, "figures": []})
        figures = sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".svg"))
        return json_response({"generated": True, "figures": [f"/report/figures/{f}" for f in figures]})

    def report_file(self, request: Request) -> Response:
        folder = (self.root / REPORT_DIR).resolve()
        relative = request.path[len("/report/"):] or "index.html"
        path = (folder / relative).resolve()
        if not path.is_relative_to(folder):
            raise HttpError(403, f"Path {request.path!r} is outside the report folder.")
        if not path.is_file():
            raise HttpError(404, f"No report file {relative!r}; generate the report with POST /api/report.")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Response(200, path.read_bytes(), kind)


def _csv_url(head_id: str, dataset: str) -> str:
    """Download link of one head's predictions on one dataset (names are quoted: they may hold '&' or spaces)."""
    return "/api/predictions.csv?" + urlencode({"head_id": head_id, "dataset": dataset})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------
class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(store: str | os.PathLike[str] | Store | None = None, **config: Any) -> ScdmApp:
    """The WSGI application over ``store`` (see :class:`ServerConfig` for the keyword arguments)."""
    return ScdmApp(open_store(store), ServerConfig(**config))


def serve(store: str | os.PathLike[str] | Store | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, ready: Callable[[str], None] | None = None, **config: Any) -> None:
    """Serve the API and web page until interrupted.

    Parameters
    ----------
    store : str, path or Store
    host : str, default "127.0.0.1"
        Address to bind. Any address other than loopback needs ``token``.
    port : int, default 8000
        0 picks a free port (the URL is passed to ``ready``).
    token : str, optional
        Bearer token required on every route.
    ready : callable, optional
        Called with the server's URL once it listens.
    **config
        Other :class:`ServerConfig` fields (``max_upload_bytes``, ``sql_max_rows``, ``sql_timeout_s``).

    Raises
    ------
    InputDataError
        A non-loopback ``host`` without ``token``, or an empty token.
    """
    if token is not None and len(token) < 8:
        msg = "The token is too short; use at least 8 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)."
        raise InputDataError(msg)
    if not _is_loopback(host) and token is None:
        msg = f"Binding to {host!r} exposes the store to the network; pass --token TOKEN to require bearer-token auth, or bind to 127.0.0.1."
        raise InputDataError(msg)
    app = create_app(store, token=token, **config)
    server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    url = f"http://{host}:{server.server_port}/"
    logger.info("scdm serve: %s (store %s, auth %s)", url, app.root, "on" if token else "off")
    if ready is not None:
        ready(url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.jobs.shutdown()


def main(argv: list[str] | None = None) -> None:
    """``python -m scdm_server --store S [--host H] [--port P] [--token T]`` (what ``scdm serve`` calls)."""
    parser = argparse.ArgumentParser(prog="scdm_server", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=os.environ.get("SCDM_TOKEN"))
    parser.add_argument("--max-upload-bytes", type=int, default=ServerConfig.max_upload_bytes)
    parser.add_argument("--sql-max-rows", type=int, default=ServerConfig.sql_max_rows)
    parser.add_argument("--sql-timeout", type=float, default=ServerConfig.sql_timeout_s)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        serve(args.store, host=args.host, port=args.port, token=args.token, max_upload_bytes=args.max_upload_bytes,
              sql_max_rows=args.sql_max_rows, sql_timeout_s=args.sql_timeout,
              ready=lambda url: print(f"listening on {url}", flush=True))
    except ScdmError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------------------------
# the web page
# --------------------------------------------------------------------------------------------
_STYLE = r"""<style>
body{font-family:system-ui,sans-serif;margin:0;color:#222}
header{background:#24466b;color:#fff;padding:.6em 1em}header h1{display:inline;font-size:1.2em;margin-right:1em}
nav a{color:#fff;margin-right:1em;cursor:pointer;text-decoration:none}nav a.on{text-decoration:underline}
main{padding:1em}section{display:none}section.on{display:block}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}
td{max-width:28em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
th{background:#eef;cursor:pointer;user-select:none}tr:nth-child(even){background:#f8f8f8}
input,select,textarea,button{font:inherit;margin:.2em}textarea{width:100%;height:6em;font-family:monospace}
.err{color:#b00}#sql-msg .err{white-space:pre-wrap;font-family:monospace}.msg{margin:.4em 0}.hint{color:#666;font-size:.85em}
.figs figure{display:inline-block;width:30%;min-width:16em;margin:.5em;vertical-align:top;cursor:pointer}
.figs img{width:100%;height:14em;object-fit:contain;border:1px solid #ddd;background:#fff}figcaption{font-size:.85em}
#fig-view{border:1px solid #aac;padding:.5em;margin:.5em 0}#fig-view img{max-width:100%;max-height:80vh}
progress{width:20em}
</style>"""

_LOGIN_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scdm: log in</title>
<link rel="icon" href="data:,">""" + _STYLE + r"""</head><body>
<header><h1>scdm</h1></header>
<main><h2>This server needs its token</h2>
<p>It was started with <code>scdm serve --token ...</code>; type that token to open the explorer.</p>
<form id="login-form" method="post" action="/login">
 <label>token <input type="password" name="token" id="login-token" size="40" autocomplete="current-password" autofocus></label>
 <button type="submit">Log in</button></form>
{message}
<p class="hint">Scripts send <code>Authorization: Bearer &lt;token&gt;</code> instead; the API is described at /openapi.json.</p>
</main></body></html>
"""

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scdm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">""" + _STYLE + r"""</head><body>
<header><h1>scdm</h1><nav>
<a data-tab="leaderboard" class="on">Leaderboard</a><a data-tab="figures">Figures</a><a data-tab="models">Models</a><a data-tab="sql">SQL</a><a data-tab="predict">Predict</a></nav></header>
<main>
<section id="leaderboard" class="on">
 <form id="lb-form">
  model <input name="model" size="10" placeholder="pca,scgpt"> head <input name="head" size="8" placeholder="ridge">
  scenario <select name="scenario"><option value="">any</option><option>pooled</option><option>cross</option><option>custom</option></select>
  category type <select name="category_type"><option value="">any</option><option>all</option><option>tissue</option>
  <option>cancer_type</option><option>drug_type</option><option>regimen</option></select>
  category <input name="category" size="10">
  metric <select name="metric"><option>auroc</option><option>f1</option><option>ap</option><option>accuracy</option>
  <option>precision</option><option>recall</option><option>f1_macro</option><option>f1_weighted</option><option>mcc</option>
  <option>ami</option><option>ari</option><option value="">all</option></select>
  <button type="submit">Filter</button></form>
 <div id="lb-msg" class="msg"></div><div id="lb-table"></div>
</section>
<section id="figures"><button id="fig-make">Generate report</button> <span id="fig-msg"></span>
 <a id="fig-report" href="/report/index.html" target="_blank" hidden>open the full report</a>
 <div id="fig-view" hidden><strong id="fig-view-name"></strong> <a id="fig-view-svg" target="_blank">SVG</a>
  <button id="fig-view-close" type="button">close</button><br><img id="fig-view-img" alt=""></div>
 <div class="figs" id="fig-list"></div></section>
<section id="models"><div id="model-list"></div><div id="model-msg" class="msg"></div><h2 id="model-name"></h2><div id="model-detail"></div></section>
<section id="sql"><textarea id="sql-text">SELECT name, n_cells FROM datasets</textarea><br>
 <button id="sql-run">Run</button> <span class="hint">(Ctrl+Enter; read-only, at most 500 rows shown)</span>
 <div id="sql-msg" class="msg"></div><div id="sql-table"></div></section>
<section id="predict"><form id="pred-form">
 head <select name="head_id" id="pred-head"></select> dataset <select name="dataset" id="pred-dataset"></select>
 <button type="submit" id="pred-submit">Predict</button></form>
 <progress id="pred-progress" max="1" value="0" hidden></progress> <span id="pred-msg"></span>
 <a id="pred-csv" download hidden>Download CSV</a><div id="pred-table"></div></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
async function api(path, opts) {
  const r = await fetch(path, Object.assign({credentials: "same-origin"}, opts || {}));
  const ct = r.headers.get("content-type") || "";
  const body = ct.includes("json") ? await r.json() : await r.text();
  if (r.status === 401) throw new Error("Not logged in (or the token changed): reload the page to log in again.");
  if (!r.ok) throw new Error((body && body.error) || r.statusText);
  return body;
}
function esc(v) { return v === null || v === undefined ? "" : String(v).replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";"); }
function fmt(v) { return typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : (typeof v === "object" && v !== null ? JSON.stringify(v) : v); }
function showError(el, err) { el.innerHTML = `<span class="err">${esc(err.message || err)}</span>`; }
function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }
// missing values sort last in both directions; numbers as numbers, the rest as text
function compare(x, y) {
  const nx = x === null || x === undefined, ny = y === null || y === undefined;
  if (nx || ny) return nx && ny ? 0 : nx ? 1 : -1;
  if (typeof x === "number" && typeof y === "number") return x - y;
  return String(fmt(x)).localeCompare(String(fmt(y)));
}
// long values (params, telemetry JSON) are cut by CSS; the whole text shows on hover
function cell(v) { const t = esc(v); return t.length > 40 ? `<td title="${t}">${t}</td>` : `<td>${t}</td>`; }
function table(el, rows, columns) {
  if (!rows.length) { el.innerHTML = "<p>(no rows)</p>"; return; }
  columns = columns || Object.keys(rows[0]);
  let sortKey = null, asc = true;
  function draw() {
    const data = rows.slice();
    if (sortKey) data.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey], missing = x === null || x === undefined || y === null || y === undefined;
      return missing ? compare(x, y) : compare(x, y) * (asc ? 1 : -1);
    });
    el.innerHTML = "<table><thead><tr>" + columns.map(c => `<th data-k="${esc(c)}" title="sort">${esc(c)}${c === sortKey ? (asc ? " ▲" : " ▼") : ""}</th>`).join("") +
      "</tr></thead><tbody>" + data.map(r => "<tr>" + columns.map(c => cell(fmt(r[c]))).join("") + "</tr>").join("") + "</tbody></table>";
    el.querySelectorAll("th").forEach(th => th.onclick = () => { const k = th.dataset.k; asc = sortKey === k ? !asc : true; sortKey = k; draw(); });
  }
  draw();
}
document.querySelectorAll("nav a").forEach(a => a.onclick = () => show(a.dataset.tab));
const loaders = {leaderboard: () => {}, figures: () => loadFigures(), models: () => loadModels(), sql: () => {}, predict: () => loadPredict()};
function show(tab) {
  if (!(tab in loaders)) tab = "leaderboard";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("on", a.dataset.tab === tab));
  document.querySelectorAll("section").forEach(s => s.classList.toggle("on", s.id === tab));
  history.replaceState(null, "", "#" + tab);  // a reload stays on the tab
  loaders[tab]();
}
async function loadLeaderboard(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams([...new FormData($("lb-form"))].filter(([k, v]) => v));
  $("lb-msg").textContent = "loading...";
  try {
    const rows = await api("/api/leaderboard?" + q);
    $("lb-msg").textContent = plural(rows.length, "row");
    table($("lb-table"), rows, ["model", "variant", "head", "scenario", "scheme", "category_type", "category", "metric", "mean", "sd", "n_folds", "n_null", "datasets"]);
  } catch (e) { showError($("lb-msg"), e); $("lb-table").innerHTML = ""; }
}
$("lb-form").onsubmit = loadLeaderboard;
function figureName(path) { return path.split("/").pop().replace(/\.(png|svg)$/, ""); }
async function loadFigures() {
  try {
    const r = await api("/api/report/figures");
    $("fig-report").hidden = !r.generated;
    const pngs = r.figures.filter(f => f.endsWith(".png"));
    if (!r.generated || !pngs.length) { $("fig-list").innerHTML = "<p>No report yet: generate it (radar, bars, projections, scalability).</p>"; return; }
    $("fig-list").innerHTML = pngs.map(f => `<figure data-src="${esc(f)}"><img src="${esc(f)}" alt="${esc(figureName(f))}"><figcaption>${esc(figureName(f).replace(/_/g, " "))}</figcaption></figure>`).join("");
    $("fig-list").querySelectorAll("figure").forEach(fig => fig.onclick = () => openFigure(fig.dataset.src, r.figures));
  } catch (e) { showError($("fig-list"), e); }
}
function openFigure(src, all) {
  const svg = src.replace(/\.png$/, ".svg");
  $("fig-view-img").src = src; $("fig-view-img").alt = figureName(src);
  $("fig-view-name").textContent = figureName(src).replace(/_/g, " ");
  $("fig-view-svg").href = svg; $("fig-view-svg").hidden = !all.includes(svg);
  $("fig-view").hidden = false; $("fig-view").scrollIntoView();
}
$("fig-view-close").onclick = () => { $("fig-view").hidden = true; };
async function waitJob(job, onTick) {
  for (;;) {
    const j = await api("/api/jobs/" + job.job_id);
    onTick(j);
    if (!["queued", "running"].includes(j.state)) return j;
    await new Promise(r => setTimeout(r, 300));
  }
}
$("fig-make").onclick = async () => {
  $("fig-make").disabled = true;
  try {
    const j = await waitJob(await api("/api/report", {method: "POST"}), j => $("fig-msg").textContent = j.stage + "...");
    if (j.state !== "done") throw new Error(j.message);
    $("fig-msg").textContent = "report ready"; await loadFigures();
  } catch (e) { showError($("fig-msg"), e); } finally { $("fig-make").disabled = false; }
};
async function loadModels() {
  try {
    const models = await api("/api/models");
    $("model-list").innerHTML = models.length ? models.map(m => `<button data-m="${esc(m.model)}">${esc(m.model)} (${plural(m.n_embeddings, "embedding")})</button>`).join("")
      : "<p>No embeddings yet: run <code>scdm embed</code>.</p>";
    $("model-list").querySelectorAll("button").forEach(b => b.onclick = () => loadModel(b.dataset.m));
  } catch (e) { showError($("model-msg"), e); }
}
async function loadModel(name) {
  try {
    const m = await api("/api/models/" + encodeURIComponent(name));
    $("model-msg").textContent = ""; $("model-name").textContent = name;
    const d = $("model-detail"); d.innerHTML = "<h3>Embeddings</h3><div id=me></div><h3>Leaderboard (all cells)</h3><div id=ml></div><h3>Trained heads</h3><div id=mh></div>";
    table($("me"), m.embeddings, ["embedding_id", "dataset_name", "variant", "dim", "status", "n_cells", "params", "telemetry"]);
    table($("ml"), m.leaderboard, ["head", "scenario", "scheme", "metric", "mean", "sd", "n_folds"]);
    table($("mh"), m.trained_heads, ["head_id", "head", "category_type", "category", "n_train", "created_at"]);
  } catch (e) { showError($("model-msg"), e); }
}
async function runSql() {
  $("sql-msg").textContent = "running...";
  try {
    const r = await api("/api/sql", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({query: $("sql-text").value, max_rows: 500})});
    $("sql-msg").textContent = `${plural(r.n_rows, "row")}${r.truncated ? " (truncated)" : ""} in ${r.seconds} s`;
    table($("sql-table"), r.rows, r.columns);
  } catch (e) { showError($("sql-msg"), e); $("sql-table").innerHTML = ""; }
}
$("sql-run").onclick = runSql;
$("sql-text").onkeydown = (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runSql(); } };
async function loadPredict() {
  try {
    const [heads, datasets] = await Promise.all([api("/api/heads"), api("/api/datasets")]);
    $("pred-head").innerHTML = heads.map(h => `<option value="${esc(h.head_id)}">${esc(h.head_id)} ${esc(h.head)} on ${esc(h.model)} (${esc(h.category_type)}=${esc(h.category)})</option>`).join("");
    $("pred-dataset").innerHTML = datasets.map(d => `<option>${esc(d.name)}</option>`).join("");
    $("pred-submit").disabled = !heads.length || !datasets.length;
    if (!heads.length) $("pred-msg").textContent = "No trained heads yet: train one with `scdm train-head`.";
    else if (!datasets.length) $("pred-msg").textContent = "No datasets yet: ingest one with `scdm ingest`.";
  } catch (e) { showError($("pred-msg"), e); }
}
$("pred-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const body = Object.fromEntries(new FormData($("pred-form")));
  const bar = $("pred-progress"); bar.hidden = false; bar.value = 0; $("pred-csv").hidden = true; $("pred-table").innerHTML = "";
  $("pred-submit").disabled = true; $("pred-msg").textContent = "submitting...";
  try {
    const job = await api("/api/jobs/predict", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const j = await waitJob(job, j => { bar.value = j.progress; $("pred-msg").textContent = j.stage + "..."; });
    if (j.state !== "done") throw new Error(j.message);
    bar.value = 1; $("pred-msg").textContent = `${plural(j.result.n_cells, "cell")}, ${j.result.n_sensitive} predicted sensitive (mean probability ${j.result.mean_proba.toFixed(3)})`;
    $("pred-csv").href = j.result.csv_url; $("pred-csv").hidden = false;
    const rows = await api(`/api/predictions?head_id=${encodeURIComponent(j.result.head_id)}&dataset=${encodeURIComponent(body.dataset)}&limit=200`);
    table($("pred-table"), rows, ["cell_id", "proba", "label", "response"]);
  } catch (e) { showError($("pred-msg"), e); bar.hidden = true; } finally { $("pred-submit").disabled = false; }
};
loadLeaderboard();
show(location.hash.slice(1));
</script></body></html>
"""


if __name__ == "__main__":
    main()
