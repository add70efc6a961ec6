"""The routes of ``scdm serve``: the page, the JSON API over the store, jobs, uploads and the report.

Every catalog access is a read through the store (``Store.query``, ``Store.sql``, the leaderboard
of ``scdm.classify.results``) in one short read-only connection, so evaluation and embedding jobs
in other processes write while the server reads. Writes (ingesting an upload, predictions, a
retrained head) happen only in jobs, through the store's and the stages' functions.
Synchronous routes run in the server's thread pool; only the upload streams in the event loop.
"""

from __future__ import annotations

import functools
import json
import logging
import mimetypes
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import anyio
import pandas as pd
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from scdm.classify.metrics import METRICS
from scdm.classify.results import (
    LEADERBOARD_KEYS,
    POOLED_COLUMNS,
    json_records,
    leaderboard,
    leaderboard_notes,
    pooled_names,
    stale_notes,
    stale_sql,
    unanswered_note_sql,
    with_signed_partner,
)
from scdm.classify.trained_heads import with_revision_notes
from scdm.server.config import SQL_TIMEOUT_ENV, ServerState, version
from scdm.server.jobs import JobFolder, JobHandle, JobRecord, new_job_id
from scdm.server.models import (
    UPLOAD_FIELDS,
    DatasetRow,
    EmbeddingFilters,
    EmbeddingRow,
    ErrorBody,
    Health,
    JobStatus,
    LeaderboardNotes,
    LeaderboardRow,
    Limit,
    LoginForm,
    ModelDetail,
    ModelSummary,
    PagedResultFilters,
    PredictionCsvQuery,
    PredictionFilters,
    PredictionRow,
    PredictRequest,
    ReportFigures,
    ReportRequest,
    ResultFilters,
    ResultRow,
    RunRow,
    SkippedRow,
    SqlAnswer,
    SqlRequest,
    TrainedHeadRow,
    UploadQuery,
)
from scdm.server.security import REPORT_CSP
from scdm.store.errors import QueryTimeoutError, ScdmError
from scdm.store.evaluation import unanswered_sql
from scdm.store.genes import space_notes_sql
from scdm.store.heads import trained_head, trained_head_table, with_responses
from scdm.store.labels import mixed_drugs_sql
from scdm.store.transfer import transfer_runs_table
from scdm.store.wording import spoken

logger = logging.getLogger(__name__)

__all__ = ["router", "UPLOADS_DIR", "REPORT_DIR", "BASELINE_MODELS"]

UPLOADS_DIR = "uploads"
"""Folder of uploaded ``.h5ad`` files, relative to the store root (one sub-folder per upload job)."""
REPORT_DIR = "artifacts/report"
"""Folder the report is written to and served from, relative to the store root."""
BASELINE_MODELS = ("pca", "hvg")
"""Models cheap enough to embed uploads with on the server."""
TOTAL_COUNT_HEADER = "X-Total-Count"
"""Response header of a paged list route: the rows of every page together (a shorter page than that is not the end)."""
PAGING = ("Paged with limit (capped at the server's page size) and offset. Each page and its X-Total-Count header (the "
          "rows of every page together) are read from one state of the store, in one total order (ties broken by the "
          "row's key), so the pages of an unchanged store neither repeat nor skip a row. A job or an evaluation that "
          "writes between two page requests can shift the later pages; the total then differs from the first "
          "page's: read again from offset 0.")
"""What the paged routes guarantee (their descriptions in the OpenAPI document)."""
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MAX_LOGIN_BYTES = 4096

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad request"},
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token (when the server has one)"},
    403: {"model": ErrorBody, "description": "Refused: a write in SQL, a cross-origin request, a read-only store"},
    404: {"model": ErrorBody, "description": "No such dataset, head, model or job"},
    415: {"model": ErrorBody, "description": "A state-changing request without a JSON (or octet-stream) body"},
    422: {"model": ErrorBody, "description": "A parameter or body field has a bad value; the message names the allowed ones"},
}
router = APIRouter(responses=_ERRORS)


def server(request: Request) -> ServerState:
    state: ServerState = request.app.state.scdm
    return state


Server = Annotated[ServerState, Depends(server)]


class HttpError(ScdmError):
    """An error answered with a given status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def root_of(request: Request) -> str:
    """The ``--root-path`` prefix: URLs the server hands out start with it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------
_JSON_COLUMNS = {"params", "telemetry", "audit", "options", "head_params", "train_metrics", "embedding_ids",
                 "datasets", "embedding_params", "config", "definition"}
_RESULT_JSON_COLUMNS = _JSON_COLUMNS - {"datasets"}
"""JSON columns of result rows: their ``datasets`` is comma-separated names, not JSON (a dataset named
``1`` must stay a name)."""


