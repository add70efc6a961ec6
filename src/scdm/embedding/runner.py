"""The embedding runner: drives any adapter (or baseline) over a dataset into the store.

Cells are processed in row-chunks equal to the store's chunks. Inside a chunk, cells are
tokenised (in DataLoader workers when asked, overlapping compute), sorted by token length so
mini-batches carry little padding, embedded, scattered back to the original order and written
as one chunk. A chunk counts only once it is flushed and committed, so an interrupted run
resumes from the missing chunks; asking for a finished embedding returns it once its committed
chunks match their checksums, and recomputes exactly the chunks that do not (a repair).

Processes that run the same embedding at once share it: each claims a chunk before computing it,
skips chunks another live process holds and waits for those at the end (taking over the chunks
of a process that died), so every chunk is computed once (see :class:`store.EmbeddingJob`).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from scdm.embedding import baselines
from scdm.embedding._adapter import (
    Adapter,
    GeneAudit,
    check_cells_expressed,
    check_embedded_rows,
    check_input_kind,
    get_adapter,
    library_progress,
    require_matches,
)
from scdm.embedding.chunks import (
    ChunkTokens,
    EmbedResult,
    Finish,
    batches_by_length,
    cells_without_known_genes,
    compile_model,
    embed_cells,
    empty_audit,
    finalize_with_repair,
    length_counts,
    model_chunk_rows,
    padding_stats,
    run_telemetry,
    token_stats_of,
    warn_cells_without_known_genes,
    warn_zero_rows,
    zero_rows_of,
)
from scdm.embedding.hub import ResolvedCheckpoint, resolve_checkpoint
from scdm.store import Embedding, Store, open_store, space_id_of
from scdm.store.adapters import adapter_dir, adapter_row
from scdm.store.checkpoints import checkpoint_content_hash
from scdm.store.errors import CheckpointError, InputDataError, ScdmError
from scdm.store.genes import GENE_MATCH, gene_table_version
from scdm.store.hashing import file_blake2b
from scdm.store.matrix import iter_row_blocks
from scdm.store.progress import progress_bar

if TYPE_CHECKING:
    from scdm.embedding.lora_card import LoraCard
    from scdm.store import ChunkWriter, EmbeddingJob

__all__ = ["EmbedResult", "embed", "embed_baseline", "checkpoint_hash", "resolve_device", "resolve_precision", "batches_by_length", "complete_and_intact", "repair", "embed_command"]

logger = logging.getLogger(__name__)


# ---- device and precision ------------------------------------------------------------------
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is checked and returned."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"--device {device} was asked for, but this torch has no CUDA device ({torch.__version__}). Use --device cpu or install a CUDA build of torch."
        raise ScdmError(msg)
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` on CPU. Choices: fp32, bf16, fp16."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        msg = f"Unknown precision {precision!r}; use auto, fp32, bf16 or fp16."
        raise InputDataError(msg)
    if precision == "fp16" and not device.startswith("cuda"):
        msg = "fp16 autocast needs a CUDA device; use --precision fp32 or bf16 on CPU."
        raise InputDataError(msg)
    return precision


# ---- options and input checks ----------------------------------------------------------------
MODEL_SIZE_PARAMS = ("max_genes", "max_length")
"""Adapter parameters that are sizes (checked >= 1 before any work; the adapters check the rest)."""


def _require_int(option: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        name = option.replace("_", "-")
        msg = f"--{name} ({option}=) must be an integer >= {minimum}; got {value!r}."
        raise InputDataError(msg)


def _require_number(option: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        name = option.replace("_", "-")
        where = f"{'>' if low_open else '>='} {low:g}" if high is None else f"in [{low:g}, {high:g}]"
        msg = f"--{name} ({option}=) must be a number {where}; got {value!r}."
        raise InputDataError(msg)


def check_embed_options(*, batch_size: int | None = None, chunk_rows: int | None = None, seed: int = 0, workers: int | None = None,
                        min_genes: int = 1, min_gene_fraction: float = 0.0, actors: int | None = None, max_retries: int = 3,
                        num_gpus_per_actor: float | None = None, n_hvg: int | None = None, n_comps: int | None = None,
                        target_sum: float | None = None, **model_params: Any) -> None:
    """Refuse sizes out of range before anything is read, created or written.

    Raises
    ------
    InputDataError
        Naming the option (as on the command line and in Python) and its allowed range.
    """
    for option, value, minimum in (("batch_size", batch_size, 1), ("chunk_rows", chunk_rows, 1), ("seed", seed, 0),
                                   ("workers", workers, 0), ("min_genes", min_genes, 0), ("actors", actors, 1),
                                   ("max_retries", max_retries, 0), ("n_hvg", n_hvg, 1), ("n_comps", n_comps, 1)):
        _require_int(option, value, minimum)
    for key in MODEL_SIZE_PARAMS:
        _require_int(key, model_params.get(key), 1)
    _require_number("min_gene_fraction", min_gene_fraction, 0.0, 1.0)
    _require_number("num_gpus_per_actor", num_gpus_per_actor, 0.0)
    _require_number("target_sum", target_sum, 0.0, low_open=True)


def count_empty_cells(st: Store, dataset: str, model: str, *, allow_empty_cells: bool = False) -> int | None:
    """Cells of ``dataset`` without any stored value, refused before any work unless allowed.

    Read from the CSR row pointers alone (a few bytes per cell); None when the stored matrix is not
    CSR (then each chunk is checked as it is read). Cells whose values are all explicit zeros, or
    whose genes the model does not know, are caught per chunk.
    """
    adata = st.open_anndata(dataset, backed=True)
    try:
        x = adata.X
        if getattr(x, "format", None) != "csr" or getattr(x, "group", None) is None:
            return None
        indptr = np.asarray(x.group["indptr"][:])
    finally:
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    empty = np.flatnonzero(np.diff(indptr) == 0)
    if empty.size:
        check_cells_expressed(_no_values(empty.size), empty, model, allow_empty_cells=allow_empty_cells)
        logger.warning("%d cells of the dataset express no gene; their %s embeddings are kept as the model returns them", empty.size, model)
    return int(empty.size)


def _no_values(n: int) -> Any:
    import scipy.sparse as sp

    return sp.csr_matrix((n, 1), dtype=np.float32)


# ---- checkpoint identity ---------------------------------------------------------------------
def checkpoint_hash(folder: str | os.PathLike[str], *, cache_dir: Path | None = None, files: Sequence[str] | None = None) -> str:
    """Content hash of every file in a checkpoint folder (each file's digest cached while the file is untouched).

    Hashing a multi-GB checkpoint takes a while, so each file's digest is cached in
    ``cache_dir/checkpoint-hashes.json`` and reused while the file is the same file, untouched: same
    path, device, inode, size, mtime and ctime. The ctime and inode matter: copying other weights of
    the same size over a file with its mtime kept (``cp -p``, ``rsync -t``, ``tar x``, ``touch -r``)
    leaves size and mtime as they were, but not the ctime, which no user call can set back (nor the
    inode, when the file was replaced). The one change it cannot see is a rewrite in place within
    the file system's timestamp granularity that also sets the mtime back; delete the cache file to
    hash everything again.
    ``files`` (paths relative to ``folder``) limits the hash to those files: a checkpoint resolved
    for a model (:func:`scdm.embedding.hub.resolve_checkpoint`, a Hub snapshot or a local folder)
    counts the files the model reads (:func:`scdm.embedding.hub.model_files`), so a folder's README
    or another tool's downloads into a cached snapshot do not change it.
    """
    if files is None and isinstance(folder, ResolvedCheckpoint):
        files = folder.files
    folder = Path(folder)
    cache_file = (cache_dir / "checkpoint-hashes.json") if cache_dir else None
    cache: dict[str, str] = {}
    if cache_file and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    known = len(cache)

    def cached_digest(path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_dev}:{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        digest = cache.get(key)
        if digest is None:
            digest = cache[key] = file_blake2b(path)
        return digest

    total = checkpoint_content_hash(folder, files=files, digest_of=cached_digest)
    if cache_file and len(cache) > known:
        # a temporary of its own: runs started together (one per GPU) write the cache at the same time
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    return total


# ---- batching --------------------------------------------------------------------------------


TOKENISE_WORKERS_CUDA = 2
"""Tokeniser processes of a CUDA run by default. On an H200 scGPT's forward pass took 2,676 cells/s
and one process tokenised 1,993 cells/s (``benchmarks/results/``), so inline tokenisation would have
left the GPU idle for more than half of the run; two processes feed it."""


def tokenise_workers(workers: int | None, device: str, n_chunks: int) -> int:
    """Processes that tokenise the next chunks while the model runs.

    ``workers`` when given. By default (None): none on the CPU, where the model's own threads use
    every core, and none for a single chunk, which has nothing to overlap with; on CUDA
    :data:`TOKENISE_WORKERS_CUDA`, fewer when this process may use fewer spare CPUs.
    """
    if workers is not None:
        return workers
    if not device.startswith("cuda") or n_chunks < 2:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(TOKENISE_WORKERS_CUDA, cpus - 1))


def _iter_chunk_tokens(source: ChunkTokens, workers: int, wanted: Callable[[int], bool] | None = None
                       ) -> Iterator[tuple[int, list[dict[str, np.ndarray]] | None]]:
    """(chunk, tokenised cells); chunks ``wanted`` refuses come as (chunk, None), untokenised.

    Inline (``workers`` 0) in chunk order. With worker processes, the chunks ``wanted`` accepts
    come in order as the workers finish them and the refused ones after: this process asks
    ``wanted`` (claims the chunk) only when the DataLoader hands the chunk to a worker, a few chunks
    ahead of the model, so runs sharing an embedding never tokenise each other's chunks.
    """
    if workers <= 0:
        for i in range(len(source)):
            chunk = source.chunks[i]
            if wanted is not None and not wanted(chunk):
                yield chunk, None
                continue
            yield source[i]
        return
    from torch.utils.data import DataLoader, Dataset

    # ChunkTokens is a map-style dataset by protocol (__len__, __getitem__), which is all DataLoader
    # uses; it does not subclass torch's Dataset so that chunks.py need not import torch.
    dataset = cast("Dataset[tuple[int, list[dict[str, np.ndarray]]]]", source)
    order = _WantedChunks(source.chunks, wanted)
    spool = Path(tempfile.mkdtemp(prefix=f"scdm-tokens-{os.getpid()}-"))
    try:
        # collate_fn (run in the worker) keeps the cells as numpy, spooled to a file: the default
        # would turn them into tensors (shared memory, which containers often cap at 64 MB)
        loader = DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers, prefetch_factor=2,
                            persistent_workers=False, collate_fn=functools.partial(_spool_cells, spool))
        items: Any = iter(loader)
        for chunk, cells in items:
            yield chunk, _unspool_cells(cells) if isinstance(cells, SpooledCells) else cells
    finally:
        items = None  # the DataLoader's iterator joins its workers when dropped: none writes into the folder after
        shutil.rmtree(spool, ignore_errors=True)
    for chunk in order.refused:
        yield chunk, None


class _WantedChunks:
    """DataLoader sampler: positions of the chunks ``wanted`` accepts, asked lazily in this process."""

    def __init__(self, chunks: Sequence[int], wanted: Callable[[int], bool] | None) -> None:
        self.chunks = list(chunks)
        self.wanted = wanted
        self.refused: list[int] = []

    def __iter__(self) -> Iterator[int]:
        for i, chunk in enumerate(self.chunks):
            if self.wanted is None or self.wanted(chunk):
                yield i
            else:
                self.refused.append(chunk)


@dataclass(frozen=True)
class SpooledCells:
    """A worker's tokenised chunk, written to ``path`` by :func:`_spool_cells` (``n_cells`` cells)."""

    path: str
    n_cells: int


def pack_cells(cells: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """The cells' arrays concatenated key by key, with offsets; None when they do not pack.

    They pack when every cell has the same keys and each key holds numeric arrays (at least 1-D)
    of one dtype and one trailing shape. A chunk of 4,096 cells then travels as a few arrays instead
    of thousands: through a pipe, it took 0.1-0.4 s of the runner's own time per chunk, as the
    worker and the runner took turns over its 64 kB buffer.
    """
    if not cells:
        return None
    keys = list(cells[0])
    if any(len(cell) != len(keys) or any(k not in cell for k in keys) for cell in cells):
        return None
    packed: dict[str, np.ndarray] = {"keys": np.asarray(keys, dtype=str)}
    for i, key in enumerate(keys):
        values = [cell[key] for cell in cells]
        first = values[0]
        if not isinstance(first, np.ndarray) or first.ndim == 0 or first.dtype.kind not in "biuf":
            return None
        if any(not isinstance(v, np.ndarray) or v.dtype != first.dtype or v.shape[1:] != first.shape[1:] for v in values):
            return None
        packed[f"data_{i}"] = np.concatenate(values)
        packed[f"offsets_{i}"] = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
    return packed


def unpack_cells(packed: Mapping[str, np.ndarray], n_cells: int) -> list[dict[str, np.ndarray]]:
    """The cells of :func:`pack_cells`: views into its arrays, equal to the originals bit for bit."""
    keys = [str(k) for k in packed["keys"]]
    columns = [(key, packed[f"data_{i}"], packed[f"offsets_{i}"]) for i, key in enumerate(keys)]
    return [{key: data[offsets[j]:offsets[j + 1]] for key, data, offsets in columns} for j in range(n_cells)]


def _spool_cells(folder: Path, item: tuple[int, list[dict[str, Any]]]) -> tuple[int, Any]:
    """In a tokenising worker: write the chunk's packed cells to a file; cells that do not pack go as they are."""
    chunk, cells = item
    packed = pack_cells(cells)
    if packed is None:
        return item
    path = folder / f"chunk-{chunk}-{os.getpid()}.npz"
    try:
        np.savez(path, **packed)  # type: ignore[arg-type]
    except OSError:  # a full or missing temporary folder: the pipe still works
        path.unlink(missing_ok=True)
        return item
    return chunk, SpooledCells(str(path), len(cells))


def _unspool_cells(spooled: SpooledCells) -> list[dict[str, np.ndarray]]:
    """Read back (no pickle) and delete a chunk a worker spooled."""
    with np.load(spooled.path, allow_pickle=False) as npz:
        packed = {k: npz[k] for k in npz.files}
    os.unlink(spooled.path)
    return unpack_cells(packed, spooled.n_cells)


# ---- the adapter path ------------------------------------------------------------------------
def embed(
    store: Store | str | os.PathLike[str] | None,
    dataset: str,
    model: str,
    checkpoint: str | os.PathLike[str] | ResolvedCheckpoint | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    chunk_rows: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    min_gene_fraction: float = 0.0,
    min_genes: int = 1,
    progress: bool = True,
    lora_dir: str | os.PathLike[str] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    num_gpus_per_actor: float | None = None,
    actors: int | None = None,
    max_retries: int = 3,
    allow_non_counts: bool = False,
    allow_empty_cells: bool = False,
    torch_compile: bool = False,
    **model_params: Any,
) -> EmbedResult:
    """Embed every cell of ``dataset`` with ``model`` into the store (resumable, idempotent).

    Parameters
    ----------
    store
        A :class:`store.Store` or its directory.
    dataset
        Dataset name or id in the store.
    model
        A registered model (``scdm models``); ``pca`` and ``hvg`` are dispatched to
        :func:`embed_baseline` (``lora_dir`` is then refused, and the other foundation-model
        options given are named in a warning, as ``scdm embed`` does).
    checkpoint
        Local folder in the model's official format, or a Hugging Face model id ``org/name`` /
        ``org/name@revision`` (fetched into the Hugging Face cache; see :mod:`scdm.embedding.hub`).
        An existing local path wins. The embedding's telemetry records the source under
        ``"checkpoint"`` (``hub_id``, ``revision``, ``commit``; or ``path``).
    batch_size
        Cells per forward pass (default: the adapter's; on CUDA, halved on out-of-memory).
    device, precision
        ``auto`` = CUDA with bf16 autocast when available, else CPU fp32.
    workers
        DataLoader processes that tokenise the next chunks while the model runs (0 = inline;
        local executor only). Default: 2 on CUDA (fewer on a machine with fewer spare CPUs), 0 on
        the CPU (see :func:`tokenise_workers`). Results do not depend on it; the telemetry records
        the number used (``tokenise_workers``).
    lora_dir
        A LoRA adapter made by :func:`scdm.embedding.finetune.finetune`: its folder, or its id in this
        store (``<adapter id>`` or the variant name ``lora:<adapter id>``). The embedding is the tuned
        variant ``lora:<adapter id>`` (its content hash is the embedding's ``adapter_hash``;
        ``params["lora"]`` names the split and fold it belongs to).
    executor
        ``"local"`` (this process) or ``"ray"``: chunks are handed to Ray actors that each load the
        model once and write their chunks straight into the array, while this process alone writes
        the catalog (see :mod:`scdm.embedding._ray_executor`). Both give bit-identical results on CPU
        and can resume each other's interrupted embeddings.
    ray_address
        ``"auto"`` (a running cluster), ``"ray://host:port"`` (Ray client), or None to start a
        local cluster (ignored when Ray is already initialised in this process).
    num_gpus_per_actor
        GPUs each Ray actor reserves (default: 1 when the cluster has GPUs and ``device`` allows
        CUDA, else 0).
    actors
        Ray actors (model copies); default: the cluster's GPUs / ``num_gpus_per_actor``, or its
        CPUs, at most the number of chunks to compute.
    max_retries
        Ray only: times a failed chunk is resubmitted (and an actor that died is restarted).
    allow_non_counts
        Embed normalised (non-integer) values with a model that expects raw counts, with a
        warning; refused otherwise. Scaled data (negative values) is refused always.
    allow_empty_cells
        Keep what the model returns for cells without any expressed gene, or none the model knows
        (all zeros for some models); refused otherwise, naming the cells.
    torch_compile
        Compile the model with ``torch.compile`` after loading it (see
        :func:`scdm.embedding.chunks.compile_model`): on CUDA it fuses the norms, activations and
        casts between the matmuls. The first batches wait for compilation. The embedding is the same
        one (compiled kernels differ from eager ones by float rounding, as another GPU would), so it
        is not part of the identity; the telemetry records ``torch_compile``.
    **model_params
        Adapter parameters that change the numbers (``layer``, ``pooling``, ``max_genes``, ...).

    Returns
    -------
    EmbedResult

    Notes
    -----
    Several processes may run the same embedding at once: each claims a chunk before computing it
    and skips those another live process holds, then waits for them (see
    :class:`store.EmbeddingJob`), so each chunk is computed once and every process returns the
    complete embedding. While a job runs, removing the embedding is refused.
    """
    check_embed_options(batch_size=batch_size, chunk_rows=chunk_rows, seed=seed, workers=workers, min_genes=min_genes,
                        min_gene_fraction=min_gene_fraction, actors=actors, max_retries=max_retries,
                        num_gpus_per_actor=num_gpus_per_actor, **model_params)
    # plain ints: both are keyed into the embedding id, where numpy.int64(1) was "1", another id for the same numbers
    seed, batch_size = int(seed), None if batch_size is None else int(batch_size)
    st = open_store(store)
    if executor not in ("local", "ray"):
        msg = f"Unknown executor {executor!r}; use 'local' (this process) or 'ray' (a Ray cluster)."
        raise InputDataError(msg)
    if model in baselines.BASELINES:
        if checkpoint is not None:
            logger.warning("%s needs no checkpoint; ignoring --checkpoint", model)
        if torch_compile:
            logger.warning("%s runs no neural network; ignoring torch_compile", model)
        if lora_dir is not None:  # as `scdm embed --lora` refuses it: the frozen baseline must not pass for a tuned variant
            msg = f"lora_dir applies to foundation models tuned by scdm finetune; {model} has no adapter. Drop lora_dir."
            raise InputDataError(msg)
        unread = [name for name, value, default in (
            ("batch_size", batch_size, None), ("device", device, "auto"), ("precision", precision, "auto"), ("seed", seed, 0),
            ("workers", workers, None), ("min_gene_fraction", min_gene_fraction, 0.0), ("allow_non_counts", allow_non_counts, False),
            ("allow_empty_cells", allow_empty_cells, False)) if value != default]
        if unread:  # as `scdm embed` names them: a seed sweep of pca would otherwise read as seed-stable
            logger.warning("%s is fitted from the data on the CPU and ignores %s (foundation-model options)", model,
                           ", ".join(unread))
        if executor == "ray":
            logger.info("%s is fitted in one pass on this machine; the ray executor applies to foundation models", model)
        return embed_baseline(st, [dataset], model=model, chunk_rows=chunk_rows, progress=progress, **model_params)[0]
    ds = st.dataset(dataset)
    with library_progress(progress):
        source = resolve_checkpoint(checkpoint, model, params=model_params) if checkpoint is not None else None
    adapter = get_adapter(model)(checkpoint=source.path if source is not None else None, seed=seed, **model_params)
    adapter.check_checkpoint()
    ray_exec: Any = None
    if executor == "ray":
        from scdm.embedding import _ray_executor as ray_exec

        ray_exec.check_supported(adapter)
        # actors, not this process, hold the devices: decide from the cluster, not from local torch
        dev, num_gpus_per_actor = ray_exec.actor_device(device, num_gpus_per_actor, ray_address)
    else:
        dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    ckpt_hash = checkpoint_hash(source, cache_dir=st.root / "artifacts") if source is not None else None
    # bf16/fp16 weights on CUDA change the numbers: the weight dtype is part of the embedding's identity
    params = {**adapter.params(), **adapter.configure_precision(dev, prec), "seed": seed, "precision": prec,
              "gene_table": gene_table_version()}
    if getattr(adapter, "batch_dependent", False):
        params["batch_size"] = batch_size or adapter.default_batch_size
    lora, variant = None, {}
    if lora_dir is not None:
        from scdm.embedding.lora_card import read_lora_card

        lora_dir = lora_folder(st, lora_dir)  # an adapter id becomes its folder, for the Ray workers too
        lora = read_lora_card(lora_dir)
        lora.check_base(adapter, ckpt_hash)  # before loading: a mismatch fails fast
        _refuse_changed_adapter(lora)  # before the lookup too: a stored embedding is the card's adapter, not these files
        params["lora"] = lora.embedding_params()
        variant = {"adapter_hash": lora.adapter_hash, "variant": lora.variant}
    # before a stored embedding is returned too: allow_non_counts is not part of its identity, and one made
    # with it from normalised values must not reach a run that did not ask for it
    check_input_kind(model, adapter.requires_counts, ds.x_kind, ds.name, allow_non_counts=allow_non_counts,
                     ranks_expression=getattr(adapter, "ranks_expression", False))
    # one computation, one embedding: keyed by what its settings resolve to, or as a stored one of it is keyed
    params = identity_key(st, [ds.dataset_id], model, identity_candidates(params, identity_spellings(adapter, params)),
                          checkpoint_hash=ckpt_hash, **variant)
    existing = st.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=ckpt_hash, **variant)
    if existing is not None and complete_and_intact(st, existing):
        # the gene thresholds guard a stored embedding as they guard a new one (they are not part of its identity)
        _require_stored_matches(st, existing.embedding_id, model, min_genes=min_genes, min_fraction=min_gene_fraction)
        if not allow_empty_cells:
            _refuse_stored_empty_cells(st, existing.embedding_id, model)
        logger.info("%s embedding of %s exists (%s); nothing to compute", model, ds.name, existing.embedding_id)
        return EmbedResult(existing.embedding_id, ds.name, model, existing.dim, existing.n_cells, 0, "complete")
    n_empty = count_empty_cells(st, ds.dataset_id, model, allow_empty_cells=allow_empty_cells)
    if ray_exec is not None:
        job = ray_exec.RayEmbedJob(
            dataset=ds, adapter=adapter, params=params, variant=variant, checkpoint_hash=ckpt_hash, seed=seed,
            model_params=model_params, lora_dir=None if lora_dir is None else str(lora_dir), device=dev, precision=prec,
            batch_size=batch_size or _auto_batch_size(adapter, dev), chunk_rows=chunk_rows, min_genes=min_genes,
            min_gene_fraction=min_gene_fraction, num_gpus_per_actor=float(num_gpus_per_actor or 0), actors=actors,
            max_retries=max_retries, ray_address=ray_address, progress=progress, allow_empty_cells=allow_empty_cells,
            checkpoint_source=source.provenance() if source is not None else None, torch_compile=torch_compile,
            cells_without_expressed_genes=n_empty,
        )
        return ray_exec.embed_on_ray(st, job)

    t_load = time.perf_counter()
    with library_progress(progress):
        adapter.load(dev)
    if lora is not None:
        lora.apply(adapter)
    if torch_compile:
        compile_model(adapter)
    load_s = time.perf_counter() - t_load
    genes = st.genes(ds.dataset_id)["gene_id"].astype(str).tolist()
    audit = adapter.prepare(genes, gene_id_kind=ds.gene_id_kind)
    require_matches(audit, model, min_genes=min_genes, min_fraction=min_gene_fraction)
    n_unknown = count_cells_without_known_genes(st, ds.dataset_id, adapter) if allow_empty_cells else None
    chunk_rows = model_chunk_rows(chunk_rows, adapter.emb_dim, params, bool(getattr(adapter, "batch_dependent", False)))
    emb = st.create_embedding(ds.dataset_id, model=model, params=params, dim=adapter.emb_dim, checkpoint_hash=ckpt_hash,
                              chunk_rows=chunk_rows, **variant)
    _reset_peak_rss()
    with emb.job() as job:  # `scdm rm` of this embedding is refused until the job ends
        missing = emb.missing_chunks()
        logger.info("%s on %s: %d cells, %d of %d chunks to compute, device %s, %s", model, ds.name, ds.n_cells, len(missing), emb.n_chunks, dev, prec)
        zero_by_chunk: dict[int, int] = {}  # all-zero rows of each chunk this process computed (both rounds)
        lengths_by_chunk: dict[int, dict[int, int]] = {}  # cells per token length of each chunk this process computed

        def run(chunks: list[int], finish: Finish | None) -> dict[str, Any]:
            return _run_chunks(st, emb, job, adapter, chunks, batch_size=batch_size or _auto_batch_size(adapter, dev), device=dev,
                               precision=prec, workers=workers, progress=progress, allow_empty_cells=allow_empty_cells, finish=finish,
                               zero_by_chunk=zero_by_chunk, lengths_by_chunk=lengths_by_chunk)

        def telemetry_of(s: dict[str, Any]) -> dict[str, Any]:
            out = run_telemetry(s, dev, prec, load_s, adapter, torch_compile=torch_compile)
            return {**out, "checkpoint": source.provenance()} if source is not None else out

        stats = finalize_with_repair(emb, run, missing, telemetry_of,
                                     lambda s: {**audit.to_dict(), **token_stats_of(emb, lengths_by_chunk),
                                                **empty_audit(n_empty, zero_rows_of(emb, zero_by_chunk), n_unknown)})
    return EmbedResult(emb.embedding_id, ds.name, model, emb.dim, emb.n_cells, stats["chunks"], "complete", stats["telemetry"])


def identity_spellings(adapter: Adapter, params: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The settings of ``params`` with more than one spelling: each as ``[how it is keyed now, *how an older scdm keyed it*]``.

    The adapter's settings that resolve on the checkpoint (:meth:`Adapter.identity_spellings`), and the seed
    and batch size: before 564c11b a numpy int was keyed as its string (``"5"``), the same numbers under
    another id.
    """
    spellings = {"seed": [params["seed"], str(params["seed"])]}
    if "batch_size" in params:
        spellings["batch_size"] = [params["batch_size"], str(params["batch_size"])]
    return {**adapter.identity_spellings(), **spellings}


def identity_candidates(params: Mapping[str, Any], spellings: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``params`` with each setting of ``spellings`` spelled in every way it names, the first (canonical) one first."""
    names = list(spellings)
    out: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*(spellings[n] for n in names)):
        spelled = {**params, **dict(zip(names, values))}
        # once each, as keyed (JSON): 10000 and 10000.0, or 1 and True, are equal in Python but two keys
        out.setdefault(json.dumps(spelled, sort_keys=True, default=str), spelled)
    return list(out.values())


def identity_key(st: Store, dataset_ids: Sequence[str], model: str, candidates: Sequence[dict[str, Any]], *,
                 checkpoint_hash: str | None, adapter_hash: str | None = None, variant: str = "frozen") -> dict[str, Any]:
    """The params to key the embeddings of ``dataset_ids`` by, among ``candidates`` (spellings of one computation).

    The first candidate under which one of them is stored (complete or not): it keeps its key and id. Else the one
    whose space the store holds for other datasets, under whichever spelling an older scdm keyed it: keyed
    canonically beside them, one computation would be two spaces and two leaderboard rows. Else the first
    (canonical) candidate.
    """
    for params in candidates:
        if any(st.get_embedding(d, model=model, params=params, checkpoint_hash=checkpoint_hash, adapter_hash=adapter_hash,
                                variant=variant) is not None for d in dataset_ids):
            return params
    spaces = [space_id_of(model, checkpoint_hash, adapter_hash, variant, params) for params in candidates]
    held = set(st.query("SELECT DISTINCT space_id FROM embeddings WHERE list_contains(?, space_id)", [spaces])["space_id"])
    return next((params for params, space in zip(candidates, spaces) if space in held), candidates[0])


def lora_folder(st: Store, adapter: str | os.PathLike[str]) -> Path:
    """The folder of a LoRA adapter given as a folder, or as its id in ``st`` (``<id>`` or ``lora:<id>``)."""
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        return folder
    adapter_id = str(adapter).removeprefix("lora:")
    if adapter_row(st, adapter_id) is not None:
        return adapter_dir(st, adapter_id)
    msg = (f"{str(adapter)!r} is neither a folder nor an adapter of this store. Give the adapter id that scdm finetune "
           "printed (see scdm sql \"SELECT adapter_id, model, split_id, fold, label_set FROM adapters\") or its folder.")
    raise InputDataError(msg)


def _refuse_changed_adapter(lora: LoraCard) -> None:
    """Refuse an adapter folder whose weight files are not the ones its card hashed (changed or damaged).

    Its tuned embeddings are found by the card's adapter hash, so without this check a stored one (made
    from the files the card describes) would be returned for other files, where computing refuses them.
    """
    problem = lora.damage()
    if problem is not None:
        msg = (f"{problem}: embeddings made with it would not be those of the adapter its card describes, and the ones "
               f"stored under lora:{lora.adapter_id} were made from its original files. Fine-tune again (scdm finetune "
               "trains a damaged adapter again), or restore the folder's files.")
        raise CheckpointError(msg)


def _stored_audit(st: Store, embedding_id: str) -> dict[str, Any]:
    """The input audit a stored embedding recorded ({} when none was)."""
    frame = st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [embedding_id])
    raw = frame["audit"].iloc[0] if len(frame) else None
    return json.loads(raw) if isinstance(raw, str) else {}


