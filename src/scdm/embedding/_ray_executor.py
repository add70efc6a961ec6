"""The Ray executor of embedding jobs: one model load per actor, chunks handed out by the driver.

Who does what
-------------
*Driver* (the process that called :func:`scdm.embedding.runner.embed` with ``executor="ray"``): it alone
opens the DuckDB catalog. It fixes the embedding's identity exactly as the local executor does,
starts the actors, creates the embedding once the first actor reports the model's dimension and
gene audit, hands out the missing chunks, and commits a chunk's catalog row when its task reports
success and the bytes in the array match the reported checksum. That check reads the chunk back,
so an array that is not on storage shared with the workers fails loudly instead of leaving holes.
The driver claims each chunk before handing it out (:class:`store.EmbeddingJob`) and releases it
once committed, so a second driver, or a local run of the same embedding, computes other chunks;
chunks another process holds are waited for at the end (and taken over if that process died).

*Actor* (:class:`EmbedWorker`): builds the adapter from the same class, checkpoint and parameters,
loads it once, maps the dataset's genes once, and then for each chunk reads its cells from the
dataset's stored ``.h5ad`` (backed), tokenises, embeds with the runner's own code
(``ChunkTokens``, :func:`~scdm.embedding.runner.batches_by_length`, ``embed_cells``) and writes the
chunk straight into the Zarr array (:meth:`store.ChunkTarget.write`). It never opens the catalog.

Failures
--------
A task that raises is resubmitted, up to ``max_retries`` times per chunk. An actor whose process
dies is replaced by the driver (the new actor reloads the model; deaths are counted) and its chunks are resubmitted. A chunk's row is
committed once: results are accepted once per chunk, and :meth:`store.Embedding.commit_chunks` is
idempotent. Errors in the user's data (:class:`store.errors.ScdmError` raised in a task) are not
retried. When the driver dies, every committed chunk stays; the same call with either executor
continues from the missing chunks.

Not supported
-------------
Adapters with ``sequential_tokenize`` (``--reference-quirks`` of models whose reference tokeniser
draws from one global RNG stream in row order) need every chunk tokenised in one process in order;
they are refused with a message pointing to ``executor="local"``. Batch-dependent adapters are
fine: their batches are fixed row ranges inside a chunk, whichever actor embeds it.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdm.embedding._adapter import Adapter, GeneAudit, check_embedded_rows, require_matches
from scdm.embedding.chunks import (
    ChunkTokens,
    EmbedResult,
    batches_by_length,
    cells_without_known_genes,
    compile_model,
    embed_cells,
    empty_audit,
    finalize_with_repair,
    length_counts,
    model_chunk_rows,
    padding_stats,
    peak_rss,
    run_telemetry,
    token_stats_of,
    warn_cells_without_known_genes,
    warn_zero_rows,
    zero_rows_of,
)
from scdm.store import ChunkRecord, ChunkTarget, Store
from scdm.store.errors import InputDataError, ScdmError
from scdm.store.progress import progress_bar

if TYPE_CHECKING:
    from scdm.store import DatasetInfo, Embedding, EmbeddingJob

__all__ = ["EmbedWorker", "RayEmbedJob", "actor_device", "check_supported", "connect", "embed_on_ray"]

logger = logging.getLogger(__name__)

TASKS_PER_ACTOR = 2
"""Chunks queued on each actor at once: the next one is already there when the last one ends."""
COMMIT_EVERY_S = 1.0
"""Catalog rows of finished chunks are committed together at most this often (a commit costs ~10 ms)."""
MISSING_RAY = "--executor ray needs Ray: pip install 'scdm[ray]'"


# ---- connecting ---------------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ScdmError(MISSING_RAY) from err
    return ray


def connect(ray_address: str | None = None) -> Any:
    """Initialise Ray once per process and return the module.

    ``None`` starts a local cluster on this machine, ``"auto"`` joins the running cluster this node
    belongs to, ``"ray://host:port"`` connects through Ray client. When Ray is already initialised
    (a notebook, a test fixture) that connection is used as it is.
    """
    ray = _ray()
    if not ray.is_initialized():
        logger.info("connecting to Ray (%s)", ray_address or "new local cluster")
        try:
            # a cluster started here needs no dashboard; a running cluster keeps its own settings
            ray.init(address=ray_address, **({"include_dashboard": False} if ray_address is None else {}))
        except (ConnectionError, RuntimeError, ValueError) as err:
            msg = (f"Could not connect to Ray at {ray_address or '(new local cluster)'}: {err}. Start the cluster first "
                   "(`ray start --head` on the head node), or pass --ray-address auto / ray://HOST:10001.")
            raise ScdmError(msg) from err
    return ray


def check_supported(adapter: Adapter) -> None:
    """Refuse adapters whose results would depend on how chunks are split across processes."""
    if getattr(adapter, "sequential_tokenize", False):
        msg = (f"{adapter.name} with --reference-quirks draws its gene sampling from one RNG stream in row order, "
               "so every chunk must be tokenised by one process in order and cannot be spread over Ray actors. "
               "Run it with --executor local (or drop --reference-quirks).")
        raise InputDataError(msg)


def actor_device(device: str, num_gpus_per_actor: float | None, ray_address: str | None) -> tuple[str, float]:
    """The device string actors use and the GPUs each reserves.

    Ray hides the GPUs an actor did not reserve (``CUDA_VISIBLE_DEVICES``), so inside an actor
    ``cuda`` is its own GPU: a device index (``cuda:1``) is refused, and ``auto`` is decided from
    the cluster's resources rather than from this process's torch.
    """
    if device.startswith("cuda:"):
        msg = f"--device {device} names one GPU, but Ray assigns GPUs to actors; use --device cuda (and --num-gpus-per-actor)."
        raise InputDataError(msg)
    if device not in ("auto", "cpu", "cuda"):
        msg = f"Unknown device {device!r} for the ray executor; use auto, cpu or cuda."
        raise InputDataError(msg)
    if num_gpus_per_actor is not None and num_gpus_per_actor < 0:
        msg = f"--num-gpus-per-actor must be >= 0; got {num_gpus_per_actor}."
        raise InputDataError(msg)
    if device == "cpu":
        if num_gpus_per_actor:
            msg = f"--device cpu with --num-gpus-per-actor {num_gpus_per_actor}: CPU actors need no GPU; drop one of the two."
            raise InputDataError(msg)
        return "cpu", 0.0
    if device == "cuda" and num_gpus_per_actor == 0:
        msg = "--device cuda with --num-gpus-per-actor 0: an actor sees only the GPUs it reserves; give e.g. --num-gpus-per-actor 1."
        raise InputDataError(msg)
    if num_gpus_per_actor is not None:
        return ("cuda", num_gpus_per_actor) if num_gpus_per_actor > 0 else ("cpu", 0.0)
    gpus = float(connect(ray_address).cluster_resources().get("GPU", 0))
    if device == "cuda" and gpus == 0:
        msg = "--device cuda, but the Ray cluster has no GPUs. Add GPU nodes, or use --device cpu."
        raise ScdmError(msg)
    return ("cuda", 1.0) if gpus > 0 else ("cpu", 0.0)


# ---- the actor ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """Everything an actor needs to rebuild the adapter and read the data (no catalog)."""

    adapter_cls: type
    checkpoint: str | None
    seed: int
    model_params: dict[str, Any]
    lora_dir: str | None
    device: str
    precision: str
    dataset_path: str
    """Absolute path of the dataset's stored ``.h5ad`` (must be visible on every node)."""
    gene_id_kind: str
    batch_size: int
    sort: bool
    """Length-sort cells into batches (False for batch-dependent adapters)."""
    allow_empty_cells: bool = False
    """Keep what the model returns for cells without expressed (known) genes instead of refusing them."""
    torch_compile: bool = False
    """Compile the model after loading it (:func:`~scdm.embedding.chunks.compile_model`)."""


