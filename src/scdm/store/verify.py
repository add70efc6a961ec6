"""Verified reads and repair: which committed chunks of an embedding are damaged, and how to fix them.

Every committed chunk has a checksum in ``embedding_chunks``. :meth:`store.Store.verify` checks
the chunks of some or all embeddings against it and returns a :class:`VerifyReport`; with
``repair=True`` it also puts the bad chunks back to pending (their rows deleted, the embedding's
status back to ``pending``), so that the normal resume path recomputes exactly those chunks:
``scdm embed`` with the embedding's original options, or ``scdm verify --repair``, which reruns
the pca/hvg baselines by itself and prints the ``scdm embed ... --checkpoint DIR`` command of
embeddings that need a checkpoint.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scdm.store._store import Embedding, Store

__all__ = ["BadChunk", "EmbeddingCheck", "VerifyReport", "BASELINE_MODELS", "repair_hint"]

BASELINE_MODELS = ("pca", "hvg")
"""Models fitted from the data alone (no checkpoint): ``scdm verify --repair`` recomputes them."""


@dataclass(frozen=True)
class BadChunk:
    """One committed chunk whose stored data does not match its checksum."""

    embedding_id: str
    model: str
    dataset: str
    """Dataset name."""
    chunk: int
    rows: tuple[int, int]
    """First and one-past-last row of the chunk."""
    path: str
    """The chunk file (or its key under a remote array URL)."""
    reason: str
    """``missing``, ``truncated``, ``wrong size``, ``unreadable`` or ``checksum mismatch``."""
    detail: str

    def line(self) -> str:
        """One line for a listing: which embedding and chunk, why, and the file."""
        return (f"{self.embedding_id}  {self.model}  {self.dataset}  chunk {self.chunk} "
                f"(rows {self.rows[0]}-{self.rows[1] - 1}) {self.reason}: {self.detail}; file {self.path}")


@dataclass(frozen=True)
class EmbeddingCheck:
    """The verification of one embedding."""

    embedding_id: str
    model: str
    variant: str
    dataset: str
    status: str
    """Catalog status when it was checked (``complete`` or ``pending``)."""
    n_chunks: int
    checked: int
    """Committed chunks checked (a pending embedding has fewer than ``n_chunks``)."""
    bad: tuple[BadChunk, ...] = ()
    repair: str | None = None
    """The command that recomputes the bad chunks (None when there are none)."""
    marked_pending: bool = False
    """Whether the bad chunks were put back to pending (``repair=True``)."""

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_chunks(self) -> list[int]:
        return [b.chunk for b in self.bad]


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`store.Store.verify` found, one :class:`EmbeddingCheck` per embedding."""

    embeddings: tuple[EmbeddingCheck, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.embeddings)

    @property
    def bad(self) -> list[BadChunk]:
        """Every bad chunk, embedding by embedding."""
        return [b for e in self.embeddings for b in e.bad]

    @property
    def damaged(self) -> list[EmbeddingCheck]:
        return [e for e in self.embeddings if not e.ok]

    def summary(self) -> str:
        """One sentence: how much was checked and what is bad."""
        chunks = sum(e.checked for e in self.embeddings)
        head = f"checked {len(self.embeddings)} embedding(s), {chunks} committed chunk(s)"
        if self.ok:
            return f"{head}: all match their checksums"
        return f"{head}: {len(self.bad)} bad chunk(s) in {len(self.damaged)} embedding(s)"


def repair_hint(st: Store, emb: Embedding) -> str:
    """The command that recomputes an embedding's bad chunks (its original ``scdm embed`` options).

    Baselines (pca/hvg) are rebuilt from their recorded parameters; a LoRA variant is remade by
    its ``scdm finetune`` command; other models need their checkpoint folder, which the store does
    not record, so ``scdm verify --repair`` prints their exact ``scdm embed`` command.
    """
    params = emb.params
    if emb.model in BASELINE_MODELS and "fit_datasets" in params:
        return _baseline_command(st, emb.model, params)
    if emb.variant != "frozen":
        return (f"the `scdm finetune` command that made variant {emb.variant} (it re-embeds with the adapter; "
                f"`scdm verify --repair --embedding {emb.embedding_id}` marks the bad chunks first)")
    return f"scdm verify --repair --embedding {emb.embedding_id}  (prints the `scdm embed ... --checkpoint DIR` command to run)"


def _baseline_command(st: Store, model: str, params: dict[str, Any]) -> str:
    names = fit_dataset_names(st, params["fit_datasets"])
    args = ["scdm", "embed", *names, "--model", model]
    if len(names) > 1:
        args.append("--joint")
    if params.get("n_hvg_requested", 2000) != 2000:
        args += ["--n-hvg", str(params["n_hvg_requested"])]
    if model == "pca" and params.get("n_comps_requested", 50) != 50:
        args += ["--n-comps", str(params["n_comps_requested"])]
    if params.get("normalized") is not None:
        args.append("--normalized" if params["normalized"] else "--counts")
    return shlex.join(args)


def fit_dataset_names(st: Store, content_hashes: list[str]) -> list[str]:
    """Names of the datasets a baseline was fitted on, in the order they were ingested."""
    frame = st.query("SELECT name FROM datasets WHERE list_contains(?, content_hash) ORDER BY created_at, name",
                     [list(content_hashes)])
    return frame["name"].astype(str).tolist()
