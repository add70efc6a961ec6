"""Verified reads and repair: which committed chunks of an embedding are damaged, and how to fix them.

Every committed chunk has a checksum in ``embedding_chunks``. :meth:`store.Store.verify` checks
the chunks of some or all embeddings against it and returns a :class:`VerifyReport`; with
``repair=True`` it also puts the bad chunks back to pending (their rows deleted, the embedding's
status back to ``pending``), so that the normal resume path recomputes exactly those chunks:
``scdm embed`` with the embedding's original options, or ``scdm verify --repair``, which reruns
the pca/hvg baselines by itself and prints the ``scdm embed ... --checkpoint DIR`` command of
embeddings that need a checkpoint.

Two more things are damage: a complete embedding with a chunk that has no committed record (it
could only be read unchecked), and an array whose ``zarr.json`` is missing or disagrees with the
catalog row (shape, data type, rows per chunk: the chunk bytes would be read as other rows or
numbers). ``repair=True`` puts such chunks back to pending too, and rewrites the metadata file from
the catalog before the chunks are checked. Temporary ``*.partial`` files that killed writers left
are listed (not damage: no read uses them) and deleted with ``repair=True``, and so are, when the
whole store is checked, the files and folders that no catalog row names, the temporaries of
interrupted ingests and saves, the lock folders (``claims/``) no process holds and the write probes of
killed processes, once their writer is gone (:mod:`store.leftovers`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scdm.store._store import Embedding, Store
    from scdm.store.leftovers import Leftover

__all__ = ["BadChunk", "EmbeddingCheck", "VerifyReport", "WrongValueKind", "BASELINE_MODELS", "repair_hint"]

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
    """``missing``, ``truncated``, ``wrong size``, ``unreadable``, ``checksum mismatch``, or ``no record``
    (a chunk of a complete embedding without a committed checksum)."""
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
    metadata: str | None = None
    """What is wrong with the array's ``zarr.json`` (which file, and what it says against the catalog);
    None when it matches."""
    metadata_rewritten: bool = False
    """Whether that file was rewritten from the catalog (``repair=True``)."""
    leftovers: tuple[str, ...] = ()
    """Temporary files that interrupted writes left in the array (not damage: nothing reads them)."""
    leftovers_removed: bool = False
    """Whether they were deleted (``repair=True``)."""

    @property
    def ok(self) -> bool:
        return not self.bad and self.metadata is None

    def metadata_line(self) -> str | None:
        """One line for a listing when the array's metadata is damaged (None when it is not)."""
        if self.metadata is None:
            return None
        done = "; rewrote it from the catalog" if self.metadata_rewritten else ""
        return f"{self.embedding_id}  {self.model}  {self.dataset}  {self.metadata}{done}"

    @property
    def bad_chunks(self) -> list[int]:
        return [b.chunk for b in self.bad]


