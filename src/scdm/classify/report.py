"""``scdm report``: an HTML page with the figures and tables of an evaluated store.

Everything comes from the catalog: no embedding is recomputed and no head is refitted. The only
arrays read are the stored embeddings, subsampled, for the 2-D projections. Every table on the
page is the result of the SQL printed under it, run through the read-only user interface
(:meth:`store.Store.sql`), so pasting that SQL into ``scdm sql`` or any DuckDB client gives the
same numbers. The same SQL, and the table as CSV, are written next to the page (``tables/``).

Result identity. Every aggregate reads the ``results`` view and groups by the whole result
identity (:data:`scdm.classify.results.LEADERBOARD_KEYS`): embedding space, datasets, label set,
split (scenario, scheme, k, seed, category), head and its parameters, variant. Results of a 5-fold
and a 3-fold split of the same cells, of two label sets or of two dataset collections are never
averaged together: they are separate rows of every table and separate series (or, where one
figure point would need two of them, one picked and named in the caption) of every figure. The
folds of one LoRA tuning (one adapter per fold) form one result, as in ``scdm results``. Every
leaderboard row shows its datasets, label set and split, the folds done out of the folds expected
(an interrupted run is marked incomplete) and, where a metric is undefined on some folds, its n.

Figures (PNG and SVG, in ``figures/``):

- ``overview_bars``: mean +- sd over folds of F1 and AUROC on all cells, per series and head;
- ``radar_<scenario>_<strategy>_<head>``: mean F1 and AUROC per tissue, cancer type, drug type
  and regimen (scDrugMap Fig. 2, 3, 6); a category type with fewer than 3 categories is drawn as
  a bar chart, and the caption says so;
- ``f1_by_cancer_type_<scenario>``: per-fold F1 across cancer types (box plots + folds);
- ``projection_<model>_<strategy>_<space>``: UMAP (or PCA) of each embedding space, subsampled
  to ``max_cells``, coloured by response, cancer type and study (scDrugMap Fig. 4). UMAP gets an
  exact neighbour graph (scikit-learn) and, where there are two CPUs, runs in a worker process
  while the other figures are drawn (same arrays, same seed: the same coordinates);
- ``scalability``: embedding throughput and head fit time (scDrugMap Fig. 7).

Reference heads that ignore the embedding (``majority``, ``shuffled-label``) appear in the tables
and the overview bars but not in the per-model radar and box figures. A *series* is one embedding
space under one label set (and one split protocol, where a space was evaluated with several k or
seeds). Every (model, datasets) group has its own colour in every figure, so ``pca`` fitted on
A375 and ``pca`` fitted on another collection are two colours and two legend labels naming their
datasets; the series of one group (LoRA variants, other spaces on the same datasets, other splits
or label sets) are hatched / dashed. The page lists every series with its colour (table
``figure-series``, also ``tables/figure_series.csv``): ``datasets`` are those its results cover,
``space_datasets`` those of its colour group (a space embedding more datasets than were evaluated).

Markup. This module prepares data; every tag of the page is in the autoescaped Jinja2 templates
``templates/report.html`` (the page) and ``templates/report_parts.html`` (sections, tables,
captions), so a dataset, label set, study or head name is always text.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import itertools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from scdm.classify import _plots
from scdm.classify._plots import CATEGORY_LABELS, METRIC_LABELS, Palette, Series
from scdm.classify.metrics import METRICS
from scdm.classify.results import (
    LEADERBOARD_KEYS,
    NOTES,
    has_skipped_folds,
    metric_text,
    split_labels,
    stale_notes,
    stale_sql,
    unanswered_note_sql,
)
from scdm.store import evaluation as records
from scdm.store.errors import InputDataError
from scdm.store.genes import space_notes_sql
from scdm.store.hashing import file_sha256
from scdm.store.labels import mixed_drugs_sql
from scdm.store.metrics import fold_summary_sql

if TYPE_CHECKING:
    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = ["REPORT_STATE_FILE", "report_is_current", "results_state", "runs_table", "write_report"]

REPORT_STATE_FILE = "report_state.json"
"""Beside ``index.html``: the :func:`results_state` the report was written from, and its selection (run, models,
heads) that :func:`report_is_current` judges it on."""

Projection = Literal["auto", "umap", "pca", "none"]

_CATEGORY_ORDER = ("all", "tissue", "cancer_type", "drug_type", "regimen")
_RADAR_TYPES = ("tissue", "cancer_type", "drug_type", "regimen")
_SCENARIO_ORDER = ("pooled", "cross", "custom")
_BASELINE_HEADS = ("majority", "shuffled-label")
"""Reference heads that ignore the embedding: in the tables and bar charts, not in per-model radars/boxes."""
_SCHEMES = ("cell", "sample", "study", "custom")
"""Split schemes the page explains (the text is the ``scheme_text`` macro of report_parts.html)."""


# --------------------------------------------------------------------------------------------
# SQL text: literal values, so the printed query runs as is in any DuckDB client
# --------------------------------------------------------------------------------------------
def _lit(value: Any) -> str:
    """A SQL literal for a string, number or list of those."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_lit(v) for v in value) + "]"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


@dataclass(frozen=True)
class _Filters:
    """The report's selection, as SQL conditions on each table alias."""

    run_id: str | None = None
    models: tuple[str, ...] | None = None
    heads: tuple[str, ...] | None = None
    stale: str = "FALSE"
    """SQL condition on a ``results`` row ``x`` whose numbers are known to be wrong now (left out)."""
    skip_heads: tuple[tuple[str, str, str | None, bool], ...] = ()
    """(run_id, head, head_params key, stale) of each run and head with skipped tasks (:func:`_skip_heads`)."""

    def results(self, alias: str = "r") -> list[str]:
        """Conditions on eval_results, eval_tasks or the report's ``r`` (all have run_id, model, head)."""
        out = []
        if self.run_id is not None:
            out.append(f"{alias}.run_id = {_lit(self.run_id)}")
        if self.models is not None:
            out.append(f"{alias}.model IN ({', '.join(_lit(m) for m in self.models)})")
        if self.heads is not None:
            out.append(f"{alias}.head IN ({', '.join(_lit(h) for h in self.heads)})")
        return out

    def current(self) -> list[str]:
        """Conditions on ``eval_results x``: the selection, less the results left out as known wrong (``stale``)."""
        return [f"NOT {self.stale}", *self.results("x")]

    def skipped(self, alias: str = "s") -> list[str]:
        """Conditions on skipped_tasks (which has no model column: select its spaces): the selection's skips
        that explain a result missing from the page.

        A skip whose run fitted its head at another revision than this scdm's explains nothing the page
        shows (the page leaves that revision's results out), and one whose task a later run fitted (the same
        space, split, fold, head and parameters; for a skipped split, any of its folds) is superseded: the
        result is on the page. Needs the ``skip_heads`` CTE (:meth:`skip_heads_cte`).
        """
        # no `--` comments here: _splits_sql joins these conditions onto one line
        same_params = (f"coalesce((SELECT h.head_params FROM skip_heads h WHERE h.run_id = {alias}.run_id "
                       f"AND h.head = {alias}.head), CAST(x.head_params AS VARCHAR))")
        explains = [f"NOT coalesce((SELECT h.stale FROM skip_heads h WHERE h.run_id = {alias}.run_id AND h.head = {alias}.head), "
               "FALSE)",
               f"NOT EXISTS (SELECT 1 FROM eval_results x WHERE x.space_id = {alias}.space_id AND x.split_id = {alias}.split_id"
               f" AND x.head = {alias}.head AND ({alias}.fold IS NULL OR x.fold = {alias}.fold)"
               f" AND CAST(x.head_params AS VARCHAR) = {same_params}"
               + "".join(f" AND {c}" for c in self.current()) + ")"]
        out = []
        if self.run_id is not None:
            out.append(f"{alias}.run_id = {_lit(self.run_id)}")
        if self.models is not None:
            models = ", ".join(_lit(m) for m in self.models)
            out.append(f"{alias}.space_id IN (SELECT space_id FROM embeddings WHERE model IN ({models}))")
        if self.heads is not None:
            out.append(f"{alias}.head IN ({', '.join(_lit(h) for h in self.heads)})")
        return out + explains

    def skip_heads_cte(self) -> str:
        """``skip_heads``: each run and head with skipped tasks, the parameters the run asked for it and whether
        the run fitted it at another revision than this scdm's (values computed by :func:`_skip_heads`)."""
        rows = ", ".join(f"({_lit(run)}, {_lit(head)}, {'NULL' if params is None else _lit(params)}, {str(stale).upper()})"
                         for run, head, params, stale in self.skip_heads)
        values = (f"SELECT * FROM (VALUES {rows}) v(run_id, head, head_params, stale)" if rows else
                  "SELECT NULL::VARCHAR AS run_id, NULL::VARCHAR AS head, NULL::VARCHAR AS head_params, NULL::BOOLEAN AS stale "
                  "WHERE FALSE")
        return ("skip_heads AS (  -- per run and head: the parameters it asked, and whether it fitted another revision "
                "of the head\n    " + values + "\n)")

    def embeddings(self, alias: str = "e") -> list[str]:
        out = [f"{alias}.status = 'complete'"]
        if self.models is not None:
            out.append(f"{alias}.model IN ({', '.join(_lit(m) for m in self.models)})")
        return out


def _where(conditions: Sequence[str]) -> str:
    return ("WHERE " + "\n  AND ".join(conditions)) if conditions else ""


# The whole result identity (scdm.classify.results.LEADERBOARD_KEYS): every aggregate groups by it.
_KEYS = ", ".join(f"r.{k}" for k in LEADERBOARD_KEYS)


def _results_cte(filters: _Filters) -> str:
    """``r``: the ``results`` view with LoRA folds grouped, as :func:`scdm.classify.results.leaderboard` reads it."""
    return (
        "WITH r AS (\n"
        "    -- the results view: one row per task and metric, the whole result identity spelled out;\n"
        "    -- the folds of one LoRA tuning (one adapter, a space of its own, per fold) form one result\n"
        "    SELECT x.* EXCLUDE (n_folds) REPLACE (coalesce('lora:' || a.tuning_id, x.variant) AS variant,\n"
        "                                       coalesce('lora:' || a.tuning_id, x.space_id) AS space_id),\n"
        "           x.n_folds AS k,  -- note: 'older gene table (...)', as scdm ls marks it; 'labelled for different drugs (...)'\n"
        "           concat_ws('; ', nullif(n.note, ''), m.note) AS note,\n"
        f"           {records.unanswered_sql('t.flags')} AS unanswered,  -- test cells a prompting model left unanswered\n"
        "           json_extract_string(sp.definition, '$.folds_from') AS folds_from  -- pair_folds_with: whose partition\n"
        "    FROM results x LEFT JOIN adapters a ON x.variant = 'lora:' || a.adapter_id\n"
        "    LEFT JOIN splits sp ON sp.split_id = x.split_id\n"
        f"    LEFT JOIN {space_notes_sql()} n ON n.space_id = x.space_id\n"
        f"    LEFT JOIN {mixed_drugs_sql()} m ON m.split_id = x.split_id AND m.label_set = x.label_set\n"
        "    LEFT JOIN eval_tasks t ON t.task_id = x.task_id\n"
        f"    WHERE NOT {filters.stale}  -- numbers known to be wrong now (an older head or answer parser)\n"
        ")"
    )


_EXPECTED_CTE = (
    "expected AS (  -- folds of each split that can be evaluated: a result with fewer is incomplete\n"
    "    SELECT split_id, count(*) FILTER (WHERE status = 'ok') AS folds_expected FROM split_folds GROUP BY split_id\n"
    ")"
)


def _leaderboard_sql(filters: _Filters, metrics: Sequence[str], *, scenario: str | None = None,
                     category_type: str | None = None) -> str:
    """Mean, sd and n over folds of each metric, one row per result (the whole result identity)."""
    aggregates = []
    for m in metrics:
        aggregates.append(fold_summary_sql("r.value", where=f"r.metric = {_lit(m)}",
                                           mean=f"{m}_mean", sd=f"{m}_sd", n=f"{m}_n"))
    conditions = [f"r.metric IN ({', '.join(_lit(m) for m in metrics)})", *filters.results()]
    if scenario is not None:
        conditions.append(f"r.scenario = {_lit(scenario)}")
    if category_type is not None:
        conditions.append(f"r.category_type = {_lit(category_type)}")
    first = metrics[0]
    # ::BIGINT: a sum of BIGINT is a HUGEINT, which pandas reads as float (66.0 cells in tables/*.csv)
    unanswered, n_test = (f"(sum(r.{c}) FILTER (WHERE r.metric = {_lit(first)}))::BIGINT" for c in ("unanswered", "n_test"))
    order = ("list_position(['pooled', 'cross', 'custom'], r.scenario), r.category_type, r.category"
             if scenario is None or category_type is None else "r.category")
    return (
        f"{_results_cte(filters)},\n{_EXPECTED_CTE}\n"
        f"SELECT {_KEYS},\n"
        "       count(DISTINCT r.fold) AS folds_done, any_value(e.folds_expected) AS folds_expected,\n"
        "       count(DISTINCT r.fold) >= coalesce(any_value(e.folds_expected), 0) AS complete,\n"
        "       any_value(json_extract_string(s.definition, '$.folds_from')) AS folds_from,  -- pair_folds_with: whose partition\n"
        # one row per task and metric: the cells of each task are counted on the rows of one metric
        f"       concat_ws('; ', nullif(max(r.note), ''), {unanswered_note_sql(unanswered, n_test)}) AS note,\n"
        f"       {unanswered} AS unanswered,\n"
        f"       {n_test} AS n_test,\n       "
        + ",\n       ".join(aggregates) + "\n"
        "FROM r LEFT JOIN expected e ON e.split_id = r.split_id LEFT JOIN splits s ON s.split_id = r.split_id\n"
        f"{_where(conditions)}\n"
        f"GROUP BY {_KEYS}\n"
        f"ORDER BY {order}, r.datasets, r.label_set, r.scheme, r.k, r.seed, r.head, r.head_params,\n"
        f"         {first}_mean DESC NULLS LAST, r.model, r.variant, r.space_id"
    )