class EmbedWorker:
    """A Ray actor: loads the model once, then embeds and writes whole chunks on request."""

    def __init__(self, spec: WorkerSpec, genes: list[str]) -> None:
        t0 = time.perf_counter()
        self.spec = spec
        self.host = platform.node()
        if not Path(spec.dataset_path).is_file():
            msg = (f"Ray worker on {self.host} cannot see the dataset file {spec.dataset_path!r}. Every node must see the "
                   "store's datasets/ folder at the same path (shared storage: NFS, Lustre, a Kubernetes volume).")
            raise ScdmError(msg)
        adapter = spec.adapter_cls(checkpoint=spec.checkpoint, seed=spec.seed, **spec.model_params)
        adapter.check_checkpoint()
        adapter.configure_precision(spec.device, spec.precision)  # the driver's identity says which weights
        adapter.load(spec.device)
        if spec.lora_dir is not None:
            from scdm.embedding.lora_card import read_lora_card

            read_lora_card(spec.lora_dir).apply(adapter)
        if spec.torch_compile:
            compile_model(adapter)
        self.audit: GeneAudit = adapter.prepare(genes, gene_id_kind=spec.gene_id_kind)
        self.adapter = adapter
        self.load_s = time.perf_counter() - t0
        self.state: dict[str, Any] = {"batch_size": spec.batch_size}
        self._source: ChunkTokens | None = None
        self._array: Any = None
        self._target: ChunkTarget | None = None

    def info(self) -> dict[str, Any]:
        """What the driver needs before it can create the embedding."""
        out = {"emb_dim": self.adapter.emb_dim, "audit": self.audit, "n_parameters": self.adapter.n_parameters(),
               "load_s": self.load_s, "host": self.host, "pid": os.getpid()}
        if self.spec.device.startswith("cuda"):
            import torch

            out["gpu"] = torch.cuda.get_device_name(0)
        return out

    def count_cells_without_known_genes(self) -> int | None:
        """One pass over the dataset file, as the local executor makes (see :func:`~scdm.embedding.chunks.cells_without_known_genes`)."""
        import anndata as ad

        adata = ad.read_h5ad(self.spec.dataset_path, backed="r")
        try:
            return cells_without_known_genes(adata, self.adapter.known_columns_, self.adapter.name)
        finally:
            adata.file.close()

    def _open(self, target: ChunkTarget) -> None:
        if self._target == target:
            return
        import anndata as ad

        if not target.exists():
            msg = (f"Ray worker on {self.host} cannot find the embedding array {target.location}. The arrays must be on storage "
                   "every node shares: put the store on a shared file system or give --arrays-url (file:///shared/..., s3://...).")
            raise ScdmError(msg)
        source = ChunkTokens(Path(), "", self.adapter, target, list(range(target.n_chunks)), self.adapter.requires_counts,  # type: ignore[arg-type]
                              allow_empty_cells=self.spec.allow_empty_cells)
        # the dataset file is opened directly: actors never open the catalog, which the driver owns
        source._adata = ad.read_h5ad(self.spec.dataset_path, backed="r")
        self._source, self._array, self._target = source, target.open_array(), target

    def embed_chunk(self, target: ChunkTarget, chunk: int, attempt: int) -> dict[str, Any]:
        """Read, tokenise, embed and write one chunk; return its record and statistics."""
        import torch

        t0 = time.perf_counter()
        self._open(target)
        assert self._source is not None
        cuda = self.spec.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        _, cells = self._source[chunk]
        lengths = [self.adapter.token_length(c) for c in cells]
        batches = batches_by_length(lengths, self.state["batch_size"], sort=self.spec.sort)
        computed, naive = padding_stats(lengths, batches)
        vectors = embed_cells(self.adapter, cells, batches, self.spec.device, self.spec.precision, self.state)
        lo, hi = target.chunk_bounds(chunk)
        zero_rows = check_embedded_rows(vectors, np.arange(lo, hi), self.adapter.name, allow_empty_cells=self.spec.allow_empty_cells)
        t_write = time.perf_counter()
        record = target.write(chunk, vectors, seconds=t_write - t0, array=self._array, token_lengths=length_counts(lengths))
        return {
            "record": record, "lengths": np.asarray(lengths, dtype=np.int32), "tokens_computed": computed,
            "tokens_naive": naive, "batch_size": self.state["batch_size"], "oom_backoffs": self.state.get("oom_backoffs", 0),
            "compute_s": t_write - t0, "write_s": time.perf_counter() - t_write, "host": self.host, "attempt": attempt,
            "actor": f"{self.host}:{os.getpid()}", "zero_rows": zero_rows,
            "peak_gpu_mem_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None, "peak_rss_bytes": peak_rss(),
        }


