"""Language-model prompt records: every request sent to a language model and its parsed answers.

A request is content-addressed: :func:`request_id_of` hashes the backend, the model, the template
hash, the chat messages exactly as sent (which hold the cells' prompt content) and the decoding
parameters. A stored request is never sent again, so rerunning a prompting run is free and an
interrupted one resumes at the first request without a row. The endpoint URL is provenance, not
identity: the same model answering the same messages behind another URL is the same request.

Each request stores the raw response body and, per cell (by its 1-based number in the prompt), the
parsed answer: ``ok`` with a label (1 sensitive, 0 resistant), or ``missing`` / ``invalid`` /
``unparsed`` with no label — an unreadable answer is recorded as such, never guessed. ``p_sensitive``
is the model's probability of "sensitive" where the backend gave token log-probabilities (always
for the local model), else NULL.

The parsed answers are derived data: the answer text and the raw response are the record. When
the answer parser changes what it reads (:data:`ANSWER_PARSER_VERSION`), the prompting arm reads the
stored texts again, and the scores of tasks made from an older parse are not shown as current
(:func:`older_parser_sql`): rerunning the same ``scdm prompt`` rescores them without sending anything.
Likewise zero-shot tasks scored from requests composed the way an older scdm composed them
(:data:`ZERO_SHOT_BATCHING`, :func:`older_batching_sql`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store._catalog import registered
from scdm.store._store import canonical_json
from scdm.store.errors import InputDataError
from scdm.store.evaluation import delete_tasks

if TYPE_CHECKING:
    from scdm.store._store import Store

__all__ = [
    "ANSWER_PARSER_VERSION",
    "ANSWER_STATUSES",
    "ZERO_SHOT_BATCHING",
    "PROMPT_VARIANT",
    "PromptAnswer",
    "PromptRecord",
    "request_id_of",
    "save_prompts",
    "load_prompts",
    "forget_older_prompt_tasks",
    "older_batching_note",
    "older_batching_sql",
    "older_parser_note",
    "older_parser_sql",
    "older_prompt_sql",
]

PROMPT_VARIANT = "prompt"
"""The ``variant`` of every prompting result."""
ANSWER_PARSER_VERSION = 3
"""What the answer parser reads, recorded in every prompting task's ``head_params`` (``answer_parser``).

1 (no ``answer_parser`` key; scdm before 2026-12-07) read a number such as ``Cell 1: 0.7`` as the
label 0, shifted the answers of a model that numbered its cells from 0 onto their neighbours, read
an unnumbered list with an entry too few or too many by place, read ``sensitive|resistant`` (the
format echoed back) as an answer and left a JSON answer with brackets in the prose around it
unread. 2 reads none of these as answers (and reads the last one), but read a list of cell numbers
in the prose (``Resistant cells: [1, 2]``, as long as the request) by place as labels (cell 1
"sensitive") instead of the ``Cell N: label`` lines around it; 3 does not. Raise it whenever the parser reads
a stored answer text differently."""
ZERO_SHOT_BATCHING = 2
"""How zero-shot requests are composed, recorded in every zero-shot task's ``head_params`` (``batching``).

1 (no ``batching`` key; scdm before 2026-12-07) put cells into requests in the order of the first
fold of the run's splits that tested them, so which cells shared a request depended on the
``--scenario/--by/--category/--folds`` asked with them: with a model whose answer for a cell depends
on its batch-mates (any LLM), the same task got other numbers when other splits were asked, and a
second run with more splits asked every cell again. 2 composes them from the cells alone (per
dataset and data source, in an order drawn with the seed), whatever the splits. Raise it whenever the
composition of zero-shot requests changes."""

ANSWER_STATUSES: tuple[str, ...] = ("ok", "missing", "invalid", "unparsed")
"""Per-cell answer statuses: parsed, no entry for the cell, an entry that is not a label, no readable answer."""
REQUEST_STATUSES: tuple[str, ...] = ("answered", "unparsed")


def request_id_of(*, backend: str, model: str, checkpoint_hash: str | None, template_hash: str,
                  messages: Sequence[dict[str, Any]], decoding: dict[str, Any]) -> str:
    """The content address of one request (see the module docstring)."""
    text = canonical_json({"backend": backend, "model": model, "checkpoint_hash": checkpoint_hash,
                       "template_hash": template_hash, "messages": list(messages), "decoding": decoding})
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class PromptAnswer:
    """The answer for one cell of a request."""

    position: int
    """The cell's number in the prompt (1-based)."""
    status: str
    """``ok``, ``missing``, ``invalid`` or ``unparsed``."""
    label: int | None = None
    """1 sensitive, 0 resistant; None unless ``status == "ok"``."""
    p_sensitive: float | None = None
    """P(sensitive) from the model's token probabilities; None without scores."""

    def __post_init__(self) -> None:
        if self.status not in ANSWER_STATUSES:
            msg = f"answer status {self.status!r} is not one of {', '.join(ANSWER_STATUSES)}."
            raise InputDataError(msg)
        if (self.label is None) != (self.status != "ok") or self.label not in (None, 0, 1):
            msg = f"answer of cell {self.position}: status {self.status!r} with label {self.label!r} (ok needs 0 or 1, else None)."
            raise InputDataError(msg)
        if self.p_sensitive is not None and not (0.0 <= self.p_sensitive <= 1.0):
            msg = f"answer of cell {self.position}: p_sensitive {self.p_sensitive!r} is not a probability."
            raise InputDataError(msg)


