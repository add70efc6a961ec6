"""A synthetic single-cell drug-response collection with the shape of scDrugMap's primary collection.

The scDrugMap primary collection holds 36 datasets from 23 studies (326,751 cells). Its
supplementary tables (shipped in ``scdm.classify/_data``, see ``PROVENANCE.md`` there) give each
dataset's tissue, cancer type, drug type, regimen and number of responsive / non-responsive
samples, and the number of sensitive and resistant cells per *category* (tissue, cancer type, drug
type, regimen). :func:`primary_datasets` works out per-dataset cell counts from the category table
and :func:`synthesize` generates raw counts for a collection of that shape at any scale.

The generative model, per cell *i* of sample *k* in study *s* and cell state *c*, gene *j*::

    logit_ij = base_j + study_sj + sample_kj + state_cj + 0.5 * y_i * a_i * program_sj
    mu_ij    = L_i * exp(logit_ij) / (sum_j' exp(logit_ij') + R)
    x_ij     ~ NegativeBinomial(mean mu_ij, inverse dispersion theta_j)   (gamma-Poisson)

- ``L_i`` is the cell's library size over its whole transcriptome (log-normal, median
  ``library_median``; a per-dataset offset mimics protocol differences); the ``n_genes`` panel
  genes receive their share of it and ``R`` is the mass of the ~20,000 genes outside the panel,
  so sparsity does not depend on the panel size. ``obs["n_counts"]`` is the whole-transcriptome
  total (panel counts plus the drawn counts of the rest), as CellRanger would report it.
- ``study_sj`` ~ N(0, ``batch_sd``): gene-wise multiplicative study batch effects;
  ``sample_kj`` ~ N(0, ``sample_sd``): patient/sample effects (labels are constant within a
  sample, so these can leak sample identity into cell-level folds, as in the real data).
- ``state_cj``: a few cell states (cell types) shared across studies, mixed in per-dataset
  proportions, so that the main axes of variation are not the response.
- ``y_i`` = +1 for sensitive, -1 for resistant; ``a_i`` ~ Gamma(mean 1, sd 0.5) is the cell's
  program activity. ``program_s = response_strength * ((1 - study_shift) * common + study_shift *
  specific_s)``: ``common`` moves 5% of the genes (half up, half down in sensitive cells; listed in
  ``var["response_program"]``), ``specific_s`` moves a gene set of the same size drawn for study
  *s* alone. With ``study_shift=0`` every study uses the same program; with ``study_shift=1`` each
  study has its own and nothing transfers. A model trained on a study can learn its own part, a
  model that never saw the study cannot: leave-one-study-out prediction is harder than pooled
  prediction, as in the scDrugMap paper. Cell-level pooled folds are easier still, because sample
  effects are shared between training and test cells of the same sample.

Every random draw comes from a stream keyed by ``(seed, purpose, index)``; counts are drawn in
fixed tiles of cells, so the matrix is identical whether it is built in memory or written in blocks
of any size (``same seed -> identical X``).
"""

from __future__ import annotations

import io
import logging
import math
import numbers
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdm.store.errors import InputDataError

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_COLUMNS",
    "FULL_SCALE_CELLS",
    "SynthConfig",
    "category_table",
    "compare_to_tables",
    "primary_datasets",
    "synth_genes",
    "synthesize",
]

FULL_SCALE_CELLS = 326_751
"""Cells in the scDrugMap primary collection (``scale=1.0``)."""

CATEGORY_COLUMNS: dict[str, str] = {
    "Tissue_type": "tissue",
    "Cancer_type": "cancer_type",
    "Drug_type": "drug_type",
    "Regimen": "regimen",
}
"""Supplementary Data 2 ``Maintask`` -> the obs column holding that category."""

_DATASETS_FILE = "datasets.tsv"
_CATEGORIES_FILE = "category_counts.tsv"
_PRIMARY = "Primary collection"  # name used in Supplementary Data 1
_MAIN = "Main collection"  # name of the same collection in Supplementary Data 2
_LABELS = ("sensitive", "resistant")
_SYNTH_FORMAT = 1  # bump when the generative model changes the numbers for a given seed

# Random streams: SeedSequence(seed, spawn_key=(stream, index)).
_STREAM_LAYOUT = 0
_STREAM_MODEL = 1
_STREAM_COUNTS = 2

# Transcriptome outside the panel: the panel's genes are ~1.5x more expressed than the average
# gene of a 20k-gene transcriptome (a chosen panel is biased towards expressed genes). Tuned so a
# 2,000-gene panel is ~85-92% zeros at 3,000 UMI per cell, like a real 10x matrix.
_TRANSCRIPTOME_GENES = 20_000
_PANEL_ENRICHMENT = 1.5
_BASE_SD = 1.6  # sd of log gene abundance
_THETA_MEDIAN = 1.0  # median NB inverse dispersion (theta); log-normal, sd 0.5 on the log scale
_LIBRARY_SD = 0.45  # sd of log library size within a dataset
_DATASET_LIBRARY_SD = 0.3  # sd of the per-dataset log library offset (protocol differences)
_STATE_GENE_FRACTION = 0.05  # share of genes a cell state changes
_STATE_EFFECT_SD = 1.0
_PROGRAM_FRACTION = 0.05  # share of panel genes in the response program
_ACTIVITY_SHAPE = 4.0  # program activity ~ Gamma(4, 1/4): mean 1, sd 0.5
_SAMPLE_SIZE_ALPHA = 4.0  # Dirichlet concentration of sample sizes within a (dataset, label)
_TILE_ELEMENTS = 2**20  # cells x genes drawn at once (~8 MB per float64 temporary)
_H5_CHUNK = 2**16  # HDF5 chunk of X's data/indices, in elements