def _figure_data_sql(filters: _Filters, metrics: Sequence[str]) -> str:
    """Mean, sd and n over folds per result and metric (long format): the data of the bar and radar figures.

    ``complete`` and ``unanswered`` are the leaderboard's: a result missing folds or scored on the test
    cells a prompting model answered is not drawn (the tables mark it; the caption names it).
    """
    conditions = [f"r.metric IN ({', '.join(_lit(m) for m in metrics)})", *filters.results()]
    return (
        f"{_results_cte(filters)},\n{_EXPECTED_CTE}\n"
        f"SELECT {_KEYS}, r.metric,\n"
        f"       {fold_summary_sql('r.value')},\n"
        "       count(DISTINCT r.fold) AS folds_done, any_value(e.folds_expected) AS folds_expected,\n"
        "       count(DISTINCT r.fold) >= coalesce(any_value(e.folds_expected), 0) AS complete,\n"
        "       sum(r.unanswered)::BIGINT AS unanswered, sum(r.n_test)::BIGINT AS n_test, any_value(r.folds_from) AS folds_from\n"
        "FROM r LEFT JOIN expected e ON e.split_id = r.split_id\n"
        f"{_where(conditions)}\n"
        f"GROUP BY {_KEYS}, r.metric\n"
        "ORDER BY r.scenario, r.category_type, r.category, r.metric, r.model, r.variant, r.space_id, r.datasets,\n"
        "         r.label_set, r.k, r.seed, r.head"
    )


def _fold_values_sql(filters: _Filters, metric: str, category_type: str) -> str:
    """Every fold's value of ``metric``, with its result's ``complete`` and ``unanswered`` (as :func:`_figure_data_sql`)."""
    conditions = [f"r.metric = {_lit(metric)}", f"r.category_type = {_lit(category_type)}", *filters.results()]
    result = f"PARTITION BY {_KEYS}"
    return (
        f"{_results_cte(filters)},\n{_EXPECTED_CTE}\n"
        f"SELECT {_KEYS}, r.fold, r.value,\n"
        f"       count(DISTINCT r.fold) OVER ({result}) AS folds_done, e.folds_expected,\n"
        f"       count(DISTINCT r.fold) OVER ({result}) >= coalesce(e.folds_expected, 0) AS complete,\n"
        f"       (sum(r.unanswered) OVER ({result}))::BIGINT AS unanswered, (sum(r.n_test) OVER ({result}))::BIGINT AS n_test, r.folds_from\n"
        "FROM r LEFT JOIN expected e ON e.split_id = r.split_id\n"
        f"{_where(conditions)}\n"
        "ORDER BY r.scenario, r.category, r.model, r.variant, r.space_id, r.datasets, r.label_set, r.k, r.seed,\n"
        "         r.head, r.fold"
    )


def _series_sql(filters: _Filters) -> str:
    """Every (space, label set, split protocol) with results, and the datasets of each (all runs: stable colours)."""
    return (
        f"{_results_cte(filters)}\n"
        "SELECT DISTINCT r.model, r.variant, r.space_id, r.label_set, r.scenario, r.scheme, r.k, r.seed, r.folds_from,\n"
        "       r.datasets\n"
        "FROM r"
    )


def _spaces_sql() -> str:
    """Every embedding space with its datasets; the per-fold spaces of a LoRA tuning grouped as in ``r``."""
    return (
        "SELECT e.model, coalesce('lora:' || a.tuning_id, e.variant) AS variant,\n"
        "       coalesce('lora:' || a.tuning_id, e.space_id) AS space_id,\n"
        "       e.variant AS raw_variant, e.space_id AS raw_space_id, d.name AS dataset\n"
        "FROM embeddings e JOIN datasets d USING (dataset_id)\n"
        "LEFT JOIN adapters a ON e.variant = 'lora:' || a.adapter_id"
    )


def _datasets_sql() -> str:
    return (
        "SELECT d.name, d.n_cells, d.gene_id_kind,\n"
        "       count(c.response) AS labelled,\n"
        "       count(*) FILTER (WHERE c.response = 1) AS sensitive,\n"
        "       count(*) FILTER (WHERE c.response = 0) AS resistant,\n"
        "       count(DISTINCT c.study) AS studies,\n"
        "       count(DISTINCT c.sample) AS samples,\n"
        "       string_agg(DISTINCT c.tissue, '; ' ORDER BY c.tissue) AS tissue,\n"
        "       string_agg(DISTINCT c.cancer_type, '; ' ORDER BY c.cancer_type) AS cancer_type,\n"
        "       string_agg(DISTINCT c.drug_type, '; ' ORDER BY c.drug_type) AS drug_type,\n"
        "       string_agg(DISTINCT c.regimen, '; ' ORDER BY c.regimen) AS regimen\n"
        "FROM datasets d LEFT JOIN cells c USING (dataset_id)\n"
        "GROUP BY d.name, d.n_cells, d.gene_id_kind\n"
        "ORDER BY d.name"
    )


def _label_sets_sql() -> str:
    return (
        "SELECT d.name AS dataset, l.name AS label_set, l.drug, l.label_key, l.positive, l.is_default,\n"
        "       l.n_labelled, l.n_sensitive, l.n_labelled - l.n_sensitive AS n_resistant\n"
        "FROM label_sets l JOIN datasets d USING (dataset_id)\n"
        "ORDER BY d.name, NOT l.is_default, l.name"
    )


def _mark_stopped_runs(runs: pd.DataFrame) -> None:
    """A ``running`` run whose process is gone (killed: it could not record failing) reads as stopped; a
    ``partial`` one says how it is finished."""
    for i, row in runs.iterrows():
        if row["status"] == "running" and records.run_process_gone(row["host"], row["pid"]):
            runs.at[i, "status"] = "stopped (its process is gone; run the same command again to finish it)"
        elif row["status"] == "partial":
            runs.at[i, "status"] = "partial (its request budget ran out; run the same command again to finish it)"


def runs_table(st: Store, run_id: str | None = None) -> pd.DataFrame:
    """The evaluation runs (``scdm evaluate``, ``scdm prompt``, LoRA tunings: ``kind``) as the report's runs
    table lists them: a run whose process is gone reads ``stopped (...)``, one cut short by its request
    budget ``partial (...)``.

    ``state`` is the status's first word (``running``, ``stopped``, ``partial``, ``complete``, ``failed``).
    The server's ``GET /api/runs`` answers this table (with the transfer runs besides), so the page, the
    API and the report agree.
    """
    runs = st.sql(_runs_sql(_Filters(run_id=run_id)))
    _mark_stopped_runs(runs)
    runs.insert(runs.columns.get_loc("status") + 1, "state", runs["status"].astype(str).str.split(" ").str[0])
    return runs


_RUN_KIND_SQL = ("CASE WHEN config->>'arm' = 'prompt' THEN 'prompt' WHEN (config->'finetune') IS NOT NULL THEN 'finetune' "
                 "ELSE 'evaluate' END")
"""What recorded an evaluation run: ``scdm evaluate``, ``scdm prompt`` (config arm ``prompt``) or a LoRA
tuning (``scdm finetune``, config ``finetune``)."""


def _runs_sql(filters: _Filters) -> str:
    conditions = [f"run_id = {_lit(filters.run_id)}"] if filters.run_id is not None else []
    # The pooled scheme as used, beside the one asked where they differ ('auto → sample'): recorded with
    # the run (split_schemes_used); for a run recorded before that, the schemes of the pooled splits
    # it fitted or skipped tasks of (a run that only reused earlier fits cannot tell, and says so).
    used = ("coalesce(array_to_string(list_sort(CAST(config->'split_schemes_used' AS VARCHAR[])), ', '),\n"
            "                (SELECT string_agg(DISTINCT p.scheme, ', ' ORDER BY p.scheme) FROM splits p\n"
            "                 WHERE p.scenario = 'pooled' AND p.split_id IN (\n"
            "                   SELECT t.split_id FROM eval_tasks t WHERE t.run_id = e.run_id\n"
            "                   UNION SELECT s.split_id FROM skipped_tasks s WHERE s.run_id = e.run_id)))")
    return (
        f"SELECT run_id, {_RUN_KIND_SQL} AS kind, created_at, finished_at, status,\n"
        "       CASE WHEN used IS NULL AND config->>'split_scheme' = 'auto' THEN 'auto (the scheme used was not recorded)'\n"
        "            WHEN config->>'split_scheme' IS NULL OR used IS NULL OR used = config->>'split_scheme'\n"
        "            THEN nullif(coalesce(used, config->>'split_scheme'), '')\n"
        "            WHEN used = '' THEN NULL\n"  # no pooled split (a cross-data run): no pooled scheme
        "            ELSE config->>'split_scheme' || ' → ' || used END AS split_scheme,\n"
        "       config->>'folds' AS folds, config->>'seed' AS seed,\n"
        "       coalesce(config->>'label_set', '(default)') AS label_set,\n"
        "       config->>'heads' AS heads, config->>'scenarios' AS scenarios,\n"
        "       n_tasks, n_done, n_reused, n_skipped, round(seconds, 1) AS seconds,\n"
        "       config->'process'->>'host' AS host, CAST(config->'process'->>'pid' AS BIGINT) AS pid\n"
        f"FROM (SELECT e.*, {used} AS used FROM eval_runs e)\n"
        f"{_where(conditions)}\n"
        "ORDER BY created_at"
    ).replace("\n\n", "\n")


def _splits_sql(filters: _Filters) -> str:
    # a split belongs to its cells and labels, so two label sets with identical labels (JHU006's Vorinostat and
    # AR-42) share one, which names the first: the label sets listed are those its results and skips were for
    used = (f"  SELECT x.split_id, x.label_set FROM eval_results x {_where(filters.current())}\n"
            f"  UNION SELECT s.split_id, s.label_set FROM skipped_tasks s {_where(filters.skipped())}\n").replace("\n  AND", " AND")
    return (
        f"WITH {filters.skip_heads_cte()},\nused AS (\n" + used + "),\n"
        "labels AS (SELECT p.scenario, p.scheme,\n"
        "                  string_agg(DISTINCT coalesce(u.label_set, p.label_set), '; '\n"
        "                             ORDER BY coalesce(u.label_set, p.label_set)) AS label_sets\n"
        "           FROM splits p JOIN used u ON u.split_id = p.split_id GROUP BY p.scenario, p.scheme)\n"
        "SELECT p.scenario, p.scheme,\n"
        "       array_to_string(list_sort(list_distinct(list(p.n_folds))), ', ') AS folds,\n"  # 4, 5, 15: as numbers
        "       array_to_string(list_sort(list_distinct(list(p.seed))), ', ') AS seed,\n"
        "       any_value(l.label_sets) AS label_sets,\n"
        "       count(*) AS splits,\n"
        "       count(*) FILTER (WHERE p.status = 'skipped') AS skipped_splits,\n"
        "       string_agg(DISTINCT p.category_type, ', '\n"
        "                  ORDER BY list_position(['all', 'tissue', 'cancer_type', 'drug_type', 'regimen'], p.category_type),\n"
        "                           p.category_type) AS category_types\n"
        "FROM splits p JOIN labels l ON l.scenario = p.scenario AND l.scheme = p.scheme\n"
        "WHERE p.split_id IN (SELECT split_id FROM used)\n"
        "GROUP BY p.scenario, p.scheme\n"
        "ORDER BY list_position(['pooled', 'cross', 'custom'], p.scenario), p.scheme"
    )