def records(frame: pd.DataFrame, json_columns: set[str] = _JSON_COLUMNS) -> list[dict[str, Any]]:
    """DataFrame rows as JSON-ready dicts (as the CLI's --format json writes them), JSON text columns parsed."""
    out = json_records(frame)
    for row in out:
        for key in json_columns & row.keys():
            if isinstance(row[key], str):
                try:
                    row[key] = json.loads(row[key])
                except ValueError:
                    pass
    return out


def _values(items: list[Any] | None) -> list[str] | None:
    """Enum members (or strings) as their string values."""
    return None if items is None else [getattr(i, "value", i) for i in items]


def _cap(limit: int | None, cap: int) -> int:
    return cap if limit is None else min(limit, cap)


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def typed(kind: Any, value: Any) -> Response:
    """``value`` checked against ``kind`` (the route's response model) and encoded as JSON, in the route's thread.

    FastAPI would validate a returned value in a second hop to the thread pool and encode it on
    the event loop; done here, the event loop only moves bytes (under 8 concurrent clients this
    is most of the difference in requests per second).
    """
    adapter = _adapter(kind)
    return Response(adapter.dump_json(adapter.validate_python(value)), media_type="application/json")


def job_status(record: JobRecord, request: Request) -> JobStatus:
    return JobStatus(**asdict(record), status_url=f"{root_of(request)}/api/jobs/{record.job_id}")