# Genes placed first in the panel (deterministic order): housekeeping genes, which also get high
# abundance, then markers of the collection's tissues and drug-response genes. The panel is filled
# up with the remaining protein-coding-looking genes of the shipped table in Entrez id order
# (low Entrez ids are the long-known, well-annotated genes that every model vocabulary holds).
_HOUSEKEEPING = (
    "ACTB GAPDH B2M EEF1A1 TMSB4X TMSB10 FTL FTH1 TPT1 MYL6 PFN1 CFL1 UBB UBC PPIA PTMA NPM1 EIF1 "
    "HSP90AB1 RPLP0 RPLP1 RPL3 RPL4 RPL5 RPL7 RPL8 RPL10 RPL11 RPL13 RPL13A RPL19 RPL32 RPS2 RPS3 "
    "RPS4X RPS6 RPS8 RPS12 RPS18 RPS19 RPS27A"
).split()
_MARKERS = (
    "PTPRC CD3E CD3D CD4 CD8A CD19 MS4A1 CD79A CD14 LYZ NKG7 GNLY SDC1 MZB1 JCHAIN XBP1 PRDM1 CD38 "
    "EPCAM KRT8 KRT18 KRT19 VIM MKI67 TOP2A PCNA MCM2 CCNB1 CDK1 MITF PMEL MLANA SOX10 TYR AR KLK3 "
    "ESR1 PGR ERBB2 EGFR ALK ABL1 BRAF KRAS NRAS TP53 MYC MYCN BCL2 MCL1 BTK ABCB1 ABCG2 ABCC1 AXL "
    "ALDH1A1 CD44 PROM1 SOX2 SOX9 ZEB1 SNAI2 TWIST1 CDH1 CDH2 FN1 COL1A1 SPARC ALB AFP GPC3 HNF4A "
    "KRT5 TP63 NKX2-1 ASCL1 NEUROD1 INSM1 CHGA SYP PHOX2B HAND2 HBB CD34 KIT MPO ELANE CEBPA SPI1 "
    "FLT3 CRBN IKZF1 IKZF3 PSMB5 TNFRSF17 CD274 PDCD1 CTLA4 LAG3 HAVCR2 IFNG GZMB PRF1 ISG15 IFI6 "
    "HLA-A HLA-B HLA-DRA JUN FOS EGR1 HSPA1A DUSP1 ATF3 GADD45A CDKN1A CCND1 RB1 E2F1 KDM5A KDM5B "
    "BRD4 CDK4 CDK6 TUBB3 MET HGF"
).split()
_SYMBOL_RE = re.compile(r"^[A-Z][A-Z0-9]{1,9}(-[A-Z0-9]{1,4})?$")
# Non-coding, uncharacterised or receptor families that scRNA panels and model vocabularies
# often lack, and antisense / divergent transcripts.
_EXCLUDED_SYMBOL_RE = re.compile(
    r"^(LINC|LOC|MIR|SNOR|SNHG|SCAR|RNU|RNA|RNY|TRNA|OR\d|KRTAP|FAM\d|C\d+ORF|IG[HKL]|TR[ABGD][VJCD])"
    r"|-(AS|IT|DT|OT)\d*$"
)
_PSEUDOGENE_RE = re.compile(r"^(.+?)P\d*$")


# --------------------------------------------------------------------------------------------
# The shape of the primary collection
# --------------------------------------------------------------------------------------------


def _read_table(name: str) -> pd.DataFrame:
    raw = resources.files("scdm.classify").joinpath("_data").joinpath(name).read_bytes()
    return pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)


def _sample_counts(text: str) -> tuple[int, int]:
    """Sensitive and resistant sample counts from a ``Sample_size`` cell.

    ``"pre (resistant 2, sensitive 1)"`` -> (1, 2); several groups are summed.
    """
    n_sens = sum(int(m) for m in re.findall(r"sensitive (\d+)", text))
    n_res = sum(int(m) for m in re.findall(r"resistant (\d+)", text))
    return n_sens, n_res


def _dataset_metadata() -> pd.DataFrame:
    """The 36 primary datasets with their categories and sample counts (Supplementary Data 1)."""
    table = _read_table(_DATASETS_FILE)
    table = table[table["Collections"] == _PRIMARY]
    samples = table["Sample_size"].map(_sample_counts)
    meta = pd.DataFrame(
        {
            "dataset": table["scDrugMap_collection_series_number"].to_numpy(),
            # The GEO accession: GSE161801_PI and GSE161801_IMiD are two cohorts of one study
            "study": table["Original_Dataset"].str.split("_").str[0].to_numpy(),
            "original_dataset": table["Original_Dataset"].to_numpy(),
            "subgroup": table["Dataset_subgroup"].to_numpy(),
            "tissue": table["Tissue"].to_numpy(),
            "cancer_type": table["Cancer_type_level1"].to_numpy(),
            "drug_type": table["Drug_type"].to_numpy(),
            # Data19 (GSE138267) has no regimen in the table: kept missing, so it is in no regimen task
            "regimen": table["Regimen"].replace("", None).to_numpy(),
            "n_sensitive_samples": [s for s, _ in samples],
            "n_resistant_samples": [r for _, r in samples],
            "n_samples_listed": table["Sample_size_all"].astype(int).to_numpy(),
        }
    )
    return meta.reset_index(drop=True)