# ---- the driver ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayEmbedJob:
    """One embedding job as the runner resolved it (identity fixed, nothing computed yet)."""

    dataset: DatasetInfo
    adapter: Adapter
    """Constructed, not loaded: actors build their own from its class and the parameters."""
    params: dict[str, Any]
    variant: dict[str, Any]
    checkpoint_hash: str | None
    seed: int
    model_params: dict[str, Any]
    lora_dir: str | None
    device: str
    precision: str
    batch_size: int
    chunk_rows: int | None
    min_genes: int
    min_gene_fraction: float
    num_gpus_per_actor: float
    actors: int | None
    max_retries: int
    ray_address: str | None
    progress: bool
    allow_empty_cells: bool = False
    checkpoint_source: dict[str, Any] | None = None
    """Where the checkpoint came from (``hub_id``/``revision``/``commit``, or ``path``), for the telemetry."""
    torch_compile: bool = False
    cells_without_expressed_genes: int | None = None
    """What :func:`~scdm.embedding.runner.count_empty_cells` found (None: not counted), for the audit."""


@dataclass
class _Tally:
    """What the driver has seen so far (for the progress bar and the telemetry)."""

    cells: int = 0
    chunks: int = 0
    zero_rows: int = 0
    zero_by_chunk: dict[int, int] = field(default_factory=dict)
    """All-zero rows per chunk the actors computed (the audit counts the other chunks' from the array)."""
    lengths_by_chunk: dict[int, dict[int, int]] = field(default_factory=dict)
    """Cells per token length of each chunk the actors computed (the audit reads the other chunks' from the catalog)."""
    failed: int = 0
    retried: int = 0
    actor_deaths: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)
    tokens_computed: int = 0
    tokens_naive: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    oom_backoffs: dict[str, int] = field(default_factory=dict)
    """Per actor (``host:pid``): its running count of CUDA out-of-memory batch halvings."""
    peak_gpu: int = 0
    peak_rss: int = 0
    hosts: set[str] = field(default_factory=set)
    compute_s: float = 0.0
    write_s: float = 0.0
    verify_s: float = 0.0
    commit_s: float = 0.0
    wall_s: float = 0.0


