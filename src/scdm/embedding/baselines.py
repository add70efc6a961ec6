"""Baseline embeddings that need no checkpoint: ``pca`` and ``hvg``.

Both start from log-normalised expression (``normalize_total`` to 1e4 then ``log1p``) of raw
counts, or take already-normalised or scaled data as is (detected from the dataset's value kind,
overridable). Highly variable genes are the genes of largest variance of that expression; ``pca``
standardises them and projects onto the leading eigenvectors of their correlation matrix. Every
statistic is accumulated over row blocks, so memory does not grow with the number of cells, and
the result is deterministic (exact eigendecomposition, fixed signs).

A baseline fitted on several datasets at once (on their shared genes) puts all their cells in one
space: their embeddings carry the same ``space_id`` and can be evaluated together.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from scdm.store import Store
from scdm.store.errors import InputDataError, ScdmWarning
from scdm.store.genes import GENE_MATCH, as_gene_id_kind, stored_gene_keys

__all__ = ["BASELINES", "BaselineFit", "check_sizes", "fit_baseline", "preprocess_block"]

logger = logging.getLogger(__name__)

BASELINES: dict[str, str] = {
    "pca": "PCA of standardised highly variable genes of log-normalised expression (no checkpoint)",
    "hvg": "Log-normalised expression of the highly variable genes itself (no checkpoint)",
}

BLOCK_ROWS = 8192


@dataclass(frozen=True)
class BaselineFit:
    """A fitted baseline: which genes, and for ``pca`` the standardisation and components."""

    model: str
    genes: tuple[str, ...]
    """Selected gene keys (:func:`gene_keys`), in output order for ``hvg``."""
    mean: np.ndarray
    """ndarray of shape (n_genes,): mean of the selected genes."""
    std: np.ndarray
    """ndarray of shape (n_genes,): standard deviation (1 where a gene is constant)."""
    components: np.ndarray | None
    """ndarray of shape (n_genes, n_comps) for ``pca``; None for ``hvg``."""
    explained_variance_ratio: np.ndarray | None
    params: dict[str, Any]

    @property
    def dim(self) -> int:
        return len(self.genes) if self.components is None else int(self.components.shape[1])

    def transform(self, block: np.ndarray) -> np.ndarray:
        """Preprocessed expression over ``genes`` -> embedding rows (float32)."""
        if self.components is None:
            return block.astype(np.float32)
        z = (block - self.mean) / self.std
        return (z @ self.components).astype(np.float32)


def preprocess_block(x: sp.csr_matrix, *, as_is: bool, target_sum: float) -> sp.csr_matrix:
    """normalize_total(target_sum) + log1p of a counts block, or the block unchanged when ``as_is``."""
    if as_is:
        return x
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ x.astype(np.float64))
    out.data = np.log1p(out.data)
    return out


def gene_keys(st: Store, dataset: str, gene_match: str | None = None) -> np.ndarray:
    """A dataset's genes as the keys a fit matches them by.

    ``gene_match=None`` (fits of one dataset, and joint fits made before :data:`GENE_MATCH`): the
    stored symbol (the dataset's own for a symbol dataset), else the id as given. :data:`GENE_MATCH`:
    the gene each id resolves to (:func:`scdm.store.genes.stored_gene_keys`), so that ``AARS`` in one dataset and
    ``ENSG00000090861`` (``AARS1``) in another are one gene. A GENCODE ``_PAR_Y`` copy, which the
    genes table maps to nothing, stays a key of its own.
    """
    genes = st.genes(dataset)
    if gene_match is None:
        keys = genes["symbol"].where(genes["symbol"].notna(), genes["gene_id"])
        return keys.astype(str).to_numpy()
    if gene_match != GENE_MATCH:
        msg = f"Unknown gene matching {gene_match!r} of a baseline fit; this scdm knows {GENE_MATCH!r}. Update scdm."
        raise InputDataError(msg)
    return stored_gene_keys(genes, as_gene_id_kind(st.dataset(dataset).gene_id_kind)).astype(str)


def shared_columns(st: Store, datasets: Sequence[str], gene_match: str | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Genes present in every dataset (first dataset's order) and each dataset's column indices."""
    keys = [gene_keys(st, d, gene_match) for d in datasets]
    common = set(keys[0])
    for k in keys[1:]:
        common &= set(k)
    ordered = [g for g in dict.fromkeys(keys[0]) if g in common]
    if not ordered:
        msg = f"Datasets {', '.join(datasets)} share no genes; fit the baseline per dataset (omit --joint) or check their gene ids."
        raise InputDataError(msg)
    cols = []
    for k in keys:
        first: dict[str, int] = {}
        for i, g in enumerate(k):
            first.setdefault(g, i)
        cols.append(np.array([first[g] for g in ordered], dtype=np.int64))
    return ordered, cols


def resolve_as_is(x_kind: str, normalized: bool | None, dataset: str) -> bool:
    """Whether a dataset's values are used as they are (True) or normalised from counts (False)."""
    if normalized is None:
        return x_kind != "counts"
    if not normalized and x_kind == "scaled":
        msg = (f"Dataset {dataset!r} holds negative (scaled) values; it cannot be normalised as counts. Drop --counts "
               "(Python: normalized=False) to use its values as they are.")
        raise InputDataError(msg)
    return normalized


def iter_blocks(st: Store, dataset: str, cols: np.ndarray, *, as_is: bool, target_sum: float, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, dense preprocessed block over cols)`` for a dataset, block by block."""
    from scdm.store.matrix import iter_row_blocks

    adata = st.open_anndata(dataset, backed=True)
    try:
        for lo, block in iter_row_blocks(adata, block_rows):
            yield lo, preprocess_block(block, as_is=as_is, target_sum=target_sum)[:, cols].toarray()
    finally:
        if getattr(adata, "file", None) is not None:
            adata.file.close()


def _warn_if_scaled_with_unscaled(infos: Sequence[Any]) -> None:
    """Say when a joint fit pools z-scored datasets with log-normalised ones.

    Each scaled dataset was centred on its own mean, the others were not: the leading components
    then separate the datasets by their preprocessing, and pooled or cross-data heads learn that.
    """
    scaled = [i.name for i in infos if i.x_kind == "scaled"]
    other = [i.name for i in infos if i.x_kind != "scaled"]
    if scaled and other:
        msg = (f"joint fit of datasets with scaled (z-scored) values ({', '.join(scaled)}) and log-normalised or count "
               f"values ({', '.join(other)}): each scaled dataset is centred on its own mean, so their cells differ by "
               "preprocessing as well as biology in this space; ingest the same kind of values for all (e.g. raw counts)")
        warnings.warn(msg, ScdmWarning, stacklevel=3)


HVG_TIE_RTOL = 1e-5
"""Variances this close (relative) are one value: a matrix z-scored per gene gives every gene 1 +- 3e-6 here."""


def _warn_if_cut_is_a_tie(var: np.ndarray, ranked: np.ndarray, k: int, model: str) -> None:
    """Say when the variance cut falls inside a tie, so that rounding noise picks the 'highly variable' genes.

    A matrix z-scored per gene on these very cells (the bundled A375) gives every gene variance 1:
    the top ``k`` are then not the most variable genes but whichever rounding put first.
    """
    if k >= len(ranked):
        return
    cut = var[ranked[k - 1]]
    tied = np.abs(var - cut) <= HVG_TIE_RTOL * max(abs(float(cut)), 1e-12)
    n_tied, left_out = int(tied.sum()), int(tied[ranked[k:]].sum())
    if left_out == 0 or float(cut) == 0.0 or 10 * (n_tied - left_out) < k:
        return  # constant genes carry nothing, and a few genes of one cell tying at the cut change nothing
    msg = (f"{model}: {n_tied} of the {len(var)} shared genes have the same variance ({float(cut):.6g}) as the "
           f"{k}th most variable one, so which {n_tied - left_out} of them are kept as highly variable genes is decided "
           f"by rounding, not by the data (values z-scored per gene have variance 1 everywhere); pass --n-hvg {len(var)} "
           f"(Python: n_hvg={len(var)}) to keep every gene")
    warnings.warn(msg, ScdmWarning, stacklevel=3)


def check_sizes(*, n_hvg: int, n_comps: int, target_sum: float) -> None:
    """Refuse baseline sizes out of range (before any data is read)."""
    for option, value in (("n_hvg", n_hvg), ("n_comps", n_comps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            msg = f"--{option.replace('_', '-')} ({option}=) must be an integer >= 1; got {value!r}."
            raise InputDataError(msg)
    if isinstance(target_sum, bool) or not isinstance(target_sum, (int, float, np.number)) or not np.isfinite(target_sum) or target_sum <= 0:
        msg = f"target_sum= must be a number > 0 (counts per cell after normalisation, e.g. 1e4); got {target_sum!r}."
        raise InputDataError(msg)


def fit_baseline(
    st: Store,
    datasets: Sequence[str],
    *,
    model: str = "pca",
    n_hvg: int = 2000,
    n_comps: int = 50,
    target_sum: float = 1e4,
    normalized: bool | None = None,
    gene_match: str | None = None,
) -> BaselineFit:
    """Fit ``pca`` or ``hvg`` on the cells of ``datasets`` (jointly, on their shared genes).

    Parameters
    ----------
    n_hvg
        Highly variable genes kept (all shared genes if fewer).
    n_comps
        Principal components (``pca``); at most ``n_hvg`` and ``n_cells - 1``.
    normalized
        None: detect from each dataset's value kind (raw counts are normalised, anything else used
        as is); True: use values as they are; False: treat them as counts.
    gene_match
        How the datasets' genes are matched (:func:`gene_keys`): :data:`GENE_MATCH` by the gene each
        id resolves to (joint fits), None by the stored symbol (one dataset; older joint fits).
    """
    if model not in BASELINES:
        msg = f"Unknown baseline {model!r}; baselines: {', '.join(BASELINES)}."
        raise InputDataError(msg)
    check_sizes(n_hvg=n_hvg, n_comps=n_comps, target_sum=target_sum)
    infos = [st.dataset(d) for d in datasets]
    genes, cols = shared_columns(st, [i.dataset_id for i in infos], gene_match)
    as_is = [resolve_as_is(i.x_kind, normalized, i.name) for i in infos]
    _warn_if_scaled_with_unscaled(infos)
    n_cells = sum(i.n_cells for i in infos)
    if n_cells < 2:
        msg = f"A {model} baseline needs at least 2 cells; the datasets hold {n_cells}."
        raise InputDataError(msg)

    total = np.zeros(len(genes))
    total_sq = np.zeros(len(genes))
    for info, c, keep in zip(infos, cols, as_is):
        for _, block in iter_blocks(st, info.dataset_id, c, as_is=keep, target_sum=target_sum):
            total += block.sum(axis=0)
            total_sq += np.square(block).sum(axis=0)
    mean = total / n_cells
    var = np.maximum(total_sq / n_cells - mean**2, 0.0) * n_cells / (n_cells - 1)
    k = min(n_hvg, len(genes))
    ranked = np.argsort(-var, kind="stable")
    _warn_if_cut_is_a_tie(var, ranked, k, model)
    top = np.sort(ranked[:k])  # keep the shared gene order
    sel_genes = tuple(genes[i] for i in top)
    std = np.sqrt(var[top])
    std[std == 0] = 1.0
    params: dict[str, Any] = {
        "n_hvg": k, "target_sum": target_sum, "input": ["as-is" if a else "normalize_total+log1p" for a in as_is],
        "hvg_method": "variance", "fit_datasets": sorted(i.content_hash for i in infos), "n_shared_genes": len(genes),
    }
    if model == "hvg":
        return BaselineFit(model, sel_genes, mean[top], std, None, None, params)

    gram = np.zeros((k, k))
    for info, c, keep in zip(infos, cols, as_is):
        for _, block in iter_blocks(st, info.dataset_id, c[top], as_is=keep, target_sum=target_sum):
            z = (block - mean[top]) / std
            gram += z.T @ z
    corr = gram / (n_cells - 1)
    n_keep = min(n_comps, k, n_cells - 1)
    # only the leading eigenpairs: several times faster than a full eigh for 2000 genes
    values, vectors = scipy.linalg.eigh(corr, subset_by_index=[k - n_keep, k - 1])
    order = np.argsort(-values, kind="stable")
    comps = vectors[:, order]
    # eigenvectors have arbitrary sign: make the largest loading positive so refits agree
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1, signs)
    ratio = values[order] / max(float(np.trace(corr)), 1e-12)
    params["n_comps"] = int(comps.shape[1])
    logger.info("pca: %d cells, %d shared genes, %d HVG, %d components (%.1f%% variance)", n_cells, len(genes), k, comps.shape[1], 100 * ratio.sum())
    return BaselineFit(model, sel_genes, mean[top], std, comps, ratio, params)
