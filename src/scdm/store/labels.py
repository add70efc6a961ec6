"""Label sets: the named drug-response labels of a dataset.

A dataset is its expression content (matrix, gene ids, cell ids). Its response labels are a
*label set*: where they came from (obs column, positive value, unknown values), the drug they are
the response to, and the per-cell labels (1 = sensitive, 0 = resistant; unlabelled cells have no
row). One matrix may carry several label sets (JHU006: Gefitinib and Vorinostat responses of the
same cells). One of them is the dataset's default: what evaluation uses unless told otherwise,
and what ``cells.response`` holds.

Every split, evaluation result, trained head and LoRA tuning records the label set(s) it used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store._catalog import registered
from scdm.store.errors import InputDataError

if TYPE_CHECKING:
    import duckdb

    from scdm.store._store import Store

__all__ = [
    "LabelSet",
    "label_set_id_of",
    "labels_hash",
    "label_sets",
    "resolve_label_sets",
    "label_set_name",
    "mixed_drugs_sql",
]


@dataclass(frozen=True)
class LabelSet:
    """One named set of response labels of one dataset."""

    label_set_id: str
    """First 16 hex digits of md5(dataset_id/name)."""
    dataset_id: str
    name: str
    """Unique within the dataset; default: the drug, else the label column."""
    label_key: str | None
    """obs column the labels came from."""
    positive: str | None
    """Label value meaning sensitive (None: sensitive/resistant-like words, 0/1)."""
    unknown_values: tuple[str, ...]
    drug: str | None
    is_default: bool
    n_labelled: int
    n_sensitive: int
    labels_hash: str
    """Equal hashes mean equal labels on the same cells."""

    def same_source(self, label_key: str | None, positive: str | None, unknown_values: Sequence[str], drug: str | None) -> bool:
        """True when labels read with these options are this label set's."""
        return (self.label_key == label_key and self.positive == positive
                and tuple(self.unknown_values) == tuple(unknown_values) and (drug is None or self.drug == drug))


def label_set_id_of(dataset_id: str, name: str) -> str:
    """The id of label set ``name`` of a dataset (the migration computes the same in SQL)."""
    return hashlib.md5(f"{dataset_id}/{name}".encode()).hexdigest()[:16]


def labels_hash(rows: np.ndarray, response: np.ndarray) -> str:
    """Hash of (row, response) pairs in row order, equal to the migration's SQL formula."""
    order = np.argsort(rows, kind="stable")
    text = ",".join(f"{int(r)}:{int(y)}" for r, y in zip(np.asarray(rows)[order], np.asarray(response)[order]))
    return hashlib.md5(text.encode()).hexdigest()


def label_set_name(label_key: str | None, drug: str | None, name: str | None) -> str:
    """The name a new label set gets: the one given, else the drug, else the label column.

    Result rows join the label sets of pooled datasets with commas, so a name holds none: a given
    one with a comma is refused, a drug combination ("5-FU,cisplatin") is named "5-FU+cisplatin".
    """
    if name is not None:
        if "," in name:
            msg = f"Label set name {name!r} holds a comma, which joins label sets in result rows; use another, e.g. {name.replace(',', '+')!r}."
            raise InputDataError(msg)
        return name
    return (drug or label_key or "response").replace(",", "+")


def _record(row: dict[str, Any]) -> LabelSet:
    unknown = row.get("unknown_values")
    values = tuple(json.loads(unknown)) if isinstance(unknown, str) else tuple(unknown or ())
    return LabelSet(
        label_set_id=row["label_set_id"], dataset_id=row["dataset_id"], name=row["name"],
        label_key=_none(row.get("label_key")), positive=_none(row.get("positive")), unknown_values=values,
        drug=_none(row.get("drug")), is_default=bool(row["is_default"]), n_labelled=int(row["n_labelled"]),
        n_sensitive=int(row["n_sensitive"]), labels_hash=str(row["labels_hash"]),
    )