def embed_on_ray(st: Store, job: RayEmbedJob) -> EmbedResult:
    """Run ``job`` on Ray actors and finalize the embedding (see the module docstring)."""
    ray = connect(job.ray_address)
    t_start = time.perf_counter()
    ds, adapter = job.dataset, job.adapter
    spec = WorkerSpec(
        adapter_cls=type(adapter), checkpoint=None if adapter.checkpoint is None else str(adapter.checkpoint.resolve()),
        seed=job.seed, model_params=dict(job.model_params), lora_dir=job.lora_dir, device=job.device, precision=job.precision,
        dataset_path=str(_dataset_path(st, ds)), gene_id_kind=ds.gene_id_kind, batch_size=job.batch_size,
        sort=not getattr(adapter, "batch_dependent", False), allow_empty_cells=job.allow_empty_cells,
        torch_compile=job.torch_compile,
    )
    genes_ref = ray.put(st.genes(ds.dataset_id)["gene_id"].astype(str).tolist())  # shipped once, not per actor
    # no Ray-side restarts: the driver replaces a dead actor itself, so it counts deaths and
    # knows which of the dead actor's tasks to resubmit
    worker_cls = ray.remote(num_cpus=1, num_gpus=job.num_gpus_per_actor, max_restarts=0, max_task_retries=0)(EmbedWorker)

    def new_actor() -> Any:
        return worker_cls.remote(spec, genes_ref)

    n_actors = job.actors or _default_actors(ray, job.num_gpus_per_actor)
    actors = [new_actor() for _ in range(max(1, n_actors))]
    try:
        info, first = _first_info(ray, actors)
        require_matches(info["audit"], adapter.name, min_genes=job.min_genes, min_fraction=job.min_gene_fraction)
        # counted as the local executor counts it (the whole dataset, every run), by an actor: it has the model's genes
        n_unknown = _count_unknown(ray, first) if job.allow_empty_cells else None
        warn_cells_without_known_genes(n_unknown, adapter.name)
        chunk_rows = model_chunk_rows(job.chunk_rows, info["emb_dim"], job.params, not spec.sort)
        emb = st.create_embedding(ds.dataset_id, model=adapter.name, params=job.params, dim=info["emb_dim"],
                                  checkpoint_hash=job.checkpoint_hash, chunk_rows=chunk_rows, **job.variant)
        with emb.job() as claims:  # `scdm rm` of this embedding is refused until the job ends
            missing = emb.missing_chunks()
            keep = max(1, len(missing))
            for extra in actors[keep:]:
                ray.kill(extra)  # fewer chunks than actors: do not hold GPUs for nothing
            actors = actors[:keep]
            logger.info("%s on %s: %d cells, %d of %d chunks to compute on %d Ray actor(s), device %s, %s",
                        adapter.name, ds.name, ds.n_cells, len(missing), emb.n_chunks, len(actors), job.device, job.precision)
            tallies: list[_Tally] = []

            def run(chunks: list[int], _finish: Any) -> dict[str, Any]:  # actors write the chunks: finalized after
                tallies.append(_run(ray, emb, claims, actors, new_actor, chunks, job))
                warn_zero_rows(tallies[-1].zero_rows, adapter.name)
                return {"chunks": tallies[-1].chunks}  # this round's: finalize_with_repair sums the rounds

            def telemetry_of(_: dict[str, Any]) -> dict[str, Any]:
                return _ray_telemetry(_merged(tallies), info, job, len(actors), time.perf_counter() - t_start)

            def _audit_of(_: dict[str, Any]) -> dict[str, Any]:
                merged = _merged(tallies)
                return {**info["audit"].to_dict(), **token_stats_of(emb, merged.lengths_by_chunk),
                        **empty_audit(job.cells_without_expressed_genes, zero_rows_of(emb, merged.zero_by_chunk), n_unknown)}

            stats = finalize_with_repair(emb, run, missing, telemetry_of, _audit_of)
    finally:
        for actor in actors:
            ray.kill(actor)
    return EmbedResult(emb.embedding_id, ds.name, adapter.name, emb.dim, emb.n_cells, int(stats["chunks"]), "complete", stats["telemetry"])