def _skip_heads(st: Store) -> tuple[tuple[str, str, str | None, bool], ...]:
    """(run_id, head, head_params key, stale) of every run and head with skipped tasks.

    A skipped task has no row of its own for its head's parameters or revision: they are its run's
    (config ``head_params`` and ``head_revisions``). ``stale``: the run fitted the head at another
    revision than this scdm's for those parameters (as :func:`scdm.classify.results.stale_sql` judges a
    result). The key is None where this scdm cannot build the head with them (a skip then matches a
    fit of the same head with any parameters).
    """
    from scdm.classify.heads import HEADS, get_head, head_revision

    runs = st.query("SELECT DISTINCT s.run_id, s.head, CAST(e.config->'head_params'->s.head AS VARCHAR) AS params,\n"
                    f"       {records.stored_revision_sql('s')} AS revision\n"
                    "FROM skipped_tasks s LEFT JOIN eval_runs e USING (run_id) ORDER BY s.run_id, s.head")
    out = []
    for run_id, head, params_text, revision in runs.itertuples(index=False, name=None):
        try:
            params = json.loads(params_text) if isinstance(params_text, str) else {}
        except ValueError:
            params = {}
        params = params if isinstance(params, dict) else {}
        key = None
        if head in HEADS:
            with contextlib.suppress(InputDataError, TypeError, ValueError):
                key = get_head(head, **params).params_key()
        out.append((str(run_id), str(head), key, int(revision) != head_revision(str(head), params)))
    return tuple(out)


def _skipped_sql(filters: _Filters) -> str:
    """One row per split, fold and reason: the skips of two splits (another k, seed or scheme) are two rows.

    Only the skips that explain a result missing from the page (:meth:`_Filters.skipped`)."""
    return (
        f"WITH {filters.skip_heads_cte()}\n"
        "SELECT s.scenario, s.datasets, s.label_set, p.scheme, p.n_folds AS k, p.seed,\n"
        "       json_extract_string(p.definition, '$.folds_from') AS folds_from,  -- pair_folds_with: whose partition\n"
        "       s.category_type, s.category, s.fold, f.label AS held_out, s.reason,\n"
        "       count(DISTINCT s.space_id) AS spaces,\n"
        "       string_agg(DISTINCT s.head, ', ' ORDER BY s.head) AS heads, s.split_id\n"
        "FROM skipped_tasks s\n"
        "JOIN splits p ON p.split_id = s.split_id\n"
        "LEFT JOIN split_folds f ON f.split_id = s.split_id AND f.fold = s.fold\n"
        f"{_where(filters.skipped())}\n"
        "GROUP BY s.scenario, s.datasets, s.label_set, p.scheme, p.n_folds, p.seed, folds_from, s.category_type,\n"
        "         s.category, s.fold, f.label, s.reason, s.split_id\n"
        "ORDER BY list_position(['pooled', 'cross', 'custom'], s.scenario), s.category_type, s.category,\n"
        "         s.datasets, s.label_set, p.scheme, p.n_folds, p.seed, folds_from NULLS FIRST, s.split_id,\n"
        "         s.fold NULLS FIRST, s.reason"
    ).replace("\n\n", "\n")


def _embed_cost_sql(filters: _Filters) -> str:
    def num(key: str) -> str:
        return f"TRY_CAST(e.telemetry->>'{key}' AS DOUBLE)"

    return (
        # the comment is not the first line: `scdm sql "-- ..."` would read the query as an option
        "SELECT e.model, coalesce('lora:' || a.tuning_id, e.variant) AS variant,  -- one row per embedding space\n"
        "       -- (the per-fold spaces of a LoRA tuning together)\n"
        "       coalesce('lora:' || a.tuning_id, e.space_id) AS space_id,\n"
        "       count(*) AS embeddings,\n"
        "       string_agg(DISTINCT d.name, ', ' ORDER BY d.name) AS datasets,\n"
        "       array_to_string(list_sort(list_distinct(list(e.dim))), ', ') AS dim,\n"
        "       -- where the checkpoint came from: the Hub id at the commit used, or the local folder\n"
        "       array_to_string(list_sort(list_distinct(list(coalesce((e.telemetry->'checkpoint'->>'hub_id') || '@'\n"
        "                                                          || (e.telemetry->'checkpoint'->>'commit'),\n"
        "                                                          e.telemetry->'checkpoint'->>'path')))), ', ') AS checkpoint,\n"
        "       array_to_string(list_sort(list_distinct(list(e.checkpoint_hash))), ', ') AS checkpoint_hash,\n"
        f"       max({num('n_parameters')}) AS n_parameters,\n"
        f"       sum({num('cells')})::BIGINT AS cells_embedded,\n"
        f"       sum({num('wall_s')}) AS embed_s,\n"
        f"       sum({num('cells')}) / nullif(sum({num('wall_s')}), 0) AS cells_per_s,\n"
        "       string_agg(DISTINCT coalesce(e.telemetry->>'gpu', e.telemetry->>'device'), ', '\n"
        "                  ORDER BY coalesce(e.telemetry->>'gpu', e.telemetry->>'device')) AS device,\n"
        "       string_agg(DISTINCT e.telemetry->>'precision', ', ' ORDER BY e.telemetry->>'precision') AS precision,\n"
        f"       max({num('peak_gpu_mem_bytes')}) / 2^30 AS peak_gpu_gib\n"
        "FROM embeddings e JOIN datasets d USING (dataset_id)\n"
        "LEFT JOIN adapters a ON e.variant = 'lora:' || a.adapter_id\n"
        f"{_where(filters.embeddings())}\n"
        "GROUP BY ALL\n"
        "ORDER BY e.model, variant, space_id"
    )


def _fit_cost_sql(filters: _Filters) -> str:
    """Mean fit time per task of each space, label set, split protocol, head and dataset collection.

    The collection is that of the tasks' cells (a category's split holds the cells of some datasets
    only): a row never pools tasks trained on different datasets, such as a space evaluated on d1 and
    again on d1 and d2 once d2 joined it. It pools the categories of its split protocol whose cells are
    those datasets (``categories`` names them, ``tasks`` counts their folds). Cross-data splits have one
    fold per held-out study, so their k is not a choice: it is left out.
    """
    category = "CASE WHEN t.category_type = 'all' THEN 'all cells' ELSE t.category_type || ' ' || t.category END"
    return (
        f"{_results_cte(filters)},\n"
        "t AS (SELECT DISTINCT ON (r.task_id) * FROM r)  -- one row per task\n"
        "SELECT t.model, t.variant, t.space_id, t.datasets,\n"
        "       t.label_set, t.scenario, t.scheme, CASE WHEN t.scenario = 'cross' THEN NULL ELSE t.k END AS k, t.seed,\n"
        "       t.folds_from,\n"
        "       t.head, t.head_params,\n"
        f"       string_agg(DISTINCT {category}, '; ' ORDER BY {category}) AS categories,\n"
        "       count(*) AS tasks, avg(t.n_train) AS n_train, avg(t.fit_seconds) AS fit_s\n"
        "FROM t\n"
        f"{_where(filters.results('t'))}\n"
        "GROUP BY t.model, t.variant, t.space_id, t.datasets, t.label_set, t.scenario, t.scheme,\n"
        "         CASE WHEN t.scenario = 'cross' THEN NULL ELSE t.k END, t.seed, t.folds_from, t.head, t.head_params\n"
        "ORDER BY t.model, t.variant, t.space_id, t.label_set, list_position(['pooled', 'cross', 'custom'], t.scenario),\n"
        "         t.scheme, k, t.seed, t.folds_from NULLS FIRST, t.head, len(string_split(t.datasets, ',')) DESC, t.datasets"
    ).replace("\n\n", "\n")


# --------------------------------------------------------------------------------------------
# the page model
# --------------------------------------------------------------------------------------------
@dataclass
class _Table:
    """One table of the page: the SQL that gives it and its result."""

    slug: str
    sql: str
    frame: pd.DataFrame


@dataclass
class _Figure:
    stem: str
    caption: str
    files: list[Path]


SpaceKey = tuple[str, str, str]
"""(model, variant, space_id) of an embedding space; the per-fold spaces of a LoRA tuning are one."""
SeriesKey = tuple[str, str, str, str, str]
"""A space, plus the label set and the split protocol (empty unless the space has several) of its results."""