def _require_stored_matches(st: Store, embedding_id: str, model: str, *, min_genes: int, min_fraction: float) -> None:
    """:func:`require_matches` on the gene audit a stored embedding recorded (none recorded: nothing to check)."""
    audit = _stored_audit(st, embedding_id)
    if "n_input_genes" not in audit or "n_matched" not in audit:
        return
    require_matches(GeneAudit(n_input_genes=int(audit["n_input_genes"]), n_matched=int(audit["n_matched"]),
                              unmatched_examples=tuple(audit.get("unmatched_examples") or ())),
                    model, min_genes=min_genes, min_fraction=min_fraction)


EMPTY_CELL_WORDS = {"cells_without_expressed_genes": "cells express no gene", "cells_without_known_genes": "cells express no gene the model knows",
                    "zero_rows": "cells have an all-zero vector"}
"""Audit counts of cells a run keeps only with allow_empty_cells (otherwise it refuses them), in words."""


def _refuse_stored_empty_cells(st: Store, embedding_id: str, model: str) -> None:
    """Refuse a stored embedding whose audit counts cells kept with ``allow_empty_cells`` when this call does not allow them.

    ``allow_empty_cells`` is not part of the identity, so a run without it found the embedding an
    earlier run made with it and returned its fake cells (all zeros, or one shared vector) silently,
    where computing it would have refused them.
    """
    audit = _stored_audit(st, embedding_id)
    counts = {key: int(audit.get(key) or 0) for key in EMPTY_CELL_WORDS}
    if not any(counts.values()):
        return
    found = ", ".join(f"{n} {EMPTY_CELL_WORDS[key]}" for key, n in counts.items() if n)
    msg = (f"The stored {model} embedding {embedding_id} was made with allow_empty_cells and keeps cells its embedding says "
           f"nothing about ({found}). Pass --allow-empty-cells (allow_empty_cells=True) to use it as it is, or filter such "
           "cells out (e.g. scanpy.pp.filter_cells(adata, min_genes=200)) and ingest again.")
    raise InputDataError(msg)