def _merged(tallies: list[_Tally]) -> _Tally:
    """One tally of several dispatch rounds (a repair round after finalize found absent chunks)."""
    if len(tallies) == 1:
        return tallies[0]
    out = _Tally()
    for t in tallies:
        for name in ("cells", "chunks", "zero_rows", "failed", "retried", "actor_deaths", "tokens_computed", "tokens_naive",
                     "compute_s", "write_s", "verify_s", "commit_s", "wall_s"):
            setattr(out, name, getattr(out, name) + getattr(t, name))
        out.lengths += t.lengths
        out.zero_by_chunk.update(t.zero_by_chunk)
        out.lengths_by_chunk.update(t.lengths_by_chunk)
        out.batch_sizes += t.batch_sizes
        out.oom_backoffs.update(t.oom_backoffs)
        out.peak_gpu, out.peak_rss = max(out.peak_gpu, t.peak_gpu), max(out.peak_rss, t.peak_rss)
        out.hosts |= t.hosts
    return out


def _dataset_path(st: Store, ds: DatasetInfo) -> Path:
    path = Path(ds.stored_path)
    return (path if path.is_absolute() else st.root / path).resolve()


def _default_actors(ray: Any, num_gpus_per_actor: float) -> int:
    resources = ray.cluster_resources()
    if num_gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // num_gpus_per_actor))
    return max(1, int(resources.get("CPU", 1)))