def _none(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else value


def label_sets(st: Store, datasets: str | Iterable[str] | None = None) -> list[LabelSet]:
    """Label sets of some (default: all) datasets, default first within each dataset."""
    sql = "SELECT * FROM label_sets"
    args: list[Any] = []
    if datasets is not None:
        names = [datasets] if isinstance(datasets, str) else list(datasets)
        args.append([st.dataset(n).dataset_id for n in names])
        sql += " WHERE list_contains(?, dataset_id)"
    frame = st.query(sql + " ORDER BY dataset_id, NOT is_default, created_at, name", args)
    return [_record(r) for r in frame.to_dict("records")]


def resolve_label_sets(st: Store, dataset_ids: Sequence[str], name: str | None = None) -> dict[str, LabelSet]:
    """The label set each dataset is evaluated with: ``name`` if given, else its default.

    Raises
    ------
    InputDataError
        A dataset has no labels, or no label set called ``name`` (the message lists what it has).
    """
    found: dict[str, list[LabelSet]] = {}
    for ls in label_sets(st, list(dataset_ids)):
        found.setdefault(ls.dataset_id, []).append(ls)
    out: dict[str, LabelSet] = {}
    for dataset_id in dataset_ids:
        have = found.get(dataset_id, [])
        dname = st.dataset(dataset_id).name
        if not have:
            msg = (f"Dataset {dname!r} has no response labels. Add them with "
                   f"`scdm ingest FILE.h5ad --label-key COLUMN` (the same file again adds a label set).")
            raise InputDataError(msg)
        if name is None:
            out[dataset_id] = next((ls for ls in have if ls.is_default), have[0])
            continue
        match = [ls for ls in have if ls.name == name]
        if not match:
            names = ", ".join(ls.name for ls in have)
            msg = f"Dataset {dname!r} has no label set {name!r}; its label sets: {names}. Choose one with --label-set."
            raise InputDataError(msg)
        out[dataset_id] = match[0]
    return out


def mixed_drugs_sql() -> str:
    """SQL subquery of ``split_id, label_set, note`` for each evaluated split and label set whose datasets
    are labelled for different drugs; ``note`` is ``'labelled for different drugs (a375: PLX-4720, ...)'``.

    A result's ``datasets`` and ``label_set`` join names with commas and do not say which label set was
    each dataset's: the split's own datasets are read from its cell assignments, and each dataset's label
    set is the one of the result's names it has, its default first, as evaluation picked it (several
    names are each dataset's defaults; one name is every dataset's label set of that name).
    """
    return (
        "(SELECT split_id, label_set, 'labelled for different drugs (' "
        "|| string_agg(dataset || ': ' || drug, ', ' ORDER BY dataset) || ')' AS note "
        "FROM (SELECT k.split_id, k.label_set, d.name AS dataset, l.drug, row_number() OVER "
        "(PARTITION BY k.split_id, k.label_set, a.dataset_id ORDER BY l.is_default DESC, l.name) AS pick "
        "FROM (SELECT DISTINCT split_id, label_set FROM eval_results WHERE label_set IS NOT NULL) k "
        "JOIN (SELECT DISTINCT split_id, dataset_id FROM split_assignments "
        "WHERE split_id IN (SELECT split_id FROM eval_results)) a USING (split_id) "
        "JOIN label_sets l ON l.dataset_id = a.dataset_id AND list_contains(string_split(k.label_set, ','), l.name) "
        "JOIN datasets d ON d.dataset_id = a.dataset_id) "
        "WHERE pick = 1 AND drug IS NOT NULL "  # the label set evaluated; one of no known drug says nothing
        "GROUP BY split_id, label_set HAVING count(DISTINCT lower(drug)) > 1)"  # 'PLX4720' and 'plx4720': one drug
    )


def cell_labels(st: Store, label_set_ids: Sequence[str]) -> pd.DataFrame:
    """dataset_id, row, response of every labelled cell of these label sets."""
    frame = st.query('SELECT dataset_id, "row", response FROM cell_labels WHERE list_contains(?, label_set_id) '
                     'ORDER BY dataset_id, "row"', [list(label_set_ids)])
    frame["row"] = frame["row"].astype(np.int64)
    frame["response"] = frame["response"].astype(np.int8)
    return frame


def write_label_set(con: duckdb.DuckDBPyConnection, dataset_id: str, name: str, response: pd.Series, *,
                    label_key: str | None, positive: str | None, unknown_values: Sequence[str], drug: str | None,
                    is_default: bool) -> LabelSet:
    """Insert a label set and its cell labels inside the caller's transaction (store-internal)."""
    rows, values = _known_labels(response)
    ls = LabelSet(label_set_id=label_set_id_of(dataset_id, name), dataset_id=dataset_id, name=name, label_key=label_key,
                  positive=positive, unknown_values=tuple(unknown_values), drug=drug, is_default=is_default,
                  n_labelled=int(rows.size), n_sensitive=int(values.sum()), labels_hash=labels_hash(rows, values))
    con.execute("INSERT INTO label_sets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [ls.label_set_id, dataset_id, name, label_key, positive, json.dumps(list(unknown_values)), drug,
                 is_default, ls.n_labelled, ls.n_sensitive, ls.labels_hash])
    frame = pd.DataFrame({"label_set_id": ls.label_set_id, "dataset_id": dataset_id, "row": rows, "response": values})
    with registered(con, "_scdm_cell_labels", frame):
        con.execute('INSERT INTO cell_labels SELECT label_set_id, dataset_id, "row", response FROM _scdm_cell_labels')
    return ls