GPU_BATCH_FACTOR = 8
"""On CUDA, a model's CPU batch size times this is the first try; out-of-memory halves it."""


def _auto_batch_size(adapter: Adapter, device: str) -> int:
    if getattr(adapter, "batch_dependent", False) or not device.startswith("cuda"):
        return adapter.default_batch_size  # batch-dependent models: the batch size is part of the result
    return adapter.default_batch_size * GPU_BATCH_FACTOR


def _reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux; elsewhere the peak is process-wide)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


@dataclass
class _Tally:
    """What one process computed of an embedding (for progress and telemetry)."""

    chunks: int = 0
    cells: int = 0
    computed: int = 0
    naive: int = 0
    zero_rows: int = 0
    lengths: list[int] = field(default_factory=list)
    workers: int = 0
    zero_by_chunk: dict[int, int] = field(default_factory=dict)
    """All-zero rows per chunk computed here (the audit counts the other chunks' from the array)."""
    lengths_by_chunk: dict[int, dict[int, int]] = field(default_factory=dict)
    """Cells per token length of each chunk computed here (the audit reads the other chunks' from the catalog)."""


def _run_chunks(st: Store, emb: Embedding, job: EmbeddingJob, adapter: Adapter, chunks: list[int], *, batch_size: int, device: str,
                precision: str, workers: int | None, progress: bool, allow_empty_cells: bool = False, finish: Finish | None = None,
                zero_by_chunk: dict[int, int] | None = None, lengths_by_chunk: dict[int, dict[int, int]] | None = None) -> dict[str, Any]:
    """Compute ``chunks`` (those not claimed by other processes), then wait for and take over the rest.

    With ``finish``, the embedding is finalized through the writer (its last rows and the mark in one commit).
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    state: dict[str, Any] = {"batch_size": batch_size}
    tally = _Tally(zero_by_chunk={} if zero_by_chunk is None else zero_by_chunk,
                   lengths_by_chunk={} if lengths_by_chunk is None else lengths_by_chunk)
    t0 = time.perf_counter()
    total_cells = sum(emb.chunk_bounds(c)[1] - emb.chunk_bounds(c)[0] for c in chunks)
    bar = progress_bar(total=total_cells, desc=f"embed {adapter.name}", unit="cell", silent=not progress)
    try:
        with emb.writer(job=job) as writer:
            todo = list(chunks)
            while todo:
                elsewhere = _embed_pass(st, emb, adapter, writer, todo, workers=workers, device=device, precision=precision,
                                        state=state, tally=tally, bar=bar, t0=t0, allow_empty_cells=allow_empty_cells)
                # chunks other live processes were computing: wait until they are committed, or take
                # over those whose process died (its claims are free again)
                todo = writer.wait_for(elsewhere) if elsewhere else []
            stats = _run_stats(tally, state, t0, device)
            if finish is not None:
                finish(writer, stats)
    except KeyboardInterrupt:
        logger.warning("interrupted: %d cells written in whole chunks are kept; run the same command again to resume", tally.cells)
        raise
    finally:
        bar.close()
    warn_zero_rows(tally.zero_rows, adapter.name)
    return stats


def _run_stats(tally: _Tally, state: dict[str, Any], t0: float, device: str) -> dict[str, Any]:
    """What a run of chunks did: cells, wall time, padding saved, batch size, GPU memory."""
    import torch

    wall = time.perf_counter() - t0
    stats: dict[str, Any] = {
        "chunks": tally.chunks, "cells": tally.cells, "wall_s": wall, "cells_per_s": tally.cells / wall if wall > 0 else None,
        "tokens_computed": tally.computed, "tokens_naive_padding": tally.naive,
        "padding_saved": 1 - tally.computed / tally.naive if tally.naive else 0.0, "final_batch_size": state["batch_size"],
        "oom_backoffs": state.get("oom_backoffs", 0), "zero_rows": tally.zero_rows, "tokenise_workers": tally.workers,
    }
    if tally.lengths:
        arr = np.asarray(tally.lengths)
        stats["token_stats"] = {"tokens_per_cell_median": float(np.median(arr)), "tokens_per_cell_min": int(arr.min()), "tokens_per_cell_max": int(arr.max())}
    if device.startswith("cuda"):
        stats["peak_gpu_mem_bytes"] = int(torch.cuda.max_memory_allocated())
    return stats


def _embed_pass(st: Store, emb: Embedding, adapter: Adapter, writer: ChunkWriter, chunks: list[int], *, workers: int | None, device: str,
                precision: str, state: dict[str, Any], tally: _Tally, bar: Any, t0: float, allow_empty_cells: bool) -> list[int]:
    """Embed and write every chunk of ``chunks`` this process can claim; returns those claimed elsewhere."""
    todo = set(chunks)
    order = sorted(todo)
    workers = tokenise_workers(workers, device, len(order))
    wanted: Callable[[int], bool] | None = writer.claim  # claimed before tokenising: a chunk computed elsewhere costs nothing here
    if getattr(adapter, "sequential_tokenize", False):
        # reference-quirk tokenisers draw from one RNG stream in row order: replay every chunk in
        # one process so a resumed run draws the same numbers, and embed only the missing ones
        workers, order, wanted = 0, list(range(emb.n_chunks)), None
    tally.workers = max(tally.workers, workers)
    source = ChunkTokens(st.root, emb.dataset_id, adapter, emb, order, adapter.requires_counts, allow_empty_cells=allow_empty_cells)
    sort = not getattr(adapter, "batch_dependent", False)
    elsewhere = []
    for chunk, cells in _iter_chunk_tokens(source, workers, wanted):
        if chunk not in todo:
            continue
        if cells is None or not writer.claim(chunk):
            elsewhere.append(chunk)
            continue
        t_chunk = time.perf_counter()
        lengths = [adapter.token_length(c) for c in cells]
        batches = batches_by_length(lengths, state["batch_size"], sort=sort)
        c_tok, n_tok = padding_stats(lengths, batches)
        vectors = embed_cells(adapter, cells, batches, device, precision, state)
        lo, hi = emb.chunk_bounds(chunk)
        tally.zero_by_chunk[chunk] = check_embedded_rows(vectors, np.arange(lo, hi), adapter.name, allow_empty_cells=allow_empty_cells)
        tally.zero_rows += tally.zero_by_chunk[chunk]
        tally.lengths_by_chunk[chunk] = length_counts(lengths)
        writer.write(chunk, vectors, seconds=time.perf_counter() - t_chunk, token_lengths=tally.lengths_by_chunk[chunk])
        tally.computed, tally.naive = tally.computed + c_tok, tally.naive + n_tok
        tally.lengths.extend(lengths)
        tally.chunks += 1
        tally.cells += len(cells)
        bar.update(len(cells))
        bar.set_postfix(cells_per_s=f"{tally.cells / max(time.perf_counter() - t0, 1e-9):.1f}")
    return elsewhere


def count_cells_without_known_genes(st: Store, dataset: str, adapter: Adapter) -> int | None:
    """Cells none of whose expressed genes ``adapter`` knows (cells expressing nothing included); None if it cannot tell.

    See :func:`~scdm.embedding.chunks.cells_without_known_genes`; warns when there are any.
    """
    if adapter.known_columns_ is None:
        return None
    adata = st.open_anndata(dataset, backed=True)
    try:
        n = cells_without_known_genes(adata, adapter.known_columns_, adapter.name)
    finally:
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    warn_cells_without_known_genes(n, adapter.name)
    return n


# ---- the baseline path -----------------------------------------------------------------------
JOINT_GENE_ORDER = "fit_datasets"
"""A joint hvg fit's genes follow the gene order of the first dataset by content hash (``fit_datasets`` order)."""


