"""The embedding runner: drives any adapter (or baseline) over a dataset into the store.

Cells are processed in row-chunks equal to the store's chunks. Inside a chunk, cells are
tokenised (in DataLoader workers when asked, overlapping compute), sorted by token length so
mini-batches carry little padding, embedded, scattered back to the original order and written
as one chunk. A chunk counts only once it is flushed and committed, so an interrupted run
resumes from the missing chunks; asking for a finished embedding returns it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from store import Embedding, Store, open_store
from store._ingest import iter_row_blocks, to_csr
from store._zarr import default_chunk_rows
from store.errors import InputDataError, ScdmError
from store.genes import gene_table_version

from scdm_embed import baselines
from scdm_embed._adapter import Adapter, check_counts, get_adapter, require_matches
from store.progress import progress_bar

__all__ = ["EmbedResult", "embed", "embed_baseline", "checkpoint_hash", "resolve_device", "resolve_precision", "batches_by_length"]

logger = logging.getLogger(__name__)


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


# ---- checkpoint identity ---------------------------------------------------------------------
def checkpoint_hash(folder: str | Path, *, cache_dir: Path | None = None) -> str:
    """Content hash of every file in a checkpoint folder (cached by path, size and mtime).

    Hashing a multi-GB checkpoint takes a while, so each file's digest is cached in
    ``cache_dir/checkpoint-hashes.json`` and reused while the file's size and mtime are unchanged.
    """
    folder = Path(folder)
    cache_file = (cache_dir / "checkpoint-hashes.json") if cache_dir else None
    cache: dict[str, str] = {}
    if cache_file and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    total = hashlib.blake2b(digest_size=16)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = cache.get(key)
        if digest is None:
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            digest = cache[key] = h.hexdigest()
        total.update(str(path.relative_to(folder)).encode() + b"\x1f" + digest.encode())
    if cache_file:
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return total.hexdigest()


# ---- batching --------------------------------------------------------------------------------
def batches_by_length(lengths: Sequence[int], batch_size: int, *, sort: bool = True) -> list[np.ndarray]:
    """Index batches of cells, longest first when ``sort`` (equal lengths keep row order)."""
    idx = np.argsort(-np.asarray(lengths), kind="stable") if sort else np.arange(len(lengths))
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def _padding_stats(lengths: Sequence[int], batches: list[np.ndarray]) -> tuple[int, int]:
    """(tokens computed with these batches, tokens computed with naive batches in row order)."""
    lengths = np.asarray(lengths)
    computed = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    size = max((len(b) for b in batches), default=1)
    naive = sum(int(lengths[i:i + size].max()) * len(lengths[i:i + size]) for i in range(0, len(lengths), size))
    return computed, naive


class _ChunkTokens:
    """Map-style dataset over chunks: item i = (chunk, tokenised cells); opens the data lazily per process."""

    def __init__(self, store_root: Path, dataset_id: str, adapter: Adapter, emb: Embedding, chunks: list[int], needs_counts: bool) -> None:
        self.store_root = store_root
        self.dataset_id = dataset_id
        self.adapter = adapter
        self.chunk_rows = emb.chunk_rows
        self.n_cells = emb.n_cells
        self.chunks = chunks
        self.needs_counts = needs_counts
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
        return chunk, self.adapter.tokenize(x, np.arange(lo, hi))


def _iter_chunk_tokens(source: _ChunkTokens, workers: int) -> Iterator[tuple[int, list[dict[str, np.ndarray]]]]:
    if workers <= 0:
        for i in range(len(source)):
            yield source[i]
        return
    from torch.utils.data import DataLoader

    # collate_fn keeps the cells as numpy: the default would turn them into tensors
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2,
                        persistent_workers=False, collate_fn=_keep_as_is)
    yield from loader


def _keep_as_is(item: Any) -> Any:
    return item


# ---- the adapter path ------------------------------------------------------------------------
def embed(
    store: "Store | str | os.PathLike[str] | None",
    dataset: str,
    model: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    chunk_rows: int | None = None,
    seed: int = 0,
    workers: int = 0,
    min_gene_fraction: float = 0.0,
    min_genes: int = 1,
    progress: bool = True,
    lora_dir: str | os.PathLike[str] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    num_gpus_per_actor: float | None = None,
    actors: int | None = None,
    max_retries: int = 3,
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
        :func:`embed_baseline`.
    checkpoint
        Local folder in the model's official format.
    batch_size
        Cells per forward pass (default: the adapter's; on CUDA, halved on out-of-memory).
    device, precision
        ``auto`` = CUDA with bf16 autocast when available, else CPU fp32.
    workers
        DataLoader processes that tokenise the next chunks while the model runs (0 = inline;
        local executor only).
    lora_dir
        A LoRA adapter folder made by :func:`scdm_embed.finetune.finetune`: the embedding is the
        tuned variant ``lora:<adapter id>`` (its content hash is the embedding's ``adapter_hash``;
        ``params["lora"]`` names the split and fold it belongs to).
    executor
        ``"local"`` (this process) or ``"ray"``: chunks are handed to Ray actors that each load the
        model once and write their chunks straight into the array, while this process alone writes
        the catalog (see :mod:`scdm_embed._ray_executor`). Both give bit-identical results on CPU
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
    **model_params
        Adapter parameters that change the numbers (``layer``, ``pooling``, ``max_genes``, ...).

    Returns
    -------
    EmbedResult
    """
    st = open_store(store)
    if executor not in ("local", "ray"):
        msg = f"Unknown executor {executor!r}; use 'local' (this process) or 'ray' (a Ray cluster)."
        raise InputDataError(msg)
    if model in baselines.BASELINES:
        if checkpoint is not None:
            logger.warning("%s needs no checkpoint; ignoring --checkpoint", model)
        if executor == "ray":
            logger.info("%s is fitted in one pass on this machine; the ray executor applies to foundation models", model)
        return embed_baseline(st, [dataset], model=model, chunk_rows=chunk_rows, progress=progress, **model_params)[0]
    ds = st.dataset(dataset)
    adapter = get_adapter(model)(checkpoint=checkpoint, seed=seed, **model_params)
    adapter.check_checkpoint()
    if adapter.requires_counts and ds.x_kind == "scaled":
        msg = (
            f"{model} needs raw counts, but dataset {ds.name!r} holds negative (scaled) values. Ingest the raw "
            "counts (e.g. adata.layers['counts'] saved as X), or use a baseline model (pca, hvg)."
        )
        raise InputDataError(msg)
    ray_exec: Any = None
    if executor == "ray":
        from scdm_embed import _ray_executor as ray_exec

        ray_exec.check_supported(adapter)
        # actors, not this process, hold the devices: decide from the cluster, not from local torch
        dev, num_gpus_per_actor = ray_exec.actor_device(device, num_gpus_per_actor, ray_address)
    else:
        dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    ckpt_hash = checkpoint_hash(adapter.checkpoint, cache_dir=st.root / "artifacts") if adapter.checkpoint else None
    params = {**adapter.params(), "seed": seed, "precision": prec, "gene_table": gene_table_version()}
    if getattr(adapter, "batch_dependent", False):
        params["batch_size"] = batch_size or adapter.default_batch_size
    lora, variant = None, {}
    if lora_dir is not None:
        from scdm_embed.finetune import read_lora_card

        lora = read_lora_card(lora_dir)
        lora.check_base(adapter, ckpt_hash)  # before loading: a mismatch fails fast
        params["lora"] = lora.embedding_params()
        variant = {"adapter_hash": lora.adapter_hash, "variant": lora.variant}
    existing = st.get_embedding(ds.dataset_id, model=model, params=params, checkpoint_hash=ckpt_hash, **variant)
    if existing is not None and existing.status == "complete":
        logger.info("%s embedding of %s exists (%s); nothing to compute", model, ds.name, existing.embedding_id)
        return EmbedResult(existing.embedding_id, ds.name, model, existing.dim, existing.n_cells, 0, "complete")
    if ray_exec is not None:
        job = ray_exec.RayEmbedJob(
            dataset=ds, adapter=adapter, params=params, variant=variant, checkpoint_hash=ckpt_hash, seed=seed,
            model_params=model_params, lora_dir=None if lora_dir is None else str(lora_dir), device=dev, precision=prec,
            batch_size=batch_size or _auto_batch_size(adapter, dev), chunk_rows=chunk_rows, min_genes=min_genes,
            min_gene_fraction=min_gene_fraction, num_gpus_per_actor=float(num_gpus_per_actor or 0), actors=actors,
            max_retries=max_retries, ray_address=ray_address, progress=progress,
        )
        return ray_exec.embed_on_ray(st, job)

    t_load = time.perf_counter()
    adapter.load(dev)
    if lora is not None:
        lora.apply(adapter)
    load_s = time.perf_counter() - t_load
    genes = st.genes(ds.dataset_id)["gene_id"].astype(str).tolist()
    audit = adapter.prepare(genes, gene_id_kind=ds.gene_id_kind)
    require_matches(audit, model, min_genes=min_genes, min_fraction=min_gene_fraction)
    chunk_rows = _model_chunk_rows(chunk_rows, adapter.emb_dim, params, bool(getattr(adapter, "batch_dependent", False)))
    emb = st.create_embedding(ds.dataset_id, model=model, params=params, dim=adapter.emb_dim, checkpoint_hash=ckpt_hash,
                              chunk_rows=chunk_rows, **variant)
    missing = emb.missing_chunks()
    logger.info("%s on %s: %d cells, %d of %d chunks to compute, device %s, %s", model, ds.name, ds.n_cells, len(missing), emb.n_chunks, dev, prec)
    _reset_peak_rss()
    stats = _run_chunks(st, emb, adapter, missing, batch_size=batch_size or _auto_batch_size(adapter, dev), device=dev,
                        precision=prec, workers=workers, progress=progress)
    telemetry = _telemetry(stats, dev, prec, load_s, adapter)
    emb.finalize(telemetry=telemetry, audit={**audit.to_dict(), **stats.pop("token_stats", {})})
    return EmbedResult(emb.embedding_id, ds.name, model, emb.dim, emb.n_cells, len(missing), "complete", telemetry)


