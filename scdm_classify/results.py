"""The leaderboard: mean +- sd of every metric per model x head x scenario x category.

Built from ``eval_results`` (long format) with one SQL aggregate, so the same numbers can be had
from any DuckDB client. NULL metric values (undefined on a fold, e.g. AUROC on a single-class
test fold) are left out of the mean and counted in ``n_null``; they are never averaged as zeros.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pandas as pd

from scdm_classify.metrics import METRICS
from store.errors import InputDataError

if TYPE_CHECKING:
    from store import Store

logger = logging.getLogger(__name__)

__all__ = ["LEADERBOARD_KEYS", "format_leaderboard", "leaderboard"]

LEADERBOARD_KEYS: tuple[str, ...] = ("model", "variant", "space_id", "head", "head_params", "scenario", "scheme",
                                     "category_type", "category")
"""Columns that identify one leaderboard row (besides the metric)."""


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
) -> pd.DataFrame:
    """Mean and standard deviation over folds, per model x head x scenario x category (long format).

    Parameters
    ----------
    store : str, path or Store
    metrics, models, heads, scenarios, category_types : iterable of str, optional
        Keep only these (default: all).
    scheme : {"cell", "sample", "study", "custom"}, optional
        Keep one split scheme (the pooled scheme must always be reported with the numbers).
    run_id : str, optional
        Only tasks fitted by this run.

    Returns
    -------
    DataFrame
        Columns :data:`LEADERBOARD_KEYS` + ``datasets`` (names pooled in the space), ``metric``,
        ``mean``, ``sd`` (sample sd over folds; NULL with one fold), ``n_folds`` (folds with a
        value), ``n_null`` (folds where the metric is undefined), ``n_test`` (test cells, all folds).
        Sorted by scenario, category type, category, metric and descending mean.
    """
    from store import open_store

    st = open_store(store)
    metric_list = list(metrics) if metrics is not None else list(METRICS)
    unknown = [m for m in metric_list if m not in METRICS]
    if unknown:
        msg = f"Unknown metric {unknown}; choose from {', '.join(METRICS)}."
        raise InputDataError(msg)
    where, args = ["list_contains(?, r.metric)"], [metric_list]
    for column, values in (("model", models), ("head", heads), ("scenario", scenarios), ("category_type", category_types)):
        if values is not None:
            where.append(f"list_contains(?, r.{column})")
            args.append(list(values))
    if scheme is not None:
        where.append("r.scheme = ?")
        args.append(scheme)
    if run_id is not None:
        where.append("r.run_id = ?")
        args.append(run_id)
    keys = ", ".join(f"r.{k}" if k != "head_params" else "t.head_params" for k in LEADERBOARD_KEYS)
    sql = f"""
        WITH spaces AS (
            SELECT e.space_id, string_agg(DISTINCT d.name, ',' ORDER BY d.name) AS datasets
            FROM embeddings e JOIN datasets d USING (dataset_id) GROUP BY e.space_id
        ),
        -- each fold's LoRA variant is a space of its own: group the folds of one tuning setting
        r AS (
            SELECT x.* REPLACE (COALESCE('lora:' || a.tuning_id, x.variant) AS variant,
                                COALESCE('lora:' || a.tuning_id, x.space_id) AS space_id),
                   s.datasets
            FROM eval_results x
            LEFT JOIN adapters a ON x.variant = 'lora:' || a.adapter_id
            LEFT JOIN spaces s ON s.space_id = x.space_id
        )
        SELECT {keys}, r.datasets, r.metric,
               avg(r.value) AS mean, stddev_samp(r.value) AS sd,
               count(r.value) AS n_folds, count(*) - count(r.value) AS n_null, sum(r.n_test) AS n_test
        FROM r
        JOIN eval_tasks t USING (task_id)
        WHERE {' AND '.join(where)}
        GROUP BY {keys}, r.datasets, r.metric
        ORDER BY r.scenario, r.category_type, r.category, r.metric, mean DESC NULLS LAST
    """
    return st.query(sql, args)


def format_leaderboard(board: pd.DataFrame, *, metrics: Iterable[str] = ("auroc", "ap", "f1", "accuracy"),
                       digits: int = 3) -> pd.DataFrame:
    """Wide, printable leaderboard: one column per metric holding ``"mean ± sd"``.

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
        One row per model x head x scenario x category; ``n/a`` where every fold is undefined.
    """
    keys = ["model", "variant", "datasets", "head", "scenario", "scheme", "category_type", "category"]
    metrics = [m for m in metrics if not board.empty and m in set(board["metric"])]
    if board.empty:
        return pd.DataFrame(columns=[*keys, "folds", *metrics])
    board = board.copy()
    board["datasets"] = board["datasets"].fillna("")
    # Two parameter settings of one head stay two rows: name the head with its parameters.
    several = board.groupby("head")["head_params"].transform("nunique") > 1
    board.loc[several, "head"] = board.loc[several, "head"] + " " + board.loc[several, "head_params"]

    def cell(row: pd.Series) -> str:
        if pd.isna(row["mean"]):
            return "n/a"
        sd = "" if pd.isna(row["sd"]) else f" ± {row['sd']:.{digits}f}"
        return f"{row['mean']:.{digits}f}{sd}"

    frame = board[board["metric"].isin(metrics)]
    frame = frame.assign(text=frame.apply(cell, axis=1))
    wide = frame.pivot_table(index=keys, columns="metric", values="text", aggfunc="first").reset_index()
    folds = frame.groupby(keys)["n_folds"].max().rename("folds").reset_index()
    wide = wide.merge(folds, on=keys)
    wide.columns.name = None
    return wide[[*keys, "folds", *metrics]]