@lru_cache(maxsize=1)
def category_table() -> pd.DataFrame:
    """Cells per category of the primary collection (Supplementary Data 2, "Main collection").

    Returns
    -------
    DataFrame
        One row per category: ``category_type`` (all, tissue, cancer_type, drug_type, regimen),
        ``category``, ``n_cells``, ``n_sensitive``, ``n_resistant``, ``listed_datasets`` (as the
        table lists them) and ``datasets`` (the datasets whose Supplementary Data 1 metadata puts
        them in the category; the two differ only for "Acute lymphoblastic leukemia", which the
        table lists as Data25, Data26 although its counts are those of Data17 + Data33).
    """
    table = _read_table(_CATEGORIES_FILE)
    table = table[table["Collections"] == _MAIN]
    meta = _dataset_metadata()
    rows = []
    for _, row in table.iterrows():
        if row["Maintask"] == "All":
            kind, members = "all", list(meta["dataset"])
        else:
            kind = CATEGORY_COLUMNS[row["Maintask"]]
            members = list(meta.loc[meta[kind] == row["Subtask"], "dataset"])
        rows.append(
            {
                "category_type": kind,
                "category": row["Subtask"],
                "n_cells": int(row["samples"]),
                "n_sensitive": int(row["sensitive"]),
                "n_resistant": int(row["resistant"]),
                "listed_datasets": row["scDrugMap_collection_series_number"],
                "datasets": ", ".join(members),
            }
        )
    return pd.DataFrame(rows)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split an integer ``total`` in proportion to ``weights`` (largest remainder, ties by order)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:short]] += 1
    return out


def _solve_atoms(meta: pd.DataFrame, cats: pd.DataFrame) -> tuple[list[list[int]], np.ndarray]:
    """Cell counts of each *atom*: a group of datasets that are in exactly the same categories.

    The category table is a linear system (category total = sum of its datasets); datasets in the
    same categories cannot be told apart, so it is solved for atoms. Returns the atoms (lists of
    row positions in ``meta``) and an integer array of shape (n_atoms, 2): sensitive, resistant.
    """
    members = np.zeros((len(cats), len(meta)), dtype=np.int64)
    for r, names in enumerate(cats["datasets"]):
        members[r, meta.index[meta["dataset"].isin(names.split(", "))]] = 1
    keys: dict[tuple[int, ...], list[int]] = {}
    for d in range(len(meta)):
        keys.setdefault(tuple(members[:, d]), []).append(d)
    atoms = list(keys.values())
    system = np.stack([members[:, a[0]] for a in atoms], axis=1).astype(np.float64)
    targets = cats[["n_sensitive", "n_resistant"]].to_numpy(dtype=np.float64)
    if np.linalg.matrix_rank(system) < len(atoms):
        msg = "The shipped category table does not determine the cell counts of every dataset group."
        raise InputDataError(msg)
    solution = np.rint(np.linalg.lstsq(system, targets, rcond=None)[0]).astype(np.int64)
    residual = system.astype(np.int64) @ solution - targets.astype(np.int64)
    if np.any(residual != 0) or np.any(solution < 0):
        bad = cats.loc[np.any(residual != 0, axis=1), "category"].tolist()
        msg = f"The shipped category table is inconsistent: no non-negative cell counts reproduce {bad}."
        raise InputDataError(msg)
    return atoms, solution


@lru_cache(maxsize=1)
def primary_datasets() -> pd.DataFrame:
    """The 36 datasets of the scDrugMap primary collection with their cell counts.

    Counts are derived from the category table (:func:`category_table`): solving it for groups of
    datasets that share all categories gives 29 groups exactly; 23 datasets are alone in their
    group (``count_source == "exact"``). The six groups of several datasets (pre/post subsets of
    one cohort, and Data8 + Data27, two paclitaxel cell-line datasets) are split in proportion to
    each dataset's number of samples, with the group's sensitive fraction (``"split"``). Every
    category total and its sensitive/resistant balance is reproduced exactly.

    Returns
    -------
    DataFrame
        One row per dataset (Data1..Data36, in order): ``dataset``, ``study`` (GEO accession),
        ``original_dataset``, ``subgroup``, ``tissue``, ``cancer_type``, ``drug_type``,
        ``regimen`` (None for Data19), ``n_sensitive_samples``, ``n_resistant_samples``,
        ``n_samples_listed``, ``n_sensitive``, ``n_resistant``, ``n_cells``, ``count_source``.
    """
    meta = _dataset_metadata()
    atoms, counts = _solve_atoms(meta, category_table())
    n_sens = np.zeros(len(meta), dtype=np.int64)
    n_res = np.zeros(len(meta), dtype=np.int64)
    source = np.empty(len(meta), dtype=object)
    for atom, (sens, res) in zip(atoms, counts):
        weights = meta.loc[atom, "n_samples_listed"].to_numpy(dtype=np.float64)
        n_sens[atom] = _apportion(int(sens), weights)
        n_res[atom] = _apportion(int(res), weights)
        source[atom] = "exact" if len(atom) == 1 else "split:" + "+".join(meta.loc[atom, "dataset"])
    out = meta.assign(n_sensitive=n_sens, n_resistant=n_res, n_cells=n_sens + n_res, count_source=source)
    return out