# --------------------------------------------------------------------------------------------
# the page, logging in, the API description
# --------------------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
def index(request: Request, srv: Server, token: str | None = None) -> Response:
    """The explorer, or the login form (a browser without the token), or a 401 (a script)."""
    if request.state.authenticated:
        return _page(request, srv, "index.html", {})
    if token is not None and srv.policy.token_matches(token):
        return _logged_in(request, srv, 302)  # a link with ?token=: the token moves into a cookie, out of the URL
    if "text/html" in request.headers.get("accept", ""):
        return _login_page(request, srv, "Wrong token in the link; type it here." if token is not None else "")
    return JSONResponse({"error": "Missing or wrong token: send 'Authorization: Bearer <token>' (or open /?token=<token> "
                                  "in a browser).", "status": 401}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="scdm"'})


@router.post("/login", include_in_schema=False)
async def login(request: Request, srv: Server) -> Response:
    """The login form's POST (form-urlencoded field ``token``); sets the session cookie."""
    if srv.policy.token is None:
        return RedirectResponse(f"{root_of(request)}/", status_code=303)
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > _MAX_LOGIN_BYTES:
        return _error(413, f"The login form is {declared} bytes; a token form is far smaller.")
    raw = (await request.body())[:_MAX_LOGIN_BYTES].decode("utf-8", "replace")
    form = LoginForm(token=parse_qs(raw).get("token", [""])[-1].strip())
    if form.token and srv.policy.token_matches(form.token):
        return _logged_in(request, srv, 303)  # 303: the browser follows with a GET; a reload does not post again
    return _login_page(request, srv, "Wrong token; try again." if form.token else "Type the token.")


def _page(request: Request, srv: Server, name: str, context: dict[str, Any], *, status: int = 200,
          headers: dict[str, str] | None = None) -> HTMLResponse:
    base = {"root": root_of(request), "version": version(), "auth": srv.policy.token is not None}
    return srv.templates.TemplateResponse(request, name, {**base, **context}, status_code=status, headers=headers)


def _login_page(request: Request, srv: Server, message: str) -> HTMLResponse:
    return _page(request, srv, "login.html", {"message": message}, status=401,
                 headers={"WWW-Authenticate": 'Bearer realm="scdm"'})


def _logged_in(request: Request, srv: Server, status: int) -> Response:
    root = root_of(request)
    cookie = srv.policy.session_cookie(path=root or "/", secure=request.url.scheme == "https")
    return RedirectResponse(f"{root}/", status_code=status, headers={"Set-Cookie": cookie})


@router.get("/docs", include_in_schema=False)
def docs(request: Request, srv: Server) -> HTMLResponse:
    """Swagger UI over /openapi.json, from files this server serves (no CDN; the page's usual CSP)."""
    return _page(request, srv, "docs.html", {})


@router.get("/api/health", response_model=Health, summary="Liveness and store path")
def health(srv: Server) -> Health:
    return Health(status="ok", store=str(srv.root), auth=srv.policy.token is not None, read_only=srv.store.read_only,
                  version=version(), max_jobs=srv.config.max_jobs)


# --------------------------------------------------------------------------------------------
# catalog reads
# --------------------------------------------------------------------------------------------
@router.get("/api/datasets", response_model=list[DatasetRow], summary="Datasets in the store")
def datasets(srv: Server) -> Response:
    # n_labelled/n_sensitive count the default label set only: name it, and give every label set's counts
    rows = records(srv.store.datasets())
    label_sets = srv.store.label_sets()
    per_dataset: dict[str, list[dict[str, Any]]] = {}
    for ls in records(label_sets[["dataset_id", "name", "drug", "is_default", "n_labelled", "n_sensitive"]]):
        per_dataset.setdefault(ls.pop("dataset_id"), []).append(ls)
    for row in rows:
        row["label_sets"] = per_dataset.get(row["dataset_id"], [])
    return typed(list[DatasetRow], rows)


@router.get("/api/embeddings", response_model=list[EmbeddingRow],
            summary="Embeddings with provenance (params, checkpoint and adapter hashes) and telemetry")
def embeddings(srv: Server, f: Annotated[EmbeddingFilters, Query()]) -> Response:
    frame = srv.store.embeddings(status=getattr(f.status, "value", f.status))
    if f.model:
        frame = frame[frame["model"] == f.model]
    if f.dataset:
        frame = frame[(frame["dataset_name"] == f.dataset) | (frame["dataset_id"] == f.dataset)]
    return typed(list[EmbeddingRow], records(frame))


@router.get("/api/models", response_model=list[ModelSummary], summary="Models with embeddings or results")
def models(srv: Server) -> Response:
    # a language model (scdm prompt) has results and no embedding: listed with its result variants
    # an embedding counts once complete (as `scdm ls` lists it); one being written or stopped is counted apart
    frame = srv.store.query(
        "WITH e AS (SELECT model, count(DISTINCT embedding_id) FILTER (WHERE status = 'complete') AS n_embeddings, "
        "           count(DISTINCT embedding_id) FILTER (WHERE status <> 'complete') AS n_unfinished, "
        "           count(DISTINCT dataset_id) FILTER (WHERE status = 'complete') AS n_datasets, "
        "           list(DISTINCT variant ORDER BY variant) AS variants FROM embeddings GROUP BY model), "
        "r AS (SELECT model, list(DISTINCT variant ORDER BY variant) AS variants FROM eval_results GROUP BY model) "
        "SELECT model, coalesce(e.n_embeddings, 0) AS n_embeddings, coalesce(e.n_unfinished, 0) AS n_unfinished, "
        "       coalesce(e.n_datasets, 0) AS n_datasets, coalesce(e.variants, r.variants) AS variants "
        "FROM e FULL JOIN r USING (model) ORDER BY model")
    # evaluated: it has results a leaderboard shows (an older scdm's, left out everywhere, do not count)
    evaluated = set(srv.store.query(f"SELECT DISTINCT x.model FROM results x WHERE NOT {stale_sql(srv.store, 'x')}")["model"])
    out = records(frame)
    for row in out:
        row["evaluated"] = row["model"] in evaluated
    return typed(list[ModelSummary], out)


@router.get("/api/models/{model}", response_model=ModelDetail,
            summary="One model: its embeddings, leaderboard (category type all) and trained heads")
def model(model: str, srv: Server) -> Response:
    emb = srv.store.embeddings()
    emb = emb[emb["model"] == model]
    board = leaderboard(srv.store, models=[model], category_types=["all"])
    heads = with_revision_notes(trained_head_table(srv.store, model=model))
    if emb.empty and board.empty:
        raise HttpError(404, f"No model {model!r} in this store; GET /api/models lists them.")
    return typed(ModelDetail, {"model": model, "embeddings": records(emb), "leaderboard": records(board, _RESULT_JSON_COLUMNS),
                               "notes": leaderboard_notes(board, METRICS), "left_out": stale_notes(srv.store),
                               "trained_heads": records(heads)})


@router.get("/api/leaderboard", response_model=list[LeaderboardRow],
            summary="Mean, sd and n over the folds of each result (long format)",
            description="One row per embedding space, datasets, label set, split (scenario, scheme, k, seed, category), "
                        "head and params, and metric; folds_done/folds_expected/complete mark interrupted results. "
                        "Results of different splits, label sets or datasets are never averaged together. " + PAGING +
                        " A result's mean moves it while its evaluation adds folds.")
def leaderboard_route(srv: Server, f: Annotated[PagedResultFilters, Query()]) -> Response:
    board = _filtered_board(srv, f, metrics=_values(f.metric))
    page = _in_page_order(board).iloc[f.offset:f.offset + _cap(f.limit, srv.config.page_rows)]
    response = typed(list[LeaderboardRow], records(page, _RESULT_JSON_COLUMNS))
    response.headers[TOTAL_COUNT_HEADER] = str(len(board))
    return response


@router.get("/api/leaderboard/notes", response_model=LeaderboardNotes,
            summary="The caveats `scdm results` prints under the same leaderboard",
            description="For the filters of GET /api/leaderboard: the notes `scdm results` prints on stderr under "
                        "the same rows (a transductive baseline, one-class test folds, incomplete results, test "
                        "cells a prompting model left unanswered, an older gene table, ...), in its words, and "
                        "the results it leaves out as known wrong now (fitted by an older scdm).")
def leaderboard_notes_route(srv: Server, f: Annotated[ResultFilters, Query()]) -> Response:
    # every metric, as scdm results reads them: the notes tell a one-class test fold (every metric NULL)
    # from a metric undefined for another reason; the shown metrics pick the notes that concern them
    board = _filtered_board(srv, f, metrics=None)
    shown = with_signed_partner(_values(f.metric) or METRICS)
    return typed(LeaderboardNotes, {"notes": leaderboard_notes(board, shown), "left_out": stale_notes(srv.store)})


def _filtered_board(srv: ServerState, f: ResultFilters, metrics: list[str] | None) -> pd.DataFrame:
    """The leaderboard of these metrics (None: all) under the filters of the leaderboard routes."""
    board = leaderboard(srv.store, metrics=metrics, models=f.model, heads=_values(f.head),
                        scenarios=_values(f.scenario), category_types=_values(f.category_type), datasets=f.dataset,
                        label_sets=f.label_set)
    if f.scheme is not None:
        board = board[board["scheme"].isin(_values(f.scheme) or [])]
    if f.category is not None:
        board = board[board["category"].isin(f.category)]
    return board


def _in_page_order(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's order (best mean first per scenario, category and metric) with ties broken by the
    result identity: one order on every request, so pages neither repeat nor skip a row."""
    first = ["scenario", "category_type", "category", "metric", "mean"]
    by = first + [k for k in LEADERBOARD_KEYS if k in board.columns and k not in first]
    return board.sort_values(by, ascending=[k != "mean" for k in by], na_position="last", kind="stable")


@router.get("/api/results", response_model=list[ResultRow], summary="Per-task (per-fold) metric values", description=PAGING)
def results(srv: Server, f: Annotated[PagedResultFilters, Query()]) -> Response:
    where: list[str] = [f"NOT {stale_sql(srv.store, 'x')}"]  # numbers known to be wrong now, as the leaderboard leaves out
    args: list[Any] = []
    for column, values in (*((c, _values(getattr(f, c))) for c in ("model", "head", "scenario", "category_type", "category",
                                                                  "metric", "scheme")),
                           ("label_set", f.label_set), ("datasets", f.dataset)):
        if values is not None:  # datasets and label sets exactly as the leaderboard matches them
            where.append(f"list_contains(?, {column})")
            args.append(pooled_names(values) if column in POOLED_COLUMNS else values)
    # note: 'older gene table (...)' on a space this scdm would not make, as the leaderboard and scdm ls mark it
    # 'labelled for different drugs (...)' on a fold of datasets labelled for several drugs,
    # and 'N of M test cells unanswered' on a prompting task scored on the cells its model answered
    unanswered = unanswered_note_sql(unanswered_sql("t.flags"), "x.n_test")
    matching = (f"SELECT x.*, concat_ws('; ', nullif(n.note, ''), m.note, {unanswered}) AS note FROM eval_results x "
                f"LEFT JOIN {space_notes_sql()} n USING (space_id) LEFT JOIN (SELECT task_id, flags FROM eval_tasks) t "
                f"USING (task_id) LEFT JOIN {mixed_drugs_sql()} m USING (split_id, label_set) WHERE " + " AND ".join(where))
    # (task_id, metric) is the table's key: the order is total, so the pages of one state of the store partition it
    order = "model, head, scenario, category_type, category, metric, fold, task_id"
    frame, total = _page_and_total(srv, matching, order, "task_id", args, _cap(f.limit, srv.config.page_rows), f.offset)
    return _paged(typed(list[ResultRow], records(frame, _RESULT_JSON_COLUMNS)), total)


def _page_and_total(srv: ServerState, matching: str, order: str, key: str, args: list[Any], limit: int,
                    offset: int) -> tuple[pd.DataFrame, int]:
    """One page of the rows of ``matching`` in ``order`` and the number of them all, from one statement.

    One statement reads one state of the catalog: the total always counts the rows the page was cut
    from, even while an evaluation or a prediction job writes (two queries could straddle a commit).
    """
    sql = (f"WITH matching AS ({matching}), page AS (SELECT * FROM matching ORDER BY {order} LIMIT ? OFFSET ?) "
           f"SELECT t.total AS _total, page.* FROM (SELECT count(*) AS total FROM matching) t LEFT JOIN page ON true "
           f"ORDER BY {order}")
    frame = srv.store.query(sql, [*args, limit, offset])
    total = int(frame["_total"].iloc[0])
    # past the last row the page is empty: the join's one row of NULLs only carries the total
    return frame.drop(columns="_total")[frame[key].notna()].reset_index(drop=True), total


def _paged(response: Response, total: int) -> Response:
    response.headers[TOTAL_COUNT_HEADER] = str(total)
    return response


@router.get("/api/runs", response_model=list[RunRow], summary="Every run (evaluate, prompt, finetune, transfer), oldest first",
            description="Evaluation, prompting and LoRA runs as the report's runs table lists them, and the transfer "
                        "runs (scdm transfer) in the same shape, each with its kind; oldest first. A column that "
                        "does not apply to a kind is null (a transfer run has no heads or tasks; an evaluation run no "
                        "n_source or n_target).")
def runs(srv: Server) -> Response:
    from scdm.classify.report import runs_table

    evaluation = runs_table(srv.store).drop(columns=["host", "pid"])  # where it ran stays on the server
    transfer = transfer_runs_table(srv.store)
    parts = [f for f in (evaluation, transfer) if not f.empty]
    frame = pd.concat(parts, ignore_index=True) if parts else evaluation
    frame = frame.sort_values(["created_at", "run_id"], kind="stable")
    return typed(list[RunRow], records(frame, {"heads", "scenarios"}))


@router.get("/api/skipped", response_model=list[SkippedRow], summary="Tasks and splits that were not fitted, with the reason")
def skipped(srv: Server, f: Annotated[Limit, Query()]) -> Response:
    frame = srv.store.query("SELECT * FROM skipped_tasks ORDER BY created_at DESC LIMIT ?", [_cap(f.limit, srv.config.page_rows)])
    return typed(list[SkippedRow], records(frame))


@router.post("/api/sql", response_model=SqlAnswer, summary="Read-only SQL on the catalog with a row limit and a time limit")
def sql(body: SqlRequest, srv: Server) -> Response:
    max_rows = _cap(body.max_rows, srv.config.sql_max_rows)
    t0 = time.perf_counter()
    # one row more than asked tells whether the result was cut
    try:
        frame = srv.store.sql(body.query, max_rows=max_rows + 1, timeout_s=srv.config.sql_timeout_s)
    except QueryTimeoutError as err:  # the store cannot know how this server's limit is raised
        raise HttpError(400, f"{err} This server stops SQL queries after {err.timeout_s:g} s; whoever runs it raises "
                             f"the limit with `scdm serve --sql-timeout SECONDS` (or ${SQL_TIMEOUT_ENV}), or run the "
                             "query with `scdm sql` on the store's machine (no time limit unless --timeout).") from err
    truncated = len(frame) > max_rows
    frame = frame.head(max_rows)
    answer = {"columns": [str(c) for c in frame.columns], "rows": records(frame), "n_rows": len(frame), "truncated": truncated,
              "max_rows": max_rows, "seconds": round(time.perf_counter() - t0, 4)}
    return typed(SqlAnswer, answer)


@router.get("/api/heads", response_model=list[TrainedHeadRow], summary="Trained heads")
def heads(srv: Server) -> Response:
    return typed(list[TrainedHeadRow], records(with_revision_notes(trained_head_table(srv.store))))


@router.get("/api/heads/{head_id}", response_model=TrainedHeadRow, summary="One trained head")
def head(head_id: str, srv: Server) -> Response:
    frame = trained_head_table(srv.store, head_id=head_id)
    if frame.empty:
        raise HttpError(404, f"No trained head {head_id!r}; GET /api/heads lists them.")
    frame = with_revision_notes(frame)
    return typed(TrainedHeadRow, records(frame)[0])


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a CSV field as a formula (OWASP's CSV injection list)."""


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy whose text values that a spreadsheet would run as formulas start with an apostrophe.

    Cell ids and dataset names come from whoever uploaded the data, and the CSV download is
    opened by someone else, in Excel or LibreOffice: ``=HYPERLINK("http://...", "x")`` as a cell
    id would run there. Numbers stay numbers (a negative probability cannot occur; a numeric
    column is never touched). Only this download is changed: the JSON API and ``scdm predict
    --out`` keep the ids as stored, for programs that join on them.
    """
    out = frame.copy()
    for column in out.columns:
        values = out[column]
        if values.dtype == object or pd.api.types.is_string_dtype(values):
            text = values.astype("string")
            risky = text.str.startswith(FORMULA_STARTS).fillna(False).astype(bool)
            if risky.any():
                out[column] = values.where(~risky, "'" + text)
    return out


def _prediction_frame(srv: ServerState, head_id: str | None, dataset: str | None, *, limit: int | None = None,
                      offset: int = 0) -> tuple[pd.DataFrame, int | None]:
    """The predictions (one page of them with ``limit``) and, for a page, the number of them all."""
    where: list[str] = []
    args: list[Any] = []
    if head_id:
        where.append("p.head_id = ?")
        args.append(head_id)
    if dataset:
        where.append("p.dataset_id = ?")
        args.append(srv.store.dataset(dataset).dataset_id)
    matching = ("SELECT p.head_id, d.name AS dataset, p.dataset_id, p.row, c.cell_id, p.proba, p.label, "
                "p.trained_on, p.embedding_id, p.created_at FROM predictions p JOIN datasets d USING (dataset_id) "
                "JOIN cells c ON c.dataset_id = p.dataset_id AND c.row = p.row" +
                (" WHERE " + " AND ".join(where) if where else ""))
    order = 'head_id, dataset, "row"'  # (head_id, dataset_id, row) is the table's key; a dataset name is one dataset
    if limit is None:
        frame, total = srv.store.query(f"{matching} ORDER BY {order}", args), None
    else:
        frame, total = _page_and_total(srv, matching, order, "head_id", args, limit, offset)
    # beside each cell the label of the drug the head learned, not the dataset's default drug's
    frame = with_responses(srv.store, frame)
    return frame[["head_id", "dataset", "dataset_id", "row", "cell_id", "proba", "label", "response", "label_set",
                  "trained_on", "embedding_id", "created_at"]], total


@router.get("/api/predictions", response_model=list[PredictionRow], summary="Per-cell predictions of trained heads",
            description=PAGING)
def predictions(srv: Server, f: Annotated[PredictionFilters, Query()]) -> Response:
    frame, total = _prediction_frame(srv, f.head_id, f.dataset, limit=_cap(f.limit, srv.config.page_rows), offset=f.offset)
    return _paged(typed(list[PredictionRow], records(frame)), total or 0)


@router.get("/api/predictions.csv", summary="Predictions of one head on one dataset as CSV", response_class=Response,
            description="One row per cell, for a spreadsheet: a text value that starts with =, +, -, @, tab or carriage "
                        "return (a cell id such as '=HYPERLINK(...)') gets a leading apostrophe, so a spreadsheet shows "
                        "it as text instead of running it as a formula. GET /api/predictions and `scdm predict --out` "
                        "keep every id as stored; the `row` column joins either to the dataset.",
            responses={200: {"content": {"text/csv": {}}, "description": "One row per cell"}})
def predictions_csv(srv: Server, q: Annotated[PredictionCsvQuery, Query()]) -> Response:
    frame, _ = _prediction_frame(srv, q.head_id, q.dataset)
    if frame.empty:
        raise HttpError(404, "No predictions of this head on this dataset; POST /api/jobs/predict first.")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"predictions_{q.dataset}_{q.head_id}.csv")
    # every number as float64 (proba is DOUBLE since migration 16): pandas writes a float32 in its short
    # form (0.9432321), the JSON and `scdm predict --out` the same number as float64 (0.9432321190834045)
    frame = frame.astype({c: "float64" for c in frame.columns if frame[c].dtype == "float32"})
    return Response(spreadsheet_safe(frame).to_csv(index=False), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------
@router.post("/api/jobs/predict", response_model=JobStatus, status_code=202,
             summary="Start a prediction job for a stored dataset and a trained head")
def submit_predict(body: PredictRequest, request: Request, srv: Server) -> JobStatus:
    trained_head(srv.store, body.head_id)  # unknown ids answer 404 now, not in the job
    srv.store.dataset(body.dataset)
    root = root_of(request)

    def work(job: JobHandle) -> None:
        from scdm.classify.trained_heads import predict

        job.update(stage="predicting", progress=0.3)
        frame = predict(srv.store, body.head_id, body.dataset)
        head_id = str(frame["head_id"].iloc[0])
        job.update(stage="done", result={
            "head_id": head_id, "dataset": body.dataset, "n_cells": len(frame), "n_sensitive": int(frame["label"].sum()),
            "mean_proba": float(frame["proba"].mean()), **_prediction_notes(frame),
            "csv_url": _csv_url(root, head_id, body.dataset)})

    return job_status(srv.jobs.submit("predict", work), request)


@router.get("/api/jobs", response_model=list[JobStatus], summary="Jobs of this server run, newest first")
def list_jobs(request: Request, srv: Server) -> list[JobStatus]:
    return [job_status(r, request) for r in srv.jobs.all()]


@router.get("/api/jobs/{job_id}", response_model=JobStatus, summary="State, progress and queue position of a job")
def job(job_id: str, request: Request, srv: Server) -> JobStatus:
    return job_status(srv.jobs.get(job_id), request)


def _prediction_notes(frame: pd.DataFrame) -> dict[str, Any]:
    """What `scdm predict` says about these predictions beside its numbers: how many cells trained the head
    (their predictions are fitted values, not held-out ones) and the warnings it printed, in its words."""
    return {"n_trained_on": int(frame["trained_on"].sum()), "notes": list(frame.attrs.get("notes", []))}


def _csv_url(root: str, head_id: str, dataset: str) -> str:
    """Download link of one head's predictions on one dataset (names are quoted: they may hold '&' or spaces)."""
    return f"{root}/api/predictions.csv?" + urlencode({"head_id": head_id, "dataset": dataset})


# --------------------------------------------------------------------------------------------
# upload
# --------------------------------------------------------------------------------------------
_UPLOAD_BODY = {"requestBody": {"required": True, "description": "The .h5ad file itself (not a form).",
                                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/api/upload", response_model=JobStatus, status_code=202, openapi_extra=_UPLOAD_BODY,
             summary="Upload an .h5ad, ingest it and, with head_id and a baseline model, embed and predict it",
             description="The body streams to a file under <store>/uploads/<job id>/ (size-limited), which is removed "
                         "when the job ends, whatever its state: the ingest keeps a copy of the data in the store (the "
                         "dataset's stored_path), and its source_path records the uploaded file's path as provenance only. "
                         "The answer is the job; poll its status_url.")
async def upload(request: Request, srv: Server, q: Annotated[UploadQuery, Query()]) -> JobStatus | Response:
    srv.store.check_writable("ingest an upload")
    _check_upload_name(q.filename)
    length = _upload_length(request, srv.config.max_upload_bytes)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/octet-stream":
        raise HttpError(415, "Send the .h5ad itself as the body, with Content-Type: application/octet-stream.")
    name = q.name or q.filename[:-5]
    if not _UPLOAD_NAME.match(name):
        raise HttpError(400, f"Dataset name {name!r} is refused: letters, digits, '.', '_', '-' only.")
    if q.head_id:
        await run_in_threadpool(trained_head, srv.store, q.head_id)  # an unknown head is a 404 before the upload
    job_id = new_job_id()
    # held (locked) by this worker until the job ends: a folder whose worker died is told apart and removed
    folder = JobFolder(srv.root / UPLOADS_DIR, job_id)
    try:
        path = await _receive(request, folder.path, q.filename, length)
    except ClientDisconnect:  # nobody is left to answer; what was received is already removed
        folder.remove()
        return _error(400, "The client disconnected during the upload.")
    except BaseException:
        folder.remove()
        raise
    options = {option: getattr(q, field) for option, field in UPLOAD_FIELDS.items() if option != "name" and getattr(q, field)}
    root = root_of(request)

    def work(job: JobHandle) -> None:
        try:
            _upload_job(srv, job, path, name, options, q.head_id, root)
        finally:  # the store has its own copy (stored_path): the upload would be a second one, kept for nothing
            folder.remove()

    try:
        record = srv.jobs.submit("upload", work, on_failure=folder.remove, job_id=job_id)
    except BaseException:
        folder.remove()
        raise
    return job_status(record, request)


def _check_upload_name(filename: str) -> None:
    """Refuse anything that is not a plain ``.h5ad`` file name (no folders, no '..')."""
    if not filename.lower().endswith(".h5ad") or not _UPLOAD_NAME.match(filename) or ".." in filename:
        raise HttpError(400, f"Upload name {filename!r} is refused: use a plain file name ending in .h5ad "
                             "(letters, digits, '.', '_', '-'; no folders, no '..').")


def _upload_length(request: Request, limit: int) -> int:
    raw = request.headers.get("content-length")
    if not raw:
        raise HttpError(411, "Send the .h5ad as the request body with a Content-Length header.")
    if not raw.isdigit():
        raise HttpError(400, f"Bad Content-Length {raw!r}.")
    length = int(raw)
    if length > limit:  # refused before a byte of the body is read
        raise HttpError(413, f"The upload is {length} bytes; this server accepts at most {limit} bytes. "
                             "Ingest large files locally with `scdm ingest`.")
    if length == 0:
        raise HttpError(400, "The upload is empty.")
    return length


async def _receive(request: Request, folder: Path, filename: str, length: int) -> Path:
    """Stream the body to ``folder/.filename.part`` and rename it when complete; on any failure remove the folder."""
    folder.mkdir(parents=True)
    part, path = folder / f".{filename}.part", folder / filename
    received = 0
    try:
        with open(part, "wb") as fh:
            async for block in request.stream():
                received += len(block)
                if received > length:
                    raise HttpError(400, f"The upload sent more than its Content-Length of {length} bytes.")
                await anyio.to_thread.run_sync(fh.write, block)
        if received < length:
            raise HttpError(400, f"The upload ended after {received} of {length} bytes.")
        part.replace(path)
    except ClientDisconnect:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("upload %s: the client disconnected after %d of %d bytes; removed", filename, received, length)
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


def upload_field(option: str, value: str | None = None) -> str | None:
    """How an upload sets ingest option ``option``: its query parameter (``positive=VALUE``); None for
    ``update``, which an upload cannot do (the store's messages then leave that advice out)."""
    field = UPLOAD_FIELDS.get(option)
    if field is None:
        return None
    return f"{field}={value}" if value else field


def _upload_job(srv: ServerState, job: JobHandle, path: Path, name: str, options: dict[str, Any], head_id: str | None,
                root: str) -> None:
    job.update(stage="ingesting", progress=0.1)
    # the store's messages name the upload's parameters and the file as uploaded, not this server's copy of it
    with spoken(options=upload_field, files={str(path): path.name}):
        info = srv.store.ingest(str(path), name=name, **options)
    job.update(result={"dataset": info.name, "dataset_id": info.dataset_id, "n_cells": info.n_cells})
    if not head_id:
        job.update(stage="ingested")
        return
    from scdm.classify.trained_heads import predict, requested_label_set, train_head
    from scdm.embedding.runner import embed_baseline

    row = trained_head(srv.store, head_id)
    if row.model not in BASELINE_MODELS:
        job.update(state="needs_embedding", stage="ingested", progress=1.0, message=(
            f"Dataset {info.name!r} is ingested. Head {row.head_id} reads {row.model} embeddings, which this server "
            f"does not compute; run `scdm embed {info.name} --model {row.model}` (same checkpoint and parameters), "
            "then POST /api/jobs/predict."))
        return
    # A pca/hvg baseline is fitted on its datasets, so the upload gets a space of its own unless it
    # is fitted jointly with the head's training datasets; the head is then trained again, on the
    # same cells and settings, in that joint space.
    training = list(row.datasets)
    params = json.loads(row.embedding_params)
    job.update(stage=f"embedding with {row.model} (jointly with {', '.join(training)})", progress=0.3)
    kwargs = {"n_hvg": params.get("n_hvg_requested", 2000), "target_sum": params.get("target_sum", 1e4),
              "normalized": params.get("normalized")}
    if row.model == "pca":
        kwargs["n_comps"] = params.get("n_comps_requested", 50)
    spaces = embed_baseline(srv.store, [*training, info.name], model=row.model, progress=False, **kwargs)
    job.update(stage="training the head in the joint space", progress=0.6)
    new_head = train_head(srv.store, [r.embedding_id for r in spaces[:-1]], row.category_type, row.category, row.head,
                          threshold=row.threshold, label_set=requested_label_set(srv.store, row), **row.params)
    job.update(stage="predicting", progress=0.8)
    frame = predict(srv.store, new_head, info.name)
    job.update(stage="done", result={**job.record.result, "head_id": new_head, "requested_head_id": row.head_id,
                                     "n_sensitive": int(frame["label"].sum()), "mean_proba": float(frame["proba"].mean()),
                                     **_prediction_notes(frame), "csv_url": _csv_url(root, new_head, info.name)})


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
@router.post("/api/report", response_model=JobStatus, status_code=202,
             summary="Write the HTML report into <store>/artifacts/report/ (a job)")
def make_report(request: Request, srv: Server, body: ReportRequest | None = None) -> JobStatus:
    srv.store.check_writable("write the report into the store")  # the folder is in the store
    _report_folder_in_store(srv)
    projection = (body or ReportRequest()).projection
    root = root_of(request)

    def work(job: JobHandle) -> None:
        from scdm.classify.report import write_report

        job.update(stage="writing report", progress=0.2)
        index = write_report(srv.store, srv.root / REPORT_DIR, projection=projection, progress=False)
        job.update(result={"index": f"{root}/report/index.html", "path": str(index)})

    return job_status(srv.jobs.submit("report", work), request)


@router.get("/api/report/figures", response_model=ReportFigures, summary="The report's page and figures, if it was written")
def report_figures(request: Request, srv: Server) -> ReportFigures:
    from scdm.classify.report import report_is_current

    _report_folder_in_store(srv)  # a folder linked elsewhere would list the names of files outside the store
    folder = srv.root / REPORT_DIR
    root = root_of(request)
    generated = (folder / "index.html").is_file()
    figures = sorted(p.name for p in (folder / "figures").glob("*") if p.suffix in (".png", ".svg", ".pdf")) if generated else []
    current = report_is_current(srv.store, folder) if generated else None
    return ReportFigures(generated=generated, index=f"{root}/report/index.html" if generated else None, folder=str(folder),
                         figures=[f"{root}/report/figures/{f}" for f in figures], current=current)


def _report_folder_in_store(srv: ServerState) -> Path:
    """The report folder, resolved; refused when it links outside the store.

    A link placed in a shared store (``artifacts/report -> /``) would otherwise serve every file this
    server may read, and a new report would write its files into the folder it points to (it deletes
    and overwrites none it did not write: :func:`scdm.classify.report.write_report` refuses).
    """
    folder = (srv.root / REPORT_DIR).resolve()
    # the report writes into tables/ and figures/ too: each of them linked elsewhere is a folder outside the store
    for name in (REPORT_DIR, f"{REPORT_DIR}/figures", f"{REPORT_DIR}/tables"):
        target = (srv.root / name).resolve()
        if not target.is_relative_to(srv.root.resolve()):
            raise HttpError(403, f"The report folder {name} links outside the store (to {str(target)!r}); this server "
                                 "reads and writes files inside the store only. Remove the link, then write the report "
                                 "(POST /api/report).")
    return folder


@router.get("/report/{relative:path}", include_in_schema=False)
def report_file(relative: str, srv: Server) -> Response:
    """A file of the report folder (never a path outside it); no script runs in any of them."""
    folder = (srv.root / REPORT_DIR).resolve()
    path = (folder / (relative or "index.html")).resolve()
    if not path.is_relative_to(folder):
        raise HttpError(403, f"Path {relative!r} is outside the report folder.")
    _report_folder_in_store(srv)
    if not path.is_file():
        raise HttpError(404, f"No report file {relative!r}; generate the report with POST /api/report.")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=kind, headers={"Content-Security-Policy": REPORT_CSP})