@dataclass
class _Context:
    st: Store
    out: Path
    fig_dir: Path
    filters: _Filters
    metrics: tuple[str, ...]
    plot_metrics: tuple[str, ...]
    formats: tuple[str, ...]
    dpi: int
    palette: Palette = field(default_factory=lambda: Palette([]))
    spaces: dict[SpaceKey, Series] = field(default_factory=dict)
    """The series of each embedding space (projections, embedding cost)."""
    raw_space: dict[SpaceKey, SpaceKey] = field(default_factory=dict)
    """(model, variant, space_id) of a stored embedding -> its space key (a LoRA fold -> its tuning)."""
    several_protocols: set[tuple[str, ...]] = field(default_factory=set)
    """(model, variant, space_id, label set, scenario) evaluated with more than one split protocol."""
    head_label: dict[tuple[str, str], str] = field(default_factory=dict)
    series_rows: list[dict[str, Any]] = field(default_factory=list)
    """The legend of the figures: one row per series (label, colour, what it is)."""
    tables: list[_Table] = field(default_factory=list)
    figures: list[_Figure] = field(default_factory=list)
    progress: bool = True
    bar: Any = None
    """The progress bar over the sections (its postfix names the figure being drawn)."""
    left_out: list[str] = field(default_factory=list)
    """Why stored results are left out of every table and figure (an older head or answer parser)."""
    outputs: _Outputs = field(init=False)
    """The files written so far (the report's manifest)."""

    def __post_init__(self) -> None:
        self.outputs = _Outputs(self.out)

    def table(self, slug: str, sql: str) -> _Table:
        """Run ``sql`` through the read-only user interface (the same path as ``scdm sql``)."""
        table = _Table(slug, sql, self.st.sql(sql))
        self.tables.append(table)
        return table

    def save(self, fig: Any, stem: str, caption: str) -> _Figure:
        stem = _plots.figure_stem(stem)
        taken = {f.stem.casefold() for f in self.figures}
        if stem.casefold() in taken:  # the same name twice in one report: never overwrite the first
            stem = next(f"{stem}-{n}" for n in itertools.count(2) if f"{stem}-{n}".casefold() not in taken)
        if self.bar is not None:
            self.bar.set_postfix_str(stem)
        self.outputs.claim(self.fig_dir / f"{stem}.{fmt}" for fmt in self.formats)
        files = _plots.save(fig, self.fig_dir, stem, formats=self.formats, dpi=self.dpi)
        for path in files:
            self.outputs.record(path)
        figure = _Figure(stem, caption, files)
        self.figures.append(figure)
        logger.info("report: wrote figure %s", stem)
        return figure

    def series_key(self, row: Any) -> SeriesKey:
        """The series of a result row (a mapping with model, variant, space_id, label_set, scenario, scheme, k, seed
        and folds_from)."""
        space = (str(row["model"]), str(row["variant"]), str(row["space_id"]))
        label_set = "" if _missing(row["label_set"]) else str(row["label_set"])
        several = row["scenario"] != "cross" and (*space, label_set, str(row["scenario"])) in self.several_protocols
        protocol = _protocol_text(row["scheme"], row["k"], row["seed"], row.get("folds_from")) if several else ""
        return (*space, label_set, protocol)

    def series(self, frame: pd.DataFrame) -> list[Series]:
        """The series present in ``frame`` (after :meth:`with_labels`), in palette (colour group) order."""
        keys = set(frame["key"])
        return [s for k, s in self.palette.series.items() if k in keys]

    def with_labels(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Add ``key`` (the series), ``series`` (its legend label) and ``head_label`` to result rows."""
        out = frame.copy()
        out["key"] = [self.series_key(row) for row in out.to_dict("records")]
        out["series"] = [self.palette.series[k].label for k in out["key"]]
        if "head" in out.columns:
            params = out["head_params"] if "head_params" in out.columns else pd.Series("", index=out.index)
            out["head_label"] = [self.head_label.get((str(h), str(p)), str(h)) for h, p in zip(out["head"], params)]
        return out

    def with_space_labels(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Add ``key`` (the space) and ``series`` (its label) to rows with model, variant, space_id."""
        out = frame.copy()
        out["key"] = [(str(m), str(v), str(s)) for m, v, s in zip(out["model"], out["variant"], out["space_id"])]
        out["series"] = [self.spaces[k].label if k in self.spaces else k[0] for k in out["key"]]
        return out


def _protocol_text(scheme: Any, k: Any, seed: Any, folds_from: Any = None) -> str:
    """A split protocol in words: ``cell k=5 seed 0``; ``study, 3 held out`` for leave-one-study-out;
    ``cell k=5 seed 0 · folds of Gefitinib`` for the partition of another label set (pair_folds_with)."""
    scheme = "" if _missing(scheme) else str(scheme)
    if scheme == "study":
        return "study" + ("" if _missing(k) else f", {int(k)} held out")
    text = scheme + ("" if _missing(k) else f" k={int(k)}")
    text += "" if _missing(seed) else f" seed {int(seed)}"
    return text + ("" if _missing(folds_from) else f" · folds of {folds_from}")


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def write_report(
    store: str | os.PathLike[str] | Store,
    out_dir: str | os.PathLike[str],
    *,
    run_id: str | None = None,
    models: Iterable[str] | None = None,
    heads: Iterable[str] | None = None,
    metrics: Iterable[str] = ("f1", "auroc", "ap", "accuracy"),
    plot_metrics: Iterable[str] = ("f1", "auroc"),
    projection: Projection = "auto",
    max_cells: int = 5000,
    seed: int = 0,
    formats: Iterable[str] = ("png", "svg"),
    dpi: int = 150,
    title: str = "scdm report",
    progress: bool = True,
) -> Path:
    """Write an HTML report of the store's evaluations, with PNG/SVG figures, from the catalog alone.

    Parameters
    ----------
    store : str, path or Store
    out_dir : str or path
        Folder to write into (created): ``index.html``, ``figures/`` (PNG + SVG) and ``tables/``
        (each table as CSV plus the SQL that produces it), and ``.scdm-report.json``, the list of
        files written. The files an earlier report wrote into the same folder are removed first
        (those it lists, where unchanged); other files are left alone, and a report that would
        overwrite one of them stops with an error instead.
    run_id : str, optional
        Only results fitted by this evaluation run (``eval_runs.run_id``). Default: every run.
    models, heads : iterable of str, optional
        Only these models / heads (default: all).
    metrics : iterable of str, default ("f1", "auroc", "ap", "accuracy")
        Metric columns of the leaderboard tables (see :data:`scdm.classify.metrics.METRICS`).
    plot_metrics : iterable of str, default ("f1", "auroc")
        Metrics drawn in the radar and bar figures.
    projection : {"auto", "umap", "pca", "none"}, default "auto"
        2-D projection of each embedding space: ``auto`` = UMAP when umap-learn is installed,
        else the first two principal components (the caption says which); ``none`` skips them.
    max_cells : int, default 5000
        Cells per projection: larger spaces are subsampled uniformly at random with ``seed``.
    seed : int, default 0
        Seed of the subsample, UMAP and the jitter of per-fold points.
    formats : iterable of str, default ("png", "svg")
        Figure formats; the page shows the first and links the others.
    dpi : int, default 150
        Resolution of raster formats.
    title : str, default "scdm report"
    progress : bool, default True
        A progress bar over the sections of the page (tqdm, on stderr), where
        :func:`scdm.store.progress.progress_enabled` allows one (not under ``scdm -q`` or ``SCDM_PROGRESS=0``).

    Returns
    -------
    Path
        Path of ``index.html``.

    Raises
    ------
    InputDataError
        On an unknown metric, projection or format, ``max_cells < 10``, ``projection="umap"``
        without umap-learn installed, or a file of ``out_dir`` that the report would overwrite
        but did not write.

    Examples
    --------
    >>> write_report("scdm-store", "report")  # doctest: +SKIP
    PosixPath('report/index.html')
    """
    from scdm.store import open_store

    st = open_store(store)
    metric_list, plot_list = _check_metrics(metrics, "metrics"), _check_metrics(plot_metrics, "plot_metrics")
    model_list = None if models is None else tuple(models)
    head_list = None if heads is None else tuple(heads)
    selection = {"run_id": run_id, "models": model_list, "heads": head_list}
    # before reading: a result stored while the report is written makes it out of date
    drawn_from = {"results_state": results_state(st, run_id=run_id, models=model_list, heads=head_list),
                  "selection": {k: v if v is None or isinstance(v, str) else list(v) for k, v in selection.items()}}
    left_out = stale_notes(st)
    for note in left_out:
        logger.warning("report: %s", note)
    format_list = _check_formats(formats)
    _check_projection(projection, max_cells)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    _remove_earlier_outputs(out)
    filters = _Filters(run_id, model_list, head_list, stale_sql(st, "x"), _skip_heads(st))
    ctx = _Context(st, out, fig_dir, filters, metric_list, plot_list, format_list, dpi, progress=progress,
                   left_out=left_out)
    try:
        with _plots.style():
            body = _build_page(ctx, projection=projection, max_cells=max_cells, seed=seed)
        index = _write_tables_and_page(ctx, _page(title, st, body), drawn_from)
    finally:  # also after an error: the next report removes what this one wrote so far
        ctx.outputs.save_manifest()
    logger.info("report: %s (%d figures, %d tables)", index, len(ctx.figures), len(ctx.tables))
    return index


def results_state(st: Store, *, run_id: str | None = None, models: Iterable[str] | None = None,
                  heads: Iterable[str] | None = None) -> str:
    """The results and embeddings a report of this selection draws, in one string that changes when any of
    them does.

    A result added, fitted again with another value or removed (a re-ingest with other labels removes
    the results made with the old ones) and an embedding completed each change it. Only the rows the
    report reads count: a report of ``models=["geneformer"]`` stays current when another model's results
    arrive (``run_id``, ``models`` and ``heads`` select as in :func:`write_report`).

    The rows are hashed with DuckDB's ``hash()``: ~15 ms over 1M results, where ``md5`` over the same
    rows took ~0.9 s (DuckDB 2.0, 2 CPUs). A DuckDB release that changes ``hash()`` marks every report
    written before it out of date once.
    """
    model_list = None if models is None else list(models)
    results: list[str] = ["TRUE"]
    args: list[list[str]] = []
    for column, value in (("run_id", None if run_id is None else [run_id]), ("model", model_list),
                          ("head", None if heads is None else list(heads))):
        if value is not None:
            results.append(f"list_contains(?, {column})")
            args.append(value)
    embeddings, embedding_args = ["status = 'complete'"], []
    if model_list is not None:
        embeddings.append("list_contains(?, model)")
        embedding_args.append(model_list)
    where, done = " AND ".join(results), " AND ".join(embeddings)
    # the embeddings by id, not only their count: one removed and another completed draws other tables and projections
    row = st.query(f"SELECT (SELECT count(*) FROM eval_results WHERE {where}) AS n_results, "
                   f"(SELECT coalesce(bit_xor(hash(task_id, metric, value)), 0) FROM eval_results WHERE {where}) AS results, "
                   f"(SELECT count(*) FROM embeddings WHERE {done}) AS n_embeddings, "
                   f"(SELECT coalesce(bit_xor(hash(embedding_id)), 0) FROM embeddings WHERE {done}) AS embeddings",
                   [*args, *args, *embedding_args, *embedding_args]).iloc[0]
    return (f"{int(row['n_results'])}-{int(row['results']):016x}-{int(row['n_embeddings'])}-"
            f"{int(row['embeddings']):016x}")


def report_is_current(st: Store, out_dir: str | os.PathLike[str]) -> bool | None:
    """Whether the report in ``out_dir`` shows the store's results as they are now (None: a report that did not
    record what it was drawn from, written by an older scdm, or no report).

    Judged on the rows of the report's own selection (``run_id``, ``models``, ``heads``, recorded beside it):
    a report of one model is not made out of date by another model's results.
    """
    try:
        written = json.loads((Path(out_dir) / REPORT_STATE_FILE).read_text())
        state, selection = written["results_state"], written.get("selection") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(selection, dict) or not _is_selection(selection):
        return None
    return bool(state == results_state(st, run_id=selection.get("run_id"), models=selection.get("models"),
                                       heads=selection.get("heads")))


def _is_selection(selection: dict[str, Any]) -> bool:
    """Whether a recorded selection is one :func:`write_report` writes (anything else: a report it cannot judge)."""
    def names(value: Any) -> bool:
        return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    run = selection.get("run_id")
    return (set(selection) <= {"run_id", "models", "heads"} and (run is None or isinstance(run, str))
            and names(selection.get("models")) and names(selection.get("heads")))


def _write_tables_and_page(ctx: _Context, page: str, drawn_from: dict[str, Any]) -> Path:
    """Write ``tables/`` (CSV and SQL of each table), the state of the results the page was drawn from
    (:data:`REPORT_STATE_FILE`) and then the page, refusing first if any would overwrite a file."""
    tables = ctx.out / "tables"
    files: list[tuple[Path, Callable[[Path], object]]] = []
    for table in ctx.tables:
        files += [(tables / f"{table.slug}.csv", functools.partial(_write_csv, table.frame)),
                  (tables / f"{table.slug}.sql", functools.partial(Path.write_text, data=table.sql + ";\n"))]
    if ctx.series_rows:
        files.append((tables / "figure_series.csv", functools.partial(_write_csv, pd.DataFrame(ctx.series_rows))))
    files.append((ctx.out / REPORT_STATE_FILE,
                  functools.partial(Path.write_text, data=json.dumps(drawn_from))))
    index = ctx.out / "index.html"
    files.append((index, functools.partial(Path.write_text, data=page)))
    ctx.outputs.claim([path for path, _ in files])
    for path, write in files:
        write(path)
        ctx.outputs.record(path)
    return index


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False)


MANIFEST = ".scdm-report.json"
"""The files a report wrote into its folder (path relative to it -> sha256): the next report deletes
exactly those still unchanged, and nothing else."""

_REPORT_FILE = re.compile(r"index\.html|report_state\.json|tables/[^/]+\.(?:csv|sql)|figures/[^/]+\.(?:png|svg|pdf)")
"""The names a report writes: a manifest entry of any other shape is never deleted."""

_FIGURE_PREFIXES = ("overview_bars", "radar_", "f1_by_cancer_type_", "projection_", "scalability")


@dataclass
class _Outputs:
    """The files this report writes into ``out``; it overwrites none it did not write itself."""

    out: Path
    written: dict[str, str] = field(default_factory=dict)
    """Path relative to ``out`` -> sha256 of the content written."""

    def claim(self, paths: Iterable[Path]) -> None:
        """Refuse before writing any of ``paths`` if one is taken (by a file an earlier report did not write, or
        one changed since it did: :func:`_remove_earlier_outputs` left it alone)."""
        taken = [p for p in paths if p.exists() or p.is_symlink()]
        if taken:
            names = ", ".join(str(p.relative_to(self.out)) for p in taken[:3]) + (" ..." if len(taken) > 3 else "")
            msg = (f"The report folder {str(self.out)!r} holds {names}, which no earlier report wrote there "
                   f"(or which changed since; see {MANIFEST}); the report would overwrite it, so it stops here and "
                   "leaves it as it is. "
                   "Move the file(s) out of the way, or write the report into another folder (scdm report --out).")
            raise InputDataError(msg)

    def record(self, path: Path) -> None:
        self.written[path.relative_to(self.out).as_posix()] = file_sha256(path)

    def save_manifest(self) -> None:
        path = self.out / MANIFEST
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps({"files": self.written}, indent=1, sort_keys=True) + "\n")
        partial.replace(path)


def _remove_earlier_outputs(out: Path) -> None:
    """Delete the page, figures and tables an earlier report wrote into ``out`` (and nothing else).

    Only the files of its manifest whose content is still what it wrote: a user's own CSV in ``tables/``
    (or in a folder ``tables/`` links to) stays, as does a report file the user edited since. The page
    goes first and is written last: an interrupted report leaves no page whose tables are the old
    numbers beside figures and table files that are new or gone.
    """
    manifest = out / MANIFEST
    if not manifest.is_file():
        _remove_older_report(out)
        return
    try:
        files = json.loads(manifest.read_text()).get("files", {})
    except (ValueError, AttributeError):
        files = {}  # a damaged manifest names nothing: every file left is claimed by the user
    names = sorted((n for n in files if isinstance(n, str) and _REPORT_FILE.fullmatch(n)), key=lambda n: n != "index.html")
    for name in names:
        path = out / name
        if path.is_file() and not path.is_symlink() and file_sha256(path) == files[name]:
            path.unlink()
    manifest.unlink()


def _remove_older_report(out: Path) -> None:
    """The outputs of a report written before reports kept a manifest (scdm's page is its ``index.html``).

    Its figures and table files are recognised by name, in ``figures/`` and ``tables/`` folders of its
    own only: one of them linked elsewhere is someone else's folder.
    """
    index = out / "index.html"
    if not (index.is_file() and not index.is_symlink() and _is_report_page(index)):
        return
    index.unlink()
    state = out / REPORT_STATE_FILE
    if state.is_file() and not state.is_symlink():
        state.unlink()
    figures, tables = out / "figures", out / "tables"
    if not figures.is_symlink():
        for path in figures.iterdir():
            if path.suffix in (".png", ".svg", ".pdf") and path.name.startswith(_FIGURE_PREFIXES) and path.is_file():
                path.unlink()
    if not tables.is_symlink():
        for path in tables.iterdir():
            if path.suffix in (".csv", ".sql") and path.is_file():
                path.unlink()


def _is_report_page(path: Path) -> bool:
    with path.open(errors="replace") as f:
        head = f.read(1 << 16)
    return "from the catalog alone (no embedding recomputed, no head refitted)" in head


def _check_metrics(metrics: Iterable[str], name: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(metrics))
    unknown = [m for m in values if m not in METRICS]
    if unknown or not values:
        msg = f"{name}={list(values)!r}: unknown or empty; choose from {', '.join(METRICS)}."
        raise InputDataError(msg)
    return values


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    allowed = ("png", "svg", "pdf")
    bad = [f for f in values if f not in allowed]
    if bad or not values:
        msg = f"formats={list(values)!r}: choose one or more of {', '.join(allowed)}."
        raise InputDataError(msg)
    return values