def _known_labels(response: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Rows and values (int8) of the labelled cells of a per-cell response column."""
    y = pd.array(response, dtype="Int8")
    known = np.asarray(~pd.isna(y), dtype=bool)
    return np.flatnonzero(known).astype(np.int32), np.asarray(y[known], dtype=np.int8)


def differing_cells(con: duckdb.DuckDBPyConnection, ls: LabelSet, response: pd.Series) -> np.ndarray:
    """Rows (sorted) where ``response`` (per cell, NA = unknown) differs from the stored label set."""
    found = con.execute('SELECT "row", response FROM cell_labels WHERE label_set_id = ?', [ls.label_set_id]).fetchnumpy()
    stored = np.full(len(response), -1, dtype=np.int8)
    stored[np.asarray(found["row"], dtype=np.int64)] = np.asarray(found["response"], dtype=np.int8)  # rows < n: same content
    given = np.full(len(response), -1, dtype=np.int8)
    rows, values = _known_labels(response)
    given[rows] = values
    return np.flatnonzero(stored != given)


def replace_labels(con: duckdb.DuckDBPyConnection, ls: LabelSet, response: pd.Series) -> LabelSet:
    """Replace the cell labels of a stored label set, keeping its name, source and default flag (store-internal)."""
    con.execute("DELETE FROM cell_labels WHERE label_set_id = ?", [ls.label_set_id])
    con.execute("DELETE FROM label_sets WHERE label_set_id = ?", [ls.label_set_id])
    return write_label_set(con, ls.dataset_id, ls.name, response, label_key=ls.label_key, positive=ls.positive,
                           unknown_values=ls.unknown_values, drug=ls.drug, is_default=ls.is_default)


def set_default(con: duckdb.DuckDBPyConnection, ls: LabelSet) -> None:
    """Make ``ls`` its dataset's default label set; ``cells.response`` follows (store-internal)."""
    con.execute("UPDATE label_sets SET is_default = (label_set_id = ?) WHERE dataset_id = ?", [ls.label_set_id, ls.dataset_id])
    con.execute("UPDATE cells SET response = NULL WHERE dataset_id = ?", [ls.dataset_id])
    con.execute('UPDATE cells SET response = l.response FROM cell_labels l '
                'WHERE l.label_set_id = ? AND cells.dataset_id = l.dataset_id AND cells."row" = l."row"',
                [ls.label_set_id])