DEFAULT_TARGET_SUM = 1e4
"""Counts per cell a baseline normalises to (``normalize_total``) before ``log1p``."""


def embed_baseline(
    store: Store | str | os.PathLike[str] | None,
    datasets: Sequence[str],
    *,
    model: str = "pca",
    n_hvg: int = 2000,
    n_comps: int = 50,
    target_sum: float = DEFAULT_TARGET_SUM,
    normalized: bool | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
    _symbol_match: bool = False,
) -> list[EmbedResult]:
    """Fit a ``pca``/``hvg`` baseline jointly on ``datasets`` and embed each of them.

    With one dataset this is the per-dataset baseline (a space of its own). With several, they
    are fitted on their shared genes and all embeddings share one ``space_id``, so the CPU stage
    may pool them. Already complete embeddings whose chunks all match their checksums are returned
    without refitting; damaged chunks (see :func:`complete_and_intact`) are recomputed, and only those.
    A dataset given more than once is fitted once; the result has one entry per dataset given.
    ``_symbol_match`` is for :func:`repair` of a joint fit made before genes were matched by gene.
    """
    check_embed_options(chunk_rows=chunk_rows, n_hvg=n_hvg, n_comps=n_comps if model == "pca" else None, target_sum=target_sum)
    st = open_store(store)
    given = [st.dataset(d) for d in datasets]
    if not given:
        msg = "No dataset given to embed."
        raise InputDataError(msg)
    # a dataset named twice (by name and by id, or an upload equal to a training dataset) is fitted
    # once: counted twice, its cells would weigh double in the fit, and the space would be another one
    infos = list({i.dataset_id: i for i in given}.values())
    if len(infos) < len(given):
        logger.info("%s: %d dataset(s) given more than once are fitted once", model, len(given) - len(infos))
    fit_key = sorted(i.content_hash for i in infos)
    # the sizes and target_sum spelled one way (int, float): target_sum=10000 is the default 1e4's embedding, and a
    # numpy int (JSON: the string "50") is that int; the spelling as given finds what an older scdm stored under it.
    # normalized=True or False where the datasets' value kinds say the same is the default None's fit: keyed None, as
    # the default (its params are replayed onto other datasets, a joint refit with an upload, where None detects each
    # one's kind and a bool would force it), and what an older scdm keyed as given is found
    # target_sum normalises counts: where every dataset's values are used as they are it changes nothing, and is keyed
    # as the default's (target_sum=5000 on log-normalised values was another embedding of the same fit)
    detected = {baselines.resolve_as_is(i.x_kind, None, i.name) for i in infos}
    unused = all(baselines.resolve_as_is(i.x_kind, normalized, i.name) for i in infos)
    spellings: dict[str, list[Any]] = {"n_hvg_requested": [int(n_hvg), n_hvg],
                                       "target_sum": [*([DEFAULT_TARGET_SUM] if unused else []), float(target_sum), target_sum],
                                       "normalized": [None, *detected] if len(detected) == 1 and normalized in (None, *detected)
                                       else [normalized]}
    base_params = {"n_hvg_requested": int(n_hvg), "target_sum": float(target_sum), "normalized": normalized,
                   "fit_datasets": fit_key, "gene_table": gene_table_version()}
    if model == "pca":
        base_params["n_comps_requested"] = int(n_comps)
        spellings["n_comps_requested"] = [int(n_comps), n_comps]
    elif len(infos) > 1:
        # a joint hvg's columns follow the first fitted dataset's gene order: fitted in fit_datasets
        # order, whatever order the datasets are given in (ids made before this marker did not)
        base_params["gene_order"] = JOINT_GENE_ORDER
    # a joint fit matches genes by the gene they resolve to, not by the stored symbol: a new space, since
    # joint fits made before this marker (which keep their ids and numbers) left renamed genes out
    gene_match = GENE_MATCH if len(infos) > 1 and not _symbol_match else None
    if gene_match is not None:
        base_params["gene_match"] = gene_match
    # one key for every dataset of a joint fit: their embeddings are one space
    base_params = identity_key(st, [i.dataset_id for i in infos], model, identity_candidates(base_params, spellings),
                               checkpoint_hash=None)
    found = [st.get_embedding(i.dataset_id, model=model, params=base_params) for i in infos]
    intact = [f is not None and complete_and_intact(st, f) for f in found]
    done = {i.dataset_id: EmbedResult(f.embedding_id, i.name, model, f.dim, f.n_cells, 0, "complete")  # type: ignore[union-attr]
            for f, i, ok in zip(found, infos, intact) if ok}
    if len(done) == len(infos):
        return [done[i.dataset_id] for i in given]
    t0 = time.perf_counter()
    in_fit_order = sorted(infos, key=lambda i: i.content_hash)  # the same fit for any order the datasets are given in
    fit = baselines.fit_baseline(st, [i.dataset_id for i in in_fit_order], model=model, n_hvg=n_hvg, n_comps=n_comps,
                                 target_sum=target_sum, normalized=normalized, gene_match=gene_match)
    fit_s = time.perf_counter() - t0
    _reset_peak_rss()
    for info in infos:
        # a joint fit is refitted for one damaged member; the intact ones are left as they are
        if info.dataset_id not in done:
            done[info.dataset_id] = _write_baseline(st, info, fit, base_params, chunk_rows, fit_s, progress)
    return [done[i.dataset_id] for i in given]


