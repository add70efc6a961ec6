"""LoRA adapter records: one row per adapter trained on the training cells of one (split, fold).

The weights live in ``<store>/artifacts/adapters/<adapter_id>/`` (written by ``scdm.embedding``); the
catalog row is written here, after the files are in place, so a row always has its files.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store import _claims
from scdm.store._constants import ARTIFACTS_DIR
from scdm.store._store import canonical_json

if TYPE_CHECKING:
    from scdm.store._store import Store

__all__ = ["ADAPTERS_DIR", "AdapterRecord", "adapter_dir", "write_adapter", "forget_adapter", "adapter_row", "tuned_training_rows",
           "training_lock"]

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
"""Folder under ``<store>/artifacts`` holding one ``<adapter_id>/`` folder per adapter."""


def adapter_dir(st: Store, adapter_id: str) -> Path:
    """The folder of adapter ``adapter_id``'s files: ``<store>/artifacts/adapters/<adapter_id>``."""
    return st.root / ARTIFACTS_DIR / ADAPTERS_DIR / adapter_id


@contextlib.contextmanager
def training_lock(st: Store, adapter_id: str, *, note_every_s: float = 60.0) -> Iterator[None]:
    """Be the only process that decides about, trains and places adapter ``adapter_id`` until the block ends.

    Two ``scdm finetune`` runs of the same fold (one per GPU, or a command started twice) would
    otherwise both train it and put their folders in place over each other. The second waits here
    (logging who it waits for every ``note_every_s`` seconds) and then finds the first's adapter
    and its row: it reuses them. The lock is an advisory file lock the system drops when its
    holder dies, so a killed run never blocks the next (see :mod:`store._claims`).
    """
    path = _claims.claims_folder(st.root, f"adapter-{adapter_id}.lock")
    fd = _claims.lock_waiting(path, note_every_s=note_every_s,
                              note=lambda who: logger.warning("adapter %s is being trained by %s; waiting for it",
                                                              adapter_id, who.describe() if who else "another process"))
    try:
        yield
    finally:
        _claims.unlock_and_delete(path, fd)


@dataclass(frozen=True)
class AdapterRecord:
    """One trained LoRA adapter (the ``adapters`` table)."""

    adapter_id: str
    tuning_id: str
    adapter_hash: str
    model: str
    checkpoint_hash: str
    model_params: dict[str, Any]
    split_id: str
    fold: int
    scenario: str
    category_type: str
    category: str
    scheme: str
    label_set: str | None
    lora_config: dict[str, Any]
    train_config: dict[str, Any]
    n_train: int
    train_cells_hash: str
    train_curve: list[Any]
    wall_seconds: float
    device: str
    telemetry: dict[str, Any]
    path: str
    """Adapter folder, relative to the store root."""

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("model_params", "lora_config", "train_config", "train_curve", "telemetry"):
            out[key] = canonical_json(out[key])
        out["created_at"] = pd.Timestamp.now(tz="UTC").tz_localize(None)
        return out


def write_adapter(st: Store, record: AdapterRecord) -> None:
    """Insert (or replace) an adapter's row, in one transaction."""
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM adapters WHERE adapter_id = ?", [record.adapter_id])
        st.catalog.insert_df("adapters", pd.DataFrame([record.row()]), con)


def forget_adapter(st: Store, adapter_id: str) -> None:
    """Delete an adapter's row (its files are the caller's to remove)."""
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM adapters WHERE adapter_id = ?", [adapter_id])


def adapter_row(st: Store, adapter_id: str) -> dict[str, Any] | None:
    """The adapter's catalog row as a dict, or None."""
    frame = st.query("SELECT * FROM adapters WHERE adapter_id = ?", [adapter_id])
    return None if frame.empty else frame.iloc[0].to_dict()


def tuned_training_rows(st: Store, embedding_id: str) -> np.ndarray | None:
    """Rows of an embedding's dataset whose labels trained the LoRA adapter it was made with (sorted).

    None for an embedding that no adapter tuned (``params["lora"]`` absent). An adapter trains on
    every cell of its split outside its test fold: those cells' embeddings were shaped by their
    labels, so a score on them is not held-out. When that split is gone (removed when its cells'
    labels or metadata changed) the cells cannot be told apart, and every row of the dataset is
    returned.
    """
    frame = st.query("SELECT dataset_id, params, n_cells FROM embeddings WHERE embedding_id = ?", [embedding_id])
    if frame.empty:
        return None
    scope = json.loads(frame["params"].iloc[0]).get("lora")
    if not scope:
        return None
    if st.query("SELECT 1 FROM splits WHERE split_id = ?", [scope["split_id"]]).empty:
        return np.arange(int(frame["n_cells"].iloc[0]), dtype=np.int64)
    rows = st.query(
        'SELECT "row" FROM split_assignments WHERE split_id = ? AND dataset_id = ? AND fold IS DISTINCT FROM ? ORDER BY "row"',
        [scope["split_id"], frame["dataset_id"].iloc[0], int(scope["fold"])])
    return rows["row"].to_numpy(np.int64)