def _check_projection(projection: str, max_cells: int) -> None:
    if projection not in ("auto", "umap", "pca", "none"):
        msg = f"projection={projection!r}; choose auto, umap, pca or none."
        raise InputDataError(msg)
    if isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 10:
        msg = f"max_cells={max_cells!r} must be an integer >= 10 (cells drawn per projection)."
        raise InputDataError(msg)
    if projection == "umap" and not _umap_available():
        msg = ("projection='umap' needs umap-learn, which is not installed; `pip install umap-learn`, or use "
               "projection='pca' (or 'auto', which falls back to PCA).")
        raise InputDataError(msg)


def _umap_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


# --------------------------------------------------------------------------------------------
# page sections
# --------------------------------------------------------------------------------------------
def _build_page(ctx: _Context, *, projection: Projection, max_cells: int, seed: int) -> Markup:
    st = ctx.st
    n_datasets = int(st.query("SELECT count(*) AS n FROM datasets")["n"].iloc[0])
    n_embeddings = int(st.query("SELECT count(*) AS n FROM embeddings WHERE status = 'complete'")["n"].iloc[0])
    n_results = int(st.query("SELECT count(*) AS n FROM eval_results")["n"].iloc[0])
    if n_datasets == 0 and n_results == 0:
        return _next_steps(st, "The store holds no dataset yet.", start="ingest")
    _register_series(ctx)
    projections = _prepare_projections(ctx, projection=projection, max_cells=max_cells, seed=seed)
    try:
        return _sections(ctx, projections, n_embeddings=n_embeddings, n_results=n_results)
    finally:
        if projections is not None:
            projections.close()


def _sections(ctx: _Context, projections: _Projections | None, *, n_embeddings: int, n_results: int) -> Markup:
    st = ctx.st
    parts = [_section_datasets(ctx)]
    if n_embeddings == 0 and n_results == 0:
        parts.insert(0, _next_steps(st, "The store holds datasets but no complete embedding yet.", start="embed"))
        return Markup("\n").join(parts)
    board = ctx.with_labels(st.sql(_figure_data_sql(ctx.filters, ctx.plot_metrics))) if n_results else pd.DataFrame()
    steps: list[tuple[str, Callable[[], Markup]]] = []
    if n_results == 0 or board.empty:
        why = ("No evaluation result matches the selection." if n_results else
               "The store holds embeddings but no evaluation result yet.")
        parts.insert(0, _next_steps(st, why, start="evaluate"))
    else:
        steps += [("protocol", lambda: _section_protocol(ctx)), ("leaderboard", lambda: _section_summary(ctx, board)),
                  ("categories", lambda: _section_radars(ctx, board)), ("per-fold F1", lambda: _section_folds(ctx)),
                  ("tables", lambda: _section_leaderboards(ctx))]
    steps += [("embeddings", lambda: _section_projections(ctx, projections)),
              ("scalability", lambda: _section_scalability(ctx))]
    if n_results:
        steps.append(("skipped", lambda: _section_skipped(ctx)))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from scdm.store.progress import progress_bar

    # hidden under `scdm -q`, SCDM_PROGRESS=0 and where stderr is not a terminal, like every stage's bar
    bar = progress_bar(len(steps), desc="report", unit="section", silent=not ctx.progress)
    # log lines are written above the bar, not through it
    redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
    with redirect, bar:
        ctx.bar = bar
        for name, step in steps:
            bar.set_postfix_str(name)
            parts.append(step())
            bar.update()
    parts.append(_section_sql_help())
    # the reader of the page sees what the log said: these results are in the store and not on the page
    parts[:0] = [Markup('<p class="warn left-out">{}</p>').format(note) for note in ctx.left_out]
    return Markup("\n").join(p for p in parts if p)


def _next_steps(st: Store, why: str, *, start: str) -> Markup:
    root = str(st.root)
    steps = {
        "ingest": ("Add a dataset with its drug-response labels and metadata",
                   f"scdm --store {root} ingest data.h5ad --label-key response --study GSE000000 \\\n"
                   "    --tissue 'Cell line' --cancer-type Melanoma --drug-type 'Targeted therapy' --regimen PLX-4720"),
        "embed": ("Embed the cells (baselines run on a CPU; foundation models take a local checkpoint)",
                  f"scdm --store {root} embed DATASET --model pca --joint\n"
                  f"scdm --store {root} embed DATASET --model geneformer --checkpoint /path/to/checkpoint"),
        "evaluate": ("Evaluate the embeddings (pooled k-fold and leave-one-study-out, several heads)",
                     f"scdm --store {root} evaluate --head logreg,mlp --folds 10"),
        "report": ("Write this report again", f"scdm --store {root} report --out report/"),
    }
    order = list(steps)
    return _parts().next_steps(why, [steps[k] for k in order[order.index(start):]])


def _register_series(ctx: _Context) -> None:
    """Give every series a unique legend label and a style: one colour per (model, datasets) group.

    The datasets of a space are those it embeds and those its results cover. A space evaluated
    with several split protocols (k, seed, scheme) in one scenario, or under several label sets,
    has one series per protocol and label set: they are never averaged into one line.
    """
    spaces = ctx.st.query(_spaces_sql())
    results = ctx.st.query(_series_sql(ctx.filters))
    results["label_set"] = results["label_set"].astype(object).where(results["label_set"].notna(), "")
    datasets: dict[SpaceKey, set[str]] = {}
    for row in spaces.itertuples(index=False):
        key = (str(row.model), str(row.variant), str(row.space_id))
        datasets.setdefault(key, set()).add(str(row.dataset))
        ctx.raw_space[(str(row.model), str(row.raw_variant), str(row.raw_space_id))] = key
    for row in results.itertuples(index=False):
        names = [] if _missing(row.datasets) else [d for d in str(row.datasets).split(",") if d]
        datasets.setdefault((str(row.model), str(row.variant), str(row.space_id)), set()).update(names)
    group = {key: (key[0], ", ".join(sorted(names))) for key, names in datasets.items()}
    ctx.palette = Palette(list(group.values()))

    # labels: the datasets where the report covers several collections, the space where one model has
    # several spaces on the same datasets, the label set and split protocol where they differ
    several_collections = len({g[1] for g in group.values()}) > 1
    same = pd.Series([(_base_label(k), group[k][1]) for k in group]).value_counts()
    space_parts: dict[SpaceKey, list[str]] = {}
    for key in group:
        parts = [_short(group[key][1], 40)] if several_collections and group[key][1] else []
        if same[(_base_label(key), group[key][1])] > 1:
            parts.append(key[2][:8])
        space_parts[key] = parts

    # paired folds (pair_folds_with) are another partition of the same protocol: a series of their own
    pooled = results[results["scenario"] != "cross"].drop_duplicates(
        ["model", "variant", "space_id", "label_set", "scenario", "scheme", "k", "seed", "folds_from"])
    counts = pooled.groupby(["model", "variant", "space_id", "label_set", "scenario"]).size()
    ctx.several_protocols = {tuple(str(v) for v in idx) for idx, n in counts.items() if n > 1}
    label_sets = results.groupby(["model", "variant", "space_id"])["label_set"].nunique()
    several_label_sets = {tuple(str(v) for v in idx) for idx, n in label_sets.items() if n > 1}
    # a series covers the datasets of its own results, which may be fewer than its space embeds
    covered: dict[SeriesKey, set[str]] = {}
    for record in results.to_dict("records"):
        names = [] if _missing(record["datasets"]) else [d for d in str(record["datasets"]).split(",") if d]
        covered.setdefault(ctx.series_key(record), set()).update(names)
    keys = sorted(covered, key=lambda k: (group[k[:3]], k[1] != "frozen", k[1], k[2], k[3], _natural(k[4])))
    for series_key in keys:
        space, label_set, protocol = series_key[:3], series_key[3], series_key[4]
        parts = [*space_parts[space], *([label_set or "no label set"] if space in several_label_sets else []),
                 *([protocol] if protocol else [])]
        series = ctx.palette.add(series_key, _label(space, parts), group=group[space], tuned=space[1] != "frozen")
        ctx.series_rows.append(_series_row(series, space, datasets=", ".join(sorted(covered[series_key])),
                                           space_datasets=group[space][1], label_set=label_set, protocol=protocol))
    # a space is drawn (projections, embedding cost) like its first series, or gets a style of its own
    for space in sorted(group, key=lambda k: (group[k], k[1] != "frozen", k[1], k[2])):
        first = next((s for k, s in ctx.palette.series.items() if k[:3] == space and len(k) == 5), None)
        label = _label(space, space_parts[space])
        if first is not None:
            ctx.spaces[space] = replace(first, key=space, label=label)
        else:
            ctx.spaces[space] = ctx.palette.add(space, label, group=group[space], tuned=space[1] != "frozen")
            ctx.series_rows.append(_series_row(ctx.spaces[space], space, datasets=group[space][1],
                                               space_datasets=group[space][1], label_set="", protocol="(not evaluated)"))
    labels = [s.label for s in ctx.palette.series.values()]
    if len(set(labels)) != len(labels):  # cannot happen by construction; two series must never share a legend entry
        msg = f"report: two figure series got the same label: {sorted(labels)}"
        raise AssertionError(msg)
    heads = ctx.st.query("SELECT DISTINCT head, head_params FROM eval_tasks ORDER BY head, head_params")
    for head, group_ in heads.groupby("head"):
        for params in group_["head_params"]:
            ctx.head_label[(str(head), str(params))] = str(head) if len(group_) == 1 else f"{head} {params}"