def _write_baseline(st: Store, info: Any, fit: baselines.BaselineFit, params: dict[str, Any], chunk_rows: int | None, fit_s: float, progress: bool) -> EmbedResult:
    emb = st.create_embedding(info.dataset_id, model=fit.model, params=params, dim=fit.dim, chunk_rows=chunk_rows)
    keys = baselines.gene_keys(st, info.dataset_id, params.get("gene_match"))
    first: dict[str, int] = {}
    for i, g in enumerate(keys):
        first.setdefault(g, i)
    cols = np.array([first[g] for g in fit.genes], dtype=np.int64)
    as_is = baselines.resolve_as_is(info.x_kind, params["normalized"], info.name)
    t0 = time.perf_counter()

    def telemetry_of(stats: dict[str, Any]) -> dict[str, Any]:
        wall = time.perf_counter() - t0
        return run_telemetry({"cells": stats["cells"], "wall_s": wall, "fit_s": fit_s, "cells_per_s": stats["cells"] / wall if wall > 0 else None},
                          "cpu", "fp64", None, None)

    audit = {"n_input_genes": info.n_genes, "n_matched": fit.params["n_shared_genes"], "n_selected_genes": len(fit.genes),
             "fitted": fit.params, "explained_variance_ratio": None if fit.explained_variance_ratio is None else float(fit.explained_variance_ratio.sum())}
    with emb.job() as job:  # `scdm rm` of this embedding is refused until the job ends

        def run(chunks: list[int], finish: Finish | None) -> dict[str, Any]:
            return _baseline_chunks(st, emb, job, info, fit, cols, as_is, chunks, progress, finish)

        stats = finalize_with_repair(emb, run, emb.missing_chunks(), telemetry_of, lambda _: audit)
    return EmbedResult(emb.embedding_id, info.name, fit.model, emb.dim, emb.n_cells, stats["chunks"], "complete", stats["telemetry"])


