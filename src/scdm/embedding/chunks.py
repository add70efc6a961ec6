"""The chunk machinery both embedding executors share: tokenising a chunk's cells, running the
model over length-sorted batches, padding statistics, telemetry and the finalize-with-repair step.

:mod:`scdm.embedding.runner` (local) and :mod:`scdm.embedding._ray_executor` (Ray actors) both import it,
so neither imports the other's internals.
"""

from __future__ import annotations

import logging
import platform
import resource
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdm.embedding._adapter import Adapter, check_cells_expressed, check_cells_known, check_counts
from scdm.store import ChunkWriter, Embedding, Store, default_chunk_rows
from scdm.store.errors import EmbeddingIncompleteError, ScdmError
from scdm.store.matrix import iter_row_blocks, to_csr

if TYPE_CHECKING:
    pass

__all__ = ["EmbedResult", "ChunkTokens", "MODEL_CHUNK_ROWS_MAX", "autocast_context", "batches_by_length", "cells_without_known_genes",
           "compile_model", "embed_cells", "empty_audit", "Finish", "finalize_with_repair", "model_chunk_rows", "padding_stats", "peak_rss",
           "length_counts", "run_telemetry", "token_stats_of", "warn_zero_rows", "zero_rows_of"]

logger = logging.getLogger("scdm.embedding.runner")


@dataclass(frozen=True)
class EmbedResult:
    """What one embedding job produced."""

    embedding_id: str
    dataset: str
    model: str
    dim: int
    n_cells: int
    computed_chunks: int
    """Chunks written by this call (0 when the embedding already existed)."""
    status: str
    telemetry: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batches_by_length(lengths: Sequence[int], batch_size: int, *, sort: bool = True) -> list[np.ndarray]:
    """Index batches of cells, longest first when ``sort`` (equal lengths keep row order)."""
    idx = np.argsort(-np.asarray(lengths), kind="stable") if sort else np.arange(len(lengths))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def padding_stats(lengths: Sequence[int], batches: list[np.ndarray]) -> tuple[int, int]:
    """(tokens computed with these batches, tokens computed with naive batches in row order)."""
    cell_lengths = np.asarray(lengths)
    computed = sum(int(cell_lengths[b].max()) * len(b) for b in batches if len(b))
    size = max((len(b) for b in batches), default=1)
    naive = sum(int(cell_lengths[i:i + size].max()) * len(cell_lengths[i:i + size])
                for i in range(0, len(cell_lengths), size))
    return computed, naive


class ChunkTokens:
    """Map-style dataset over chunks: item i = (chunk, tokenised cells); opens the data lazily per process."""

    def __init__(self, store_root: Path, dataset_id: str, adapter: Adapter, emb: Embedding, chunks: list[int], needs_counts: bool,
                 *, allow_empty_cells: bool = False) -> None:
        self.store_root = store_root
        self.dataset_id = dataset_id
        self.adapter = adapter
        self.chunk_rows = emb.chunk_rows
        self.n_cells = emb.n_cells
        self.chunks = chunks
        self.needs_counts = needs_counts
        self.allow_empty_cells = allow_empty_cells
        self._adata: Any = None

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[int, list[dict[str, np.ndarray]]]:
        if self._adata is None:
            self._adata = Store(self.store_root).open_anndata(self.dataset_id, backed=True)
        chunk = self.chunks[i]
        lo = chunk * self.chunk_rows
        hi = min(lo + self.chunk_rows, self.n_cells)
        x = to_csr(self._adata.X[lo:hi])
        if self.needs_counts:
            check_counts(x, self.adapter.name)
        check_cells_expressed(x, np.arange(lo, hi), self.adapter.name, allow_empty_cells=self.allow_empty_cells)
        check_cells_known(x, self.adapter.known_columns_, np.arange(lo, hi), self.adapter.name,
                          allow_empty_cells=self.allow_empty_cells)
        return chunk, self.adapter.tokenize(x, np.arange(lo, hi))


def cells_without_known_genes(adata: Any, known_columns: np.ndarray | None, model: str) -> int | None:
    """Cells of the (backed) ``adata`` none of whose expressed genes are in ``known_columns``; None if the model cannot tell.

    Counted only when such cells are kept (``allow_empty_cells``): models with special tokens
    (Geneformer V2's <cls>/<eos>, the LLM's template) give each of them one shared, non-zero vector
    that no output check sees, so the audit must say how many there are. One pass over the matrix;
    both executors call it, the Ray one on an actor (where the data is), and warn as it does.
    """
    if known_columns is None:
        return None
    n = 0
    for lo, block in iter_row_blocks(adata):
        rows = np.arange(lo, lo + block.shape[0])
        n += check_cells_known(block, known_columns, rows, model, allow_empty_cells=True)
    return n