# --------------------------------------------------------------------------------------------
# Genes
# --------------------------------------------------------------------------------------------


def _is_pseudogene(symbol: str, known: set[str]) -> bool:
    """``A2MP1``, ``LEFTY3P``: a known gene's symbol followed by P and digits."""
    match = _PSEUDOGENE_RE.match(symbol)
    return match is not None and match.group(1) in known


@lru_cache(maxsize=4)
def _gene_candidates() -> pd.DataFrame:
    """Panel candidates in preference order: symbol, ensembl, entrez, housekeeping flag."""
    from scdm.store.genes import gene_table, map_genes

    table = gene_table()
    known = set(table["symbol"])
    # one Entrez gene per symbol, and an Ensembl id that maps back to the same symbol
    n_entrez = table.groupby("symbol")["entrez"].nunique()
    table = table[(table["symbol"] != "") & (table["ensembl"] != "")]
    table = table[table["symbol"].map(n_entrez).eq(1)].drop_duplicates("symbol")
    symbols = table["symbol"].to_numpy(dtype=object)
    ensembl = map_genes(symbols, src="symbol", dst="ensembl")
    back = map_genes([e or "" for e in ensembl], src="ensembl", dst="symbol")
    keep = np.array(
        [
            e is not None and b == s and bool(_SYMBOL_RE.match(s)) and not _EXCLUDED_SYMBOL_RE.search(s)
            and not _is_pseudogene(s, known)
            for s, e, b in zip(symbols, ensembl, back)
        ]
    )
    cand = pd.DataFrame(
        {"symbol": symbols[keep], "ensembl": ensembl[keep], "entrez": table["entrez"].to_numpy()[keep]}
    )
    curated = {s: i for i, s in enumerate(_HOUSEKEEPING + _MARKERS)}
    cand["rank"] = cand["symbol"].map(curated).fillna(len(curated)).astype(int)
    cand["entrez_num"] = cand["entrez"].astype(np.int64)
    cand = cand.sort_values(["rank", "entrez_num"], kind="stable").reset_index(drop=True)
    cand["housekeeping"] = cand["symbol"].isin(_HOUSEKEEPING)
    return cand[["symbol", "ensembl", "entrez", "housekeeping"]]