def _baseline_chunks(st: Store, emb: Embedding, job: EmbeddingJob, info: Any, fit: baselines.BaselineFit, cols: np.ndarray,
                     as_is: bool, chunks: list[int], progress: bool, finish: Finish | None = None) -> dict[str, Any]:
    """Transform and write the chunks this process claims; wait for (or take over) the others; finalize through the writer with ``finish``."""
    bar = progress_bar(total=sum(emb.chunk_bounds(c)[1] - emb.chunk_bounds(c)[0] for c in chunks),
                       desc=f"embed {fit.model} {info.name}", unit="cell", silent=not progress)
    adata = st.open_anndata(info.dataset_id, backed=True)
    written = cells = 0
    try:
        with emb.writer(job=job) as writer:
            todo = sorted(chunks)
            while todo:
                elsewhere = []
                for chunk in todo:
                    if not writer.claim(chunk):
                        elsewhere.append(chunk)
                        continue
                    lo, hi = emb.chunk_bounds(chunk)
                    _, block = next(iter_row_blocks(adata, hi - lo, start=lo, stop=hi))
                    dense = baselines.preprocess_block(block, as_is=as_is, target_sum=fit.params["target_sum"])[:, cols].toarray()
                    writer.write(chunk, fit.transform(dense))
                    written, cells = written + 1, cells + hi - lo
                    bar.update(hi - lo)
                todo = writer.wait_for(elsewhere) if elsewhere else []
            if finish is not None:
                finish(writer, {"chunks": written, "cells": cells})
    finally:
        bar.close()
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    return {"chunks": written, "cells": cells}