def warn_cells_without_known_genes(n: int | None, model: str) -> None:
    if n:
        logger.warning("%d cells express none of the genes %s knows; they are kept as the model embeds them (allow_empty_cells), "
                       "recorded as cells_without_known_genes in the audit", n, model)


def warn_zero_rows(n: int, model: str) -> None:
    if n:
        logger.warning("%d cells got an all-zero %s embedding (kept, as allow_empty_cells asked)", n, model)


def zero_rows_of(emb: Embedding, computed: dict[int, int]) -> int:
    """All-zero rows of the whole embedding: ``computed`` (chunk -> its all-zero rows) counted as this
    process embedded them, every other chunk (an earlier, interrupted run's; another process's) read back.

    The audit describes the stored embedding, not the last run: a resume that recomputed one chunk
    recorded zero_rows 0 though the chunks it kept held all-zero vectors. Only chunks computed
    elsewhere are read (verified reads, one chunk at a time), so a run that computed all costs nothing.
    """
    n = sum(computed.values())
    for chunk in range(emb.n_chunks):
        if chunk not in computed:
            lo, hi = emb.chunk_bounds(chunk)
            try:
                block = emb.read(np.arange(lo, hi), allow_partial=True)
            except ScdmError:
                continue  # its data is gone: finalize refuses it, and the repair round computes it here
            n += int((~block.any(axis=1)).sum())
    return n


def length_counts(lengths: Sequence[int]) -> dict[int, int]:
    """Cells per token length of one chunk (what its catalog row keeps for :func:`token_stats_of`)."""
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def token_stats_of(emb: Embedding, computed: dict[int, dict[int, int]]) -> dict[str, Any]:
    """The audit's tokens_per_cell_* over the whole embedding: ``computed`` (chunk -> :func:`length_counts`)
    as this process tokenised them, every other chunk's as its catalog row keeps them.

    The audit describes the stored embedding, not the last run: a resume that recomputed one chunk
    of three recorded the statistics of that chunk alone, and one that computed none recorded none.
    Empty (no keys) when a chunk's lengths are unknown (written by an scdm that did not keep them):
    statistics of part of the cells would read as the embedding's.
    """
    stored = emb.chunk_token_lengths() if len(computed) < emb.n_chunks else {}
    total: dict[int, int] = {}
    for chunk in range(emb.n_chunks):
        counts = computed.get(chunk, stored.get(chunk))
        if counts is None:
            return {}  # no row (finalize refuses it; the repair round computes it) or kept without lengths
        for length, n in counts.items():
            total[length] = total.get(length, 0) + n
    if not total:
        return {}
    lengths = np.fromiter(total, dtype=np.int64, count=len(total))
    arr = np.repeat(lengths, [total[int(v)] for v in lengths])
    return {"tokens_per_cell_median": float(np.median(arr)), "tokens_per_cell_min": int(arr.min()), "tokens_per_cell_max": int(arr.max())}


def empty_audit(n_empty: int | None, zero_rows: int, n_unknown: int | None = None) -> dict[str, Any]:
    """What the audit records about cells without expressed genes, or without any the model knows (kept with allow_empty_cells).

    The same keys from either executor: the same data embedded locally or on Ray has the same audit.
    """
    out: dict[str, Any] = {"zero_rows": int(zero_rows)}
    if n_empty is not None:
        out["cells_without_expressed_genes"] = n_empty
    if n_unknown is not None:
        out["cells_without_known_genes"] = n_unknown
    return out


MODEL_CHUNK_ROWS_MAX = 4096
"""Cells per chunk at most for foundation-model embeddings (a crash loses at most one chunk)."""