MODEL_CHUNK_ROWS_MAX = 4096
"""Cells per chunk at most for foundation-model embeddings (a crash loses at most one chunk)."""


def _model_chunk_rows(chunk_rows: int | None, emb_dim: int, params: dict[str, Any], batch_dependent: bool) -> int:
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


def _peak_rss() -> int:
    """Peak resident memory since :func:`_reset_peak_rss` (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _autocast(device: str, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _embed_cells(adapter: Adapter, cells: list[dict[str, np.ndarray]], batches: list[np.ndarray], device: str, precision: str, state: dict[str, Any]) -> np.ndarray:
    """Embed one chunk's cells batch by batch, halving the batch on CUDA out-of-memory."""
    import torch

    out = np.empty((len(cells), adapter.emb_dim), dtype=np.float32)
    queue = list(batches)
    while queue:
        idx = queue.pop(0)
        try:
            batch = adapter.collate([cells[i] for i in idx])
            batch = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
            with torch.inference_mode(), _autocast(device, precision):
                vecs = adapter.embed(batch)
            out[idx] = vecs.float().cpu().numpy()
        except torch.cuda.OutOfMemoryError as err:
            if getattr(adapter, "batch_dependent", False):
                msg = (f"CUDA out of memory at batch size {len(idx)}. {adapter.name} embeds cells jointly within a batch, so "
                       "the batch size is part of the result and is not lowered automatically; rerun with a smaller --batch-size.")
                raise ScdmError(msg) from err
            if len(idx) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(idx) // 2
            state["batch_size"] = max(1, half)
            state["oom_backoffs"] = state.get("oom_backoffs", 0) + 1
            logger.warning("CUDA out of memory at batch %d; retrying with %d", len(idx), half)
            queue[:0] = [idx[:half], idx[half:]]
    return out