def _natural(text: str) -> tuple[Any, ...]:
    """Sort key that orders numbers in text by value (k=5 before k=10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _base_label(space: SpaceKey) -> str:
    model, variant, _ = space
    return model if variant == "frozen" else f"{model} ({_short_variant(variant)})"


def _label(space: SpaceKey, parts: Sequence[str]) -> str:
    return _base_label(space) + (f" [{' · '.join(parts)}]" if parts else "")


def _series_row(series: Series, space: SpaceKey, *, datasets: str, space_datasets: str, label_set: str,
                protocol: str) -> dict[str, Any]:
    """A row of the series table: ``datasets`` those the series' results cover, ``space_datasets`` those of
    its colour group (what the space embeds and all its results cover)."""
    return {"label": series.label, "color": series.color, "hatch": series.hatch, "model": space[0],
            "variant": space[1], "space_id": space[2], "datasets": datasets, "space_datasets": space_datasets,
            "label_set": label_set, "protocol": protocol}


def _short_variant(variant: str) -> str:
    kind, _, ident = variant.partition(":")
    return f"{kind}:{ident[:8]}" if ident else kind


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _strategy(variant: str) -> str:
    """Training strategy of a variant: ``frozen`` or the fine-tuning kind (``lora``)."""
    return "frozen" if variant == "frozen" else variant.partition(":")[0]


def _strategy_text(strategy: str) -> str:
    return {"frozen": "frozen embeddings", "lora": "LoRA fine-tuned"}.get(strategy, strategy)


# ---- datasets -------------------------------------------------------------------------------
def _section_datasets(ctx: _Context) -> Markup:
    table = ctx.table("datasets", _datasets_sql())
    columns = [("name", "Dataset", None), ("n_cells", "Cells", _int), ("labelled", "Labelled", _int),
               ("sensitive", "Sensitive", _int), ("resistant", "Resistant", _int), ("studies", "Studies", _int),
               ("samples", "Samples", _int), ("tissue", "Tissue", None), ("cancer_type", "Cancer type", None),
               ("drug_type", "Drug type", None), ("regimen", "Regimen", None)]
    labels = ctx.table("label_sets", _label_sets_sql())
    label_columns = [("dataset", "Dataset", None), ("label_set", "Label set", None), ("drug", "Drug", None),
                     ("label_key", "Label column", None), ("positive", "Sensitive value", None),
                     ("is_default", "Default", _yes), ("n_labelled", "Labelled", _int),
                     ("n_sensitive", "Sensitive", _int), ("n_resistant", "Resistant", _int)]
    body = _parts().datasets_body(_html_table(table, columns, table_id="datasets"),
                                  _html_table(labels, label_columns, table_id="label-sets"))
    return _section("datasets", "Datasets", body)


# ---- protocol -------------------------------------------------------------------------------
def _section_protocol(ctx: _Context) -> Markup:
    runs = ctx.table("eval_runs", _runs_sql(ctx.filters))
    _mark_stopped_runs(runs.frame)
    splits = ctx.table("split_schemes", _splits_sql(ctx.filters))
    in_results = ctx.st.query("SELECT DISTINCT x.scheme FROM eval_results x " + _where(ctx.filters.current())
                              + " ORDER BY x.scheme")["scheme"]
    schemes = [s for s in dict.fromkeys([*splits.frame["scheme"], *in_results]) if s in _SCHEMES]
    run_cols = [("run_id", "Run", None), ("created_at", "Started", _time), ("status", "Status", None),
                ("split_scheme", "Pooled scheme", None), ("folds", "Folds", None), ("seed", "Seed", None),
                ("label_set", "Label set", None), ("heads", "Heads", _json_list), ("scenarios", "Scenarios", _json_list),
                ("n_tasks", "Tasks", _int), ("n_done", "Fitted", _int), ("n_reused", "Reused", _int),
                ("n_skipped", "Skipped", _int), ("seconds", "Seconds", _num1)]
    split_cols = [("scenario", "Scenario", None), ("scheme", "Scheme", None), ("folds", "Folds", None),
                  ("seed", "Seed", None), ("label_sets", "Label sets", None), ("splits", "Splits", _int),
                  ("skipped_splits", "Skipped splits", _int), ("category_types", "Category types", None)]
    body = _parts().protocol_body(schemes, list(_confounded(ctx).items()), list(_one_class(ctx).items()), _metric_caveats(),
                                  _html_table(splits, split_cols, table_id="split-schemes"),
                                  _html_table(runs, run_cols, table_id="eval-runs"))
    return _section("protocol", "Evaluation protocol", body)


def _confounded(ctx: _Context) -> dict[str, str]:
    """The studies whose labels are constant within each of their samples (cell-level folds can leak them)."""
    from scdm.store.splits import confounded_studies

    cells = ctx.st.cells()
    return dict(confounded_studies(cells[cells["response"].notna()]))


def _one_class(ctx: _Context) -> dict[str, str]:
    """Studies whose labelled cells are all one class in a pooled split of the results that holds
    other studies too, and one-class datasets of mixed studies (a head can score them by recognising
    the study or the dataset)."""
    from scdm.store.splits import pooled_one_class_studies

    used = ctx.st.query(f"SELECT DISTINCT x.split_id FROM eval_results x {_where(ctx.filters.current())}")
    return pooled_one_class_studies(ctx.st, list(used["split_id"]))


def _metric_caveats() -> list[str]:
    """Where metrics can mislead (the same notes `scdm results` prints)."""
    from scdm.classify.results import NOTES

    return [NOTES["ami"], NOTES["shuffled-label"], NOTES["single_class"], NOTES["no_scores"],
            NOTES["transductive-baseline"], NOTES["transductive-dann"]]


# ---- summary --------------------------------------------------------------------------------
def _section_summary(ctx: _Context, board: pd.DataFrame) -> Markup:
    table = ctx.table("leaderboard_all", _leaderboard_sql(ctx.filters, ctx.metrics, category_type="all"))
    parts = []
    if table.frame.empty:
        parts.append(_parts().no_overall_result())
    else:
        parts.append(_leaderboard_html(ctx, table, table_id="lb-all", first=("scenario", "Scenario")))
    comparable, not_drawn = _comparable_only(board[board["category_type"] == "all"])
    overall, picked = _one_result_per_point(comparable, ["series", "scenario", "head_label", "metric"])
    if overall.empty and not_drawn:
        parts.append(_parts().nothing_drawn("overall performance", not_drawn))
    if not overall.empty:
        scenarios = [s for s in _SCENARIO_ORDER if s in set(overall["scenario"])]
        heads = sorted(overall["head_label"].unique())
        frame = overall.rename(columns={"head": "head_name"}).rename(columns={"head_label": "head"})
        fig = _plots.bars_figure(frame, ctx.series(overall), scenarios=scenarios, metrics=ctx.plot_metrics,
                                 heads=heads, title="Overall performance (all cells)")
        caption = _parts().overview_caption(_metric_names(ctx.plot_metrics), _several_series(overall), picked,
                                            _n_text(overall, "bar"), not_drawn)
        parts.append(_figure_html(ctx.save(fig, "overview_bars", caption)))
    parts.append(_series_table(ctx))
    return _section("leaderboard", "Leaderboard: all cells", Markup("").join(parts))


def _n_text(frame: pd.DataFrame, what: str) -> str:
    """How many folds each drawn mean is over, per scenario: ``3 folds (pooled); 4 to 15 held-out studies (cross)``.

    A mean over 4 held-out studies looks as sure as one over 15 in a bar or radar: the caption says
    which. ``n`` counts the folds where the metric is defined (a one-class test fold has none).
    """
    parts = []
    for scenario in [s for s in _SCENARIO_ORDER if s in set(frame["scenario"])]:
        n = frame.loc[frame["scenario"] == scenario, "n"].dropna().astype(int)
        n = n[n > 0]  # a mean undefined on every fold (no score: AUROC of hard labels) is not drawn
        if n.empty:
            continue
        one, many = ("held-out study", "held-out studies") if scenario == "cross" else ("fold", "folds")
        lo, hi = int(n.min()), int(n.max())
        count = f"{lo} {one if lo == 1 else many}" if lo == hi else f"{lo} to {hi} {many}"
        parts.append(f"{count} ({scenario})")
    if not parts:
        return ""
    one_fold = "; a mean over one fold has no error bar" if (frame["n"] == 1).any() else ""
    return f"n per {what}: " + "; ".join(parts) + one_fold + " (each result's n is in the tables)."


def _several_series(frame: pd.DataFrame) -> bool:
    """Whether some space in ``frame`` is drawn as several series (label sets or split protocols): the caption says so."""
    keys = set(frame["key"])
    spaces = pd.Series([k[:3] for k in keys]).value_counts()
    return bool((spaces > 1).any())


def _comparable_only(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Leave out of a figure the results the leaderboards mark as not comparable; name them.

    A result missing folds (an interrupted run: a mean over the folds it finished) or scored on the
    test cells a prompting model answered (not the cells the others were scored on) is a marked row
    of the tables, never "best". Drawn, its bar, radar point or box would stand beside the others as
    one of them, so the figures leave it out and their caption names it.
    """
    if frame.empty:
        return frame, []
    unanswered = frame["unanswered"].fillna(0)
    keep = frame["complete"].astype(bool) & unanswered.eq(0)
    notes = []
    for r in frame[~keep].drop_duplicates(["series", "head_label", "scenario", "category", "split_id"]).to_dict("records"):
        why = []
        if not bool(r["complete"]):
            why.append(f"{int(r['folds_done'])} of {int(r['folds_expected'])} folds (incomplete)")
        if not _missing(r["unanswered"]) and r["unanswered"] > 0:
            asked = int(r["unanswered"]) + (0 if _missing(r["n_test"]) else int(r["n_test"]))
            why.append(f"{int(r['unanswered'])} of {asked} test cells unanswered")
        where = r["scenario"] if r["category"] == "all" else f"{r['scenario']}, {r['category']}"
        notes.append(f"{r['series']}, head {r['head_label']} ({where}): {'; '.join(why)}")
    return frame[keep].reset_index(drop=True), list(dict.fromkeys(notes))