@dataclass(frozen=True)
class PromptRecord:
    """One request sent to a language model, its raw response and its per-cell answers."""

    request_id: str
    backend: str
    model: str
    checkpoint_hash: str | None
    endpoint: str | None
    template_hash: str
    decoding: dict[str, Any]
    messages: list[dict[str, Any]]
    n_cells: int
    status: str
    """``answered`` or ``unparsed``."""
    answer_text: str | None
    response: dict[str, Any] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    seconds: float | None
    answers: tuple[PromptAnswer, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.status not in REQUEST_STATUSES:
            msg = f"request status {self.status!r} is not one of {', '.join(REQUEST_STATUSES)}."
            raise InputDataError(msg)
        positions = sorted(a.position for a in self.answers)
        if positions != list(range(1, self.n_cells + 1)):
            msg = f"request {self.request_id}: answers for positions {positions}, expected 1..{self.n_cells}."
            raise InputDataError(msg)

    def row(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "backend": self.backend, "model": self.model,
                "checkpoint_hash": self.checkpoint_hash, "endpoint": self.endpoint, "template_hash": self.template_hash,
                "decoding": canonical_json(self.decoding), "messages": canonical_json(self.messages), "n_cells": self.n_cells,
                "status": self.status, "answer_text": self.answer_text,
                "response": None if self.response is None else canonical_json(self.response),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "attempts": self.attempts, "seconds": self.seconds,
                "created_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}

    def answer_rows(self) -> pd.DataFrame:
        return pd.DataFrame({
            "request_id": [self.request_id] * len(self.answers),
            "position": np.array([a.position for a in self.answers], dtype=np.int32),
            "status": [a.status for a in self.answers],
            "label": pd.array([a.label for a in self.answers], dtype="Int8"),
            "p_sensitive": pd.array([a.p_sensitive for a in self.answers], dtype="Float64"),
        })


def older_parser_sql(alias: str) -> str:
    """SQL condition on a ``results`` / ``eval_results`` row ``alias``: a prompting result scored from
    answers read by an older parser than :data:`ANSWER_PARSER_VERSION` (numbers now known to be wrong)."""
    version = f"TRY_CAST(json_extract_string({alias}.head_params, '$.answer_parser') AS INTEGER)"
    return f"({alias}.variant = '{PROMPT_VARIANT}' AND coalesce({version}, 1) <> {ANSWER_PARSER_VERSION})"


def older_batching_sql(alias: str) -> str:
    """SQL condition on a ``results`` / ``eval_results`` row ``alias``: a zero-shot prompting result scored
    from requests composed otherwise than :data:`ZERO_SHOT_BATCHING` (by the folds of its run's splits)."""
    shots = f"TRY_CAST(json_extract_string({alias}.head_params, '$.shots') AS INTEGER)"
    version = f"TRY_CAST(json_extract_string({alias}.head_params, '$.batching') AS INTEGER)"
    return (f"({alias}.variant = '{PROMPT_VARIANT}' AND {shots} = 0 "
            f"AND coalesce({version}, 1) <> {ZERO_SHOT_BATCHING})")


def older_prompt_sql(alias: str) -> str:
    """SQL condition on a ``results`` / ``eval_results`` row ``alias``: a prompting result that this scdm
    would not compute so (an older answer parser, or zero-shot requests composed by an older scdm)."""
    return f"({older_parser_sql(alias)} OR {older_batching_sql(alias)})"


def older_batching_note(st: Store) -> str | None:
    """What to say when the catalog holds zero-shot results of requests composed by an older scdm (None
    when it holds none). Readers leave them out (:func:`older_batching_sql`); their answers stay stored."""
    n = int(st.query(f"SELECT count(DISTINCT task_id) AS n FROM eval_results x WHERE {older_batching_sql('x')}")["n"][0])
    if not n:
        return None
    return (f"{n} zero-shot prompting tasks were scored from requests that an older scdm composed by the folds of the "
            f"splits asked in their run, so a model's answers (which depend on the other cells of a request) depended "
            f"on which other splits were asked; they are left out. Run the same `scdm prompt` command again to ask "
            f"each cell in requests that do not depend on the splits (this sends the requests again).")


def older_parser_note(st: Store) -> str | None:
    """What to say when the catalog holds prompting results of an older parser (None when it holds none).

    Readers leave those results out (:func:`older_parser_sql`); the stored answers stay, so rerunning
    the same ``scdm prompt`` reads them again and rescores the tasks without sending a request.
    Zero-shot results whose requests an older scdm also composed otherwise are counted by
    :func:`older_batching_note` instead (their rerun sends requests).
    """
    n = int(st.query(f"SELECT count(DISTINCT task_id) AS n FROM eval_results x WHERE {older_parser_sql('x')} "
                     f"AND NOT {older_batching_sql('x')}")["n"][0])
    if not n:
        return None
    return (f"{n} prompting tasks were scored from answers read by an older scdm's answer parser, which misread some "
            f"answers (e.g. 'Cell 1: 0.7' as resistant, cells numbered from 0 as their neighbours); they are left out. "
            f"Run the same `scdm prompt` command again to rescore them from the stored answers (nothing is sent).")


def forget_older_prompt_tasks(st: Store, *, space_id: str, head: str, seed: int, split_ids: Sequence[str]) -> int:
    """Delete the prompting tasks of an older parser or zero-shot batching (:func:`older_prompt_sql`) that
    a rerun of the same configuration rescored (same space, head, seed and splits), with their metrics
    and predictions; returns how many.

    Their answers stay (read again by the current parser); kept, the old scores would only be
    counted in :func:`older_parser_note` / :func:`older_batching_note` as waiting for a rerun that
    has been done.
    """
    where = (f"x.space_id = ? AND x.head = ? AND list_contains(?, x.split_id) "
             f"AND TRY_CAST(json_extract_string(x.head_params, '$.seed') AS BIGINT) IS NOT DISTINCT FROM ? "
             f"AND {older_prompt_sql('x')}")
    with st.catalog.transaction() as con:
        tasks = [r[0] for r in con.execute(f"SELECT task_id FROM eval_tasks x WHERE {where}",
                                           [space_id, head, list(split_ids), int(seed)]).fetchall()]
        delete_tasks(con, tasks)
    return len(tasks)


def _insert(con: Any, table: str, frame: pd.DataFrame) -> None:
    cols = ", ".join(f'"{c}"' for c in frame.columns)
    with registered(con, "_scdm_prompt_rows", frame):
        con.execute(f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM _scdm_prompt_rows')


def save_prompts(st: Store, records: Sequence[PromptRecord]) -> None:
    """Store requests with their answers in one transaction (a request stored twice keeps the last copy)."""
    if not records:
        return
    ids = [r.request_id for r in records]
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM prompt_answers WHERE list_contains(?, request_id)", [ids])
        con.execute("DELETE FROM prompt_requests WHERE list_contains(?, request_id)", [ids])
        last = {r.request_id: r for r in records}.values()
        _insert(con, "prompt_requests", pd.DataFrame([r.row() for r in last]))
        _insert(con, "prompt_answers", pd.concat([r.answer_rows() for r in last], ignore_index=True))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _none(value: Any) -> Any:
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else value


def load_prompts(st: Store, request_ids: Sequence[str]) -> dict[str, PromptRecord]:
    """The stored requests among ``request_ids`` (request_id -> record); missing ones are absent."""
    ids = list(dict.fromkeys(request_ids))
    if not ids:
        return {}
    heads = st.query("SELECT * FROM prompt_requests WHERE list_contains(?, request_id)", [ids])
    if heads.empty:
        return {}
    answers = st.query("SELECT * FROM prompt_answers WHERE list_contains(?, request_id) ORDER BY request_id, position",
                       [list(heads["request_id"])])
    by_request: dict[str, list[PromptAnswer]] = {}
    for r in answers.itertuples(index=False):
        label, p = _none(r.label), _none(r.p_sensitive)
        by_request.setdefault(r.request_id, []).append(PromptAnswer(
            int(r.position), str(r.status), None if label is None else int(label), None if p is None else float(p)))
    out = {}
    for r in heads.to_dict("records"):
        out[r["request_id"]] = PromptRecord(
            request_id=r["request_id"], backend=r["backend"], model=r["model"], checkpoint_hash=_none(r["checkpoint_hash"]),
            endpoint=_none(r["endpoint"]), template_hash=r["template_hash"], decoding=_json(r["decoding"]),
            messages=_json(r["messages"]), n_cells=int(r["n_cells"]), status=r["status"], answer_text=_none(r["answer_text"]),
            response=_json(_none(r["response"])), prompt_tokens=_int(r["prompt_tokens"]),
            completion_tokens=_int(r["completion_tokens"]), attempts=int(r["attempts"]), seconds=_float(r["seconds"]),
            answers=tuple(by_request.get(r["request_id"], [])))
    return out


def _int(value: Any) -> int | None:
    value = _none(value)
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    value = _none(value)
    return None if value is None else float(value)