def _run_chunks(st: Store, emb: Embedding, adapter: Adapter, chunks: list[int], *, batch_size: int, device: str, precision: str, workers: int, progress: bool) -> dict[str, Any]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    todo = set(chunks)
    sequential = bool(getattr(adapter, "sequential_tokenize", False))
    if sequential:
        # reference-quirk tokenisers draw from one RNG stream in row order: replay every chunk in
        # one process so a resumed run draws the same numbers, and embed only the missing ones
        workers = 0
        chunks = list(range(emb.n_chunks)) if todo else []
    source = _ChunkTokens(st.root, emb.dataset_id, adapter, emb, chunks, adapter.requires_counts)
    state: dict[str, Any] = {"batch_size": batch_size}
    lengths_all: list[int] = []
    computed = naive = 0
    n_done = 0
    sort = not getattr(adapter, "batch_dependent", False)
    t0 = time.perf_counter()
    total_cells = sum(emb.chunk_bounds(c)[1] - emb.chunk_bounds(c)[0] for c in todo)
    bar = progress_bar(total=total_cells, desc=f"embed {adapter.name}", unit="cell", silent=not progress)
    try:
        with emb.writer() as writer:
            for chunk, cells in _iter_chunk_tokens(source, workers):
                if chunk not in todo:
                    continue
                t_chunk = time.perf_counter()
                lengths = [adapter.token_length(c) for c in cells]
                batches = batches_by_length(lengths, state["batch_size"], sort=sort)
                c_tok, n_tok = _padding_stats(lengths, batches)
                computed, naive = computed + c_tok, naive + n_tok
                vectors = _embed_cells(adapter, cells, batches, device, precision, state)
                writer.write(chunk, vectors, seconds=time.perf_counter() - t_chunk)
                lengths_all.extend(lengths)
                n_done += len(cells)
                bar.update(len(cells))
                bar.set_postfix(cells_per_s=f"{n_done / max(time.perf_counter() - t0, 1e-9):.1f}")
    except KeyboardInterrupt:
        logger.warning("interrupted: %d cells written in whole chunks are kept; run the same command again to resume", n_done)
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    stats: dict[str, Any] = {
        "cells": n_done, "wall_s": wall, "cells_per_s": n_done / wall if wall > 0 else None,
        "tokens_computed": computed, "tokens_naive_padding": naive,
        "padding_saved": 1 - computed / naive if naive else 0.0, "final_batch_size": state["batch_size"],
        "oom_backoffs": state.get("oom_backoffs", 0),
    }
    if lengths_all:
        arr = np.asarray(lengths_all)
        stats["token_stats"] = {"tokens_per_cell_median": float(np.median(arr)), "tokens_per_cell_min": int(arr.min()), "tokens_per_cell_max": int(arr.max())}
    if device.startswith("cuda"):
        stats["peak_gpu_mem_bytes"] = int(torch.cuda.max_memory_allocated())
    return stats