def model_chunk_rows(chunk_rows: int | None, emb_dim: int, params: dict[str, Any], batch_dependent: bool) -> int:
    """Rows per chunk of a foundation-model embedding (same rule for every executor)."""
    if chunk_rows is None:
        # a chunk is the unit of resume: foundation models are slow, so cap the work a crash can lose
        chunk_rows = min(default_chunk_rows(emb_dim), MODEL_CHUNK_ROWS_MAX)
    if batch_dependent:
        # cells of one batch attend to each other: batches must be fixed row ranges, so chunks
        # hold whole batches and batch k is always rows [k*bs, (k+1)*bs)
        bs = params["batch_size"]
        chunk_rows = -(-chunk_rows // bs) * bs
    return chunk_rows


def peak_rss() -> int:
    """Peak resident memory since :func:`_reset_peak_rss` (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def autocast_context(device: str, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


COMPILE_BACKEND: Any = "inductor"
"""The ``torch.compile`` backend of :func:`compile_model` (tests swap in one that records Dynamo's
graphs and runs them eagerly: seconds instead of a C++ build)."""


def compile_model(adapter: Adapter) -> None:
    """Compile the loaded model of ``adapter`` in place with ``torch.compile`` (``--compile``).

    Why: on CUDA, a small-width model (Geneformer, scGPT: 512 wide) spends about half its GPU time
    outside matmuls and attention, in layer norms, activations, residual adds and the dtype casts
    of autocast, which compilation fuses. Shapes are dynamic because length-sorted batches differ
    in length and a chunk's last batch in size: static shapes would compile once per shape. The
    module keeps its parameters and ``state_dict`` keys (``nn.Module.compile``), so LoRA weights
    applied before stay as they are. The first batches wait for compilation (tens of seconds).
    """
    if adapter.model is None:
        msg = "Call load(device) before compile_model()."
        raise RuntimeError(msg)
    adapter.model.compile(dynamic=True, backend=COMPILE_BACKEND)


def _compile_failed(err: BaseException, adapter: Adapter) -> ScdmError | None:
    """A clear error for a ``torch.compile`` that could not build the model's kernels, else None."""
    import torch._dynamo.exc as dynamo_exc

    if not isinstance(err, dynamo_exc.BackendCompilerFailed):
        return None
    cause = getattr(err, "inner_exception", None) or err.__cause__ or err
    text = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
    msg = (f"torch.compile could not compile the {adapter.name} model ({type(cause).__name__}: {text}). Compiling needs a "
           "C++ compiler on CPU and Triton on CUDA (installed with CUDA builds of torch). Run again without --compile "
           "(torch_compile=False): the embedding is the same, and the chunks written so far are kept.")
    return ScdmError(msg)


def embed_cells(adapter: Adapter, cells: list[dict[str, np.ndarray]], batches: list[np.ndarray], device: str, precision: str, state: dict[str, Any]) -> np.ndarray:
    """Embed one chunk's cells batch by batch, halving the batch on CUDA out-of-memory.

    One batch deep: the vectors of a batch are copied to the host only after the next batch is
    collated and its forward pass queued. On CUDA the copy waits for the device, so copying each
    batch at once left the device idle while the host collated and launched the next one; now the
    host does that while the device computes. On the CPU every step runs in order anyway and the
    vectors are the same bits either way.
    """
    out = np.empty((len(cells), adapter.emb_dim), dtype=np.float32)
    queue = list(batches)
    pending: tuple[np.ndarray, Any] | None = None
    while queue:
        idx = queue.pop(0)
        try:
            vecs = _launch_batch(adapter, [cells[i] for i in idx], device, precision)
        except RuntimeError as err:
            if pending is not None:  # computed before the failure: kept
                _to_host(out, *pending)
                pending = None
            _after_failed_batch(adapter, idx, queue, state, err)
            continue
        if pending is not None:
            _to_host(out, *pending)
        pending = (idx, vecs)
    if pending is not None:
        _to_host(out, *pending)
    return out


def _launch_batch(adapter: Adapter, batch_cells: list[dict[str, np.ndarray]], device: str, precision: str) -> Any:
    """The batch's vectors as a float32 tensor on ``device``, possibly still being computed there."""
    import torch

    batch = adapter.collate(batch_cells)
    batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.inference_mode(), autocast_context(device, precision):
        vecs = adapter.embed(batch)
        # a copy of its own: the next batch may run before these are read, and must not write over them
        return vecs.to(torch.float32, copy=True)


def _to_host(out: np.ndarray, idx: np.ndarray, vecs: Any) -> None:
    """Write a launched batch's vectors into the chunk's rows (waits for the device on CUDA)."""
    out[idx] = vecs.cpu().numpy()


def _after_failed_batch(adapter: Adapter, idx: np.ndarray, queue: list[np.ndarray], state: dict[str, Any], err: RuntimeError) -> None:
    """Halve the batch on CUDA out-of-memory; a compile failure becomes a clear error; others re-raise."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        _back_off(adapter, idx, queue, state, err)
        return
    failed = _compile_failed(err, adapter)
    if failed is None:
        raise err
    raise failed from err


def _back_off(adapter: Adapter, idx: np.ndarray, queue: list[np.ndarray], state: dict[str, Any], err: BaseException) -> None:
    """After CUDA out-of-memory at batch ``idx``: its two halves go first in ``queue``."""
    import torch

    if getattr(adapter, "batch_dependent", False):
        msg = (f"CUDA out of memory at batch size {len(idx)}. {adapter.name} embeds cells jointly within a batch, so "
               "the batch size is part of the result and is not lowered automatically; rerun with a smaller --batch-size.")
        raise ScdmError(msg) from err
    if len(idx) == 1:
        raise err
    torch.cuda.empty_cache()
    half = len(idx) // 2
    state["batch_size"] = max(1, half)
    state["oom_backoffs"] = state.get("oom_backoffs", 0) + 1
    logger.warning("CUDA out of memory at batch %d; retrying with %d", len(idx), half)
    queue[:0] = [idx[:half], idx[half:]]


class Finish:
    """Finalizes an embedding with a run's telemetry and audit (see :func:`finalize_with_repair`).

    A run that writes through its own :class:`~scdm.store.ChunkWriter` calls it with that writer
    before leaving the ``with`` block, so that the rows of its last chunks and the mark complete go
    in one catalog commit; a run without one (Ray actors write the chunks) is finalized after it.
    A refusal (chunks without data) is kept in ``refused`` for the repair round, not raised.
    """

    def __init__(self, telemetry_of: Callable[[dict[str, Any]], dict[str, Any]], audit_of: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.telemetry_of = telemetry_of
        self.audit_of = audit_of
        self.tried = False
        self.telemetry: dict[str, Any] = {}
        self.refused: EmbeddingIncompleteError | None = None

    def __call__(self, target: ChunkWriter | Embedding, stats: dict[str, Any]) -> None:
        self.tried = True
        self.telemetry = self.telemetry_of(stats)
        try:
            target.finalize(telemetry=self.telemetry, audit=self.audit_of(stats))
            self.refused = None
        except EmbeddingIncompleteError as err:
            self.refused = err


def finalize_with_repair(emb: Embedding, run: Callable[[list[int], Finish | None], dict[str, Any]], chunks: list[int],
                         telemetry_of: Callable[[dict[str, Any]], dict[str, Any]], audit_of: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Compute ``chunks`` with ``run``, then finalize the embedding with its telemetry and audit.

    ``run(chunks, finish)`` may finalize from inside its writer by calling ``finish(writer, stats)``
    (see :class:`Finish`). :meth:`store.Embedding.finalize` refuses chunks whose data is absent from
    the array (marking them missing again); those are computed once more here, then it finalizes
    again. Returns the stats of ``run`` (summed over both rounds) with the ``telemetry`` that was stored.
    """
    finish = Finish(telemetry_of, audit_of)
    stats = run(chunks, finish)
    if not finish.tried:
        finish(emb, stats)
    if finish.refused is not None:
        again = emb.missing_chunks()
        logger.warning("%s; computing %d chunk(s) again", finish.refused, len(again))
        more = run(again, None)
        for key in ("chunks", "cells", "zero_rows"):
            stats[key] = stats.get(key, 0) + more.get(key, 0)
        finish(emb, stats)
        if finish.refused is not None:
            raise finish.refused
    stats["telemetry"] = finish.telemetry
    return stats


def run_telemetry(stats: dict[str, Any], device: str, precision: str, load_s: float | None, adapter: Adapter | None, *,
                  torch_compile: bool = False) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("scdm", "torch", "transformers", "peft", "numpy", "zarr", "duckdb", "anndata"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    # "local" unless the Ray executor overwrites it: a query on telemetry->>'executor' finds both kinds
    out = {**stats, "device": device, "precision": precision, "torch_compile": torch_compile, "peak_rss_bytes": peak_rss(),
           "host": platform.node(), "versions": versions, "executor": "local"}
    if load_s is not None:
        out["load_s"] = load_s
    if adapter is not None:
        out["n_parameters"] = adapter.n_parameters()
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out