def synth_genes(n_genes: int = 2000) -> pd.DataFrame:
    """The gene panel of a synthetic collection (the same for every seed).

    Housekeeping genes and markers of the collection's tissues come first, then protein-coding-
    looking genes of the shipped table (no pseudogenes, lncRNAs or receptor-family clusters) in
    Entrez id order. Every symbol maps to its Ensembl id and back through
    :func:`store.genes.map_genes`.

    Returns
    -------
    DataFrame of shape (n_genes, 4)
        Columns ``symbol``, ``ensembl``, ``entrez``, ``housekeeping``.

    Raises
    ------
    InputDataError
        If ``n_genes`` is below 10 or above the number of usable genes.
    """
    cand = _gene_candidates()
    if not isinstance(n_genes, (int, np.integer)) or not 10 <= n_genes <= len(cand):
        msg = f"n_genes={n_genes!r} is out of range: pass an integer from 10 to {len(cand)} (the usable genes of the shipped table)."
        raise InputDataError(msg)
    return cand.iloc[: int(n_genes)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Configuration, layout of cells, model parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic collection (stored in ``uns["synth"]``)."""

    scale: float
    """Fraction of the real collection's cells (1.0 = 326,751 cells)."""
    seed: int
    """Seed of every random stream."""
    n_genes: int
    """Genes in the panel."""
    response_strength: float
    """Log fold change of the response program between sensitive and resistant cells."""
    study_shift: float
    """0 = one response program shared by all studies; 1 = an unrelated program per study."""
    batch_sd: float
    """SD of the per-study, per-gene log batch factors."""
    sample_sd: float
    """SD of the per-sample (patient), per-gene log factors."""
    library_median: float
    """Median UMI per cell over the whole transcriptome (``obs["n_counts"]``)."""
    n_cell_states: int
    """Cell states (cell types) shared across studies."""
    dtype: str
    """dtype of X: float32 (the AnnData convention for counts) or int32."""
    format: int = _SYNTH_FORMAT
    """Version of the generative model."""


@dataclass(frozen=True)
class _Layout:
    """Where every cell is: obs plus the per-cell inputs of the count model."""

    obs: pd.DataFrame
    study_idx: np.ndarray
    sample_idx: np.ndarray
    state_idx: np.ndarray
    sign: np.ndarray  # +1 sensitive, -1 resistant
    activity: np.ndarray
    log_library: np.ndarray
    n_samples: int
    studies: list[str]


@dataclass(frozen=True)
class _Model:
    """Gene-level parameters of the count model."""

    base: np.ndarray  # (n_genes,)
    theta: np.ndarray  # (n_genes,)
    study_effect: np.ndarray  # (n_studies, n_genes)
    sample_effect: np.ndarray  # (n_samples, n_genes)
    state_effect: np.ndarray  # (n_states, n_genes)
    program: np.ndarray  # (n_studies, n_genes)
    common_program: np.ndarray  # (n_genes,)
    rest_mass: float


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _scaled_counts(table: pd.DataFrame, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Cells per (dataset, label) at ``scale``: rounded, at least one where the real data has any.

    The minimum keeps both classes in every dataset at small scales, as in the real collection.
    """
    out = []
    for column in ("n_sensitive", "n_resistant"):
        real = table[column].to_numpy(dtype=np.int64)
        scaled = np.floor(real * scale + 0.5).astype(np.int64)
        out.append(np.where(real > 0, np.maximum(scaled, 1), 0))
    return out[0], out[1]


def _layout(config: SynthConfig) -> _Layout:
    """Assign cells to datasets, labels, samples and cell states; draw library sizes."""
    table = primary_datasets()
    studies = sorted(table["study"].unique())
    study_of = {s: i for i, s in enumerate(studies)}
    n_sens, n_res = _scaled_counts(table, config.scale)
    parts: list[pd.DataFrame] = []
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in ("study", "sample", "state", "sign", "activity", "lib")}
    n_samples = 0
    for d, row in table.iterrows():
        rng = _rng(config.seed, _STREAM_LAYOUT, int(d))
        state_mix = rng.dirichlet(np.ones(config.n_cell_states))
        lib_offset = rng.normal(0.0, _DATASET_LIBRARY_SD)
        for label, n_cells, n_groups in (
            ("sensitive", int(n_sens[d]), int(row["n_sensitive_samples"])),
            ("resistant", int(n_res[d]), int(row["n_resistant_samples"])),
        ):
            n_groups = max(n_groups, 1)
            sizes = _apportion(n_cells, rng.dirichlet(np.full(n_groups, _SAMPLE_SIZE_ALPHA)))
            if n_cells >= n_groups:  # every sample keeps at least one cell when there are enough
                while (sizes == 0).any():
                    sizes[np.argmax(sizes)] -= 1
                    sizes[np.argmin(sizes)] += 1
            names = [f"{row['dataset']}_{label[0].upper()}{k + 1}" for k in range(n_groups)]
            sample_names = np.repeat(np.asarray(names, dtype=object), sizes)
            parts.append(pd.DataFrame({"dataset": row["dataset"], "sample": sample_names, "response": label}))
            arrays["sample"].append(np.repeat(np.arange(n_samples, n_samples + n_groups), sizes))
            n_samples += n_groups
            arrays["study"].append(np.full(n_cells, study_of[row["study"]], dtype=np.int64))
            arrays["state"].append(rng.choice(config.n_cell_states, size=n_cells, p=state_mix))
            arrays["sign"].append(np.full(n_cells, 1.0 if label == "sensitive" else -1.0))
            arrays["activity"].append(rng.gamma(_ACTIVITY_SHAPE, 1.0 / _ACTIVITY_SHAPE, size=n_cells))
            arrays["lib"].append(math.log(config.library_median) + lib_offset + rng.normal(0.0, _LIBRARY_SD, size=n_cells))
    obs = _obs_frame(pd.concat(parts, ignore_index=True), table)
    cat = {k: np.concatenate(v) for k, v in arrays.items()}
    return _Layout(
        obs=obs, study_idx=cat["study"], sample_idx=cat["sample"], state_idx=cat["state"], sign=cat["sign"],
        activity=cat["activity"], log_library=cat["lib"], n_samples=n_samples, studies=studies,
    )


def _obs_frame(cells: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """obs with the dataset's categories joined on, categorical columns and unique cell ids."""
    meta = table.set_index("dataset")
    obs = pd.DataFrame(index=pd.RangeIndex(len(cells)))
    within = cells.groupby("dataset", sort=False).cumcount().to_numpy()
    obs.index = pd.Index([f"{d}_{i:06d}" for d, i in zip(cells["dataset"], within)], name="cell_id")
    order = list(table["dataset"])
    obs["study"] = pd.Categorical(meta.loc[cells["dataset"], "study"].to_numpy(), categories=sorted(table["study"].unique()))
    obs["dataset"] = pd.Categorical(cells["dataset"].to_numpy(), categories=order)
    obs["sample"] = pd.Categorical(cells["sample"].to_numpy(), categories=list(dict.fromkeys(cells["sample"])))
    for column in ("tissue", "cancer_type", "drug_type", "regimen"):
        values = meta.loc[cells["dataset"], column].to_numpy()
        categories = list(dict.fromkeys(v for v in table[column] if v is not None))
        obs[column] = pd.Categorical(values, categories=categories)
    obs["response"] = pd.Categorical(cells["response"].to_numpy(), categories=list(_LABELS))
    return obs


def _model(config: SynthConfig, genes: pd.DataFrame, n_studies: int, n_samples: int) -> _Model:
    """Draw the gene-level parameters."""
    rng = _rng(config.seed, _STREAM_MODEL)
    n_genes = config.n_genes
    base = rng.normal(0.0, _BASE_SD, size=n_genes)
    housekeeping = genes["housekeeping"].to_numpy()
    # housekeeping genes are among the most expressed genes of every cell
    base[housekeeping] = np.maximum(base[housekeeping], 3.5 + rng.normal(0.0, 0.5, size=int(housekeeping.sum())))
    theta = np.exp(rng.normal(math.log(_THETA_MEDIAN), 0.5, size=n_genes))
    study_effect = rng.normal(0.0, config.batch_sd, size=(n_studies, n_genes))
    sample_effect = rng.normal(0.0, config.sample_sd, size=(n_samples, n_genes))
    state_effect = rng.normal(0.0, _STATE_EFFECT_SD, size=(config.n_cell_states, n_genes))
    state_effect *= rng.random(size=state_effect.shape) < _STATE_GENE_FRACTION
    common, program = _response_program(rng, config, housekeeping, n_studies)
    rest_mass = (_TRANSCRIPTOME_GENES - n_genes) * float(np.exp(base).mean()) / _PANEL_ENRICHMENT
    return _Model(
        base=base, theta=theta, study_effect=study_effect, sample_effect=sample_effect, state_effect=state_effect,
        program=program, common_program=common, rest_mass=max(rest_mass, 0.0),
    )


def _response_program(rng: np.random.Generator, config: SynthConfig, housekeeping: np.ndarray, n_studies: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared program and each study's version of it, both of shape (n_genes,) per study.

    The shared program moves ``_PROGRAM_FRACTION`` of the genes, half up and half down in
    sensitive cells. Each study's own part moves a gene set of the same size drawn separately for
    that study: a model trained on a study can learn its part, a model that never saw the study
    cannot, which is what makes cross-study prediction harder than pooled prediction.
    """
    n_genes = config.n_genes
    eligible = np.flatnonzero(~housekeeping)
    n_program = min(max(4, int(round(_PROGRAM_FRACTION * n_genes))), len(eligible))

    def program_on_random_genes() -> np.ndarray:
        genes = np.sort(rng.choice(eligible, size=n_program, replace=False))
        signs = np.where(np.arange(n_program) % 2 == 0, 1.0, -1.0)
        rng.shuffle(signs)
        vector = np.zeros(n_genes)
        vector[genes] = signs * rng.uniform(0.5, 1.5, size=n_program)
        return vector

    common = program_on_random_genes()
    program = np.zeros((n_studies, n_genes))
    for s in range(n_studies):
        specific = program_on_random_genes()
        program[s] = config.response_strength * ((1.0 - config.study_shift) * common + config.study_shift * specific)
    return common, program


# --------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------


def _tile_rows(n_genes: int) -> int:
    """Cells per tile: fixed for a panel size, so the draws never depend on the write block size."""
    return max(64, _TILE_ELEMENTS // n_genes)


def _tile_counts(layout: _Layout, model: _Model, config: SynthConfig, tile: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts of one tile of cells and the cells' whole-transcriptome totals."""
    rows = _tile_rows(config.n_genes)
    cells = slice(tile * rows, min((tile + 1) * rows, len(layout.obs)))
    rng = _rng(config.seed, _STREAM_COUNTS, tile)
    s = layout.study_idx[cells]
    logits = model.study_effect[s]
    logits += model.base
    logits += model.sample_effect[layout.sample_idx[cells]]
    logits += model.state_effect[layout.state_idx[cells]]
    logits += (0.5 * layout.sign[cells] * layout.activity[cells])[:, None] * model.program[s]
    weights = np.exp(logits, out=logits)
    total = weights.sum(axis=1) + model.rest_mass
    library = np.exp(layout.log_library[cells])
    mu = weights
    mu *= (library / total)[:, None]
    # gamma-Poisson draw of NB(mean mu, inverse dispersion theta)
    mu *= rng.gamma(model.theta, 1.0 / model.theta, size=mu.shape)
    counts = rng.poisson(mu)
    rest = rng.poisson(library * model.rest_mass / total)
    n_counts = counts.sum(axis=1) + rest
    return sp.csr_matrix(counts.astype(config.dtype)), n_counts.astype(np.int64)


def _iter_blocks(layout: _Layout, model: _Model, config: SynthConfig, block_cells: int) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
    """Blocks of whole tiles (about ``block_cells`` cells each)."""
    rows = _tile_rows(config.n_genes)
    n_tiles = -(-len(layout.obs) // rows)
    per_block = max(1, block_cells // rows)
    for first in range(0, n_tiles, per_block):
        tiles = [_tile_counts(layout, model, config, t) for t in range(first, min(first + per_block, n_tiles))]
        yield sp.vstack([t[0] for t in tiles], format="csr"), np.concatenate([t[1] for t in tiles])


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _check_args(scale: float, seed: int, n_genes: int, response_strength: float, study_shift: float, batch_sd: float,
                sample_sd: float, library_median: float, n_cell_states: int, dtype: str, block_cells: int) -> None:
    problems = []
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and 0 < scale <= 100):
        problems.append(f"scale={scale!r}: pass a fraction of the real collection in (0, 100], e.g. 0.01 (1.0 = {FULL_SCALE_CELLS:,} cells)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed={seed!r}: pass a non-negative integer")
    if not response_strength >= 0:
        problems.append(f"response_strength={response_strength!r}: pass a log fold change >= 0")
    if not 0 <= study_shift <= 1:
        problems.append(f"study_shift={study_shift!r}: pass a value in [0, 1] (0 = shared program, 1 = one per study)")
    for name, value in (("batch_sd", batch_sd), ("sample_sd", sample_sd)):
        if not value >= 0:
            problems.append(f"{name}={value!r}: pass a standard deviation >= 0")
    if not library_median > 0:
        problems.append(f"library_median={library_median!r}: pass a positive UMI count, e.g. 3000")
    if not isinstance(n_cell_states, (int, np.integer)) or n_cell_states < 1:
        problems.append(f"n_cell_states={n_cell_states!r}: pass an integer >= 1")
    if dtype not in ("float32", "int32"):
        problems.append(f"dtype={dtype!r}: pass 'float32' or 'int32'")
    if not isinstance(block_cells, (int, np.integer)) or block_cells < 1:
        problems.append(f"block_cells={block_cells!r}: pass a positive integer")
    if problems:
        msg = "Cannot synthesize the collection: " + "; ".join(problems) + "."
        raise InputDataError(msg)
    synth_genes(n_genes)  # raises on a bad n_genes


def synthesize(
    scale: float = 0.01,
    *,
    seed: int = 0,
    n_genes: int = 2000,
    response_strength: float = 2.0,
    study_shift: float = 0.7,
    batch_sd: float = 0.5,
    sample_sd: float = 0.5,
    library_median: float = 3000.0,
    n_cell_states: int = 5,
    dtype: Literal["float32", "int32"] = "float32",
    out: str | Path | None = None,
    block_cells: int = 16_384,
    compression: Literal["gzip", "lzf"] | None = "gzip",
    overwrite: bool = False,
    silent: bool = True,
) -> ad.AnnData | Path:
    """Generate a scDrugMap-shaped synthetic collection of raw counts.

    Parameters
    ----------
    scale
        Fraction of the real primary collection: every (dataset, label) gets ``round(n * scale)``
        cells, at least one. ``1.0`` gives 326,751 cells.
    seed
        Seed of every random draw; the same seed and arguments give identical X.
    n_genes
        Panel size (see :func:`synth_genes`).
    response_strength
        Log fold change of the response program between sensitive and resistant cells.
    study_shift
        How much each study's response program departs from the shared one (0 to 1).
    batch_sd, sample_sd
        SD of the per-study and per-sample gene-wise log factors.
    library_median
        Median UMI per cell over the whole transcriptome.
    n_cell_states
        Cell states shared across studies.
    dtype
        dtype of X.
    out
        Where to write an ``.h5ad``; None returns the AnnData in memory.
    block_cells
        Cells generated and written per block with ``out`` (bounds the memory; never changes the
        numbers).
    compression
        HDF5 filter of X's arrays with ``out``.
    overwrite
        Replace an existing ``out``.
    silent
        Hide the progress bar.

    Returns
    -------
    AnnData or Path
        In memory: n_obs x n_genes AnnData with CSR ``X`` of raw counts, ``var_names`` gene
        symbols, ``var["ensembl"]``, ``var["entrez"]``, ``var["response_program"]`` (+1 up in
        sensitive cells, -1 down, 0 not in the program); obs ``study``, ``dataset``, ``sample``,
        ``tissue``, ``cancer_type``, ``drug_type``, ``regimen``, ``response``
        ("sensitive"/"resistant"), ``n_counts``; ``uns["synth"]`` the configuration. With
        ``out``: the path of the written file.

    Raises
    ------
    InputDataError
        On an argument out of range, or an existing ``out`` without ``overwrite``.

    Examples
    --------
    >>> adata = synthesize(0.002, n_genes=200)
    >>> adata.obs["study"].nunique()
    23
    """
    _check_args(scale, seed, n_genes, response_strength, study_shift, batch_sd, sample_sd, library_median,
                n_cell_states, dtype, block_cells)
    config = SynthConfig(
        scale=float(scale), seed=int(seed), n_genes=int(n_genes), response_strength=float(response_strength),
        study_shift=float(study_shift), batch_sd=float(batch_sd), sample_sd=float(sample_sd),
        library_median=float(library_median), n_cell_states=int(n_cell_states), dtype=dtype,
    )
    path = None if out is None else Path(out)
    if path is not None and path.exists() and not overwrite:
        msg = f"{path} already exists; pass overwrite=True (--overwrite) or choose another --out."
        raise InputDataError(msg)
    genes = synth_genes(config.n_genes)
    layout = _layout(config)
    model = _model(config, genes, len(layout.studies), layout.n_samples)
    var = _var_frame(genes, model)
    uns: dict[str, object] = {"synth": _uns(config, var)}
    logger.info("Synthesizing %d cells x %d genes (scale %g, seed %d)", len(layout.obs), config.n_genes, config.scale, config.seed)
    blocks = _iter_blocks(layout, model, config, block_cells)
    if path is None:
        return _in_memory(blocks, layout, var, uns, silent=silent)
    _write_h5ad_blocks(path, blocks, layout.obs, var, uns, n_genes=config.n_genes, dtype=config.dtype,
                      compression=compression, silent=silent)
    logger.debug("Wrote %s", path)
    return path


def _var_frame(genes: pd.DataFrame, model: _Model) -> pd.DataFrame:
    var = pd.DataFrame(
        {
            "ensembl": genes["ensembl"].to_numpy(dtype=object).astype(str),
            "entrez": genes["entrez"].to_numpy(dtype=object).astype(str),
            "response_program": np.sign(model.common_program).astype(np.int8),
        },
        index=pd.Index(genes["symbol"].to_numpy(dtype=object).astype(str), name="symbol"),
    )
    return var


def _uns(config: SynthConfig, var: pd.DataFrame) -> dict[str, object]:
    entry: dict[str, object] = {k: v for k, v in asdict(config).items()}
    entry["source"] = "scdm.classify.synth: scDrugMap primary collection shape (QSong-github/scDrugMap e3a44b9)"
    entry["program_up"] = list(var.index[var["response_program"] > 0])
    entry["program_down"] = list(var.index[var["response_program"] < 0])
    return entry


def _in_memory(blocks: Iterator[tuple[sp.csr_matrix, np.ndarray]], layout: _Layout, var: pd.DataFrame,
               uns: dict[str, object], *, silent: bool) -> ad.AnnData:
    import anndata as ad

    from scdm.store.progress import progress_bar

    parts, totals = [], []
    with progress_bar(len(layout.obs), desc="synth", unit="cell", silent=silent) as bar:
        for x, n_counts in blocks:
            parts.append(x)
            totals.append(n_counts)
            bar.update(x.shape[0])
    obs = layout.obs.copy()
    obs["n_counts"] = np.concatenate(totals)
    x = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(var)), dtype=np.float32)
    return ad.AnnData(X=x, obs=obs, var=var, uns=uns)


def _write_h5ad_blocks(path: Path, blocks: Iterator[tuple[sp.csr_matrix, np.ndarray]], obs: pd.DataFrame,
                       var: pd.DataFrame, uns: dict[str, object], *, n_genes: int, dtype: str,
                       compression: str | None, silent: bool) -> None:
    """Write an .h5ad whose CSR X grows block by block (resizable HDF5 datasets).

    Only one block of counts is in memory at a time, plus the row pointers (8 bytes per cell).
    The file is written under a temporary name and renamed when complete.
    """
    import h5py
    from anndata.io import write_elem

    from scdm.store.progress import progress_bar

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f, progress_bar(len(obs), desc="synth", unit="cell", silent=silent) as bar:
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            group = f.create_group("X")
            growable = {"maxshape": (None,), "chunks": (_H5_CHUNK,), "compression": compression}
            data = group.create_dataset("data", shape=(0,), dtype=dtype, **growable)
            indices = group.create_dataset("indices", shape=(0,), dtype=np.int32, **growable)
            indptr, totals, nnz = [np.zeros(1, dtype=np.int64)], [], 0
            for x, n_counts in blocks:
                for dataset, values in ((data, x.data), (indices, x.indices)):
                    dataset.resize((nnz + x.nnz,))
                    dataset[nnz:] = values
                indptr.append(x.indptr[1:].astype(np.int64) + nnz)
                totals.append(n_counts)
                nnz += x.nnz
                bar.update(x.shape[0])
            group.create_dataset("indptr", data=np.concatenate(indptr))
            group.attrs["encoding-type"] = "csr_matrix"
            group.attrs["encoding-version"] = "0.1.0"
            group.attrs["shape"] = np.array([len(obs), n_genes], dtype=np.int64)
            obs = obs.copy()
            obs["n_counts"] = np.concatenate(totals) if totals else np.zeros(0, dtype=np.int64)
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            write_elem(f, "uns", uns)
            for key in ("layers", "obsm", "obsp", "varm", "varp"):
                write_elem(f, key, {})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def compare_to_tables(obs: pd.DataFrame, scale: float) -> pd.DataFrame:
    """Per-category cells and balance of ``obs`` next to the real table scaled by ``scale``.

    Returns
    -------
    DataFrame
        One row per category of :func:`category_table` with ``expected_cells``
        (``n_cells * scale``), ``cells``, ``expected_sensitive``, ``sensitive``,
        ``expected_fraction``, ``fraction`` (sensitive share) and ``n_parts`` (the
        (dataset, label) groups of the category: each is rounded once, so
        ``|cells - expected_cells| <= n_parts`` is "within rounding").
    """
    cats = category_table()
    rows = []
    is_sens = (obs["response"] == "sensitive").to_numpy()
    for _, cat in cats.iterrows():
        if cat["category_type"] == "all":
            mask = np.ones(len(obs), dtype=bool)
        else:
            mask = (obs[cat["category_type"]] == cat["category"]).to_numpy()
        n_members = len(cat["datasets"].split(", "))
        cells, sens = int(mask.sum()), int((mask & is_sens).sum())
        rows.append(
            {
                "category_type": cat["category_type"], "category": cat["category"],
                "expected_cells": cat["n_cells"] * scale, "cells": cells,
                "expected_sensitive": cat["n_sensitive"] * scale, "sensitive": sens,
                "expected_fraction": cat["n_sensitive"] / cat["n_cells"], "fraction": sens / cells if cells else float("nan"),
                "n_parts": 2 * n_members,
            }
        )
    return pd.DataFrame(rows)