def _first_info(ray: Any, actors: list[Any]) -> tuple[dict[str, Any], Any]:
    """Info of the first actor that loaded the model, and that actor (the others keep loading meanwhile)."""
    pending = {actor.info.remote(): actor for actor in actors}
    last_error: Exception | None = None
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(ready[0])
        try:
            return dict(ray.get(ready[0])), actor
        except ray.exceptions.RayError as err:
            last_error = err
    msg = f"No Ray actor could load the model: {_init_error_line(last_error)}"
    raise ScdmError(msg) from last_error


def _count_unknown(ray: Any, actor: Any) -> int | None:
    try:
        return ray.get(actor.count_cells_without_known_genes.remote())
    except ray.exceptions.RayError as err:
        msg = f"The Ray actor counting the cells without any gene the model knows failed: {_cause(ray, err)}. Nothing was computed; rerun."
        raise ScdmError(msg) from err


def _init_error_line(err: Exception | None) -> str:
    """The exception line of an actor's failed ``__init__`` (Ray's message carries the whole traceback)."""
    text = str(err)
    if getattr(err, "actor_init_failed", False):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else text
    return text


def _cause(ray: Any, err: Exception | None) -> Exception | None:
    """The exception raised inside a Ray task (so a user error keeps its class and message)."""
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(getattr(err, "cause", None), Exception):
        return err.cause
    return err


