"""``import scdm``: the notebook API, AnnData in, AnnData and DataFrames out.

Four functions cover the everyday work; everything else is on the :class:`~scdm.store.Store`
that :func:`open_store` returns (and under ``scdm.store``, ``scdm.embedding``, ``scdm.classify``).

>>> import scdm                                                       # doctest: +SKIP
>>> scdm.embed(adata, model="pca")                 # adata.obsm["X_pca"], cached in the store
>>> scdm.embed(adata, model="geneformer", checkpoint="ctheodoris/Geneformer")
>>> sc.pp.neighbors(adata, use_rep="X_geneformer")
>>> scdm.evaluate(adata, heads=["logreg", "ridge"])   # a DataFrame: mean, sd, n per metric
>>> scdm.results()                                    # every result in the store, same columns

Every command has a Python call
-------------------------------
``st = scdm.open_store(path)``; each command makes the one call beside it (defaults are the
command's, except where noted):

==============  ===========================================================================
``ingest``      ``st.ingest(path_or_adata, name=...)``
``ls``          ``st.datasets()``, ``st.embeddings()``, ``st.label_sets()``
``sql``         ``st.query(sql)``
``export``      ``st.export_embedding(embedding_id, out)``
``rm``          ``st.remove_dataset(name)``, ``st.remove_embedding(embedding_id)``
``verify``      ``st.verify()``
``models``      ``scdm.embedding.available_models()``
``embed``       ``scdm.embed(adata, model=...)`` (an AnnData) or
                ``scdm.embedding.runner.embed(st, dataset, model, checkpoint)`` (a stored dataset)
``evaluate``    ``scdm.evaluate(...)`` (notebook defaults: pooled, ``by="all"``, 5 folds) or
                ``scdm.classify.grid.evaluate(st, ...)`` (the command's: pooled and cross, every
                category type, 10 folds)
``results``     ``scdm.results(store)``
``finetune``    ``scdm.embedding.finetune.finetune(...)``
``prompt``      ``scdm.prompt.prompt(...)``
``transfer``    ``scdm.classify.transfer.transfer(...)``
``genes``       ``scdm.classify.transfer.critical_genes(...)``
``train-head``  ``scdm.classify.trained_heads.train_head(...)``
``predict``     ``scdm.classify.trained_heads.predict(...)``
``report``      ``scdm.classify.report.write_report(...)``
``synth``       ``scdm.classify.synth.synthesize(...)``
``demo``        ``scdm.demo.run_demo(...)``
``serve``       ``scdm.server.serve(...)``
==============  ===========================================================================

A head on its own is a scikit-learn classifier: ``scdm.classify.heads.get_head("logreg")``.

Where embeddings are cached
---------------------------
In the store given as ``store=``, else ``$SCDM_STORE``, else the user cache folder
(``$XDG_CACHE_HOME/scdm/store``, by default ``~/.cache/scdm/store``; ``%LOCALAPPDATA%\\scdm\\store``
on Windows). The command line's default is ``./scdm-store`` instead (next to the files a job
works on); pass ``store=`` or set ``SCDM_STORE`` to share one store between both.

An AnnData is stored by content: embedding it again (even a copy, in another session) finds the
stored dataset and embedding and only reads them back. An in-memory AnnData without ``name=`` is
named ``dataset-<8 hex digits of its content hash>``, so two of them never collide.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdm.store import Store
from scdm.store.errors import InputDataError, ScdmWarning
from scdm.store.progress import plain_warnings

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

__all__ = ["default_store_path", "embed", "evaluate", "open_store", "results"]

logger = logging.getLogger("scdm.api")

BASELINES = ("pca", "hvg")
"""Models computed on the CPU from the data alone (no checkpoint)."""
UNS_KEY = "scdm"
"""``adata.uns[UNS_KEY][obsm key]`` records which stored embedding an ``obsm`` matrix is."""


def default_store_path() -> Path:
    """The notebook API's store: ``$SCDM_STORE``, else the user cache folder (see the module docstring)."""
    if os.environ.get("SCDM_STORE"):
        return Path(os.environ["SCDM_STORE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "scdm" / "store"


def open_store(path: str | os.PathLike[str] | Store | None = None, *, read_only: bool | None = None) -> Store:
    """The store at ``path`` (default: :func:`default_store_path`), created if missing.

    Parameters
    ----------
    path : str, path or Store, optional
        Store directory; a :class:`~scdm.store.Store` is returned as it is.
    read_only : bool, optional
        Open read-only (detected automatically when the directory is not writable).

    Returns
    -------
    Store
    """
    if isinstance(path, Store):
        return path
    return Store(default_store_path() if path is None else path, read_only=read_only)


def embed(
    adata: ad.AnnData,
    model: str = "pca",
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    store: str | os.PathLike[str] | Store | None = None,
    key_added: str | None = None,
    name: str | None = None,
    ingest: Mapping[str, Any] | None = None,
    progress: bool = True,
    **params: Any,
) -> np.ndarray:
    """Embed every cell of ``adata`` with ``model``; the matrix goes to ``adata.obsm`` and the store.

    Parameters
    ----------
    adata : AnnData
        Cells × genes, raw counts for the foundation models (``X``; gene ids in ``var_names`` or
        the ``var`` column named by ``ingest={"gene_key": ...}``).
    model : str, default "pca"
        ``pca`` or ``hvg`` (no checkpoint), or a foundation model (``scdm models`` lists them).
    checkpoint : str or path, optional
        The model's checkpoint: a local folder in its official format, or a Hugging Face Hub id
        (``org/name`` or ``org/name@revision``). A local folder of that name wins.
    store : str, path or Store, optional
        Where the embedding is cached (default: :func:`default_store_path`).
    key_added : str, optional
        ``obsm`` key; default ``X_<model>``.
    name : str, optional
        Dataset name in the store (default: ``dataset-<content hash>``).
    ingest : mapping, optional
        Ingest options, e.g. ``{"label_key": "response", "sample_key": "patient"}`` (see
        :meth:`scdm.store.Store.ingest`); labels are needed later by :func:`evaluate`.
    progress : bool, default True
        Progress bars (terminal or Jupyter).
    **params
        Model parameters (``n_comps=50`` for pca, ``batch_size``, ``device``, ``layer``, ...).

    Returns
    -------
    ndarray of float32, shape (n_cells, dim)
        Also stored as ``adata.obsm[key_added]``; ``adata.uns["scdm"][key_added]`` records the
        embedding id, store and whether it was read from the cache.
    """
    st = open_store(store)
    key = key_added or f"X_{model}"
    with plain_warnings():
        info = st.ingest(adata, name=name, **dict(ingest or {}))
        result = _embed_stored(st, info.name, model, checkpoint, progress=progress, **params)
        matrix = st.read_embedding(result.embedding_id)
    cached = result.computed_chunks == 0
    logger.info("%s embedding of %s: %s", model, info.name, "read from the store" if cached else "computed")
    adata.obsm[key] = matrix
    adata.uns.setdefault(UNS_KEY, {})[key] = {"embedding_id": result.embedding_id, "dataset": info.name,
                                              "model": model, "store": str(st.root), "cached": cached}
    return matrix


def _embed_stored(st: Store, dataset: str, model: str, checkpoint: str | os.PathLike[str] | None, *, progress: bool,
                  **params: Any) -> Any:
    if model in BASELINES:
        if checkpoint is not None:
            msg = f"{model} is computed from the data and takes no checkpoint; drop checkpoint=."
            raise InputDataError(msg)
        from scdm.embedding.runner import embed_baseline

        _check_baseline_params(model, params)
        return embed_baseline(st, [dataset], model=model, progress=progress, **params)[0]
    from scdm.embedding.runner import embed as run_embed

    return run_embed(st, dataset, model, checkpoint, progress=progress, **params)


_BASELINE_PARAMS = ("n_comps", "n_hvg", "target_sum", "normalized", "chunk_rows")


def _check_baseline_params(model: str, params: dict[str, Any]) -> None:
    _check_names(model, params, _BASELINE_PARAMS)


def _check_names(what: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hints = "; ".join(f"{u!r} (did you mean {c[0]!r}?)" if c else repr(u) for u, c in close.items())
        msg = f"{what} takes the parameters {', '.join(known)}; not {hints}."
        raise InputDataError(msg)


class ResultFilterWarning(ScdmWarning):
    """A filter of :func:`results` names values no stored result has (the frame is empty for that reason)."""


_RESULT_FILTERS = ("models", "heads", "scenarios", "category_types", "scheme", "datasets", "label_sets", "run_id")


def evaluate(
    data: ad.AnnData | Sequence[str] | None = None,
    *,
    store: str | os.PathLike[str] | Store | None = None,
    heads: Iterable[str] = ("logreg", "mlp"),
    scenarios: Iterable[str] = ("pooled",),
    by: Iterable[str] = ("all",),
    folds: int = 5,
    split_scheme: str = "auto",
    metrics: Iterable[str] = ("auroc", "ap", "f1", "accuracy"),
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """Train and score heads on stored embeddings; one numeric row per result.

    Parameters
    ----------
    data : AnnData or list of str, optional
        An AnnData that :func:`embed` filled (its recorded embeddings are evaluated; it must
        still hold the cells they were computed on, in any order: a subset made after
        :func:`embed` is refused), embedding ids, or None for every complete embedding in the store.
    store : str, path or Store, optional
        Default: the store recorded in ``adata.uns["scdm"]``, else :func:`default_store_path`.
    heads, scenarios, by, folds, split_scheme
        As in :func:`scdm.classify.grid.evaluate` (whose defaults differ: these are the notebook's).
        ``split_scheme="auto"`` groups the folds by sample when every labelled cell has a sample id
        and there are at least ``folds`` samples, else folds are at cell level (``cell``, the
        scDrugMap protocol, which can leak sample identity); every row names its ``scheme``.
    metrics : iterable of str
        Metric columns of the returned frame.
    progress : bool, default True
    **options
        Other arguments of :func:`scdm.classify.grid.evaluate` (``seed``, ``label_set``,
        ``head_params``, ``jobs``, ...).

    Returns
    -------
    DataFrame
        The results of exactly the tasks asked for (fitted now or found in the store): the
        result identity columns, then ``<metric>``, ``<metric>_sd``, ``<metric>_n`` (float, float,
        integer) per metric.
    """
    from scdm.classify.grid import evaluate as run_evaluate
    from scdm.classify.results import asked_results, leaderboard, name_list, wide_leaderboard

    ids, recorded_store = _embedding_ids(data)
    if store is None and recorded_store is None and ids is not None and hasattr(data, "uns"):
        places = "; ".join(f"{k}: {r['store']}" for k, r in dict(data.uns[UNS_KEY]).items())  # type: ignore[union-attr]
        msg = (f"This AnnData's embeddings are in several stores ({places}); evaluating reads one. Pass store= and "
               "the embedding ids in it, e.g. scdm.evaluate([adata.uns['scdm'][key]['embedding_id']], store=...), "
               "or embed them into one store (scdm.embed(..., store=same_path)).")
        raise InputDataError(msg)
    st = open_store(store if store is not None else recorded_store)
    if hasattr(data, "uns") and hasattr(data, "obs_names"):
        _check_same_cells(st, data)
    with plain_warnings():
        summary = run_evaluate(st, ids, heads=heads, scenarios=scenarios, by=by, folds=folds,  # type: ignore[arg-type]
                               split_scheme=split_scheme, silent=not progress, **options)  # type: ignore[arg-type]
    metric_list = name_list(metrics)
    board = asked_results(leaderboard(st, metrics=metric_list), summary.results, st)
    return wide_leaderboard(board, metrics=metric_list)


def _embedding_ids(data: ad.AnnData | Sequence[str] | None) -> tuple[list[str] | None, str | None]:
    """Embedding ids (and the store they are in) from an AnnData that :func:`embed` filled, or ids as given."""
    if data is None:
        return None, None
    if isinstance(data, str):
        return [data], None
    if hasattr(data, "uns") and hasattr(data, "obsm"):
        recorded = dict(data.uns.get(UNS_KEY, {}))
        if not recorded:
            msg = "This AnnData has no scdm embeddings yet; run scdm.embed(adata, model=...) first."
            raise InputDataError(msg)
        stores = {r["store"] for r in recorded.values()}
        return [r["embedding_id"] for r in recorded.values()], (stores.pop() if len(stores) == 1 else None)
    return list(data), None


def _check_same_cells(st: Store, adata: ad.AnnData) -> None:
    """Refuse an AnnData whose cells are not those of the datasets its recorded embeddings belong to.

    ``adata[mask].copy()`` keeps ``uns["scdm"]``: evaluating it would score every cell of the
    stored dataset (and labels of cells the user filtered out) under the subset's name. Order is
    free (scores are computed from the store's rows); the set of cells is not.
    """
    recorded = dict(adata.uns.get(UNS_KEY, {}))
    own = set(map(str, adata.obs_names))
    for name in sorted({str(r["dataset"]) for r in recorded.values()}):
        stored = st.cells(name)["cell_id"].astype(str)
        if len(stored) == adata.n_obs and set(stored) == own:
            continue
        keys = ", ".join(sorted(k for k, r in recorded.items() if r["dataset"] == name))
        missing = len(set(stored) - own)
        msg = (f"This AnnData has {adata.n_obs} cells, but its embeddings ({keys}) are of dataset {name!r}, "
               f"{len(stored)} cells ({missing} of them not in this AnnData): it was subset or changed after "
               "scdm.embed, and evaluating would score the stored dataset's cells. Run scdm.embed(adata, model=...) "
               "on this AnnData (it is stored as a dataset of its own) and evaluate again, or pass the embedding "
               "ids to evaluate the whole dataset.")
        raise InputDataError(msg)


def results(
    store: str | os.PathLike[str] | Store | None = None,
    *,
    metrics: Iterable[str] = ("auroc", "ap", "f1", "accuracy"),
    long: bool = False,
    **filters: Any,
) -> pd.DataFrame:
    """Every result in the store: mean, sd and n over folds per metric, never averaged across splits.

    Parameters
    ----------
    store : str, path or Store, optional
        Default: :func:`default_store_path`.
    metrics : iterable of str
        Metrics to keep.
    long : bool, default False
        One row per (result, metric) with ``mean``, ``sd``, ``n_folds``, fold counts instead.
    **filters
        ``models``, ``heads``, ``scenarios``, ``category_types``, ``scheme``, ``datasets``,
        ``label_sets``, ``run_id`` (see :func:`scdm.classify.results.leaderboard`). A ``models``,
        ``heads``, ``datasets`` or ``label_sets`` value that no stored result has is named in a
        warning with the values results do have, as ``scdm results`` does.

    Returns
    -------
    DataFrame
        Numeric columns (``<metric>``, ``<metric>_sd`` float; ``<metric>_n`` integer).
    """
    from scdm.classify.results import FILTER_COLUMNS, leaderboard, name_list, unmatched_filters, wide_leaderboard

    _check_names("results", filters, _RESULT_FILTERS)
    metric_list = name_list(metrics)
    st = open_store(store)
    board = leaderboard(st, metrics=metric_list, **filters)
    # as `scdm results` warns: models=["PCA"] for pca must not read as a store without results
    with plain_warnings():
        for line in unmatched_filters(st, {key: (key, filters.get(key)) for key in FILTER_COLUMNS}):
            warnings.warn(line, ResultFilterWarning, stacklevel=2)
    return board if long else wide_leaderboard(board, metrics=metric_list)