# ---- verified resume and repair --------------------------------------------------------------
def complete_and_intact(st: Store, emb: Embedding) -> bool:
    """Whether ``emb`` is complete with every committed chunk matching its checksum.

    Committed chunks that do not match (a flipped byte, a deleted or truncated chunk file), and
    chunks without a committed record, are put back to pending here, so the resume path that
    follows recomputes exactly those. A ``zarr.json`` that is gone or disagrees with the catalog is
    rewritten from it first (the chunks are then checked as reads will see them).
    """
    if emb.status != "complete":
        return False  # pending: the resume path (create_embedding) renews a broken array and fills what is missing
    st.repair_array_metadata(emb)  # a zarr.json gone or edited: rewritten from the catalog, chunks checked next
    bad = st.verify_embedding(emb.embedding_id)
    if bad:
        logger.warning("%s embedding %s: chunk(s) %s are damaged; recomputing them", emb.model, emb.embedding_id,
                       ", ".join(map(str, bad)))
        st.mark_chunks_pending(emb.embedding_id, bad)
        return False
    return True


def repair(store: Store | str | os.PathLike[str] | None, embedding_id: str, *, progress: bool = True) -> EmbedResult:
    """Recompute the pending chunks of a pca/hvg embedding from its recorded parameters.

    Run after :meth:`store.Store.verify` with ``repair=True`` (``scdm verify --repair``) marked
    its bad chunks pending; the baseline is refitted on the same datasets and only the pending
    chunks are written. Models that need a checkpoint are repaired by :func:`embed_command`'s command.

    Raises
    ------
    ScdmError
        If the embedding is not a baseline, or cannot be recomputed identically (its gene table
        version or fit datasets changed).
    """
    from scdm.store.verify import fit_dataset_names

    st = open_store(store)
    emb = st.embedding(embedding_id)
    p = emb.params
    if emb.model not in baselines.BASELINES or "fit_datasets" not in p:
        msg = f"Embedding {emb.embedding_id} ({emb.model}) needs its checkpoint to be recomputed: run {embed_command(st, emb.embedding_id)}"
        raise ScdmError(msg)
    if p.get("gene_table") != gene_table_version():
        msg = (f"Embedding {emb.embedding_id} ({emb.model}) was made with gene table {p.get('gene_table')}; this scdm has "
               f"{gene_table_version()}, so it cannot be recomputed identically. Remove it (scdm rm --embedding "
               f"{emb.embedding_id}) and embed the data again.")
        raise ScdmError(msg)
    if emb.model == "hvg" and len(p["fit_datasets"]) > 1 and p.get("gene_order") != JOINT_GENE_ORDER:
        msg = (f"Embedding {emb.embedding_id} (joint hvg) was made before scdm recorded the order its datasets were fitted "
               f"in, which sets its columns; it cannot be recomputed to match its other chunks. Remove it (scdm rm "
               f"--embedding {emb.embedding_id}) and embed the datasets again with --joint.")
        raise ScdmError(msg)
    names = fit_dataset_names(st, p["fit_datasets"])
    if len(names) != len(p["fit_datasets"]):
        msg = (f"Embedding {emb.embedding_id} ({emb.model}) was fitted on {len(p['fit_datasets'])} dataset(s), of which "
               f"{len(names)} are still in the store; it cannot be refitted. Remove it (scdm rm) and embed again.")
        raise ScdmError(msg)
    kwargs: dict[str, Any] = {"n_hvg": p["n_hvg_requested"], "target_sum": p["target_sum"], "normalized": p["normalized"]}
    if emb.model == "pca":
        kwargs["n_comps"] = p["n_comps_requested"]
    results = embed_baseline(st, names, model=emb.model, chunk_rows=emb.chunk_rows, progress=progress,
                             _symbol_match="gene_match" not in p, **kwargs)  # an older joint fit: refitted as it was made
    return next(r for r in results if r.embedding_id == emb.embedding_id)