def _one_result_per_point(frame: pd.DataFrame, point: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Keep one result per figure point; name the ones left out.

    A point (series, scenario, category, head, metric) has one result unless its space, label set
    and split protocol were evaluated on several dataset collections (e.g. category ``all`` before
    and after a dataset joined the space). Then the result covering the most datasets is drawn,
    never an average of them, and the caption says so (the tables show all of them).
    """
    if frame.empty:
        return frame, []
    f = frame.assign(_datasets=frame["datasets"].astype(object).where(frame["datasets"].notna(), ""))
    f["_n"] = [len([d for d in str(x).split(",") if d]) for x in f["_datasets"]]
    f["_split"] = f["split_id"].astype(str)
    ranked = f.sort_values(["_n", "_datasets", "_split"], ascending=[False, True, True], kind="stable")
    chosen = ranked.drop_duplicates(list(point))[[*point, "_datasets", "_split"]].assign(_keep=True)
    merged = f.merge(chosen, on=[*point, "_datasets", "_split"], how="left")
    kept = merged[merged["_keep"].eq(True)]
    dropped = merged[~merged["_keep"].eq(True)]
    notes = []
    for (series, category), group in dropped.groupby(["series", "category"], sort=True):
        drawn = kept[(kept["series"] == series) & (kept["category"] == category)]["_datasets"].iloc[0]
        other = ", ".join(sorted(set(group["_datasets"])))
        notes.append(f"{series} on {category}: drawn on datasets {drawn}; not drawn: {other}")
    return kept.drop(columns=["_datasets", "_n", "_split", "_keep"]).reset_index(drop=True), notes


def _series_table(ctx: _Context) -> Markup:
    """The legend of every figure: each series with its colour and what it is."""
    return _parts().series_table(ctx.series_rows) if ctx.series_rows else Markup("")


# ---- radars ---------------------------------------------------------------------------------
def _section_radars(ctx: _Context, board: pd.DataFrame) -> Markup:
    frame = _drop_baseline_heads(board[board["category_type"].isin(_RADAR_TYPES)]).copy()
    if frame.empty:
        return _section("categories", "Performance across categories", _parts().no_category_result())
    frame["strategy"] = frame["variant"].map(_strategy)
    parts = [_parts().radars_intro(_metric_names(ctx.plot_metrics))]
    for scenario in [s for s in _SCENARIO_ORDER if s in set(frame["scenario"])]:
        for strategy in sorted(frame.loc[frame["scenario"] == scenario, "strategy"].unique(), key=lambda s: s != "frozen"):
            sub = frame[(frame["scenario"] == scenario) & (frame["strategy"] == strategy)]
            for head in sorted(sub["head_label"].unique()):
                comparable, not_drawn = _comparable_only(sub[sub["head_label"] == head])
                panel, picked = _one_result_per_point(comparable, ["series", "category_type", "category", "metric"])
                if panel.empty:
                    parts.append(_parts().nothing_drawn(f"{scenario} · {_strategy_text(strategy)} · head {head}",
                                                        not_drawn))
                    continue
                types = [t for t in _RADAR_TYPES if t in set(panel["category_type"])]
                title = f"{scenario} · {_strategy_text(strategy)} · head {head}"
                fig, fallbacks = _plots.radar_figure(panel, ctx.series(panel), metrics=ctx.plot_metrics,
                                                     category_types=types, title=title, over=_plots.over_what(scenario))
                caption = _parts().radar_caption(scenario, _strategy_text(strategy), head, _metric_names(ctx.plot_metrics),
                                                 list(fallbacks), _several_series(panel), picked,
                                                 _n_text(panel, "point"), not_drawn)
                parts.append(_figure_html(ctx.save(fig, f"radar_{scenario}_{strategy}_{head}", caption)))
    parts.append(_sql_html(_figure_data_sql(ctx.filters, ctx.plot_metrics), "Data of these figures"))
    return _section("categories", "Performance across categories", Markup("").join(parts))


def _drop_baseline_heads(frame: pd.DataFrame) -> pd.DataFrame:
    """Leave out reference heads (majority class, shuffled labels) when a real head is there."""
    real = ~frame["head"].isin(_BASELINE_HEADS)
    return frame[real] if real.any() else frame


# ---- per-fold F1 across cancer types --------------------------------------------------------
def _section_folds(ctx: _Context) -> Markup:
    metric = "f1"
    sql = _fold_values_sql(ctx.filters, metric, "cancer_type")
    folds = ctx.st.sql(sql)
    if folds.empty:
        return Markup("")
    folds = _drop_baseline_heads(ctx.with_labels(folds))
    parts = []
    for scenario in [s for s in _SCENARIO_ORDER if s in set(folds["scenario"])]:
        comparable, not_drawn = _comparable_only(folds[folds["scenario"] == scenario])
        sub, picked = _one_result_per_point(comparable, ["series", "category", "head_label"])
        unit = "held-out study" if scenario == "cross" else "fold"
        if sub.empty:
            parts.append(_parts().nothing_drawn(f"{scenario}: F1 per {unit} across cancer types", not_drawn))
            continue
        sub = sub.rename(columns={"head": "head_name"}).rename(columns={"head_label": "head"})
        heads = sorted(sub["head"].unique())
        fig = _plots.folds_figure(sub, ctx.series(sub), heads=heads, metric=metric,
                                  title=f"{scenario}: F1 per {unit} across cancer types", unit=unit)
        n_null = int(sub["value"].isna().sum())
        caption = _parts().folds_caption(scenario, unit, n_null, _several_series(sub), picked, not_drawn)
        parts.append(_figure_html(ctx.save(fig, f"f1_by_cancer_type_{scenario}", caption)))
    parts.append(_sql_html(sql, "Data of these figures"))
    units = dict.fromkeys("held-out study" if s == "cross" else "fold" for s in _SCENARIO_ORDER if s in set(folds["scenario"]))
    return _section("folds", f"F1 per {' and per '.join(units)} across cancer types", Markup("").join(parts))


# ---- leaderboards per category type ---------------------------------------------------------
def _section_leaderboards(ctx: _Context) -> Markup:
    combos = ctx.st.query("SELECT DISTINCT x.scenario, x.category_type FROM eval_results x "
                          + _where(ctx.filters.current()))
    parts = [_parts().leaderboards_intro()]
    order = {s: i for i, s in enumerate(_SCENARIO_ORDER)}
    ct_order = {c: i for i, c in enumerate(_CATEGORY_ORDER)}
    combos = combos.assign(o1=combos["scenario"].map(order).fillna(9), o2=combos["category_type"].map(ct_order).fillna(9))
    for _, row in combos.sort_values(["o1", "o2"]).iterrows():
        scenario, ct = str(row["scenario"]), str(row["category_type"])
        if ct == "all":
            continue  # shown at the top
        table = ctx.table(f"leaderboard_{scenario}_{ct}",
                          _leaderboard_sql(ctx.filters, ctx.metrics, scenario=scenario, category_type=ct))
        if table.frame.empty:
            continue
        label = f"{scenario} · {CATEGORY_LABELS.get(ct, ct).lower()}"
        n_cat = table.frame["category"].nunique()
        board = _leaderboard_html(ctx, table, table_id=f"lb-{scenario}-{ct}",
                                  first=("category", CATEGORY_LABELS.get(ct, ct)))
        parts.append(_parts().leaderboard_group(label, n_cat, board))
    return _section("tables", "Leaderboard tables per category", Markup("").join(parts))


def _leaderboard_html(ctx: _Context, table: _Table, *, table_id: str, first: tuple[str, str]) -> Markup:
    frame = ctx.with_labels(table.frame)
    metrics = ctx.metrics
    group_col = first[0]
    # "best" only means something against another model on the same cells, labels and folds: an
    # incomplete result (a mean over the folds an interrupted run finished) or one scored on the cells a
    # prompting model happened to answer is neither best nor compared
    frame["comparable"] = frame["complete"].astype(bool) & frame["unanswered"].fillna(0).eq(0)
    best: dict[tuple[Any, ...], dict[str, float]] = {}
    for keys, group in frame[frame["comparable"]].groupby([group_col, "split_id", "head_label"], dropna=False):
        if len(group) > 1:
            best[keys] = {m: group[f"{m}_mean"].max() for m in metrics}
    headers = [first[1], "Datasets", "Label set", "Split", "Model", "Head", "Folds",
               *[METRIC_LABELS.get(m, m) for m in metrics], "Test cells"]
    # two results differing only by their split (paired folds, or another partition of the same protocol) are named
    frame["split_text"] = [_protocol_text(r["scheme"], r["k"], r["seed"]) for _, r in frame.iterrows()]
    # the space, not its series label: a series label can name the split (paired folds) and hide the likeness
    shown = [group_col, "datasets", "label_set", "split_text", "model", "variant", "space_id", "head_label"]
    folds_from = {str(i): str(f) for i, f in zip(frame["split_id"], frame["folds_from"]) if not _missing(f)}
    labels = split_labels(frame, shown, folds_from=folds_from)
    frame["split_text"] = [t + (f" · {lab}" if lab else "") for t, lab in zip(frame["split_text"], labels)]
    rows = []
    for _, r in frame.iterrows():
        done = int(r["folds_done"])
        expected = None if _missing(r["folds_expected"]) else int(r["folds_expected"])
        complete = bool(r["complete"])
        attrs = {"scenario": r["scenario"], "category-type": r["category_type"], "category": r["category"],
                 "model": r["model"], "variant": r["variant"], "space": r["space_id"], "head": r["head"],
                 "head-params": r["head_params"], "datasets": _text(r["datasets"]), "label-set": _text(r["label_set"]),
                 "split": r["split_id"], "scheme": r["scheme"], "k": _text(r["k"], integer=True),
                 "seed": _text(r["seed"], integer=True), "folds-done": done,
                 "folds-expected": "" if expected is None else expected, "complete": str(complete).lower()}
        note = _text(r.get("note"))  # an older gene table's space: marked beside the model, as scdm ls and results do
        cells = [str(r[group_col]), _text(r["datasets"]).replace(",", ", "), _text(r["label_set"]),
                 r["split_text"], r["series"] + (f" ({note})" if note else ""), r["head_label"]]
        best_here = best.get((r[group_col], r["split_id"], r["head_label"]), {})
        metric_cells = []
        for m in metrics:
            mean, sd, n = r[f"{m}_mean"], r[f"{m}_sd"], int(r[f"{m}_n"])
            metric_cells.append({"name": m, "text": _mean_sd(mean, sd), "n": n, "partial": bool(pd.notna(mean) and n < done),
                                 "best": bool(r["comparable"]) and _is_best(mean, best_here.get(m))})
        rows.append({"attrs": [(k, str(v)) for k, v in attrs.items()], "cells": cells, "complete": complete,
                     "folds": f"{done}/{expected}" if expected is not None else str(done), "metrics": metric_cells,
                     "n_test": _int(r["n_test"])})
    scheme = ", ".join(sorted(frame["scheme"].astype(str).unique()))
    n_incomplete = int((~frame["complete"].astype(bool)).sum())
    # a skipped fold is no task: such a row reads complete (2/2) while its mean covers 2 of its k=3 held-out
    # studies, so say so under the table, as `scdm results` and the page do (NOTES["skipped_folds"])
    skipped = NOTES["skipped_folds"] if has_skipped_folds(frame) else ""
    return _parts().leaderboard(table_id, headers, rows, scheme, n_incomplete, table.sql, table.slug, skipped)


def _is_best(mean: Any, best: float | None) -> bool:
    """Whether ``mean`` ties the best mean of its group.

    avg() sums the fold values in row order, so two results with the same fold values (a majority
    head on two embeddings) or the same values in another order can differ in the last bits of
    their means: a tie within float rounding is a tie, and every result of it is best.
    """
    if _missing(mean) or best is None or _missing(best):
        return False
    return math.isclose(float(mean), float(best), rel_tol=1e-9, abs_tol=1e-12)


def _text(value: Any, *, integer: bool = False) -> str:
    if _missing(value):
        return ""
    return str(int(value)) if integer else str(value)


# ---- projections ----------------------------------------------------------------------------
@dataclass
class _ProjectionInput:
    """One embedding space's subsample for its 2-D projection, and the coordinates once computed."""

    group: pd.DataFrame
    label: str
    total: int
    X: np.ndarray
    cells: pd.DataFrame
    result: tuple[np.ndarray, str, str] | None = None
    """The coordinates, axis name and how (:func:`scdm.classify._plots.project`), once computed."""


@dataclass
class _Projections:
    """The projections of the report, prepared before the other sections.

    UMAP (numba compilation included) is the slowest part of the report: where there are two or
    more CPUs, the projections run in a worker process (``python -c``: nothing of the caller's
    script is imported again) while this process draws the other figures and tables. The worker
    runs the same function on the same arrays with the same seed, so the coordinates are the same
    as in this process; if it fails, they are computed here.
    """

    method: str
    inputs: list[_ProjectionInput | None]
    """One per space (None for a space with no cell to draw)."""
    colors: dict[str, dict[str, str]]
    seed: int
    no_umap: bool
    """UMAP was asked for by ``auto`` but umap-learn is not installed (the page says so)."""
    worker: Any = None
    """The worker process (subprocess.Popen), until its results are read."""
    folder: Path | None = None
    """Where the worker reads ``<i>.npy`` and writes ``<i>.coords.npy`` and ``<i>.json``."""

    def start(self, items: list[tuple[int, _ProjectionInput]]) -> None:
        import subprocess
        import tempfile

        import scdm

        self.folder = Path(tempfile.mkdtemp(prefix="scdm-report-"))
        for i, item in items:
            np.save(self.folder / f"{i}.npy", item.X, allow_pickle=False)
        root = str(Path(scdm.__file__).resolve().parents[1])  # the worker imports this scdm, wherever it is from
        # it imports only the plotting helpers (not this module: seconds of imports saved); it runs in the
        # temporary folder, so nothing in the caller's working directory can shadow a module
        code = ("import sys; sys.path.insert(0, sys.argv[1]) if sys.argv[1] not in sys.path else None; "
                "from scdm.classify._plots import project_folder; "
                "project_folder(sys.argv[2], sys.argv[3], int(sys.argv[4]), [int(i) for i in sys.argv[5:]])")
        try:
            with open(self.folder / "stderr.txt", "wb") as stderr:  # a file, not a pipe: the worker never blocks on it
                self.worker = subprocess.Popen([sys.executable, "-c", code, root, str(self.folder), self.method,
                                                str(self.seed), *(str(i) for i, _ in items)], cwd=self.folder,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        except OSError as err:  # no process can be started here: project in this process
            logger.info("report: projections in this process (%s)", err)
            self.close()

    def coordinates(self, index: int) -> tuple[np.ndarray, str, str]:
        """The coordinates of input ``index``: from the worker where it projected them, else computed here."""
        item = self.inputs[index]
        assert item is not None
        if self.worker is not None and self.folder is not None:
            if self.worker.wait() != 0:
                err = (self.folder / "stderr.txt").read_text(errors="replace")[-2000:]
                logger.warning("report: the projection worker failed (exit %s); projecting here. %s",
                               self.worker.returncode, err)
            self.worker = None
        if item.result is None and self.folder is not None and (self.folder / f"{index}.json").exists():
            axis_name, how = json.loads((self.folder / f"{index}.json").read_text())
            item.result = (np.load(self.folder / f"{index}.coords.npy", allow_pickle=False), axis_name, how)
        if item.result is None:
            item.result = _plots.project(item.X, method=self.method, seed=self.seed)
        return item.result

    def close(self) -> None:
        import shutil

        if self.worker is not None:
            self.worker.kill()
            self.worker.wait()
            self.worker = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _prepare_projections(ctx: _Context, *, projection: Projection, max_cells: int, seed: int) -> _Projections | None:
    """Read the subsample of every embedding space and start projecting them (in a worker where possible)."""
    if projection == "none":
        return None
    spaces = ctx.st.query(
        "SELECT e.space_id, e.model, e.variant, e.embedding_id, e.dataset_id, d.name AS dataset_name, e.n_cells, e.dim "
        "FROM embeddings e JOIN datasets d USING (dataset_id) "
        "WHERE e.status = 'complete'" + ("" if ctx.filters.models is None else " AND list_contains(?, e.model)")
        + " ORDER BY e.model, e.variant, e.space_id, d.name",
        None if ctx.filters.models is None else [list(ctx.filters.models)])
    if spaces.empty:
        return None
    method = "umap" if projection in ("auto", "umap") and _umap_available() else "pca"
    categories = ctx.st.query("SELECT DISTINCT cancer_type, study FROM cells")
    colors = {"response_text": _plots.RESPONSE_COLORS, "cancer_type": _plots.category_colors(categories["cancer_type"].dropna()),
              "study": _plots.category_colors(categories["study"].dropna())}
    cells_of: dict[str, pd.DataFrame] = {}
    inputs = []
    for _, group in spaces.groupby("space_id", sort=False):
        # One embedding per dataset in a space (the newest if a dataset has several).
        inputs.append(_projection_input(ctx, group.drop_duplicates("dataset_id", keep="last"), max_cells=max_cells,
                                        seed=seed, cells_of=cells_of))
    out = _Projections(method, inputs, colors, seed=seed, no_umap=projection == "auto" and method == "pca")
    todo = [(i, item) for i, item in enumerate(inputs) if item is not None and np.isfinite(item.X).all()]
    if method == "umap" and any(len(item.X) >= 30 for _, item in todo) and _cpus() > 1:
        out.start(todo)
    return out


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _projection_input(ctx: _Context, group: pd.DataFrame, *, max_cells: int, seed: int,
                      cells_of: dict[str, pd.DataFrame]) -> _ProjectionInput | None:
    first = group.iloc[0]
    raw = (str(first["model"]), str(first["variant"]), str(first["space_id"]))
    series = ctx.spaces.get(ctx.raw_space.get(raw, raw))
    label = series.label if series else str(first["model"])
    sizes = group["n_cells"].to_numpy(np.int64)
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=max_cells, replace=False)) if total > max_cells else np.arange(total)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    blocks, frames = [], []
    for i, row in enumerate(group.itertuples()):
        rows = picked[(picked >= offsets[i]) & (picked < offsets[i + 1])] - offsets[i]
        if rows.size == 0:
            continue
        blocks.append(ctx.st.read_embedding(row.embedding_id, rows=rows))
        if row.dataset_name not in cells_of:  # one read per dataset, however many spaces embed it
            cells_of[row.dataset_name] = ctx.st.cells([row.dataset_name]).set_index("row")
        frames.append(cells_of[row.dataset_name].loc[rows].reset_index())
    if not blocks:
        return None
    cells = pd.concat(frames, ignore_index=True)
    cells["response_text"] = cells["response"].map({1: "sensitive", 0: "resistant"}).astype(object)
    cells.loc[cells["response"].isna(), "response_text"] = None
    return _ProjectionInput(group, label, total, np.vstack(blocks).astype(np.float32), cells)


def _section_projections(ctx: _Context, projections: _Projections | None) -> Markup:
    if projections is None:
        return Markup("")
    parts = []
    if projections.no_umap:
        parts.append(_parts().no_umap())
    for index, item in enumerate(projections.inputs):
        if item is not None:
            parts.append(_projection_figure(ctx, index, projections))
    name = "UMAP" if projections.method == "umap" else "PCA"
    return _section("projections", "Embeddings", _parts().projections_intro(name) + Markup("").join(parts))