class _Dispatcher:
    """Hands chunks to actors, retries failures, and commits finished chunks in short batches."""

    def __init__(self, ray: Any, emb: Embedding, claims: EmbeddingJob, actors: list[Any], new_actor: Any, chunks: list[int],
                 job: RayEmbedJob, tally: _Tally, bar: Any) -> None:
        self.ray, self.emb, self.job, self.tally, self.bar = ray, emb, job, tally, bar
        self.claims = claims
        """This driver's claims: a chunk is handed out only once claimed, and released once committed."""
        self.elsewhere: list[int] = []
        """Chunks another live process (another driver, a local run) was computing when they came up."""
        self.target = emb.target()
        self.actors = actors
        """Slot i holds the current actor of that slot (replaced in place when it dies)."""
        self.new_actor = new_actor
        self.generation = [0] * len(actors)
        self.queue: deque[int] = deque(chunks)
        self.attempts: dict[int, int] = {}
        self.in_flight: dict[Any, tuple[int, int, int]] = {}
        """Task ref -> (chunk, actor slot, generation of the actor in that slot)."""
        self.done: set[int] = set()
        self.pending: list[ChunkRecord] = []
        self.last_commit = time.monotonic()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        try:
            self._fill()
            while self.in_flight:
                # one at a time: its actor gets its next chunk at once, so no actor idles behind a slower one
                ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=COMMIT_EVERY_S)
                for ref in ready:
                    self._collect(ref)
                if self.pending and (time.monotonic() - self.last_commit >= COMMIT_EVERY_S or not self.in_flight):
                    self._commit()
        except KeyboardInterrupt:
            logger.warning("interrupted: %d chunks committed are kept; run the same command again (any executor) to resume", len(self.done))
            raise
        finally:
            self._commit()  # chunks verified on disk count, whatever stopped the loop

    def _fill(self) -> None:
        """Queue chunks on every actor up to :data:`TASKS_PER_ACTOR` each (retried chunks go first)."""
        for i in range(len(self.actors)):
            busy = sum(1 for _, a, _ in self.in_flight.values() if a == i)
            while self.queue and busy < TASKS_PER_ACTOR:
                chunk = self.queue.popleft()
                if not self.claims.claim(chunk):  # a retried chunk is still claimed by this driver
                    self.elsewhere.append(chunk)
                    continue
                self.attempts[chunk] = self.attempts.get(chunk, 0) + 1
                ref = self.actors[i].embed_chunk.remote(self.target, chunk, self.attempts[chunk])
                self.in_flight[ref] = (chunk, i, self.generation[i])
                busy += 1

    def _collect(self, ref: Any) -> None:
        chunk, i, generation = self.in_flight.pop(ref)
        try:
            report = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            if generation == self.generation[i]:
                self._replace_actor(i, err)  # its other queued tasks fail too; they only retry
            self._retry(chunk, err)
        except self.ray.exceptions.RayTaskError as err:
            cause = _cause(self.ray, err)
            if isinstance(cause, ScdmError):
                raise cause from None  # the data or the model is wrong: a retry would fail the same way
            self._retry(chunk, err)
        except self.ray.exceptions.RayError as err:  # lost objects, a node gone: worth another try
            self._retry(chunk, err)
        else:
            self._accept(chunk, report)
        self._fill()

    def _replace_actor(self, i: int, err: Exception) -> None:
        self.tally.actor_deaths += 1
        if self.tally.actor_deaths > self.job.max_retries * len(self.actors):
            msg = (f"Ray actors died {self.tally.actor_deaths} times (max_retries={self.job.max_retries} per actor); last error: {err}. "
                   "Committed chunks are kept: fix the cause (memory? a node lost?) and rerun to resume.")
            raise ScdmError(msg) from err
        logger.warning("Ray actor %d died (%s); starting a new one (it loads the model again)", i, type(err).__name__)
        self.ray.kill(self.actors[i])
        self.actors[i] = self.new_actor()
        self.generation[i] += 1

    def _retry(self, chunk: int, err: Exception) -> None:
        self.tally.failed += 1
        self.bar.set_postfix(self._postfix(), refresh=False)
        if self.attempts[chunk] > self.job.max_retries:
            msg = (f"Chunk {chunk} of embedding {self.emb.embedding_id} failed {self.attempts[chunk]} times (max_retries="
                   f"{self.job.max_retries}); last error: {_cause(self.ray, err)}. Committed chunks are kept: fix the cause and rerun to resume.")
            raise ScdmError(msg) from err
        logger.warning("chunk %d failed on attempt %d (%s); resubmitting", chunk, self.attempts[chunk], type(_cause(self.ray, err)).__name__)
        self.tally.retried += 1
        self.queue.appendleft(chunk)

    def _accept(self, chunk: int, report: dict[str, Any]) -> None:
        record: ChunkRecord = report["record"]
        if chunk in self.done:
            return  # never accepted (or committed) twice
        t = time.perf_counter()
        stored = self.target.stored_checksum(chunk)
        self.tally.verify_s += time.perf_counter() - t
        if stored != record.checksum:
            where = "is absent" if stored is None else f"has checksum {stored}, not {record.checksum}"
            msg = (f"Chunk {chunk} written by the Ray worker on {report['host']} {where} at {self.target.location} as this "
                   "driver sees it. The arrays must be on storage every node shares: put the store on a shared file system "
                   "or give an --arrays-url (file:///shared/..., s3://...).")
            raise ScdmError(msg)
        self.done.add(chunk)
        self.pending.append(record)
        self._tally(report)

    def _tally(self, report: dict[str, Any]) -> None:
        t = self.tally
        n = int(report["record"].n_rows)
        t.cells += n
        t.chunks += 1
        t.zero_rows += int(report.get("zero_rows", 0))
        t.zero_by_chunk[int(report["record"].chunk)] = int(report.get("zero_rows", 0))
        t.lengths.append(report["lengths"])
        t.lengths_by_chunk[int(report["record"].chunk)] = length_counts(report["lengths"])
        t.tokens_computed += int(report["tokens_computed"])
        t.tokens_naive += int(report["tokens_naive"])
        t.batch_sizes.append(int(report["batch_size"]))
        t.oom_backoffs[report["actor"]] = int(report["oom_backoffs"])
        t.hosts.add(report["host"])
        t.compute_s += float(report["compute_s"])
        t.write_s += float(report["write_s"])
        t.peak_gpu = max(t.peak_gpu, int(report["peak_gpu_mem_bytes"] or 0))
        t.peak_rss = max(t.peak_rss, int(report["peak_rss_bytes"] or 0))
        self.bar.update(n)
        self.bar.set_postfix(self._postfix(), refresh=False)

    def _postfix(self) -> dict[str, str]:
        rate = self.tally.cells / max(time.perf_counter() - self.t0, 1e-9)
        return {"chunks": str(self.tally.chunks), "failed": str(self.tally.failed), "retried": str(self.tally.retried), "cells_per_s": f"{rate:.1f}"}

    def _commit(self) -> None:
        if not self.pending:
            return
        t = time.perf_counter()
        records, self.pending = self.pending, []
        self.emb.commit_chunks(records)
        self.claims.release(r.chunk for r in records)
        self.tally.commit_s += time.perf_counter() - t
        self.last_commit = time.monotonic()