def embed_command(store: Store | str | os.PathLike[str] | None, embedding_id: str) -> str:
    """The ``scdm embed`` command that recomputes an embedding (its pending chunks) with its options.

    For a model that needs a checkpoint, ``--checkpoint DIR`` stands for the folder it was made
    with (the store records its content hash, not its path); an embedding made from a Hugging Face
    Hub id gets ``--checkpoint org/name@commit``, the commit its telemetry records. The options are rebuilt from the
    recorded parameters and checked: the adapter built with them must report the same parameters,
    else the command says so.
    """
    import inspect
    import shlex

    from scdm.store.verify import repair_hint

    st = open_store(store)
    emb = st.embedding(embedding_id)
    if (emb.model in baselines.BASELINES and "fit_datasets" in emb.params) or emb.variant != "frozen":
        return repair_hint(st, emb)
    cls = get_adapter(emb.model)
    params = dict(emb.params)
    seed, precision = int(params.pop("seed", 0)), str(params.pop("precision", "auto"))
    gene_table, batch_size = params.pop("gene_table", None), params.pop("batch_size", None)
    weights = params.pop("weights", None)  # set again by --precision on CUDA (configure_precision)
    accepted = {name: prm for name, prm in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "checkpoint", "seed") and prm.kind in (prm.KEYWORD_ONLY, prm.POSITIONAL_OR_KEYWORD)}
    options = {k: v for k, v in params.items() if k in accepted}
    dataset = st.query("SELECT name FROM datasets WHERE dataset_id = ?", [emb.dataset_id])["name"]
    hub = _recorded_hub_checkpoint(st, emb)
    args = ["scdm", "embed", str(dataset.iloc[0]) if len(dataset) else emb.dataset_id, "--model", emb.model, "--checkpoint", hub or "DIR",
            "--precision", precision]
    if seed:
        args += ["--seed", str(seed)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    for key, value in options.items():
        if accepted[key].default is not inspect.Parameter.empty and value == accepted[key].default:
            continue
        args += ["--reference-quirks"] if key == "reference_quirks" and value is True else ["--param", f"{key}={_param_text(value)}"]
    rebuilt = {**cls(None, seed=seed, **options).params(), "seed": seed, "precision": precision, "gene_table": gene_table,
               **({"weights": weights} if weights else {})}
    if batch_size is not None:
        rebuilt["batch_size"] = batch_size
    what = f"{hub}: the Hugging Face" if hub else "DIR: the"
    note = f"  # {what} {emb.model} checkpoint it was made with (content hash {str(_recorded_checkpoint_hash(st, emb))[:16]})"
    if json.dumps(rebuilt, sort_keys=True, default=str) != json.dumps(emb.params, sort_keys=True, default=str):
        note += "; check the options: not all of its recorded parameters could be rebuilt"
    if gene_table != gene_table_version():
        note += f"; it was made with gene table {gene_table}, this scdm has {gene_table_version()}, so it would be a new embedding"
    return shlex.join(args) + note


def _recorded_checkpoint_hash(st: Store, emb: Embedding) -> str | None:
    """The checkpoint content hash an embedding records."""
    frame = st.query("SELECT checkpoint_hash FROM embeddings WHERE embedding_id = ?", [emb.embedding_id])
    return None if frame.empty else frame["checkpoint_hash"].iloc[0]


def _recorded_hub_checkpoint(st: Store, emb: Embedding) -> str | None:
    """``org/name@commit`` when the embedding's telemetry records a Hugging Face Hub checkpoint, else None."""
    frame = st.query("SELECT telemetry FROM embeddings WHERE embedding_id = ?", [emb.embedding_id])
    try:
        source = json.loads(frame["telemetry"].iloc[0]).get("checkpoint") if len(frame) else None
    except (TypeError, ValueError, AttributeError):
        return None
    if isinstance(source, dict) and source.get("hub_id") and source.get("commit"):
        return f"{source['hub_id']}@{source['commit']}"
    return None


def _param_text(value: Any) -> str:
    """A ``--param KEY=VALUE`` value that the CLI parses back to ``value`` (JSON unless a plain string)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)