def _projection_figure(ctx: _Context, index: int, projections: _Projections) -> Markup:
    item = projections.inputs[index]
    assert item is not None
    first, X, cells, label = item.group.iloc[0], item.X, item.cells, item.label
    if not np.isfinite(X).all():
        return _parts().not_finite(label)
    logger.info("report: %s projection of %d cells of %s (%d dims)", projections.method.upper(), len(X), label, X.shape[1])
    coords, axis_name, how = projections.coordinates(index)
    datasets = ", ".join(item.group["dataset_name"])
    # the colours are each dataset's default label set; another label set of the same cells can say the opposite
    label_sets = _response_label_sets(cells)
    response_title = f"response ({label_sets[0][1]})" if len({ls for _, ls in label_sets}) == 1 else "response"
    fig = _plots.projection_figure(coords, cells, panels=[("response_text", response_title),
                                                          ("cancer_type", "cancer type"), ("study", "study")],
                                   colors=projections.colors, title=f"{label} ({X.shape[1]} dims; {datasets})",
                                   axis_name=axis_name)
    subsample = (f"{len(X):,} of {item.total:,} cells (uniform random subsample, seed {projections.seed})"
                 if item.total > len(X) else f"all {item.total:,} cells")
    unknown = bool(cells["response"].isna().any() or cells["cancer_type"].isna().any() or cells["study"].isna().any())
    caption = _parts().projection_caption(label, str(first["space_id"]), datasets, how, subsample, unknown,
                                          label_sets, _other_label_sets(ctx, item))
    stem = f"projection_{first['model']}_{_strategy(str(first['variant']))}_{str(first['space_id'])[:8]}"
    return _figure_html(ctx.save(fig, stem, caption))


def _response_label_sets(cells: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, label set) whose labels colour the response panel: each dataset's default (cells.response)."""
    if "label_set" not in cells.columns:
        return []
    pairs = cells[["dataset_id", "label_set"]].drop_duplicates()
    pairs = pairs[pairs["label_set"].notna()]
    return [(str(d), str(ls)) for d, ls in zip(pairs["dataset_id"], pairs["label_set"])]


def _other_label_sets(ctx: _Context, item: _ProjectionInput) -> list[str]:
    """Label sets of the projected datasets, other than the default, that results of this report use."""
    ids = [str(d) for d in item.group["dataset_id"]]
    frame = ctx.st.query(
        "SELECT DISTINCT l.name FROM label_sets l WHERE list_contains(?, l.dataset_id) AND NOT l.is_default "
        "AND l.name IN (SELECT DISTINCT x.label_set FROM eval_results x " + _where(ctx.filters.current()) + ") "
        "ORDER BY l.name", [ids])
    return [str(n) for n in frame["name"]]


# ---- scalability ----------------------------------------------------------------------------
def _section_scalability(ctx: _Context) -> Markup:
    embed = ctx.table("scalability_embed", _embed_cost_sql(ctx.filters))
    fit = ctx.table("scalability_fit", _fit_cost_sql(ctx.filters))
    if embed.frame.empty and fit.frame.empty:
        return Markup("")
    e = ctx.with_space_labels(embed.frame)
    f = ctx.with_labels(fit.frame) if not fit.frame.empty else fit.frame
    embed_series = [ctx.spaces[k] for k in ctx.spaces if k in set(e["key"])]
    parts = []
    if not e.empty:
        parts += [_embed_cost_table(e, embed_series), _sql_html(embed.sql, "SQL (embedding cost)", csv=embed.slug)]
    if not f.empty:
        parts += [_fit_cost_table(f), _sql_html(fit.sql, "SQL (head fit time)", csv=fit.slug)]
    has_embed = bool(e["cells_per_s"].notna().any()) if not e.empty else False
    # the figure shows one scenario, so that no bar averages fit times of different splits
    scenario = next((s for s in _SCENARIO_ORDER if not f.empty and s in set(f["scenario"])), None)
    shown = _one_collection_per_bar(f[f["scenario"] == scenario] if scenario is not None else f)
    has_fit = bool(shown["fit_s"].notna().any()) if not shown.empty else False
    if has_embed or has_fit:
        fit_plot = (shown.drop(columns="head").rename(columns={"head_label": "head"})[["series", "head", "fit_s"]]
                    if not shown.empty else pd.DataFrame(columns=["series", "head", "fit_s"]))
        fig = _plots.scalability_figure(e[["series", "cells_per_s"]], fit_plot, embed_series,
                                        ctx.series(shown) if not shown.empty else [], title="Computational cost")
        panels = [p for p, on in (("embedding throughput per embedding space (cells/s; the device is in the table)",
                                   has_embed),
                                  (f"mean head fit time per task of the {scenario} scenario on each series' largest "
                                   "dataset collection (its categories together; the table has every collection and "
                                   "scenario)", has_fit)) if on]
        caption = _parts().scalability_caption(panels)
        parts.append(_figure_html(ctx.save(fig, "scalability", caption)))
    return _section("scalability", "Computational scalability", Markup("").join(parts))


def _one_collection_per_bar(fit: pd.DataFrame) -> pd.DataFrame:
    """One fit-time row per (series, head) for the figure: its largest dataset collection.

    The table has a row per collection (a category's split holds some datasets only; a space may have
    been evaluated on several collections); a bar is one of them, the one covering the most datasets,
    never an average of them.
    """
    if fit.empty:
        return fit
    f = fit.assign(_datasets=fit["datasets"].astype(object).where(fit["datasets"].notna(), ""))
    f["_n"] = [len([d for d in str(x).split(",") if d]) for x in f["_datasets"]]
    ranked = f.sort_values(["_n", "_datasets"], ascending=[False, True], kind="stable")
    return ranked[~ranked.duplicated(["series", "head_label"])].sort_index().drop(columns=["_datasets", "_n"])


def _checkpoint(row: dict[str, Any]) -> str:
    """Where a space's checkpoint came from and the start of its content hash; empty for a baseline."""
    digest = row.get("checkpoint_hash")
    if not isinstance(digest, str) or not digest:
        return ""
    source = row.get("checkpoint")
    return f"{source} (hash {digest[:12]})" if isinstance(source, str) and source else f"hash {digest[:12]}"


def _embed_cost_table(e: pd.DataFrame, series: list[Series]) -> Markup:
    """One row per embedding space: the telemetry of its embeddings."""
    header = ["Model", "Datasets", "Parameters", "Output dim", "Cells embedded", "Embed cells/s", "Device",
              "Precision", "Peak GPU GiB", "Checkpoint"]
    numeric = [False, False, True, True, True, True, False, False, True, False]
    by_key = dict(zip(e["key"], e.to_dict("records")))
    rows = []
    for s in series:
        r = by_key[s.key]
        cells = [s.label, r.get("datasets") or "", _params(r.get("n_parameters")), r.get("dim") or "",
                 _int(r.get("cells_embedded")), _num1(r.get("cells_per_s")), r.get("device") or "",
                 r.get("precision") or "", _num2(r.get("peak_gpu_gib")), _checkpoint(r)]
        rows.append(([("space", s.key[2]), ("model", s.key[0])], list(zip(numeric, map(str, cells)))))
    return _parts().embed_cost_table(header, rows)


def _fit_cost_table(f: pd.DataFrame) -> Markup:
    """One row per space, label set, scenario, split protocol, head and dataset collection: mean fit time per task
    (the categories of that collection together, named)."""
    header = ["Series", "Datasets", "Label set", "Scenario", "Split", "Head", "Categories", "Tasks", "Train cells",
              "Fit s/task"]
    numeric = [False, False, False, False, False, False, False, True, True, True]
    rows: list[tuple[list[tuple[str, str]], list[tuple[bool, str]]]] = []
    for r in f.to_dict("records"):
        cells = [r["series"], _text(r["datasets"]).replace(",", ", "), _text(r["label_set"]), r["scenario"],
                 _protocol_text(r["scheme"], r["k"], r["seed"], r.get("folds_from")), r["head_label"],
                 _text(r["categories"]), _int(r["tasks"]), _int(r["n_train"]), _seconds(r["fit_s"])]
        rows.append(([], list(zip(numeric, map(str, cells)))))
    return _parts().fit_cost_table(header, rows)


# ---- skipped ----------------------------------------------------------------------------------
def _section_skipped(ctx: _Context) -> Markup:
    table = ctx.table("skipped_tasks", _skipped_sql(ctx.filters))
    if table.frame.empty:
        body = _parts().no_skipped(table.sql)
    else:
        # the split in words, as the leaderboards name it (the CSV keeps the columns of the SQL)
        split = [_protocol_text(r["scheme"], r["k"], r["seed"], r["folds_from"]) for r in table.frame.to_dict("records")]
        columns = [("scenario", "Scenario", None), ("datasets", "Datasets", None), ("label_set", "Label set", None),
                   ("split", "Split", None), ("category_type", "Category type", None),
                   ("category", "Category", None), ("fold", "Fold", _fold), ("held_out", "Held-out study", None),
                   ("reason", "Reason", None), ("spaces", "Spaces", _int), ("heads", "Heads", None)]
        shown = replace(table, frame=table.frame.assign(split=split))
        body = _parts().skipped_intro() + _html_table(shown, columns, table_id="skipped")
    return _section("skipped", "Skipped tasks", body)


def _section_sql_help() -> Markup:
    return _section("sql", "Asking your own questions", _parts().sql_help())


# --------------------------------------------------------------------------------------------
# HTML helpers: the page skeleton and its building blocks are Jinja2 templates (autoescaped) in
# scdm.classify/templates/; the functions below hand them text, or markup built from escaped parts.
# --------------------------------------------------------------------------------------------
@functools.cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("scdm.classify", "templates"), autoescape=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def _parts() -> Any:
    """The macros of ``report_parts.html`` (section, sql, figure, table, next_steps)."""
    return _templates().get_template("report_parts.html").module


_NAV = [("datasets", "Datasets"), ("protocol", "Protocol"), ("leaderboard", "Leaderboard"),
        ("categories", "Categories"), ("folds", "Per fold"), ("tables", "Tables"), ("projections", "Embeddings"),
        ("scalability", "Scalability"), ("skipped", "Skipped")]


def _page(title: str, st: Store, body: str) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = [(anchor, label) for anchor, label in _NAV if f'id="{anchor}"' in body]
    return _templates().get_template("report.html").render(
        title=title, store=str(st.root), generated=now, version=_version(), nav=nav, body=body)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


def _section(anchor: str, title: str, body: str) -> Markup:
    return _parts().section(anchor, title, body)


def _sql_html(sql: str, label: str, *, csv: str | None = None) -> Markup:
    return _parts().sql(sql, label, csv=csv)


def _figure_html(figure: _Figure) -> Markup:
    files = [{"name": p.name, "kind": p.suffix[1:].upper()} for p in figure.files]
    return _parts().figure(figure.stem, figure.caption, files)


Formatter = Callable[[Any], str] | None


def _html_table(table: _Table, columns: Sequence[tuple[str, str, Formatter]], *, table_id: str) -> Markup:
    rows = []
    for record in table.frame.to_dict("records"):
        cells = []
        for col, _, fmt in columns:
            value = record.get(col)
            text = fmt(value) if fmt is not None else ("" if _missing(value) else str(value))
            cells.append((fmt in (_int, _num1, _num2, _seconds, _fold), text))
        rows.append(cells)
    return _parts().table(table_id, [h for _, h, _ in columns], rows, table.sql, table.slug)


def _missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _mean_sd(mean: Any, sd: Any, digits: int = 3) -> str:
    if _missing(mean):
        return "n/a"
    # as scdm results prints it: 0.9996, not 1.000
    return metric_text(mean, digits) + ("" if _missing(sd) else f" ± {metric_text(sd, digits)}")


def _int(value: Any) -> str:
    return "" if _missing(value) else f"{int(value):,}"


def _num1(value: Any) -> str:
    return "" if _missing(value) else f"{float(value):,.1f}"


def _num2(value: Any) -> str:
    return "" if _missing(value) else f"{float(value):.2f}"


def _seconds(value: Any) -> str:
    if _missing(value):
        return ""
    v = float(value)
    return f"{v:.2g}" if v < 0.1 else f"{v:.2f}"


def _params(value: Any) -> str:
    if _missing(value):
        return "—"
    v = float(value)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{int(v)}"


def _yes(value: Any) -> str:
    return "" if _missing(value) else ("yes" if bool(value) else "")


def _fold(value: Any) -> str:
    return "all" if _missing(value) else str(int(value))


def _time(value: Any) -> str:
    return "" if _missing(value) else str(value)[:19]


def _json_list(value: Any) -> str:
    if _missing(value):
        return ""
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return ", ".join(map(str, parsed)) if isinstance(parsed, list) else str(parsed)


def _metric_names(metrics: Sequence[str]) -> str:
    names = [METRIC_LABELS.get(m, m) for m in metrics]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