def _run(ray: Any, emb: Embedding, claims: EmbeddingJob, actors: list[Any], new_actor: Any, chunks: list[int], job: RayEmbedJob) -> _Tally:
    tally = _Tally()
    total = sum(emb.chunk_bounds(c)[1] - emb.chunk_bounds(c)[0] for c in chunks)
    bar = progress_bar(total=total, desc=f"embed {job.adapter.name} (ray x{len(actors)})", unit="cell", silent=not job.progress)
    t0 = time.perf_counter()
    try:
        todo = list(chunks)
        while todo:
            dispatcher = _Dispatcher(ray, emb, claims, actors, new_actor, todo, job, tally, bar)
            dispatcher.run()
            # chunks other processes were computing: wait until they are committed, or take over
            # those whose process died (its claims are free again)
            todo = claims.wait_for(dispatcher.elsewhere) if dispatcher.elsewhere else []
    finally:
        bar.close()
    tally.wall_s = time.perf_counter() - t0
    return tally


def _ray_telemetry(tally: _Tally, info: dict[str, Any], job: RayEmbedJob, n_actors: int, total_s: float) -> dict[str, Any]:
    import ray

    wall = tally.wall_s
    stats: dict[str, Any] = {
        "cells": tally.cells, "wall_s": wall, "cells_per_s": tally.cells / wall if wall > 0 and tally.cells else None,
        "tokens_computed": tally.tokens_computed, "tokens_naive_padding": tally.tokens_naive,
        "padding_saved": 1 - tally.tokens_computed / tally.tokens_naive if tally.tokens_naive else 0.0,
        "final_batch_size": min(tally.batch_sizes) if tally.batch_sizes else job.batch_size,
        "oom_backoffs": sum(tally.oom_backoffs.values()), "zero_rows": tally.zero_rows,
    }
    # the driver holds no model and maybe no GPU: describe the actors' device, not this process's
    out = run_telemetry(stats, "cpu", job.precision, None, None, torch_compile=job.torch_compile)
    out.update({
        "device": job.device, "executor": "ray", "actors": n_actors, "num_gpus_per_actor": job.num_gpus_per_actor,
        "chunks": tally.chunks, "failed_attempts": tally.failed, "retries": tally.retried, "actor_deaths": tally.actor_deaths,
        "actor_hosts": sorted(tally.hosts), "load_s": info.get("load_s"), "n_parameters": info.get("n_parameters"),
        "total_s": total_s, "actor_compute_s": tally.compute_s, "actor_write_s": tally.write_s,
        "driver_verify_s": tally.verify_s, "driver_commit_s": tally.commit_s, "actor_peak_rss_bytes": tally.peak_rss,
        "ray_version": ray.__version__,
    })
    if "gpu" in info:
        out["gpu"] = info["gpu"]
    if job.checkpoint_source is not None:
        out["checkpoint"] = job.checkpoint_source
    if tally.peak_gpu:
        out["peak_gpu_mem_bytes"] = tally.peak_gpu
    return out