def _telemetry(stats: dict[str, Any], device: str, precision: str, load_s: float | None, adapter: Adapter | None) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("scdm", "torch", "transformers", "peft", "numpy", "zarr", "duckdb", "anndata"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out = {**stats, "device": device, "precision": precision, "peak_rss_bytes": _peak_rss(),
           "host": platform.node(), "versions": versions}
    if load_s is not None:
        out["load_s"] = load_s
    if adapter is not None:
        out["n_parameters"] = adapter.n_parameters()
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---- the baseline path -----------------------------------------------------------------------
def embed_baseline(
    store: "Store | str | os.PathLike[str] | None",
    datasets: Sequence[str],
    *,
    model: str = "pca",
    n_hvg: int = 2000,
    n_comps: int = 50,
    target_sum: float = 1e4,
    normalized: bool | None = None,
    chunk_rows: int | None = None,
    progress: bool = True,
) -> list[EmbedResult]:
    """Fit a ``pca``/``hvg`` baseline jointly on ``datasets`` and embed each of them.

    With one dataset this is the per-dataset baseline (a space of its own). With several, they
    are fitted on their shared genes and all embeddings share one ``space_id``, so the CPU stage
    may pool them. Already complete embeddings are returned without refitting.
    """
    st = open_store(store)
    infos = [st.dataset(d) for d in datasets]
    if not infos:
        msg = "No dataset given to embed."
        raise InputDataError(msg)
    fit_key = sorted(i.content_hash for i in infos)
    base_params = {"n_hvg_requested": n_hvg, "target_sum": target_sum, "normalized": normalized, "fit_datasets": fit_key, "gene_table": gene_table_version()}
    if model == "pca":
        base_params["n_comps_requested"] = n_comps
    found = [st.get_embedding(i.dataset_id, model=model, params=base_params) for i in infos]
    if all(f is not None and f.status == "complete" for f in found):
        return [EmbedResult(f.embedding_id, i.name, model, f.dim, f.n_cells, 0, "complete") for f, i in zip(found, infos)]  # type: ignore[union-attr]
    t0 = time.perf_counter()
    fit = baselines.fit_baseline(st, [i.dataset_id for i in infos], model=model, n_hvg=n_hvg, n_comps=n_comps, target_sum=target_sum, normalized=normalized)
    fit_s = time.perf_counter() - t0
    results = []
    _reset_peak_rss()
    for info in infos:
        results.append(_write_baseline(st, info, fit, base_params, chunk_rows, fit_s, progress))
    return results


def _write_baseline(st: Store, info: Any, fit: baselines.BaselineFit, params: dict[str, Any], chunk_rows: int | None, fit_s: float, progress: bool) -> EmbedResult:
    emb = st.create_embedding(info.dataset_id, model=fit.model, params=params, dim=fit.dim, chunk_rows=chunk_rows)
    missing = set(emb.missing_chunks())
    keys = baselines.gene_keys(st, info.dataset_id)
    first: dict[str, int] = {}
    for i, g in enumerate(keys):
        first.setdefault(g, i)
    cols = np.array([first[g] for g in fit.genes], dtype=np.int64)
    as_is = baselines.resolve_as_is(info.x_kind, params["normalized"], info.name)
    t0 = time.perf_counter()
    bar = progress_bar(total=info.n_cells, desc=f"embed {fit.model} {info.name}", unit="cell", silent=not progress)
    adata = st.open_anndata(info.dataset_id, backed=True)
    written = 0
    try:
        with emb.writer() as writer:
            for lo, block in iter_row_blocks(adata, emb.chunk_rows):
                chunk = lo // emb.chunk_rows
                if chunk in missing:
                    dense = baselines.preprocess_block(block, as_is=as_is, target_sum=fit.params["target_sum"])[:, cols].toarray()
                    writer.write(chunk, fit.transform(dense))
                    written += 1
                bar.update(block.shape[0])
    finally:
        bar.close()
        if getattr(adata, "file", None) is not None:
            adata.file.close()
    wall = time.perf_counter() - t0
    telemetry = _telemetry({"cells": info.n_cells, "wall_s": wall, "fit_s": fit_s, "cells_per_s": info.n_cells / wall if wall > 0 else None}, "cpu", "fp64", None, None)
    audit = {"n_input_genes": info.n_genes, "n_matched": fit.params["n_shared_genes"], "n_selected_genes": len(fit.genes),
             "fitted": fit.params, "explained_variance_ratio": None if fit.explained_variance_ratio is None else float(fit.explained_variance_ratio.sum())}
    emb.finalize(telemetry=telemetry, audit=audit)
    return EmbedResult(emb.embedding_id, info.name, fit.model, emb.dim, emb.n_cells, written, "complete", telemetry)
