"""Train/test partitions of cells: pooled k-fold, cross-data leave-one-study-out, custom.

A :class:`Split` partitions the labelled cells of one category (``category_type`` = all, tissue,
cancer_type, drug_type or regimen) into folds; fold ``f``'s test cells are the cells assigned to
``f`` and its training cells are all the others. Splits are built from the cells table alone
(never from embeddings), stored once in the catalog and reused by every model and head:
``split_id`` is a hash of the definition and of the cells covered, so two models evaluated on the
same cells get the same partition.

Scenarios
---------
pooled, scheme ``cell``
    k-fold stratified by response, at cell level (the scDrugMap protocol). Cells are dealt to
    folds within strata of (dataset, study, categories, response): each stratum is shuffled with a
    seed derived from its own identity and dealt round-robin from a random offset. So a cell's fold
    depends only on its stratum, never on which other datasets are in the store: the partition of
    a category is the same for every model, and the folds of all category types are *nested* (a
    cell has the same fold in each), which lets ridge solve every fold of every category from one
    pass over the embeddings. The price: folds are stratified by response within each stratum,
    not across a category's strata as one ``StratifiedKFold`` would be. Each stratum starts at its
    own random fold, so a class spread thinly over many strata (10 datasets with one sensitive
    cell each, k = 10) can leave some test folds without it; such folds are one-class, and their
    AUROC/AP are NULL (never 0), counted out of the ``_n`` of every result.
pooled, scheme ``auto`` (the default)
    ``sample`` when every labelled cell has a sample id and there are at least as many samples
    as folds; otherwise ``cell``, with a one-line warning when sample ids exist but are too few.
    Splits always record the scheme they were made with, never ``auto``.
pooled, scheme ``sample``
    grouped k-fold: scikit-learn's ``StratifiedGroupKFold`` over all cells with groups =
    (study, sample), restricted to each category, so no sample is on both sides of any fold.
pooled, either scheme
    a study whose labelled cells are all one class, pooled with other studies, has cells on both
    sides of every fold: a head can score them by recognising the study. The same holds one level
    down: a dataset whose labelled cells are all one class inside a study that holds both classes
    (a parental line ingested apart from its resistant derivative) can be scored by recognising the
    dataset (its batch). Nothing is refused; a :class:`StudyLeakageWarning` names such studies and
    datasets (and the report lists them). Only those whose cells fall in two or more folds are
    named: a one-sample study or dataset under sample-grouped folds is tested whole in one fold,
    never seen in training, so nothing identifies it.
cross
    within a category, leave one study out. Categories with one study, and held-out studies whose
    cells hold one class, are recorded as skipped with the reason.
custom
    a user-provided fold (or ``"train"``/``"test"``) per cell.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd

from scdm.store.errors import InputDataError, ScdmWarning
from scdm.store.evaluation import forget_tasks
from scdm.store.warning_scopes import ignoring
from scdm.store.wording import option

if TYPE_CHECKING:
    import duckdb

    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_TYPES",
    "SCENARIOS",
    "SPLIT_SCHEMES",
    "STORED_SCHEMES",
    "SampleLeakageWarning",
    "StudyLeakageWarning",
    "resolve_split_scheme",
    "Split",
    "cells_hash",
    "confounded_studies",
    "one_class_datasets",
    "one_class_studies",
    "pooled_one_class_studies",
    "load_split",
    "make_splits",
    "save_splits",
    "split_seed",
    "split_datasets",
    "find_splits",
    "splits_of_same_labels",
    "ForgottenSplits",
    "shared_partitions",
    "stale_splits",
    "forget_splits",
    "forget_label_set",
]

CATEGORY_TYPES: tuple[str, ...] = ("all", "tissue", "cancer_type", "drug_type", "regimen")
"""Category types; every category of every type is a task."""
SCENARIOS: tuple[str, ...] = ("pooled", "cross", "custom")
"""Evaluation scenarios."""
SPLIT_ALGORITHM = 1
"""Version of the fold-assignment algorithm (part of every split's identity)."""
SPLIT_SCHEMES: tuple[str, ...] = ("auto", "sample", "cell")
"""Pooled split schemes a caller may ask for (``auto`` resolves to ``sample`` or ``cell``)."""
STORED_SCHEMES: tuple[str, ...] = ("cell", "sample", "study", "custom")
"""Schemes a stored split (and so a result) has: pooled ``cell``/``sample``, cross-data ``study``, ``custom``."""

_ATOM_COLUMNS = ("dataset_id", "study", "tissue", "cancer_type", "drug_type", "regimen")


class SampleLeakageWarning(ScdmWarning):
    """Cell-level folds on data whose labels are constant within samples."""


class StudyLeakageWarning(ScdmWarning):
    """Pooled folds mixing a study whose labelled cells are all one class with other studies, or a
    dataset whose labelled cells are all one class with datasets of the other class of its study."""


@dataclass(frozen=True)
class Split:
    """A partition of one category's labelled cells into test folds."""

    split_id: str
    """Hash of ``definition`` and of the cells covered."""
    scenario: str
    """``pooled``, ``cross`` or ``custom``."""
    category_type: str
    """``all``, ``tissue``, ``cancer_type``, ``drug_type`` or ``regimen``."""
    category: str
    """The category value (``"all"`` for category type ``all``)."""
    scheme: str
    """``cell`` or ``sample`` (pooled), ``study`` (cross), ``custom``."""
    n_folds: int
    """Number of folds (cross: number of studies)."""
    seed: int | None
    """Seed of the assignment."""
    cells: pd.DataFrame = field(repr=False)
    """``dataset_id``, ``row``, ``response``, ``fold`` (Int64; <NA> = training cell in every fold)."""
    fold_labels: dict[int, str] = field(default_factory=dict)
    """Fold -> held-out study (cross) or the user's fold value (custom)."""
    skipped_folds: dict[int, str] = field(default_factory=dict)
    """Fold -> why it is not evaluated."""
    reason: str | None = None
    """Why the whole split is skipped (None if it is evaluated)."""
    definition: dict[str, Any] = field(default_factory=dict, repr=False)
    """Everything that determines the assignment, besides the cells."""
    cells_hash: str = ""
    """Hash of (dataset_id, row, response) of the cells covered."""
    label_set: str | None = None
    """Name(s) of the label set(s) the responses come from (comma-separated, sorted); metadata,
    not identity: the responses themselves are in ``cells_hash``."""
    partition_of: str | None = None
    """The label set(s) the stored split was made for, where that is not ``label_set``: two label
    sets with the same responses on the same cells share one partition, and the tasks evaluated
    under this one are its own (see :func:`shared_partitions`). None: the split is its own."""

    @property
    def status(self) -> str:
        """``ok`` or ``skipped``."""
        return "skipped" if self.reason else "ok"

    @property
    def n_cells(self) -> int:
        """Number of labelled cells covered."""
        return len(self.cells)

    @property
    def folds(self) -> list[int]:
        """Folds to evaluate (all folds minus skipped ones; none if the split is skipped)."""
        if self.reason:
            return []
        return [f for f in range(self.n_folds) if f not in self.skipped_folds]

    def test_mask(self, fold: int) -> np.ndarray:
        """Boolean mask over ``cells`` of fold ``fold``'s test cells."""
        return (self.cells["fold"] == fold).fillna(False).to_numpy(bool)

    def train_mask(self, fold: int) -> np.ndarray:
        """Boolean mask over ``cells`` of fold ``fold``'s training cells."""
        return ~self.test_mask(fold)


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------
def _seed_of(*parts: Any) -> int:
    digest = hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def cells_hash(cells: pd.DataFrame) -> str:
    """Hash of the (dataset_id, row, response) of ``cells``, independent of their order."""
    frame = cells[["dataset_id", "row", "response"]].sort_values(["dataset_id", "row"])
    frame = frame.assign(response=frame["response"].astype("Int64").fillna(-1).astype(np.int64))
    values = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashlib.blake2b(values.tobytes(), digest_size=8).hexdigest()


def _split_id(definition: dict[str, Any], chash: str) -> str:
    text = json.dumps(definition, sort_keys=True, default=str) + chash
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _labelled(cells: pd.DataFrame) -> pd.DataFrame:
    need = {"dataset_id", "row", "study", "sample", "response", *CATEGORY_TYPES[1:]}
    missing = sorted(need - set(cells.columns))
    if missing:
        msg = f"cells table lacks columns {missing}; pass the frame returned by Store.cells()."
        raise InputDataError(msg)
    out = cells[cells["response"].notna()].copy()
    dropped = len(cells) - len(out)
    if dropped:
        logger.info("splits: %d of %d cells have no response label and are left out", dropped, len(cells))
    out["response"] = out["response"].astype(np.int8)
    out["row"] = out["row"].astype(np.int64)
    # A study name is needed for cross-data; without one, a dataset is its own study.
    out["study"] = out["study"].astype(object).where(out["study"].notna(), out["dataset_id"])
    return out.sort_values(["dataset_id", "row"]).reset_index(drop=True)


def _group_codes(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    keys = frame[list(columns)].astype(str)
    return keys.groupby(list(columns), sort=True, dropna=False).ngroup().to_numpy()


def confounded_studies(cells: pd.DataFrame) -> dict[str, str]:
    """Studies whose labels cell-level folds can learn from sample identity: study -> why.

    A study is confounded when its labels are constant within each of its samples (every sample
    all sensitive or all resistant), which includes a study with one sample per class. Studies
    without sample ids cannot be checked here (see the ingest warning about --sample-key).
    """
    out: dict[str, str] = {}
    with_sample = cells[cells["sample"].notna()]
    for study, group in with_sample.groupby("study", observed=True, sort=True):
        per_sample = group.groupby("sample", observed=True)["response"].agg(["nunique", "first"])
        if group["response"].nunique() < 2 or not (per_sample["nunique"] == 1).all():
            continue
        n_pos = int((per_sample["first"] == 1).sum())
        out[str(study)] = (f"labels constant within each of its {len(per_sample)} samples "
                           f"({n_pos} sensitive, {len(per_sample) - n_pos} resistant)")
    return out


def too_few_samples_to_group(cells: pd.DataFrame, studies: Iterable[str]) -> list[str]:
    """Of ``studies``, those with fewer than two samples of a class: sample-grouped folds of the study alone
    cannot train and test on both classes (a test fold holds a whole sample, and its training folds then
    lack that class, or the other), so grouping does not rescue its evaluation."""
    out = []
    with_sample = cells[cells["sample"].notna()]
    for study in studies:
        group = with_sample[with_sample["study"].astype(str) == study]
        per_class = group.groupby("response", observed=True)["sample"].nunique()
        if len(per_class) < 2 or int(per_class.min()) < 2:
            out.append(study)
    return out


def one_class_studies(cells: pd.DataFrame, folds: np.ndarray | None = None) -> dict[str, str]:
    """Studies whose labelled cells are all one class, among cells of two or more studies: study -> why.

    Pooled folds (cell- or sample-grouped alike) put such a study on both sides of every fold, so a
    head can score its cells by recognising the study (its batch, its cell line) rather than the
    response, e.g. PC9 all resistant pooled with A375/JHU006/SCC47. Cells without a study are their
    dataset's study. One study alone is not flagged (its split is then one class, and skipped).
    ``folds`` (one per row of ``cells``): name only studies whose cells fall in two or more folds.
    """
    return _one_class_findings(cells, folds)[0]


def one_class_datasets(cells: pd.DataFrame, folds: np.ndarray | None = None, *,
                       names: Mapping[str, str] | None = None) -> dict[str, str]:
    """Datasets whose labelled cells are all one class inside a study whose labelled cells hold both:
    ``<dataset> of study <study>`` -> why.

    The study is mixed, so :func:`one_class_studies` does not name it, but its classes come from
    different datasets (ingested, often sequenced, apart): pooled folds put each such dataset on both
    sides of every fold, and a head can score its cells by recognising the dataset rather than the
    response. ``folds``: name only datasets whose cells fall in two or more folds; ``names``:
    dataset_id -> name, for the message.
    """
    return _one_class_findings(cells, folds, names)[1]


def _one_class_findings(cells: pd.DataFrame, folds: np.ndarray | None,
                        names: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """:func:`one_class_studies` and :func:`one_class_datasets` from one count of the cells (the grid asks
    both of every pooled category)."""
    groups = _one_class_groups(_fold_groups(cells, folds, names), spread=folds is not None)
    studies = {who: f"all {n} labelled cells {_class_name(y)}" for who, (kind, y, n) in groups.items() if kind == "study"}
    datasets = {who: f"all {n} labelled cells {_class_name(y)}, the study's other class in its other datasets"
                for who, (kind, y, n) in groups.items() if kind == "dataset"}
    return studies, datasets


def _fold_groups(cells: pd.DataFrame, folds: np.ndarray | None,
                 names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The labelled cells counted per (study, dataset, fold): n, lo and hi response (fold 0 without folds)."""
    keep = cells["response"].notna().to_numpy(bool)
    labelled = cells[keep]
    ids = labelled["dataset_id"].astype(str)
    frame = pd.DataFrame({
        "study": labelled["study"].astype(object).where(labelled["study"].notna(), labelled["dataset_id"]).astype(str),
        "dataset": ids.map(dict(names)).fillna(ids) if names else ids,
        "fold": np.zeros(len(labelled), np.int64) if folds is None else np.asarray(folds, np.int64)[keep],
        "response": labelled["response"].astype(np.int64)})
    out = frame.groupby(["study", "dataset", "fold"], sort=True)["response"].agg(n="size", lo="min", hi="max")
    return out.reset_index()


def _one_class_groups(groups: pd.DataFrame, *, spread: bool = True) -> dict[str, tuple[str, int, int]]:
    """Of one split's cells counted per (study, dataset, fold) (columns n, lo, hi): the one-class studies
    (among two or more studies) and the one-class datasets of mixed studies -> (``study`` or
    ``dataset``, class, cells). ``spread``: only those whose cells fall in two or more folds, so on
    both sides of a fold (a group tested whole in one fold is never seen in training)."""
    out: dict[str, tuple[str, int, int]] = {}
    least = 2 if spread else 1
    study = groups["study"].astype(str).to_numpy()
    dataset = groups["dataset"].astype(str).to_numpy()
    fold = groups["fold"].to_numpy(np.int64)
    n, lo, hi = (groups[c].to_numpy(np.int64) for c in ("n", "lo", "hi"))
    studies, by_study = np.unique(study, return_inverse=True)  # sorted, as the messages list them
    s_n, s_lo, s_hi, s_folds = _group_counts(by_study, len(studies), n, lo, hi, fold)
    if len(studies) >= 2:
        for i in np.flatnonzero((s_lo == s_hi) & (s_folds >= least)):
            out[str(studies[i])] = ("study", int(s_lo[i]), int(s_n[i]))
    inside = (s_lo != s_hi)[by_study]  # rows of mixed studies
    if inside.any():
        datasets, by_dataset = np.unique(dataset, return_inverse=True)
        # (study, dataset) codes in the order of the sorted pairs
        pairs, by_pair = np.unique(by_study[inside] * len(datasets) + by_dataset[inside], return_inverse=True)
        d_n, d_lo, d_hi, d_folds = _group_counts(by_pair, len(pairs), n[inside], lo[inside], hi[inside], fold[inside])
        for i in np.flatnonzero((d_lo == d_hi) & (d_folds >= least)):
            who, what = divmod(int(pairs[i]), len(datasets))
            out[f"{datasets[what]} of study {studies[who]}"] = ("dataset", int(d_lo[i]), int(d_n[i]))
    return out


def _group_counts(codes: np.ndarray, n_groups: int, n: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  fold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group code: cells, lowest and highest response, and distinct folds."""
    total = np.bincount(codes, weights=n, minlength=n_groups).astype(np.int64)
    low = np.full(n_groups, np.iinfo(np.int64).max)
    np.minimum.at(low, codes, lo)
    high = np.full(n_groups, np.iinfo(np.int64).min)
    np.maximum.at(high, codes, hi)
    distinct = np.unique(np.stack([codes, fold], axis=1), axis=0)
    return total, low, high, np.bincount(distinct[:, 0], minlength=n_groups)


def pooled_one_class_studies(st: Store, split_ids: Sequence[str]) -> dict[str, str]:
    """:func:`one_class_studies` and :func:`one_class_datasets` of the evaluated pooled splits among
    ``split_ids`` (their stored responses and folds), merged over the splits: study (or ``<dataset> of
    study <study>``) -> why (with the categories where it happens)."""
    frame = st.query(
        "SELECT p.split_id, p.category_type, p.category, coalesce(c.study, a.dataset_id) AS study, "
        "coalesce(d.name, a.dataset_id) AS dataset, a.fold, count(*) AS n, min(a.response) AS lo, "
        "max(a.response) AS hi FROM split_assignments a JOIN splits p USING (split_id) "
        'LEFT JOIN cells c ON c.dataset_id = a.dataset_id AND c."row" = a."row" '
        "LEFT JOIN datasets d ON d.dataset_id = a.dataset_id "
        "WHERE p.scenario = 'pooled' AND p.status = 'ok' AND list_contains(?, p.split_id) GROUP BY ALL", [list(split_ids)])
    where: dict[str, dict[str, str]] = {}
    for _, split in frame.groupby("split_id", sort=False):
        first = split.iloc[0]
        place = "all" if first["category_type"] == "all" else f"{first['category_type']} {first['category']}"
        for who, (_, y, _) in _one_class_groups(split).items():
            where.setdefault(who, {})[place] = _class_name(y)
    return {who: f"all labelled cells {'/'.join(sorted(set(places.values())))} in the pooled splits of "
                 f"{', '.join(sorted(places))}" for who, places in sorted(where.items())}


def _warn_if_one_class_studies(studies: dict[str, dict[str, str]], datasets: dict[str, dict[str, str]]) -> None:
    """One warning naming the one-class studies, and one-class datasets of mixed studies, of every pooled
    split made (study or dataset -> category -> why)."""
    parts = []
    if studies:
        n = len(studies)
        parts.append(f"{n} stud{'y' if n == 1 else 'ies'} whose labelled cells are all one class {'is' if n == 1 else 'are'} "
                     f"pooled with other studies ({_named(studies)}). Every pooled fold holds cells of "
                     f"{'it' if n == 1 else 'them'} on both sides, so a head can score by recognising the study rather "
                     "than the response")
    if datasets:
        n = len(datasets)
        parts.append(f"{n} dataset{'' if n == 1 else 's'} whose labelled cells are all one class "
                     f"{'is' if n == 1 else 'are'} pooled with datasets of the other class of {'its' if n == 1 else 'their'} "
                     f"study ({_named(datasets)}). Every pooled fold holds cells of {'it' if n == 1 else 'them'} on both "
                     "sides, so a head can score by recognising the dataset (its batch) rather than the response")
    if not parts:
        return
    msg = ("; ".join(parts) + "; read the pooled metrics of these splits with that in mind (the cross-data scenario "
           "does not reward it).")
    warnings.warn(msg, StudyLeakageWarning, stacklevel=4)


def _named(flagged: dict[str, dict[str, str]]) -> str:
    """A readable list of flagged groups (group -> category -> why): a few named, the rest counted."""
    shown = list(flagged.items())[:3]
    named = "; ".join(f"{who}: {next(iter(places.values()))} (in {', '.join(list(places)[:3])}"
                      f"{', ...' if len(places) > 3 else ''})" for who, places in shown)
    if len(flagged) > len(shown):
        named += f"; and {len(flagged) - len(shown)} more: {', '.join(list(flagged)[len(shown):])}"
    return named


def _warn_if_sample_labels_constant(cells: pd.DataFrame) -> None:
    studies = confounded_studies(cells)
    if not studies:
        return
    shown = list(studies.items())[:3]  # a readable line: name a few, count the rest
    named = "; ".join(f"{study}: {why}" for study, why in shown)
    if len(studies) > len(shown):
        named += f"; and {len(studies) - len(shown)} more: {', '.join(list(studies)[len(shown):])}"
    msg = (f"Labels are confounded with samples in {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} ({named}); "
           "cell-level folds put cells of one sample on both sides of a fold, so a head can score by recognising "
           "samples rather than response. Use grouped folds (--split-scheme sample; Python: split_scheme='sample'); the "
           "scDrugMap paper used cell-level folds.")
    lone = too_few_samples_to_group(cells, studies)
    if lone:
        msg += (f" Grouped folds cannot rescue {', '.join(lone[:3])}{', ...' if len(lone) > 3 else ''} on its own: with "
                "fewer than two samples of a class, no fold trains and tests on both classes of that study. Evaluate "
                "it pooled with other studies or cross-data, or ingest more samples.")
    warnings.warn(msg, SampleLeakageWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# fold assignment
# --------------------------------------------------------------------------------------------
def _cell_folds(cells: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Stratified cell-level folds, dealt per (atom, response) stratum (see module docstring)."""
    folds = np.empty(len(cells), np.int64)
    strata = cells.groupby([*_ATOM_COLUMNS, _strata_column(cells)], sort=True, dropna=False).indices
    for key, idx in strata.items():
        rng = np.random.default_rng(_seed_of(SPLIT_ALGORITHM, seed, [str(k) for k in key]))
        order = idx[np.argsort(cells["row"].to_numpy()[idx], kind="stable")]
        perm = rng.permutation(order.size)
        offset = int(rng.integers(n_folds))
        folds[order[perm]] = (offset + np.arange(order.size)) % n_folds
    return folds


def _sample_folds(cells: pd.DataFrame, n_folds: int, seed: int) -> tuple[np.ndarray, int]:
    """Grouped folds (StratifiedGroupKFold over all cells, groups = study + sample)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if cells["sample"].isna().any():
        n_missing = int(cells["sample"].isna().sum())
        msg = (f"split_scheme='sample' needs a sample id for every cell, but {n_missing} labelled cells have none. "
               "Ingest the datasets with sample_key=<obs column of sample/patient ids>, or use split_scheme='cell'.")
        raise InputDataError(msg)
    groups = _group_codes(cells, ["study", "sample"])
    n_groups = int(groups.max()) + 1 if groups.size else 0
    k = min(n_folds, n_groups)
    if k < 2:
        return np.zeros(len(cells), np.int64), max(k, 1)
    if k < n_folds:
        logger.warning("split_scheme='sample': only %d samples, so %d folds instead of %d", n_groups, k, n_folds)
    folds = np.empty(len(cells), np.int64)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with ignoring(UserWarning):  # "least populated class" on tiny data
        for fold, (_, test) in enumerate(sgkf.split(np.zeros(len(cells)), cells[_strata_column(cells)].to_numpy(), groups)):
            folds[test] = fold
    return folds, k


# --------------------------------------------------------------------------------------------
# building splits
# --------------------------------------------------------------------------------------------
def _categories(cells: pd.DataFrame, category_type: str) -> list[tuple[str, np.ndarray]]:
    if category_type == "all":
        return [("all", np.ones(len(cells), bool))]
    values = cells[category_type]
    if values.isna().any():  # a category type the user asked for: say how many cells it cannot place
        warnings.warn(f"{int(values.isna().sum())} of {len(cells)} labelled cells have no {category_type} and are left out "
                      f"of the {category_type} categories (they stay in 'all'); give them one at ingest "
                      f"(--{category_type.replace('_', '-')}-key or --{category_type.replace('_', '-')}).",
                      ScdmWarning, stacklevel=2)
    return [(str(v), (values == v).to_numpy(bool)) for v in sorted(values.dropna().unique(), key=str)]


def _make(definition: dict[str, Any], sub: pd.DataFrame, folds: np.ndarray, n_folds: int, *,
          labels: dict[int, str] | None = None, reason: str | None = None) -> Split:
    frame = sub[["dataset_id", "row", "response"]].reset_index(drop=True)
    frame["fold"] = pd.array(folds, dtype="Int64")
    chash = cells_hash(frame)
    skipped: dict[int, str] = {}
    if reason is None:
        y = frame["response"].to_numpy()
        fold_values = frame["fold"].to_numpy(dtype=float, na_value=np.nan)
        for f in range(n_folds):
            test = fold_values == f
            train = ~test
            name = (labels or {}).get(f, str(f))
            if not test.any():
                skipped[f] = f"fold {name} has no test cells"
            elif np.unique(y[train]).size < 2:
                skipped[f] = f"training cells of fold {name} hold one class only"
            elif definition["scenario"] == "cross" and np.unique(y[test]).size < 2:
                skipped[f] = f"held-out study {name!r} holds one class only ({int(test.sum())} cells, all {_class_name(y[test][0])})"
    return Split(split_id=_split_id(definition, chash), scenario=definition["scenario"],
                 category_type=definition["category_type"], category=definition["category"],
                 scheme=definition["scheme"], n_folds=n_folds, seed=definition.get("seed"), cells=frame,
                 fold_labels=labels or {}, skipped_folds=skipped, reason=reason, definition=definition,
                 cells_hash=chash)


def _class_name(response: int) -> str:
    return "sensitive" if int(response) == 1 else "resistant"


def _single_class_reason(sub: pd.DataFrame) -> str | None:
    classes = np.unique(sub["response"].to_numpy())
    if len(sub) == 0:
        return "no labelled cells"
    if classes.size < 2:
        return f"category holds one class only ({len(sub)} cells, all {_class_name(classes[0])})"
    return None


def _strata_column(cells: pd.DataFrame) -> str:
    """The labels folds are stratified by: another label set's (paired folds) or the evaluated ones."""
    return "fold_response" if "fold_response" in cells.columns else "response"


def _pooled(cells: pd.DataFrame, by: Sequence[str], n_folds: int, scheme: str, seed: int,
            folds_from: str | None = None, dataset_names: Mapping[str, str] | None = None) -> list[Split]:
    if scheme == "cell":
        base, k = _cell_folds(cells, n_folds, seed), n_folds
        _warn_if_sample_labels_constant(cells)
        extra: dict[str, Any] = {}
    else:
        base, k = _sample_folds(cells, n_folds, seed)
        # StratifiedGroupKFold balances folds over all cells, so the base cell set is part of the identity.
        strata = cells.assign(response=cells[_strata_column(cells)])
        extra = {"base_cells": cells_hash(strata), "requested_folds": n_folds}
    if folds_from is not None:
        extra["folds_from"] = folds_from  # the partition of another label set: paired comparisons
    out = []
    studies: dict[str, dict[str, str]] = {}
    datasets: dict[str, dict[str, str]] = {}
    for ctype in by:
        for category, mask in _categories(cells, ctype):
            definition = {"algorithm": SPLIT_ALGORITHM, "scenario": "pooled", "category_type": ctype,
                          "category": category, "scheme": scheme, "n_folds": k, "seed": seed, **extra}
            sub = cells[mask]
            out.append(_make(definition, sub, base[mask], k, reason=_single_class_reason(sub)))
            if out[-1].reason is None:
                place = "all" if ctype == "all" else f"{ctype} {category}"
                found_studies, found_datasets = _one_class_findings(sub, base[mask], dataset_names)
                for study, why in found_studies.items():
                    studies.setdefault(study, {})[place] = why
                for dataset, why in found_datasets.items():
                    datasets.setdefault(dataset, {})[place] = why
    _warn_if_one_class_studies(studies, datasets)
    return out


def _cross(cells: pd.DataFrame, by: Sequence[str]) -> list[Split]:
    out = []
    for ctype in by:
        for category, mask in _categories(cells, ctype):
            sub = cells[mask]
            studies = sorted(sub["study"].astype(str).unique())
            definition = {"algorithm": SPLIT_ALGORITHM, "scenario": "cross", "category_type": ctype,
                          "category": category, "scheme": "study", "n_folds": len(studies), "seed": None}
            folds = pd.Series(sub["study"].astype(str)).map({s: i for i, s in enumerate(studies)}).to_numpy()
            reason = _single_class_reason(sub)
            if reason is None and len(studies) < 2:
                reason = f"category has one study only ({studies[0]!r}); leave-one-study-out needs two or more"
            out.append(_make(definition, sub, folds, max(len(studies), 1), labels=dict(enumerate(studies)), reason=reason))
    return out


def _custom(cells: pd.DataFrame, by: Sequence[str], custom: pd.DataFrame) -> list[Split]:
    """Custom assignments: ``custom`` has dataset_id, row (or cell_id) and fold (int >= 0, or 'train'/'test')."""
    key = "row" if "row" in custom.columns else "cell_id"
    need = {"dataset_id", key, "fold"}
    if not need <= set(custom.columns) or key not in cells.columns:
        msg = (f"custom assignments need columns dataset_id, row (or cell_id) and fold; got {list(custom.columns)}. "
               "fold is an integer test fold per cell, or 'train'/'test'.")
        raise InputDataError(msg)
    if custom.duplicated(["dataset_id", key]).any():
        msg = "custom assignments list some cells twice; give one fold per cell."
        raise InputDataError(msg)
    raw = custom["fold"]
    text = raw.astype(str).str.lower()
    if text.isin(["train", "test"]).all():
        codes = pd.array(np.where(text == "test", 0, -1), dtype="Int64")
        labels = {0: "test"}
    else:
        numeric = pd.to_numeric(raw, errors="coerce")
        wrong = numeric.isna() | (numeric < 0) | (numeric % 1 != 0)
        if wrong.any():
            bad = raw[wrong].unique()[:5].tolist()  # fractions too: 'found []' named none of them
            msg = f"custom fold values must be integers >= 0 or 'train'/'test'; found {bad}."
            raise InputDataError(msg)
        uniq = sorted(numeric.astype(int).unique())
        remap = {v: i for i, v in enumerate(uniq)}
        codes = pd.array(numeric.astype(int).map(remap), dtype="Int64")
        labels = {i: str(v) for v, i in remap.items()}
    assign = pd.DataFrame({"dataset_id": custom["dataset_id"].astype(str).to_numpy(), key: custom[key].to_numpy(),
                           "_fold": codes})
    merged = cells.merge(assign, on=["dataset_id", key], how="inner")
    if merged.empty:
        msg = "No cell of the custom assignments matches the evaluated cells (check dataset_id and row/cell_id)."
        raise InputDataError(msg)
    merged = merged.sort_values(["dataset_id", "row"]).reset_index(drop=True)
    content = hashlib.blake2b(pd.util.hash_pandas_object(
        merged[["dataset_id", "row", "_fold"]].astype(str), index=False).to_numpy().tobytes(), digest_size=8).hexdigest()
    folds = merged["_fold"].where(merged["_fold"] >= 0)
    n_folds = len(labels)
    out = []
    for ctype in by:
        for category, mask in _categories(merged, ctype):
            sub = merged[mask]
            definition = {"algorithm": SPLIT_ALGORITHM, "scenario": "custom", "category_type": ctype,
                          "category": category, "scheme": "custom", "n_folds": n_folds, "seed": None,
                          "assignments": content}
            out.append(_make(definition, sub, folds[mask].to_numpy(), n_folds, labels=labels,
                             reason=_single_class_reason(sub)))
    return out


def make_splits(
    cells: pd.DataFrame,
    *,
    scenarios: Iterable[Literal["pooled", "cross", "custom"]] = ("pooled", "cross"),
    by: Iterable[str] = CATEGORY_TYPES,
    n_folds: int = 10,
    scheme: Literal["auto", "cell", "sample"] = "auto",
    seed: int = 0,
    custom: pd.DataFrame | None = None,
    folds_from: str | None = None,
    dataset_names: Mapping[str, str] | None = None,
) -> list[Split]:
    """Build every split of every category of ``by`` for the given scenarios.

    Parameters
    ----------
    cells : DataFrame
        As returned by ``Store.cells()``: dataset_id, row, study, sample, tissue, cancer_type,
        drug_type, regimen, response. Cells without a response are left out.
    scenarios : iterable of {"pooled", "cross", "custom"}, default ("pooled", "cross")
    by : iterable of category types, default all five
    n_folds : int, default 10
        Folds of the pooled scenario.
    scheme : {"auto", "cell", "sample"}, default "auto"
        Pooled folds grouped by (study, sample), or at cell level (the scDrugMap protocol, which
        can leak sample identity); ``auto`` is :func:`resolve_split_scheme`'s choice.
    seed : int, default 0
    custom : DataFrame, optional
        Needed for the ``custom`` scenario: dataset_id, row (or cell_id), fold.
    folds_from : str, optional
        Name of another label set whose labels (column ``fold_response`` of ``cells``) stratify the
        pooled folds instead of ``response``: two label sets of the same cells then get the same
        partition, so drug-vs-drug comparisons are paired fold by fold.
    dataset_names : mapping, optional
        dataset_id -> name, for the warnings that name datasets (default: their ids).

    Returns
    -------
    list of Split
        Skipped splits are included (``reason`` set) so that they can be recorded.

    Raises
    ------
    InputDataError
        Unknown scenario/category type/scheme, bad ``n_folds``, missing sample ids for the
        ``sample`` scheme, or a ``custom`` scenario without assignments.
    """
    # a category type or scenario named twice is built once: twice, its splits' tasks would be fitted twice
    # and stored under one task id (the catalog's primary key refuses the second)
    scenarios, by = list(dict.fromkeys(scenarios)), list(dict.fromkeys(by))
    for value, allowed, what in ((scenarios, SCENARIOS, "scenario"), (by, CATEGORY_TYPES, "category type")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            msg = f"Unknown {what} {unknown}; choose from {', '.join(allowed)}."
            raise InputDataError(msg)
    if scheme not in SPLIT_SCHEMES:
        msg = f"split_scheme={scheme!r} is not one of {', '.join(map(repr, SPLIT_SCHEMES))}."
        raise InputDataError(msg)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        # in the caller's words (--folds on the command line), as grid's warnings about the same option
        msg = f"{option('folds', repr(n_folds))} must be an integer >= 2 (folds of the pooled scenario)."
        raise InputDataError(msg)
    seed = split_seed(seed)
    if "custom" in scenarios and custom is None:
        msg = "The 'custom' scenario needs custom=<DataFrame with dataset_id, row (or cell_id), fold>."
        raise InputDataError(msg)
    labelled = _labelled(cells)
    if labelled.empty:
        msg = "None of the cells has a response label; ingest the datasets with label_key=<obs column>."
        raise InputDataError(msg)
    if "pooled" in scenarios:
        scheme = resolve_split_scheme(labelled, scheme, int(n_folds))
        _check_fold_count(labelled, int(n_folds), scheme)
    out: list[Split] = []
    if "pooled" in scenarios:
        if folds_from is not None and "fold_response" not in labelled.columns:
            msg = "folds_from needs a fold_response column in cells (the other label set's responses)."
            raise InputDataError(msg)
        out += _pooled(labelled, by, int(n_folds), scheme, seed, folds_from, dataset_names)
    if "cross" in scenarios:
        out += _cross(labelled, by)
    if "custom" in scenarios:
        assert custom is not None  # checked above
        out += _custom(labelled, by, custom)
    return [replace(s, label_set=_label_set_names(labelled, s.cells["dataset_id"])) for s in out]


def split_seed(seed: Any) -> int:
    """``seed`` as the int every split is dealt and identified with, or a clear error.

    The folds are dealt from a hash of the seed's JSON, so ``1``, ``1.0`` and ``numpy.int64(1)``
    (spelled ``"1"``) dealt three different partitions, each stored as seed 1 under an id of its own.
    An integer of any type is that integer; anything else (a fraction, a bool, a negative) is refused.

    Raises
    ------
    InputDataError
        ``seed`` is not an integer >= 0.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed={seed!r} must be an integer >= 0 (it deals the pooled folds); pass a whole number such as 0."
        raise InputDataError(msg)
    return int(seed)


def resolve_split_scheme(cells: pd.DataFrame, scheme: str, n_folds: int) -> Literal["cell", "sample"]:
    """The pooled scheme that ``auto`` stands for on these cells (``cell``/``sample`` pass through).

    ``sample`` when every labelled cell has a sample id and the cells come from at least
    ``n_folds`` samples (and at least two); otherwise ``cell``. Sample ids that exist but are too
    few, or missing on some of the cells, give one :class:`SampleLeakageWarning` line saying so.
    """
    if scheme in ("cell", "sample"):
        return cast(Literal["cell", "sample"], scheme)
    labelled = cells[cells["response"].notna()]
    if labelled.empty or labelled["sample"].isna().all():
        return "cell"
    missing = labelled["sample"].isna()
    if missing.any():
        where = ", ".join(sorted({str(v) for v in labelled.loc[missing, "study"].dropna().unique()})[:3])
        warnings.warn(f"{int(missing.sum())} of {len(labelled)} labelled cells have no sample id (studies: {where}), so "
                      "the pooled folds are cell-level (scheme 'cell'; cells of one sample fall on both sides of a fold). "
                      "Give every cell a sample id (sample_key=, or sample= for a one-sample dataset) for grouped folds.",
                      SampleLeakageWarning, stacklevel=3)
        return "cell"
    n_samples = int(labelled[["study", "sample"]].astype(str).drop_duplicates().shape[0])
    if n_samples >= max(n_folds, 2):
        return "sample"
    warnings.warn(f"only {n_samples} sample{'s' if n_samples != 1 else ''} for {n_folds} folds, so the pooled folds are "
                  "cell-level (scheme 'cell', the scDrugMap protocol; cells of one sample fall on both sides of a fold)",
                  SampleLeakageWarning, stacklevel=3)
    return "cell"


def _label_set_names(labelled: pd.DataFrame, dataset_ids: Iterable[str]) -> str | None:
    """The label sets whose responses a split over these datasets' cells reads (sorted, comma-separated).

    Per split, not per space: a category holding one dataset's cells used that dataset's labels only.
    """
    if "label_set" not in labelled.columns:
        return None
    mine = labelled[labelled["dataset_id"].isin(set(dataset_ids))]
    names = sorted({str(v) for v in mine["label_set"].dropna().unique()})
    return ",".join(names) or None


def _check_fold_count(labelled: pd.DataFrame, n_folds: int, scheme: str) -> None:
    """Refuse k that no category could honour (more folds than cells of the smaller class, or than samples)."""
    counts = labelled["response"].value_counts()
    smallest = int(counts.min()) if counts.size == 2 else 0
    if counts.size == 2 and n_folds > smallest:
        which = "sensitive" if int(counts.idxmin()) == 1 else "resistant"
        msg = (f"{n_folds} folds asked for, but the labelled cells hold only {smallest} {which} cells: most folds would "
               f"have no {which} test cell. Use --folds between 2 and {smallest}.")
        raise InputDataError(msg)
    if scheme == "sample" and labelled["sample"].notna().all():
        n_samples = int(labelled[["study", "sample"]].astype(str).drop_duplicates().shape[0])
        if n_folds > n_samples:
            msg = (f"{n_folds} folds asked for with split_scheme='sample', but the labelled cells come from only "
                   f"{n_samples} samples. Use --folds between 2 and {max(n_samples, 2)}.")
            raise InputDataError(msg)


# --------------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------------
def save_splits(st: Store, splits: Sequence[Split]) -> int:
    """Store splits that the catalog does not hold yet; returns how many were new.

    A split already in the catalog (same ``split_id``) is left untouched: it was built from the
    same definition and the same cells, so it is the same partition. A split is written whole in
    one transaction (its row, folds and cells), and two processes storing the same split at once
    both succeed.
    """
    if not splits:
        return 0
    ids = [s.split_id for s in splits]
    existing = set(st.query("SELECT split_id FROM splits WHERE list_contains(?, split_id)", [ids])["split_id"])
    new, seen = [], set(existing)
    for split in splits:
        if split.split_id not in seen:
            seen.add(split.split_id)
            new.append(split)
    if not new:
        return 0
    names = dict(st.query("SELECT dataset_id, name FROM datasets").itertuples(index=False, name=None))
    now = pd.Timestamp.now(tz="UTC").tz_localize(None)
    assign = pd.concat([s.cells[["dataset_id", "row", "fold", "response"]].assign(split_id=s.split_id) for s in new],
                       ignore_index=True)
    assign["row"] = assign["row"].astype(np.int32)
    assign["response"] = assign["response"].astype(np.int8)
    heads = pd.DataFrame([{
        "split_id": s.split_id, "scenario": s.scenario, "category_type": s.category_type, "category": s.category,
        "scheme": s.scheme, "n_folds": s.n_folds, "seed": s.seed, "n_cells": s.n_cells,
        "n_studies": len(s.fold_labels) if s.scenario == "cross" else None, "cells_hash": s.cells_hash,
        "status": s.status, "reason": s.reason, "definition": json.dumps(s.definition, sort_keys=True),
        "created_at": now, "label_set": s.label_set, "datasets": split_datasets(s, names)} for s in new])
    with st.catalog.transaction() as con:
        catalog = st.catalog
        catalog.insert_df("split_assignments", assign[["split_id", "dataset_id", "row", "fold", "response"]], con, or_ignore=True)
        catalog.insert_df("split_folds", pd.concat([_fold_rows(s) for s in new], ignore_index=True), con, or_ignore=True)
        catalog.insert_df("splits", heads, con, or_ignore=True)
    logger.info("stored %d new splits (%d already in the catalog)", len(new), len(splits) - len(new))
    return len(new)


def shared_partitions(st: Store, splits: Sequence[Split]) -> list[Split]:
    """The splits, each stored under other label-set names marked with them (``partition_of``).

    Label sets with identical responses on the same cells (JHU006's Vorinostat and AR-42) give the
    same split id: one partition, stored once under the first name. Marked splits give their
    tasks ids of their own, so results are reported under the label set asked for.
    """
    ids = [s.split_id for s in splits]
    if not ids:
        return []
    stored = dict(st.query("SELECT split_id, label_set FROM splits WHERE list_contains(?, split_id)", [ids])
                  .itertuples(index=False, name=None))
    out = []
    for split in splits:
        name = stored.get(split.split_id)
        name = None if name is None or pd.isna(name) else str(name)
        out.append(replace(split, partition_of=name) if name is not None and name != split.label_set else split)
    return out


def split_datasets(split: Split, names: dict[str, str]) -> str:
    """The names of the datasets a split covers, sorted and comma-separated (a result-identity column)."""
    return ",".join(sorted({names.get(d, d) for d in split.cells["dataset_id"].unique()}))


def _fold_rows(split: Split) -> pd.DataFrame:
    y = split.cells["response"].to_numpy()
    fold = split.cells["fold"].to_numpy(dtype=float, na_value=np.nan)
    rows = []
    for f in range(split.n_folds):
        test = fold == f
        reason = split.reason or split.skipped_folds.get(f)
        rows.append({"split_id": split.split_id, "fold": f, "label": split.fold_labels.get(f),
                     "n_train": int((~test).sum()), "n_test": int(test.sum()), "n_test_pos": int(y[test].sum()),
                     "status": "skipped" if reason else "ok", "reason": reason})
    return pd.DataFrame(rows)


def load_split(st: Store, split_id: str) -> Split:
    """Read a stored split back (its cells, folds, labels and skip reasons)."""
    head = st.query("SELECT * FROM splits WHERE split_id = ?", [split_id])
    if head.empty:
        msg = f"No split {split_id!r} in the catalog; list them with SELECT * FROM splits."
        raise InputDataError(msg)
    meta = head.iloc[0]
    # the split stores the responses it was made with (its label set), so it reads back the same
    cells = st.query(
        'SELECT a.dataset_id, a."row", a.response, a.fold FROM split_assignments a '
        'WHERE a.split_id = ? ORDER BY a.dataset_id, a."row"', [split_id])
    cells["row"] = cells["row"].astype(np.int64)
    cells["response"] = cells["response"].astype(np.int8)
    cells["fold"] = cells["fold"].astype("Int64")
    folds = st.query("SELECT * FROM split_folds WHERE split_id = ? ORDER BY fold", [split_id])
    labels = {int(r.fold): r.label for r in folds.itertuples() if r.label is not None and not pd.isna(r.label)}
    skipped = {int(r.fold): r.reason for r in folds.itertuples()
               if r.status == "skipped" and (meta["reason"] is None or pd.isna(meta["reason"]))}
    reason = None if meta["reason"] is None or pd.isna(meta["reason"]) else str(meta["reason"])
    seed = None if pd.isna(meta["seed"]) else int(meta["seed"])
    return Split(split_id=split_id, scenario=meta["scenario"], category_type=meta["category_type"],
                 category=meta["category"], scheme=meta["scheme"], n_folds=int(meta["n_folds"]), seed=seed,
                 cells=cells, fold_labels=labels, skipped_folds=skipped, reason=reason,
                 definition=json.loads(meta["definition"]), cells_hash=meta["cells_hash"],
                 label_set=None if pd.isna(meta.get("label_set")) else str(meta["label_set"]))


def find_splits(st: Store, dataset_ids: Sequence[str], *, scenario: str, category_type: str,
                label_set: str | None = None) -> pd.DataFrame:
    """Stored splits of exactly the labelled cells of these datasets, one row per split.

    A split qualifies when it covers no other dataset and as many cells as the datasets have
    labelled cells in its category under ``label_set`` (default: each dataset's default label set).
    Columns are those of the ``splits`` table plus ``dataset_ids`` (a list).
    """
    if category_type not in CATEGORY_TYPES:
        msg = f"Unknown category type {category_type!r}; choose from {', '.join(CATEGORY_TYPES)}."
        raise InputDataError(msg)
    frame = st.query(
        "SELECT s.*, list_sort(list(DISTINCT a.dataset_id)) AS dataset_ids "
        "FROM splits s JOIN split_assignments a USING (split_id) "
        "WHERE s.scenario = ? AND s.category_type = ? GROUP BY ALL ORDER BY s.category, s.created_at",
        [scenario, category_type])
    if frame.empty:
        return frame
    cells = st.cells(list(dataset_ids), label_set=label_set)
    cells = cells[cells["response"].notna()]
    key = pd.Series("all", index=cells.index) if category_type == "all" else cells[category_type].astype(str)
    counts = key.value_counts().to_dict()
    wanted = set(dataset_ids)
    keep = [set(ds) <= wanted and int(n) == counts.get(str(cat), -1)
            and (not isinstance(ls, str) or ls == _label_set_names(cells, ds))
            for ds, n, cat, ls in zip(frame["dataset_ids"], frame["n_cells"], frame["category"], frame["label_set"])]
    return frame[keep].reset_index(drop=True)


def splits_of_same_labels(st: Store, dataset_ids: Sequence[str], *, scenario: str, category_type: str,
                          label_set: str) -> pd.DataFrame:
    """Stored splits, under another label-set name, of exactly ``label_set``'s labelled cells and responses.

    Label sets with identical responses on the same cells share one split, stored under the first
    name (:func:`shared_partitions`), which :func:`find_splits` does not return for ``label_set``.
    Same columns as :func:`find_splits`.
    """
    frame = st.query(
        "SELECT s.*, list_sort(list(DISTINCT a.dataset_id)) AS dataset_ids "
        "FROM splits s JOIN split_assignments a USING (split_id) "
        "WHERE s.scenario = ? AND s.category_type = ? GROUP BY ALL ORDER BY s.category, s.created_at",
        [scenario, category_type])
    cells = st.cells(list(dataset_ids), label_set=label_set)
    cells = cells[cells["response"].notna()]
    cells = cells.assign(row=cells["row"].astype(np.int64), response=cells["response"].astype(np.int8))
    wanted = set(dataset_ids)
    keep = []
    for ds, category, chash in zip(frame["dataset_ids"], frame["category"], frame["cells_hash"]):
        sub = cells if category_type == "all" else cells[cells[category_type].astype(str) == str(category)]
        keep.append(set(ds) <= wanted and not sub.empty and cells_hash(sub) == chash)
    return frame[keep].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# splits made stale by a change of their cells (store-internal, inside the writer's transaction)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgottenSplits:
    """What :func:`forget_splits` deleted, and what it left that was trained on those splits."""

    splits: int = 0
    tasks: int = 0
    adapters: tuple[str, ...] = ()
    """LoRA adapters trained on a fold of a deleted split: kept, but no longer evaluated."""

    def __add__(self, other: ForgottenSplits) -> ForgottenSplits:
        return ForgottenSplits(self.splits + other.splits, self.tasks + other.tasks, self.adapters + other.adapters)

    def __bool__(self) -> bool:
        return bool(self.splits or self.tasks)

    def describe(self) -> str:
        text = f"{self.splits} splits and {self.tasks} evaluation results made from the old data were removed"
        if self.adapters:
            text += (f"; {len(self.adapters)} LoRA adapters were tuned on their folds ({', '.join(self.adapters)}): "
                     "their tuned embeddings are no longer evaluated, fine-tune again on the new splits")
        return text


def stale_splits(con: duckdb.DuckDBPyConnection, dataset_id: str, *, changed: Iterable[str] = (),
                 label_set: str | None = None) -> list[str]:
    """The stored splits of a dataset's cells that a change of those cells makes wrong.

    ``label_set``: that label set's labels were replaced: the splits made with it (or paired with
    its folds). ``changed``: these metadata columns were rewritten: a sample-only change affects
    the ``sample`` scheme; study and category columns define cross folds, category membership and
    the strata of ``cell`` folds, so any other change affects every split. Neither: the dataset is
    removed, every split of its cells.
    """
    frame = con.execute(
        "SELECT s.split_id, s.scheme, s.label_set, s.definition FROM splits s WHERE s.split_id IN "
        "(SELECT DISTINCT split_id FROM split_assignments WHERE dataset_id = ?) ORDER BY s.split_id", [dataset_id]).df()
    if label_set is not None:
        names = frame["label_set"].fillna("").astype(str).str.split(",")
        paired = frame["definition"].map(lambda d: json.loads(d).get("folds_from"))
        keep = names.map(lambda n: label_set in n) | (paired == label_set)
        frame = frame[keep.to_numpy(bool)]
    elif set(changed) and set(changed) <= {"sample"}:
        frame = frame[frame["scheme"] == "sample"]
    return [str(v) for v in frame["split_id"]]


def forget_label_set(con: duckdb.DuckDBPyConnection, dataset_id: str, label_set: str) -> ForgottenSplits:
    """Delete what was made with a dataset's label set whose labels were replaced: the splits stored
    under it, and its tasks on splits shared with other label sets (:func:`shared_partitions`)."""
    forgotten = forget_splits(con, stale_splits(con, dataset_id, label_set=label_set))
    theirs = con.execute("SELECT DISTINCT split_id FROM split_assignments WHERE dataset_id = ?", [dataset_id]).fetchall()
    shared = forget_tasks(con, [r[0] for r in theirs], label_set)
    return forgotten + ForgottenSplits(tasks=shared)


def forget_splits(con: duckdb.DuckDBPyConnection, split_ids: Sequence[str]) -> ForgottenSplits:
    """Delete these splits, their fold assignments and every evaluation made on them."""
    ids = list(split_ids)
    if not ids:
        return ForgottenSplits()
    tasks = forget_tasks(con, ids)
    adapters = [r[0] for r in con.execute(
        "SELECT adapter_id FROM adapters WHERE list_contains(?, split_id) ORDER BY adapter_id", [ids]).fetchall()]
    for table in ("split_assignments", "split_folds", "splits"):
        con.execute(f"DELETE FROM {table} WHERE list_contains(?, split_id)", [ids])
    return ForgottenSplits(splits=len(ids), tasks=tasks, adapters=tuple(str(a) for a in adapters))