@dataclass(frozen=True)
class WrongValueKind:
    """A stored dataset whose value kind, given at ingest, its values contradict.

    Ingest refuses such a kind now (:func:`store._ingest.check_given_x_kind`); a dataset stored
    before it did keeps it, and every reader believes it: pca/hvg normalise and log values stored as
    counts again, the count models read them as counts, and scaled values stored as normalised pass
    the refusal of the models that rank genes by expression.
    """

    dataset: str
    """Dataset name."""
    x_kind: str
    """The stored (given) kind."""
    detected: str
    """The kind the values show."""
    problem: str
    """What contradicts it: how many values, and the first."""
    fix: str
    """The command that rewrites the kind."""

    def line(self) -> str:
        return f"dataset {self.dataset}: stored with value kind {self.x_kind!r}, given at ingest, but {self.problem}"


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`store.Store.verify` found, one :class:`EmbeddingCheck` per embedding."""

    embeddings: tuple[EmbeddingCheck, ...] = field(default_factory=tuple)
    leftovers: tuple[Leftover, ...] = ()
    """Files and folders of the store that no catalog row names, and temporaries of interrupted writes
    (:mod:`store.leftovers`; only when the whole store is checked). Not damage: nothing reads them."""
    datasets: tuple[WrongValueKind, ...] = ()
    """Datasets whose given value kind their values contradict (only when the whole store is checked)."""

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.embeddings) and not self.datasets

    @property
    def bad(self) -> list[BadChunk]:
        """Every bad chunk, embedding by embedding."""
        return [b for e in self.embeddings for b in e.bad]

    @property
    def damaged(self) -> list[EmbeddingCheck]:
        return [e for e in self.embeddings if not e.ok]

    def problems(self) -> list[str]:
        """One line per damaged array metadata file and per bad chunk, embedding by embedding."""
        lines = []
        for check in self.embeddings:
            meta = check.metadata_line()
            lines += ([meta] if meta else []) + [b.line() for b in check.bad]
        return lines

    def summary(self) -> str:
        """One sentence: how much was checked, what is bad, and what interrupted writes left behind."""
        chunks = sum(e.checked for e in self.embeddings)
        head = f"checked {len(self.embeddings)} embedding(s), {chunks} committed chunk(s)"
        kinds = f"; {len(self.datasets)} dataset(s) stored with a value kind their values contradict" if self.datasets else ""
        if all(e.ok for e in self.embeddings):
            return f"{head}: all match their checksums{kinds}{self._leftover_note()}"
        found = [f"{len(self.bad)} bad chunk(s)"] if self.bad or not self._bad_metadata() else []
        if self._bad_metadata():
            found.append(f"{self._bad_metadata()} damaged array metadata file(s)")
        return f"{head}: {' and '.join(found)} in {len(self.damaged)} embedding(s){kinds}{self._leftover_note()}"

    def _bad_metadata(self) -> int:
        return sum(e.metadata is not None for e in self.embeddings)

    def _leftover_note(self) -> str:
        return self._partials_note() + self._store_leftovers_note()

    def _partials_note(self) -> str:
        files = sum(len(e.leftovers) for e in self.embeddings)
        if not files:
            return ""
        done = all(e.leftovers_removed for e in self.embeddings if e.leftovers)
        fix = "deleted" if done else "`scdm verify --repair` deletes them"
        return f"; {files} temporary file(s) left by interrupted writes ({fix})"

    def _store_leftovers_note(self) -> str:
        if not self.leftovers:
            return ""
        from scdm.store.leftovers import describe_size

        removed = [x for x in self.leftovers if x.removed]
        kept = [x for x in self.leftovers if x.kept is not None]
        waiting = len(self.leftovers) - len(removed) - len(kept)
        parts = [f"deleted {len(removed)} ({describe_size(sum(x.size for x in removed))})"] if removed else []
        if waiting:
            parts.append(f"`scdm verify --repair` deletes {waiting} ({describe_size(sum(x.size for x in self.leftovers if not x.removed and x.kept is None))})")
        if kept:
            parts.append(f"{len(kept)} left alone while their writer may be at work")
        total = describe_size(sum(x.size for x in self.leftovers))
        return f"; {len(self.leftovers)} leftover file(s) or folder(s) that nothing reads, {total} ({', '.join(parts)})"


def value_kind_fix(name: str, source: str | None, gene_key: str | None, detected: str) -> str:
    """The ``scdm ingest --update`` command that sets a stored dataset's value kind to the one its values show."""
    args = ["scdm", "ingest", source or "FILE.h5ad", "--name", name, *(["--gene-key", gene_key] if gene_key else []),
            "--x-kind", detected, "--update"]
    note = "" if source else "  # FILE.h5ad: the file it was ingested from"
    return (f"{shlex.join(args)}{note} (or ingest the raw counts as a new dataset; embeddings made with the old kind "
            "must be removed first: the command names them)")


def repair_hint(st: Store, emb: Embedding) -> str:
    """The command that recomputes an embedding's bad chunks (its original ``scdm embed`` options).

    Baselines (pca/hvg) are rebuilt from their recorded parameters; a LoRA variant is remade by
    its ``scdm finetune`` command; other models need their checkpoint folder, which the store does
    not record, so ``scdm verify --repair`` prints their exact ``scdm embed`` command.
    """
    params = emb.params
    if emb.model in BASELINE_MODELS and len(params.get("fit_datasets", ())) > 1 and "gene_match" not in params:
        # `scdm embed --joint` now matches genes by gene: it would make a new space, not repair or resume this one
        why = ("refits it as it was made, on the genes its datasets share by symbol; `scdm embed ... --joint` makes a "
               "new space matching genes by gene")
        if emb.status != "complete":  # interrupted: verify finds no damaged chunk to repair, the Python call resumes it
            return f"scdm.embedding.runner.repair(STORE, {emb.embedding_id!r}) in Python ({why})"
        return f"scdm verify --repair --embedding {emb.embedding_id}  ({why})"
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
