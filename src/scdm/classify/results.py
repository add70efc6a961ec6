"""The leaderboard: mean +- sd of every metric per model x head x scenario x category.

Built from ``eval_results`` (long format) with one SQL aggregate, so the same numbers can be had
from any DuckDB client. NULL metric values (undefined on a fold, e.g. AUROC on a single-class
test fold) are left out of the mean and counted in ``n_null``; they are never averaged as zeros.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import pandas as pd

from scdm.classify.heads import HEADS, REVISION_NOTES, head_revision
from scdm.classify.metrics import METRICS
from scdm.store.errors import InputDataError
from scdm.store.evaluation import OUTSIDE_GRID_REVISIONS, stored_revision_sql, unanswered_sql
from scdm.store.genes import space_notes_sql
from scdm.store.labels import mixed_drugs_sql
from scdm.store.metrics import fold_summary_sql
from scdm.store.prompts import older_batching_note, older_parser_note, older_prompt_sql
from scdm.store.splits import CATEGORY_TYPES, SCENARIOS, STORED_SCHEMES
from scdm.store.verify import BASELINE_MODELS

if TYPE_CHECKING:
    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = ["LEADERBOARD_KEYS", "NOTES", "POOLED_COLUMNS", "ROW_KEYS", "asked_results", "csv_ready", "format_leaderboard", "json_records", "leaderboard", "leaderboard_notes", "metric_text",
           "pooled_names", "split_labels", "unmatched_filters", "unanswered_note_sql", "wide_leaderboard", "with_signed_partner"]

LEADERBOARD_KEYS: tuple[str, ...] = ("model", "variant", "space_id", "datasets", "label_set", "split_id", "scenario",
                                     "scheme", "k", "seed", "category_type", "category", "head", "head_params")
"""The result identity: one leaderboard row per value of these (besides the metric). Results of
different embedding spaces, datasets, label sets, splits (scenario, scheme, k, seed) or head
parameters are never averaged together."""


POOLED_COLUMNS: tuple[str, ...] = ("datasets", "label_set")
"""Result columns that join the names of a pooled result with commas: filtered exactly (:func:`pooled_names`)."""


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A table's rows as JSON-ready dicts, every value as stored: the one encoder of the CLI's and the server's JSON.

    pandas' ``to_json`` rounds floats to 10 digits (an F1 of 0.9841269841269842 became 0.9841269841,
    unequal to the CSV and the catalog), turned a NULL inside a list into 0 and an INTERVAL of one day
    into 86.4 seconds. Here floats keep every digit (shortest repr), NaN and +-inf are null (JSON has
    no such tokens), timestamps are ISO 8601 (with their offset when they have one), lists, structs
    and maps are JSON arrays and objects with their NULLs null.
    """
    return [{str(k): _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def csv_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each list, struct or map cell as its JSON text, for ``to_csv``.

    pandas writes such a cell as Python's repr: DuckDB's [1.1, 2] became ``[1.1 2. ]`` and [1, NULL]
    ``[1 --]``, which no CSV reader parses back.
    """
    nested = (np.ndarray, list, tuple, dict)
    out = frame.copy()
    for i in range(out.shape[1]):
        column = out.iloc[:, i]
        if column.dtype == object and column.map(lambda v: isinstance(v, nested)).any():
            out.isetitem(i, column.map(lambda v: json.dumps(_json_value(v), allow_nan=False) if isinstance(v, nested) else v))
    return out


def _json_value(value: Any) -> Any:  # noqa: PLR0911 - one case per kind of value a catalog query answers
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.ma.MaskedArray):  # a DuckDB list with NULLs in it
        return [None if masked else _json_value(v) for v, masked in zip(value.data.tolist(), np.ma.getmaskarray(value).tolist())]
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_json_value(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, (int, float, decimal.Decimal)):
        number = float(value) if isinstance(value, decimal.Decimal) else value
        return number if isinstance(number, int) or math.isfinite(number) else None
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time, pd.Timedelta)):  # Timestamp is a datetime
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return pd.Timedelta(value).isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return None if _is_missing(value) else str(value)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


NameT = TypeVar("NameT", bound=str)


def name_list(values: NameT | Iterable[NameT]) -> list[NameT]:
    """A list option's values: one name given as a plain string is that name, not its letters.

    ``heads="ridge"`` or ``models="pca"`` would otherwise be read character by character: an
    unknown head 'r', or a filter that silently matches nothing.
    """
    return [values] if isinstance(values, str) else list(values)


def pooled_names(values: str | Iterable[str]) -> list[str]:
    """Filter values of a pooled-name column (``datasets``, ``label_set``) as stored: each names one result's whole set.

    A result pooled over several datasets (label sets) stores their names sorted and joined by
    commas (names cannot hold one), so ``"b,a"`` asks for the result pooled over a and b, stored
    ``"a,b"``. The match is exact: ``"a"`` is the result on a alone, never one pooled over a and
    others, whose numbers are of other cells.
    """
    return [",".join(sorted(value.split(","))) for value in name_list(values)]


FilterKey = Literal["models", "heads", "datasets", "label_sets"]
"""The free-text filters of :func:`leaderboard` (the keys of :data:`FILTER_COLUMNS`): typed, so a caller passing a column name fails mypy."""

FILTER_COLUMNS: dict[FilterKey, str] = {"models": "model", "heads": "head", "datasets": "datasets", "label_sets": "label_set"}
"""Free-text filters of :func:`leaderboard` and the ``eval_tasks`` column each matches (the others take fixed choices)."""


def unmatched_filters(st: Store, filters: Mapping[str, tuple[FilterKey, Iterable[str] | None]]) -> list[str]:
    """One sentence per filter whose values no stored result has: a typo, or ``JHU006`` for ``jhu006``, must not
    read as "no results" (the command line and ``scdm.results`` say it alike, each naming its own option).

    ``filters``: the option as the caller spells it -> (a key of :data:`FILTER_COLUMNS`, the values given). The
    sentence lists the values the store's results do have (a model or head not evaluated yet reads the same).
    """
    out = []
    for label, (key, given) in filters.items():
        values = name_list(given) if given is not None else []
        if not values:
            continue
        column = FILTER_COLUMNS[key]
        known = [str(v) for v in st.query(f"SELECT DISTINCT {column} AS v FROM eval_tasks WHERE {column} IS NOT NULL "
                                          "ORDER BY v")["v"]]
        asked = pooled_names(values) if column in POOLED_COLUMNS else values  # 'b,a' is the stored 'a,b'
        unknown = [v for v, key_ in zip(values, asked, strict=True) if key_ not in known]
        if unknown:
            choices = (", ".join(map(repr, known[:20])) + (", ..." if len(known) > 20 else "")) if known else "none yet"
            out.append(f"{label} {', '.join(map(repr, unknown))} matches no result (names are exact and case-sensitive; "
                       f"results have: {choices}).")
    return out


def _check_filter(name: str, values: Iterable[str] | None, allowed: tuple[str, ...]) -> None:
    """A misspelled filter value (``scheme="samples"``) would match nothing: an empty table that reads as "no results"."""
    if values is None:
        return
    unknown = [v for v in name_list(values) if v not in allowed]
    if unknown:
        msg = f"Unknown {name} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}."
        raise InputDataError(msg)


def unanswered_note_sql(unanswered: str, n_test: str) -> str:
    """SQL: the note ``'N of M test cells unanswered'`` from the SQL expressions of the test cells a prompting
    model left without an answer (its metrics leave them out) and of the cells scored; NULL where none."""
    return (f"CASE WHEN {unanswered} > 0 THEN {unanswered} || ' of ' || ({n_test} + {unanswered}) "
            "|| ' test cells unanswered' END")


def leaderboard(
    store: str | os.PathLike[str] | Store,
    *,
    metrics: Iterable[str] | None = None,
    models: Iterable[str] | None = None,
    heads: Iterable[str] | None = None,
    scenarios: Iterable[str] | None = None,
    category_types: Iterable[str] | None = None,
    scheme: str | None = None,
    run_id: str | None = None,
    datasets: Iterable[str] | None = None,
    label_sets: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Mean and standard deviation over the folds of one result, per result identity (long format).

    A result is identified by :data:`LEADERBOARD_KEYS`: the embedding space, the datasets, the label
    set, the split (scenario, scheme, k folds, seed, category) and the head with its parameters.
    The folds of one LoRA tuning (one adapter per fold, each a space of its own) form one result.

    Parameters
    ----------
    store : str, path or Store
    metrics, models, heads, scenarios, category_types : iterable of str, optional
        Keep only these (default: all).
    scheme : {"cell", "sample", "study", "custom"}, optional
        Keep one split scheme (the pooled scheme must always be reported with the numbers).
    run_id : str, optional
        Only tasks fitted by this run.
    datasets : iterable of str, optional
        Keep results on exactly these datasets: ``"a"`` is a result on a alone, ``"a,b"`` (in any
        order) the result pooled over a and b, as the ``datasets`` column spells it (:func:`pooled_names`).
    label_sets : iterable of str, optional
        Keep results of exactly these label sets (several label sets of a pooled result as ``"x,y"``).

    Returns
    -------
    DataFrame
        Columns :data:`LEADERBOARD_KEYS`, ``metric``, ``mean``, ``sd`` (sample sd over folds; NULL
        with one fold), ``n_folds`` (folds where the metric has a value: the n of this mean),
        ``n_null`` (folds where it is undefined), ``n_test`` (test cells, all folds),
        ``folds_done`` (folds with a result), ``folds_expected`` (evaluable folds of the split),
        ``complete`` (every evaluable fold has a result; an interrupted run is resumed by running
        ``scdm evaluate`` again), ``folds_skipped`` and ``skip_reason`` (evaluable folds missing because
        their run recorded why it could not fit them in ``skipped_tasks``, e.g. a head that diverged, and
        those reasons joined by ``' | '``; 0 and empty otherwise) and ``folds_from`` (the label set whose partition the pooled folds
        are, ``pair_folds_with``; NULL otherwise) and ``note`` (``'older gene table (...)'`` where the
        space's embeddings were made with another gene table than this scdm's, as ``scdm ls`` marks
        them; ``'labelled for different drugs (a375: PLX-4720, ...)'`` where the result's datasets are
        labelled for more than one drug; ``'N of M test cells unanswered'`` where a prompting model gave
        no readable answer for N test cells, which its metrics leave out; joined by ``'; '``; else empty). Sorted by scenario, category type, category, metric and descending mean.
    """
    from scdm.store import open_store

    st = open_store(store)
    metric_list = name_list(metrics) if metrics is not None else list(METRICS)
    unknown = [m for m in metric_list if m not in METRICS]
    if unknown:
        msg = f"Unknown metric {unknown}; choose from {', '.join(METRICS)}."
        raise InputDataError(msg)
    _check_filter("scheme", None if scheme is None else [scheme], STORED_SCHEMES)
    _check_filter("scenarios", scenarios, SCENARIOS)
    _check_filter("category_types", category_types, CATEGORY_TYPES)
    where: list[str] = ["list_contains(?, r.metric)"]
    args: list[Any] = [metric_list]
    for column, values in (("model", models), ("head", heads), ("scenario", scenarios), ("category_type", category_types),
                           ("datasets", datasets), ("label_set", label_sets)):
        if values is not None:
            where.append(f"list_contains(?, r.{column})")
            args.append(pooled_names(values) if column in POOLED_COLUMNS else name_list(values))
    if scheme is not None:
        where.append("r.scheme = ?")
        args.append(scheme)
    if run_id is not None:
        where.append("r.run_id = ?")
        args.append(run_id)
    keys = ", ".join(f"r.{k}" for k in LEADERBOARD_KEYS)
    sql = f"""
        WITH r AS (
            -- each fold's LoRA variant is a space of its own: group the folds of one tuning setting
            SELECT x.* EXCLUDE (n_folds) REPLACE (COALESCE('lora:' || a.tuning_id, x.variant) AS variant,
                                                   COALESCE('lora:' || a.tuning_id, x.space_id) AS space_id),
                   x.n_folds AS k, concat_ws('; ', nullif(n.note, ''), m.note) AS note,
                   {unanswered_sql('t.flags')} AS unanswered
            FROM results x
            LEFT JOIN adapters a ON x.variant = 'lora:' || a.adapter_id
            LEFT JOIN {space_notes_sql()} n ON n.space_id = x.space_id  -- an older gene table's space
            LEFT JOIN {mixed_drugs_sql()} m ON m.split_id = x.split_id AND m.label_set = x.label_set  -- drugs pooled
            LEFT JOIN eval_tasks t ON t.task_id = x.task_id  -- test cells a prompting model left unanswered
            WHERE NOT {stale_sql(st, 'x')}  -- numbers known to be wrong now: left out, with a warning
        ),
        expected AS (
            SELECT split_id, count(*) FILTER (WHERE status = 'ok') AS folds_expected FROM split_folds GROUP BY split_id
        ),
        g AS (
            SELECT {keys}, r.metric,
                   {fold_summary_sql('r.value', n='n_folds')}, count(*) - count(r.value) AS n_null,
                   sum(r.n_test)::BIGINT AS n_test,  -- a sum of BIGINT is a HUGEINT, which pandas reads as float
                   count(DISTINCT r.fold) AS folds_done, list(DISTINCT r.fold) AS done,
                   concat_ws('; ', nullif(max(r.note), ''), {unanswered_note_sql('sum(r.unanswered)', 'sum(r.n_test)')}) AS note
            FROM r
            WHERE {' AND '.join(where)}
            GROUP BY {keys}, r.metric
        )
        SELECT g.* EXCLUDE (done), e.folds_expected, g.folds_done >= COALESCE(e.folds_expected, 0) AS complete,
               json_extract_string(s.definition, '$.folds_from') AS folds_from,
               coalesce(k.folds_skipped, 0) AS folds_skipped, coalesce(k.skip_reason, '') AS skip_reason
        FROM g LEFT JOIN expected e USING (split_id) LEFT JOIN splits s USING (split_id)
        LEFT JOIN LATERAL (  -- evaluable folds missing because the run recorded why it could not fit them (the head failed)
            SELECT count(DISTINCT k.fold) AS folds_skipped, string_agg(DISTINCT k.reason, ' | ' ORDER BY k.reason) AS skip_reason
            FROM skipped_tasks k JOIN split_folds f ON f.split_id = k.split_id AND f.fold = k.fold AND f.status = 'ok'
            WHERE k.split_id = g.split_id AND k.space_id = g.space_id AND k.head = g.head
              AND k.category_type = g.category_type AND k.category = g.category
              AND (k.label_set IS NULL OR k.label_set = g.label_set) AND NOT list_contains(g.done, k.fold)
        ) k ON true
        ORDER BY g.scenario, g.category_type, g.category, g.metric, g.mean DESC NULLS LAST
    """
    for note in stale_notes(st):
        logger.warning("results: %s", note)
    return st.query(sql, args)


def _current_revisions(st: Store) -> dict[tuple[str, str], int]:
    """(head, head_params) -> this scdm's revision of that head, for the stored configurations above 1."""
    stored = st.query("SELECT DISTINCT head, CAST(head_params AS VARCHAR) AS params FROM eval_tasks "
                      "WHERE list_contains(?, head)", [[*HEADS, *OUTSIDE_GRID_REVISIONS]])
    out = {}
    for head, params in stored.itertuples(index=False, name=None):
        try:
            revision = head_revision(head, json.loads(params))
        except ValueError:
            continue
        if revision > 1:
            out[(head, params)] = revision
    return out


def older_revision_sql(st: Store, alias: str) -> str:
    """SQL condition on a ``results`` or ``eval_results`` row ``alias``: fitted by an earlier revision of its head (with its
    parameters) than this scdm's (:meth:`BaseHead.revision`)."""
    return _revision_condition(_current_revisions(st), alias)


def newer_revision_sql(st: Store, alias: str) -> str:
    """SQL condition on a ``results`` or ``eval_results`` row ``alias``: fitted by a later revision of its head than this scdm
    knows (a newer scdm writing to a shared store). Its numbers come from code this scdm does not run, so
    they are neither this revision's result nor averaged with it."""
    return _revision_condition(_current_revisions(st), alias, "newer")


def _revision_condition(current: dict[tuple[str, str], int], alias: str, which: str = "older") -> str:
    """SQL: a row ``alias`` whose run's revision of its head (:func:`scdm.store.evaluation.stored_revision_sql`) is
    below (``older``) or above (``newer``) ``current`` (see :func:`older_revision_sql`)."""
    if which == "older" and not current:
        return "FALSE"  # every stored configuration is at revision 1, the lowest
    cases = " ".join(f"WHEN {alias}.head = {_lit(head)} AND CAST({alias}.head_params AS VARCHAR) = {_lit(params)} "
                     f"THEN {revision}" for (head, params), revision in sorted(current.items()))
    this_scdms = f"CASE {cases} ELSE 1 END" if cases else "1"
    return f"({stored_revision_sql(alias)} {'<' if which == 'older' else '>'} {this_scdms})"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def stale_sql(st: Store, alias: str) -> str:
    """SQL condition on a ``results`` or ``eval_results`` row ``alias``: its numbers are known to be wrong now (an older
    scdm's head revision, prompting answers read by an older parser, or zero-shot requests an older scdm
    composed by the splits asked); readers leave them out."""
    return f"({older_revision_sql(st, alias)} OR {newer_revision_sql(st, alias)} OR {older_prompt_sql(alias)})"


def stale_notes(st: Store) -> list[str]:
    """What to tell the user about results left out by :func:`stale_sql` (empty when there are none)."""
    notes = []
    current = _current_revisions(st)
    old = st.query(f"SELECT x.head, count(DISTINCT x.task_id) AS n FROM results x WHERE {_revision_condition(current, 'x')} "
                   "GROUP BY x.head ORDER BY x.head") if current else pd.DataFrame(columns=["head", "n"])
    for head, n in old.itertuples(index=False, name=None):
        revision = max((r for (h, _), r in current.items() if h == head), default=1)
        why = REVISION_NOTES.get((head, revision), "its numbers changed since")
        again = ("`scdm finetune` again to score the stored adapters' heads with this one (no training)"
                 if head in OUTSIDE_GRID_REVISIONS else "`scdm evaluate` again to fit them with this one")
        notes.append(f"{n} {head} tasks were fitted by an older scdm ({why}) and are left out; run the same {again}.")
    notes.extend(_newer_revision_notes(st, current))
    for note in (older_batching_note(st), older_parser_note(st)):
        if note is not None:
            notes.append(note)
    return notes


def _newer_revision_notes(st: Store, current: dict[tuple[str, str], int]) -> list[str]:
    newer = st.query(f"SELECT x.head, max(x.revision) AS revision, count(DISTINCT x.task_id) AS n "
                     f"FROM results x WHERE {_revision_condition(current, 'x', 'newer')} GROUP BY x.head ORDER BY x.head")
    return [f"{n} {head} tasks were fitted by a newer scdm (revision {revision} of {head}; this scdm has "
            f"{max((r for (h, _), r in current.items() if h == head), default=1)}) and are left out, not averaged "
            f"with this scdm's; upgrade scdm to read them." for head, revision, n in newer.itertuples(index=False, name=None)]


ROW_KEYS: tuple[str, ...] = ("model", "variant", "datasets", "label_set", "head", "scenario", "scheme", "k", "seed",
                             "category_type", "category")
"""Printed columns of a wide leaderboard row (with ``split_id`` they identify it)."""


def _labelled(board: pd.DataFrame) -> pd.DataFrame:
    """Name rows so that different results never print alike: heads with their parameters where a
    head ran with several, models with their space id where one model name has several spaces."""
    board = board.copy()
    for column in ("datasets", "label_set"):
        board[column] = board[column].fillna("")
    board["seed"] = board["seed"].astype("Int64")
    several = board.groupby("head")["head_params"].transform("nunique") > 1
    board.loc[several, "head"] = board.loc[several, "head"] + " " + board.loc[several, "head_params"].astype(str)
    spaces = board.groupby("model")["space_id"].transform("nunique") > 1
    board.loc[spaces, "model"] = board.loc[spaces, "model"] + " [" + board.loc[spaces, "space_id"].str[:8] + "]"
    return board


def asked_results(board: pd.DataFrame, results: pd.DataFrame, store: Store | None = None) -> pd.DataFrame:
    """The rows of ``board`` that a run's results (``EvalSummary.results``, fitted or reused) belong to.

    Matched on the whole identity a run fixes (space, split, label set, head and its parameters),
    so other results in the store (other heads, datasets, label sets sharing a split) stay out.
    With ``store``, the per-fold spaces of a LoRA tuning are matched to the tuning's row
    (``lora:<tuning id>``), as :func:`leaderboard` groups them.
    """
    identity = [c for c in ("space_id", "split_id", "label_set", "head", "head_params") if c in results.columns]
    asked = results
    if store is not None and not results.empty and "variant" in results.columns and "space_id" in identity:
        tunings = store.query("SELECT 'lora:' || adapter_id AS variant, 'lora:' || tuning_id AS tuning FROM adapters")
        tuning = results["variant"].map(dict(zip(tunings["variant"], tunings["tuning"])))
        asked = results.assign(space_id=tuning.fillna(results["space_id"]))
    return board.merge(asked[identity].drop_duplicates(), on=identity, how="inner")


def wide_leaderboard(board: pd.DataFrame, *, metrics: Iterable[str] = ("auroc", "ap", "f1", "accuracy")) -> pd.DataFrame:
    """One row per result, numeric columns: ``<metric>`` (mean), ``<metric>_sd``, ``<metric>_n``.

    Parameters
    ----------
    board : DataFrame
        Output of :func:`leaderboard`.
    metrics : iterable of str
        Metrics to keep, in order.

    Returns
    -------
    DataFrame
        :data:`ROW_KEYS`, ``split_id``, ``folds_done``, ``folds_expected``, ``complete``, ``note``
        (``'older gene table (...)'`` or empty, see :func:`leaderboard`), the stored identity
        (``space_id``, ``model_name``, ``head_name``, ``head_params`` as JSON, the head's ``revision``:
        the same for one result under any filter, unlike the display names ``model`` and ``head``) and three numeric columns per metric (pandas reads them as numbers; NaN where undefined). The columns
        are always these, with the same dtypes, even on an empty board or for a metric the board
        lacks (its columns are then NaN/NA).

    Raises
    ------
    InputDataError
        A metric that is not one of :data:`METRICS`.
    """
    wide = _wide_with_skips(board, _known_metrics(metrics))
    return wide.drop(columns="skipped") if "skipped" in wide.columns else wide


def _wide_with_skips(board: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """:func:`wide_leaderboard`, with a ``skipped`` column (:func:`_skip_explained`) where the board has rows."""
    keys = [*ROW_KEYS, "split_id"]
    frame = board[board["metric"].isin(metrics)]
    if frame.empty:
        return _empty_wide(metrics)
    frame = frame.assign(skipped=_skip_explained(frame))
    frame = _labelled(frame.assign(head_name=frame["head"], model_name=frame["model"]))
    frame["seed"] = frame["seed"].fillna(-1).astype(int)  # cross-data splits have no seed; NA cannot be an index key
    wide = frame.set_index([*keys, "metric"])[["mean", "sd", "n_folds"]].unstack("metric")
    out = pd.DataFrame(index=wide.index)
    present = set(frame["metric"])
    for m in metrics:
        out[m] = wide[("mean", m)].astype(float) if m in present else float("nan")
        out[f"{m}_sd"] = wide[("sd", m)].astype(float) if m in present else float("nan")
        out[f"{m}_n"] = wide[("n_folds", m)].astype("Int64") if m in present else pd.array([pd.NA] * len(out), "Int64")
    if "note" not in frame.columns:  # a board not read by leaderboard()
        frame["note"] = ""
    folds = frame.groupby(keys)[[*_FOLD_COLUMNS, "note", *_IDENTITY_COLUMNS[:-1], "skipped"]].first()
    out = out.join(folds).reset_index()
    out["head_params"] = out["head_params"].astype(str)
    out["revision"] = [head_revision(h, json.loads(p)) for h, p in zip(out["head_name"], out["head_params"])]
    out["seed"] = out["seed"].astype("Int64").where(out["seed"] >= 0)
    out["k"] = out["k"].astype(_WIDE_DTYPES["k"])  # the catalog's INTEGER reads as int32; an empty board says int64
    out["note"] = out["note"].fillna("")
    return out[[*keys, *_FOLD_COLUMNS, "note", *_IDENTITY_COLUMNS, *_metric_columns(metrics), "skipped"]]


def _skip_explained(board: pd.DataFrame) -> pd.Series:
    """Rows missing folds only where the run recorded why it could not fit them (``skipped_tasks``: the head
    failed or diverged). Running ``scdm evaluate`` again fits them the same way, so they are not sent to a rerun."""
    if board.empty or not {"folds_skipped", "folds_done", "folds_expected", "complete"} <= set(board.columns):
        return pd.Series(False, index=board.index)
    skipped = board["folds_skipped"].fillna(0).astype(int)
    reach = board["folds_done"].astype(int) + skipped >= board["folds_expected"].fillna(0).astype(int)
    return ~board["complete"].astype(bool) & skipped.gt(0) & reach


_IDENTITY_COLUMNS: tuple[str, ...] = ("space_id", "model_name", "head_name", "head_params", "revision")
"""The result's identity as stored, the same whatever rows are shown beside it (``model`` and ``head``
name a row apart from the rows shown with it only, so one result's names differ between filters)."""
_FOLD_COLUMNS: tuple[str, ...] = ("folds_done", "folds_expected", "complete")
_WIDE_DTYPES: dict[str, str] = {"revision": "int64", "k": "int64", "seed": "Int64", "folds_done": "int64", "folds_expected": "int64",
                                "complete": "bool"}
"""Dtypes of the non-text columns of a wide leaderboard that are not metrics (an empty one gets them too)."""


def _known_metrics(metrics: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(metrics))
    unknown = [m for m in out if m not in METRICS]
    if unknown:
        msg = f"Unknown metric {unknown}; choose from {', '.join(METRICS)}."
        raise InputDataError(msg)
    return out


def _metric_columns(metrics: Iterable[str]) -> list[str]:
    return [f"{m}{x}" for m in metrics for x in ("", "_sd", "_n")]


def _empty_wide(metrics: list[str]) -> pd.DataFrame:
    """A wide leaderboard without rows: the columns and dtypes of a non-empty one."""
    columns = {c: pd.Series(dtype=_WIDE_DTYPES.get(c, "object")) for c in (*ROW_KEYS, "split_id", *_FOLD_COLUMNS, "note",
                                                                     *_IDENTITY_COLUMNS)}
    for m in metrics:
        columns[m] = pd.Series(dtype="float64")
        columns[f"{m}_sd"] = pd.Series(dtype="float64")
        columns[f"{m}_n"] = pd.Series(dtype="Int64")
    return pd.DataFrame(columns)


_MAX_DIGITS = 15
"""Decimals past which :func:`metric_text` stops adding any (a float64 holds about 15-17 significant digits)."""
_WHOLE_TOLERANCE = 1e-12
"""A value this close to a whole number is printed as one: the difference is float rounding, not data."""


def metric_text(value: float, digits: int = 3) -> str:
    """A metric (mean, sd, per-fold value) with ``digits`` decimals, or more where those would claim an
    exact whole number the value is not.

    At 3 decimals an AUROC of 0.9996 reads ``1.000`` (perfect on every fold) and an sd of 0.0004
    reads ``0.000`` (no spread); the decimals go on until the first one that differs, ``0.9996`` and
    ``0.0004``. Every other value keeps ``digits`` decimals, so columns stay aligned and the sd
    beside a mean tells its precision. The page of ``scdm serve`` formats numbers by this rule too
    (``static/scdm.js``, ``metricText``).
    """
    text = f"{value:.{digits}f}"
    # within float rounding of a whole number it is one (an sd of identical folds can come out as 1e-17)
    whole = abs(value - round(value)) < _WHOLE_TOLERANCE
    while float(text).is_integer() and not whole and digits < _MAX_DIGITS:
        digits += 1
        text = f"{value:.{digits}f}"
    return text


def format_leaderboard(board: pd.DataFrame, *, metrics: Iterable[str] = ("auroc", "ap", "f1", "accuracy"),
                       digits: int = 3) -> pd.DataFrame:
    """Wide, printable leaderboard: one column per metric holding ``"mean ± sd"``.

    A metric defined on fewer folds than the result has (a test fold with one class has no AUROC)
    shows its own n, e.g. ``0.912 ± 0.040 (n=2)``. ``folds`` is ``done/expected``, marked
    ``incomplete`` when folds are missing (resume with ``scdm evaluate``), or ``skipped`` when each
    missing fold is a ``skipped_tasks`` row with its reason (the head failed there; a rerun fails again). Numbers are
    :func:`metric_text` (``0.9996``, not ``1.000``). Where two results differ
    only by their split (folds paired with another label set's, or two partitions with the same
    scenario, scheme, k and seed), a ``split`` column names it on those rows (:func:`split_labels`).
    A ``note`` column marks results on a space made with an older gene table, where there are any.

    Parameters
    ----------
    board : DataFrame
        Output of :func:`leaderboard`.
    metrics : iterable of str
        Metric columns to show, in order.
    digits : int, default 3

    Returns
    -------
    DataFrame
        One row per result; ``n/a`` where every fold is undefined.
    """
    metrics = _known_metrics(metrics)
    wide = _wide_with_skips(board, metrics)
    metrics = [m for m in metrics if m in wide.columns]
    keys = [k for k in ROW_KEYS if k not in ("seed",)] + ["seed"]
    if wide.empty:
        return pd.DataFrame(columns=[*keys, "folds", *metrics])

    def text(row: pd.Series, m: str) -> str:
        if pd.isna(row[m]):
            return "n/a"
        sd = "" if pd.isna(row[f"{m}_sd"]) else f" ± {metric_text(row[f'{m}_sd'], digits)}"
        n = "" if row[f"{m}_n"] == row["folds_done"] else f" (n={row[f'{m}_n']})"
        return f"{metric_text(row[m], digits)}{sd}{n}"

    out = wide[keys].copy()
    out["seed"] = out["seed"].astype(object).where(out["seed"].notna(), "")
    labels = split_labels(out.assign(split_id=wide["split_id"]), keys, folds_from=_folds_from(board))
    if labels.ne("").any():
        out["split"] = labels
    expected = wide["folds_expected"].fillna(wide["folds_done"]).astype(int)
    out["folds"] = [f"{d}/{e}" + ("" if c else " skipped" if skip else " incomplete")
                    for d, e, c, skip in zip(wide["folds_done"], expected, wide["complete"], wide["skipped"])]
    for m in metrics:
        out[m] = [text(row, m) for _, row in wide.iterrows()]
    if wide["note"].ne("").any():  # as scdm ls marks the embeddings of such a space
        out["note"] = wide["note"]
    return out.reset_index(drop=True)


def _folds_from(board: pd.DataFrame) -> dict[str, str]:
    """split_id -> the label set its pooled folds come from (splits made with ``pair_folds_with``)."""
    if "folds_from" not in board.columns:
        return {}
    pairs = board[["split_id", "folds_from"]].dropna().drop_duplicates("split_id")
    return dict(zip(pairs["split_id"].astype(str), pairs["folds_from"].astype(str)))


def split_labels(rows: pd.DataFrame, shown: Iterable[str], *, folds_from: dict[str, str] | None = None) -> pd.Series:
    """A short name of each row's split where rows would otherwise print alike, ``""`` elsewhere.

    Parameters
    ----------
    rows : DataFrame
        Printed rows with a ``split_id`` column.
    shown : iterable of str
        The columns printed for each row (besides its metrics).
    folds_from : dict, optional
        split_id -> the label set whose partition the split's pooled folds are.

    Returns
    -------
    Series of str
        For rows whose ``shown`` values equal another row's of another split: the split id's
        first digits (as many as tell the splits apart, at least 8), with ``folds of <label set>``
        for paired folds, e.g. ``e4f7ba19 (folds of Gefitinib)``.
    """
    shown = list(shown)
    alike = rows.duplicated(shown, keep=False) & rows.groupby(shown, dropna=False)["split_id"].transform("nunique").gt(1)
    ids = rows["split_id"].astype(str)
    width = _prefix_width(sorted(set(ids[alike])))
    paired = folds_from or {}
    names = [(sid[:width] + (f" (folds of {paired[sid]})" if sid in paired else "")) if a else ""
             for sid, a in zip(ids, alike)]
    return pd.Series(names, index=rows.index, dtype=object)


def _prefix_width(ids: list[str], start: int = 8) -> int:
    """The shortest prefix length (at least ``start``) that keeps ``ids`` distinct."""
    width = start
    while len({i[:width] for i in ids}) < len(ids) and width < max(map(len, ids)):
        width += 1
    return width


NOTES: dict[str, str] = {
    "ami": ("AMI and ARI compare the predicted and true partitions and ignore which class is which: an inverted "
            "classifier (AUROC near 0) scores as high as a perfect one. Read them beside MCC, which is signed."),
    "shuffled-label": ("The shuffled-label head trains on permuted labels. On small data its cross-validated AUROC "
                       "is expected below 0.5 (the known negative bias of cross-validation with permuted labels: a "
                       "fold's training labels are anti-correlated with its test labels), not a bug."),
    "incomplete": ("Rows marked 'incomplete' miss folds (an interrupted or partial run); run the same "
                   "`scdm evaluate` again to finish them. Their means cover only the folds done."),
    "transductive-baseline": ("pca and hvg are fitted without labels on every cell of the datasets they were fitted "
                              "on (the embedding's params.fit_datasets), test folds and held-out studies included: "
                              "a transductive fit. On a synthetic collection (scdm synth --scale 0.005, 20 PCs) it "
                              "raised the mean AUROC by about 0.02 (pooled and cross-data) over a PCA fitted on "
                              "each fold's training cells; scdm has no per-fold baseline fit."),
    "transductive-dann": ("The dann head trains with the cells it predicts as its unlabelled target domain (the "
                          "test fold, pooled; the held-out study, cross-data): transductive, as scDEAL. Their "
                          "labels are never read; compare it with the plain heads knowing this."),
    "single_class": ("A test fold holding one class is scored on no metric (one rule for all metrics); a metric "
                     "shows its own n where it is defined on fewer folds than the result has."),
    "no_scores": ("AUROC and AP are n/a (or over fewer folds) where the predictions are hard labels without a score: "
                  "a prompting run without token log-probabilities (scdm prompt --logprobs, on an endpoint that "
                  "returns them). They are never computed from hard labels."),
    "older-gene-table": ("Rows noted 'older gene table' were computed on embeddings made with another gene table than "
                         "this scdm's (scdm ls marks them too): they stay valid for their space, but embedding the "
                         "datasets again makes a new space with results of its own beside them, not a replacement."),
    "older-gene-matching": ("Rows noted 'older gene matching' were computed in a joint pca/hvg space fitted on the "
                            "genes its datasets share by symbol as spelled: a gene renamed between them (AARS in one, "
                            "AARS1 in another) was left out. Fitting them jointly again matches genes by the gene and "
                            "makes a new space with results of its own beside them, not a replacement."),
    "unanswered": ("Rows noted 'test cells unanswered' are a prompting model's results scored on the cells it "
                   "answered readably; the others are left out, so they are not on the same cells as the rows "
                   "beside them (a model that fails on hard cells looks better than it is). The report does not "
                   "mark them best."),
    "skipped_folds": ("Rows with fewer folds than k leave out folds that cannot be scored (a held-out study holding one "
                      "class, a fold without test cells or whose training cells hold one class): their means are over "
                      "the folds they show, not all k, and are compared only with rows of the same split. "
                      "`scdm sql \"SELECT * FROM split_folds WHERE status = 'skipped'\"` names each with its reason."),
    "mixed_drugs": ("Rows noted 'labelled for different drugs' pool datasets whose labels are responses to different "
                    "drugs (scDrugMap pools them): a pooled fold mixes the drugs, and a cross-data fold scores a "
                    "held-out study's drug with a head trained on the other studies' drugs, so the number measures no "
                    "one drug's response. To measure one drug, evaluate only the datasets labelled for it (scdm "
                    "evaluate --dataset ... --label-set ...)."),
    "held_out_studies": ("Cross-data rows (scheme study): each fold is one held-out study, so their mean ± sd is over "
                         "held-out studies (each weighing the same whatever its cell count) and their n and folds count "
                         "studies; it is not a score of the pooled test cells."),
    "no_predicted_positive": ("Precision is undefined on a fold where the head predicted no cell sensitive; its mean "
                              "is over the other folds (its own n)."),
}
"""Caveats printed under a leaderboard when they apply (see :func:`leaderboard_notes`)."""



def with_signed_partner(metrics: Iterable[str]) -> list[str]:
    """The metrics, with MCC added beside AMI/ARI (which cannot tell an inverted classifier)."""
    out = list(dict.fromkeys(metrics))
    if ("ami" in out or "ari" in out) and "mcc" not in out:
        out.insert(min(out.index(m) for m in ("ami", "ari") if m in out), "mcc")
    return out


def leaderboard_notes(board: pd.DataFrame, metrics: Iterable[str]) -> list[str]:
    """The caveats that apply to this leaderboard and these shown metrics (plain sentences)."""
    metrics = set(metrics)
    notes = []
    if metrics & {"ami", "ari"}:
        notes.append(NOTES["ami"])
    if not board.empty and "shuffled-label" in set(board["head"]):
        notes.append(NOTES["shuffled-label"])
    # baselines are fitted (without labels) on every cell they embed, test cells included
    if not board.empty and ((board["variant"] == "frozen") & board["model"].isin(BASELINE_MODELS)).any():
        notes.append(NOTES["transductive-baseline"])
    if not board.empty and "dann" in set(board["head"]):
        notes.append(NOTES["transductive-dann"])
    if not board.empty and not board["complete"].all():
        explained = _skip_explained(board)
        if (~board["complete"].astype(bool) & ~explained).any():
            notes.append(NOTES["incomplete"])
        if explained.any():
            notes.append(_skipped_note(board[explained]))
    if not board.empty and "scenario" in board.columns and board["scenario"].eq("cross").any():
        notes.append(NOTES["held_out_studies"])
    if has_skipped_folds(board):
        notes.append(NOTES["skipped_folds"])
    if not board.empty and "note" in board.columns and board["note"].fillna("").str.startswith("older gene table").any():
        notes.append(NOTES["older-gene-table"])
    if not board.empty and "note" in board.columns and board["note"].fillna("").str.contains("older gene matching").any():
        notes.append(NOTES["older-gene-matching"])
    if not board.empty and "note" in board.columns and board["note"].fillna("").str.contains("labelled for different drugs").any():
        notes.append(NOTES["mixed_drugs"])
    if not board.empty and "note" in board.columns and board["note"].fillna("").str.contains("test cells unanswered").any():
        notes.append(NOTES["unanswered"])
    if board.empty:
        return notes
    one_class = _one_class_folds(board)
    if (one_class > 0).any():
        notes.append(NOTES["single_class"])
    # NULLs beyond a result's one-class folds have their own reasons (eval_tasks.flags)
    extra = board["n_null"] > one_class
    metric = board["metric"] if "metric" in board.columns else pd.Series("", index=board.index)
    if (extra & metric.isin(["auroc", "ap"]) & metric.isin(metrics)).any():
        notes.append(NOTES["no_scores"])
    if "precision" in metrics and (extra & metric.eq("precision")).any():
        notes.append(NOTES["no_predicted_positive"])
    return notes


_REASON_CHARS = 100
"""A skip reason is shortened to this many characters in a note (a head's error can be a long message)."""


def _skipped_note(rows: pd.DataFrame) -> str:
    """The note under a board whose ``rows`` miss folds the run skipped with a recorded reason (:func:`_skip_explained`)."""
    reasons: list[str] = []
    for joined in rows["skip_reason"].fillna(""):
        for reason in str(joined).split(" | "):
            line = reason.strip().splitlines()[0] if reason.strip() else ""
            short = line if len(line) <= _REASON_CHARS else line[:_REASON_CHARS - 1].rstrip() + "…"
            if short and short not in reasons:
                reasons.append(short)
    more = f"; {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    splits = sorted(set(rows["split_id"].astype(str))) if "split_id" in rows.columns else []
    where = (f" WHERE list_contains([{', '.join(_lit(s) for s in splits)}], split_id)" if 0 < len(splits) <= 3
             else " ORDER BY created_at DESC")
    return ("Rows marked 'skipped' miss folds their run could not fit and recorded why: "
            + "; ".join(reasons[:3]) + more + ". Running the same `scdm evaluate` again fits them the same way "
            "(a diverged fit diverges again); their means cover only the folds done. "
            f"`scdm sql \"SELECT * FROM skipped_tasks{where}\"` lists each with its full reason.")


def has_skipped_folds(board: pd.DataFrame) -> bool:
    """Whether a row's split has folds that are not evaluated (``folds_expected`` below ``k``).

    Such folds are not tasks, so the row reads complete (``3/3``) although its mean covers 3 of its k=4
    held-out studies; without this note nothing under the table would say so.
    """
    if board.empty or not {"k", "folds_expected"} <= set(board.columns):
        return False
    expected = pd.to_numeric(board["folds_expected"], errors="coerce")
    return bool((expected < pd.to_numeric(board["k"], errors="coerce")).any())


def _one_class_folds(board: pd.DataFrame) -> pd.Series:
    """Per row: the folds of its result with a one-class test fold, which null every metric at once.

    A fold where only some metrics are NULL has another reason: hard labels (AUROC/AP, flag
    ``no_scores``) or no predicted positive (precision). So the fewest NULLs over a result's metrics
    count its one-class folds (a board of AUROC and AP alone cannot tell these apart).
    """
    keys = [k for k in LEADERBOARD_KEYS if k in board.columns]
    if not keys or "metric" not in board.columns:
        return board["n_null"]
    return board.groupby(keys, dropna=False)["n_null"].transform("min")
