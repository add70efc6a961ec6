"""The adapter interface every foundation model implements, and the model registry.

An adapter turns a block of cells (a CSR matrix over the dataset's genes) into one vector per
cell, exactly as the model's reference implementation does. The runner (``runner.py``) owns
everything else: chunking, length-sorted mini-batches, device, precision, resume, telemetry and
writing to the store.

Life cycle, as the runner drives it::

    adapter = get_adapter("geneformer")(checkpoint="/ckpt/gf-6L", layer=-2)   # cheap, no I/O
    adapter.check_checkpoint()           # raises CheckpointError naming a missing file
    adapter.load(device="cpu")           # reads weights, builds ``adapter.model`` (nn.Module)
    audit = adapter.prepare(var_genes, gene_id_kind="symbol")   # per-dataset gene mapping
    cells = adapter.tokenize(x_block, rows)      # list[dict[str, ndarray]], CPU, picklable
    batch = adapter.collate([cells[i] for i in order])          # dict[str, Tensor], padded
    emb = adapter.embed(batch)                   # Tensor (n, emb_dim), float32, same order

``tokenize`` must be deterministic given the global row index (seed any sampling from
``(self.seed, row)``), so that results do not depend on chunk size, batch size or sorting.
``embed`` receives tensors already moved to the device and runs under the runner's autocast.
A padding mask in a batch may be ``None``: ``collate`` decides on the CPU that no cell of the
batch is padded, so the model runs without a mask (SDPA can then use its fastest kernels) and
nothing on the device has to be inspected to find that out.

Before ``load``, a runner may call ``adapter.configure_precision(device, precision)``: adapters
with ``half_precision_weights`` then hold their weights in the autocast dtype on CUDA (the
matrix products run in that dtype under autocast anyway; the fp32 copies only cost memory and a
cast per use). It returns what this adds to the embedding's parameters (``{"weights": "bf16"}``),
which the runner must record with them, so an embedding made with half-precision weights never
stands in for one made without.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from scdm.store.checkpoints import dangling_links
from scdm.store.errors import (
    CheckpointError,
    GeneMappingError,
    InputDataError,
    ScdmError,
    ScdmWarning,
    UnknownModelError,
)

if TYPE_CHECKING:
    import scipy.sparse as sp
    import torch

__all__ = [
    "Adapter",
    "GeneAudit",
    "register_adapter",
    "get_adapter",
    "available_models",
    "check_counts",
    "check_input_kind",
    "check_cells_expressed",
    "check_embedded_rows",
    "require_matches",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Adapter]] = {}


@dataclass(frozen=True)
class GeneAudit:
    """How a dataset's genes met a model's vocabulary (stored with every embedding)."""

    n_input_genes: int
    """Genes in the dataset."""
    n_matched: int
    """Dataset genes the model knows (after id mapping)."""
    unmatched_examples: tuple[str, ...] = ()
    """Up to 20 dataset genes the model does not know, for the error message and the audit."""
    id_kind_used: str = "symbol"
    """The gene id kind the model consumed (after mapping)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Model-specific notes (e.g. genes zero-filled by scFoundation)."""

    @property
    def fraction_matched(self) -> float:
        """Matched / input genes (0 for an empty gene list)."""
        return self.n_matched / self.n_input_genes if self.n_input_genes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_input_genes": self.n_input_genes,
            "n_matched": self.n_matched,
            "fraction_matched": round(self.fraction_matched, 6),
            "unmatched_examples": list(self.unmatched_examples),
            "id_kind_used": self.id_kind_used,
            **self.extra,
        }


def _globbed_by(relative: Path, pattern: str) -> bool:
    """Whether ``Path.glob(pattern)`` in the checkpoint folder would name ``relative`` (were it there).

    ``fnmatch`` alone lets ``*`` cross folders: ``*.torch`` would take ``old/x.torch``, which the
    loader, globbing the top level, never reads.
    """
    parts = PurePosixPath(pattern).parts
    return len(relative.parts) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(relative.parts, parts))


class Adapter(abc.ABC):
    """One foundation-model family: load, tokenise, collate, embed.

    Subclasses set the class attributes and implement the abstract methods. Keyword
    parameters given to ``__init__`` that change the numbers must be returned by
    :meth:`params` (they become part of the embedding's identity).
    """

    name: ClassVar[str]
    """Registry name (``scdm embed --model NAME``)."""
    description: ClassVar[str] = ""
    """One line for ``scdm models``."""
    gene_id_kind: ClassVar[str] = "symbol"
    """Gene id kind the model's vocabulary uses: ``"symbol"`` or ``"ensembl"``."""
    requires_counts: ClassVar[bool] = True
    """Whether the model's preprocessing assumes raw, non-negative counts."""
    ranks_expression: ClassVar[bool] = False
    """Whether the model ranks each cell's genes by their values (tGPT, the LLM's cell sentence): it
    takes counts or log-normalised values, never scaled ones (refused before the model is loaded)."""
    checkpoint_files: ClassVar[tuple[str, ...]] = ()
    """Files a checkpoint folder must hold (glob patterns allowed; ``"a|b"``: either), for checks and ``scdm models``."""
    hub_patterns: ClassVar[tuple[str, ...]] = ()
    """Files fetched for ``--checkpoint org/name`` (Hub ``allow_patterns``; ``"a|b"``: the first the repo has).

    Empty: ``checkpoint_files``. Set it when :meth:`load` reads more (weights, optional companions);
    see :mod:`scdm.embedding.hub`. These patterns (else ``checkpoint_files``) must cover every file
    :meth:`load` may read: they also decide which files of a local folder the checkpoint's content
    hash, part of the embedding's identity, counts (:func:`scdm.embedding.hub.model_files`).
    """
    read_if_present: ClassVar[tuple[str, ...]] = ()
    """Files :meth:`load` also reads when the folder holds them, though a Hub id does not fetch them (a PEFT
    adapter saved beside Hugging Face weights, which ``from_pretrained`` applies): the checkpoint hash counts them."""
    lora_target_modules: ClassVar[tuple[str, ...]] = ()
    """peft ``target_modules`` for LoRA fine-tuning (see MODELS.md)."""
    default_batch_size: ClassVar[int] = 32
    """Cells per mini-batch when the user gives none (CPU; the runner scales it on GPU)."""
    half_precision_weights: ClassVar[bool] = False
    """Whether :meth:`load` can hold the weights in the autocast dtype (see :meth:`configure_precision`)."""
    weight_precision: str | None = None
    """``"bf16"``/``"fp16"`` once :meth:`configure_precision` chose half-precision weights, else None (float32)."""
    known_columns_: np.ndarray | None = None
    """Dataset columns (indices) the model knows, set by :meth:`prepare` where a cell with none of them
    expressed would still get a vector (special tokens, an all-zero bin vector): such cells are refused
    before the model runs (:func:`check_cells_known`). None: the model's output shows them (all zeros)."""

    def __init__(self, checkpoint: str | Path | None = None, *, seed: int = 0, **params: Any) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.seed = seed
        self.model: torch.nn.Module | None = None
        self.device: torch.device | None = None

    # ---- checkpoint -----------------------------------------------------------------------
    def check_checkpoint(self) -> None:
        """Raise :class:`CheckpointError` naming the first missing file of the folder."""
        if self.checkpoint is None:
            msg = f"Model {self.name!r} needs --checkpoint DIR (a folder with: {', '.join(self.checkpoint_files)})."
            raise CheckpointError(msg)
        if not self.checkpoint.is_dir():
            msg = f"Checkpoint folder {str(self.checkpoint)!r} does not exist or is not a folder."
            raise CheckpointError(msg)
        self._refuse_dangling_links()
        for pattern in self.checkpoint_files:  # "a|b": either place will do
            if not any(any(self.checkpoint.glob(alternative)) for alternative in pattern.split("|")):
                msg = (
                    f"Checkpoint folder {str(self.checkpoint)!r} is missing {' or '.join(map(repr, pattern.split('|')))}; "
                    f"a {self.name} checkpoint needs: {', '.join(self.checkpoint_files)}."
                )
                raise CheckpointError(msg)

    def _refuse_dangling_links(self) -> None:
        """Name the files the model reads that are links to nothing (before they read as missing or fail bare)."""
        assert self.checkpoint is not None
        patterns = [alt for pattern in (*(self.hub_patterns or self.checkpoint_files), *self.read_if_present)
                    for alt in pattern.split("|")]
        broken = [link for link in sorted(dangling_links(self.checkpoint))
                  if not patterns or any(_globbed_by(link.relative_to(self.checkpoint), p) for p in patterns)]
        if broken:
            shown = ", ".join(f"{link.relative_to(self.checkpoint).as_posix()!r} -> {os.readlink(link)!r}" for link in broken[:3])
            more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
            msg = (f"Checkpoint folder {str(self.checkpoint)!r} holds links to files that do not exist: {shown}{more}. A "
                   "snapshot folder copied out of the Hugging Face cache with `cp -r` keeps the cache's links without the "
                   "blobs they point to: copy it again following the links (`cp -rL`), or pass the Hub id (org/name) or "
                   "the snapshot folder in the cache; if the cache itself lost those blobs, download the model again.")
            raise CheckpointError(msg)

    @abc.abstractmethod
    def load(self, device: str | torch.device = "cpu") -> None:
        """Read the checkpoint and build ``self.model`` on ``device`` in eval mode."""

    def configure_precision(self, device: str | torch.device, precision: str) -> dict[str, Any]:
        """Choose the weights' dtype for an inference run on ``device`` at ``precision``; call before :meth:`load`.

        Adapters with ``half_precision_weights`` hold their weights in bfloat16 / float16 when the
        run is on CUDA under bf16 / fp16 autocast (their normalisation layers stay float32, and
        autocast still computes those, and softmax, in float32). Anything else (CPU, fp32, an
        adapter without it, fine-tuning, which never calls this) keeps float32 weights, as before.

        Parameters
        ----------
        device
            The run's device (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        precision
            The run's resolved precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

        Returns
        -------
        dict
            ``{"weights": precision}`` when the weights will be half precision, else ``{}``: the
            caller adds it to the embedding's parameters (the numbers differ from float32 weights
            under autocast, in the last bits of the embedding tables and normalisation inputs).
        """
        if self.model is not None:
            msg = f"configure_precision() must come before load(): {self.name}'s weights are already loaded."
            raise RuntimeError(msg)
        half = self.half_precision_weights and str(device).startswith("cuda") and precision in ("bf16", "fp16")
        self.weight_precision = precision if half else None
        return {"weights": precision} if half else {}

    # ---- description ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def emb_dim(self) -> int:
        """Length of one cell's embedding."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters that change the numbers (JSON-serialisable)."""

    def identity_spellings(self) -> dict[str, list[Any]]:
        """Settings of :meth:`params` that resolve on the checkpoint: each as ``[what it resolves to, *other spellings*]``.

        The runner keys an embedding by :meth:`params` with each of these settings replaced by the
        first value, so the spellings of one computation (Geneformer's ``pooling='auto'`` and
        ``'cls'`` on a V2 checkpoint) are one embedding and one space. An older scdm keyed the
        setting as given: the runner still finds what it stored under any of the other values
        (:func:`scdm.embedding.runner.identity_candidates`). Empty, the default: every setting is
        keyed as :meth:`params` gives it. May read the checkpoint's small files (not the weights).
        """
        return {}

    def n_parameters(self) -> int:
        """Parameters of the loaded model (0 before :meth:`load`)."""
        if self.model is None:
            return 0
        return int(sum(p.numel() for p in self.model.parameters()))

    # ---- data -----------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        """Map the dataset's genes onto the model vocabulary; keep what :meth:`tokenize` needs."""

    @abc.abstractmethod
    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Turn cells into model inputs.

        Parameters
        ----------
        x
            csr_matrix of shape (n_cells, n_dataset_genes), float32, in the dataset's gene order.
        rows
            ndarray of shape (n_cells,): the cells' row indices in the dataset (seed sampling
            from them so results do not depend on chunking).

        Returns
        -------
        list of dict
            One dict of 1-D arrays per cell; its length (for sorting and padding statistics) is
            ``len(cell["input_ids"])`` unless the adapter overrides :meth:`token_length`.
        """

    def token_length(self, cell: dict[str, np.ndarray]) -> int:
        """Tokens the model computes for this cell (used for length sorting)."""
        return int(len(cell["input_ids"]))

    @abc.abstractmethod
    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Pad a list of tokenised cells into a batch of CPU tensors (a padding mask may be None: no cell is padded)."""

    @abc.abstractmethod
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and pool: ``Tensor`` of shape (n_cells, emb_dim), float32."""


def check_counts(x: sp.csr_matrix, model: str) -> None:
    """Refuse negative or non-finite values for models that need raw counts."""
    data = x.data
    if data.size and not np.isfinite(data).all():
        msg = f"{model} needs raw counts, but the expression matrix holds NaN or inf values. Clean the matrix (e.g. replace them with 0) and ingest it again."
        raise InputDataError(msg)
    if data.size and (data < 0).any():
        msg = (
            f"{model} needs raw, non-negative counts, but the expression matrix has negative values "
            "(it looks z-scored or scaled). Ingest the raw counts layer instead, or use a baseline "
            "model (pca, hvg) that accepts normalised data."
        )
        raise InputDataError(msg)


def check_input_kind(model: str, requires_counts: bool, x_kind: str, dataset: str, *, allow_non_counts: bool = False,
                     ranks_expression: bool = False) -> None:
    """Refuse a dataset whose value kind the model cannot take, before any work.

    A model that assumes raw counts (``requires_counts``) normalises and ranks them itself, so fed
    log-normalised or otherwise transformed values it returns numbers that look like embeddings
    but are not what the model computes on counts. Scaled data (negative values) is refused
    always; normalised data only with ``allow_non_counts`` (then a warning says so). A model that
    ranks genes by value (``ranks_expression``) refuses scaled data too: it would rank deviations.
    """
    if ranks_expression and x_kind == "scaled":
        msg = (f"{model} ranks each cell's genes by expression, but dataset {dataset!r} holds negative (scaled) values, "
               "which would rank genes by deviation from their mean instead. Ingest raw counts or log-normalised values, "
               "or use a baseline model (pca, hvg).")
        raise InputDataError(msg)
    if not requires_counts or x_kind == "counts":
        return
    if x_kind == "scaled":
        msg = (
            f"{model} needs raw counts, but dataset {dataset!r} holds negative (scaled) values. Ingest the raw "
            "counts (e.g. adata.layers['counts'] or adata.raw.X saved as X), or use a baseline model (pca, hvg)."
        )
        raise InputDataError(msg)
    if not allow_non_counts:
        msg = (
            f"{model} expects raw counts, but dataset {dataset!r} holds {x_kind} values (not all integers). The model "
            "would normalise them again and return embeddings of other numbers than it was trained on. Ingest the raw "
            "counts (e.g. adata.layers['counts'] or adata.raw.X saved as X; or --x-kind counts at ingest if they are "
            "counts after all), or pass --allow-non-counts (allow_non_counts=True) to embed the values as they are."
        )
        raise InputDataError(msg)
    warnings.warn(f"{model} expects raw counts; embedding the {x_kind} values of dataset {dataset!r} as they are "
                  "(allow_non_counts=True).", ScdmWarning, stacklevel=2)


def expressed_genes(x: sp.csr_matrix) -> np.ndarray:
    """Genes with a non-zero value in each row of ``x`` (explicitly stored zeros do not count)."""
    per_row = np.diff(x.indptr)
    if not x.nnz:
        return np.zeros(x.shape[0], dtype=np.int64)
    row_of = np.repeat(np.arange(x.shape[0]), per_row)
    return np.bincount(row_of[x.data != 0], minlength=x.shape[0])


def check_cells_expressed(x: sp.csr_matrix, rows: np.ndarray, model: str, *, allow_empty_cells: bool = False) -> int:
    """Refuse cells without a single expressed gene (unless allowed); returns how many there are.

    Such a cell carries no information: depending on the model its embedding is all zeros, NaN,
    or a constant (the pooled special tokens alone). Refused unless ``allow_empty_cells``, in which
    case the model's output is kept as the reference computes it.
    """
    empty = np.flatnonzero(expressed_genes(x) == 0)
    if empty.size and not allow_empty_cells:
        raise InputDataError(_empty_cells_message(model, np.asarray(rows)[empty], "express no gene at all"))
    return int(empty.size)


def check_cells_known(x: sp.csr_matrix, known_columns: np.ndarray | None, rows: np.ndarray, model: str, *,
                      allow_empty_cells: bool = False) -> int:
    """Refuse cells none of whose expressed genes the model knows (unless allowed); returns how many.

    Models that pool special tokens (a CLS token, Geneformer V2's <cls>/<eos>) or embed a vector of
    zero bins give every such cell the same non-zero vector: a fake cell no output check can tell.
    """
    if known_columns is None:
        return 0
    # expressed_genes, not getnnz: a file may store explicit zeros (kept by ingest), which are no expression
    empty = np.flatnonzero(expressed_genes(x[:, known_columns]) == 0)
    if empty.size and not allow_empty_cells:
        raise InputDataError(_empty_cells_message(model, np.asarray(rows)[empty], "express none of the genes the model knows"))
    return int(empty.size)


def check_embedded_rows(vectors: np.ndarray, rows: np.ndarray, model: str, *, allow_empty_cells: bool = False) -> int:
    """Refuse embeddings that are NaN/inf, or all zeros (unless allowed); returns the all-zero rows.

    A model returns an all-zero (or NaN) vector for a cell none of whose expressed genes it knows
    (nothing to pool): storing it silently would hand the classifier a fake cell.
    """
    rows = np.asarray(rows)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        msg = (f"{model} returned NaN or inf for the cells at rows {_rows(rows[bad])}. Cells none of whose expressed genes "
               "the model knows give that in some models: remove them and ingest again. Otherwise the model diverged: "
               "try --precision fp32.")
        raise InputDataError(msg)
    zero = np.flatnonzero(~vectors.any(axis=1))
    if zero.size and not allow_empty_cells:
        raise InputDataError(_empty_cells_message(model, rows[zero], "got an all-zero embedding: none of their expressed genes is known to the model"))
    return int(zero.size)


def _rows(rows: np.ndarray, n: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:n])
    return f"{shown}{', ...' if len(rows) > n else ''} ({len(rows)} in all)"


def _empty_cells_message(model: str, rows: np.ndarray, what: str) -> str:
    return (f"The cells at rows {_rows(rows)} {what}, so their {model} embedding would say nothing about them. Filter "
            "such cells out before ingesting (e.g. scanpy.pp.filter_cells(adata, min_genes=200)), or pass "
            "--allow-empty-cells (allow_empty_cells=True) to keep what the model returns for them.")


def require_matches(audit: GeneAudit, model: str, *, min_genes: int = 1, min_fraction: float = 0.0) -> None:
    """Raise :class:`GeneMappingError` when too few genes match, naming the likely cause."""
    if audit.n_matched >= min_genes and audit.fraction_matched >= min_fraction:
        return
    examples = ", ".join(audit.unmatched_examples[:5])
    msg = (
        f"Only {audit.n_matched} of {audit.n_input_genes} genes ({audit.fraction_matched:.1%}) are in the "
        f"{model} vocabulary (need at least {min_genes} and {min_fraction:.0%}). Unmatched examples: {examples}. "
        "Likely cause: the wrong gene id type (the dataset's gene_id_kind, see `scdm ls`; if it is wrong, ingest the "
        "file again with --gene-id-kind KIND --update, which rewrites it in the store) or a non-human species. Lower "
        "the threshold with --min-gene-fraction."
    )
    raise GeneMappingError(msg)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` available as ``get_adapter(cls.name)``."""
    _REGISTRY[cls.name] = cls
    return cls


def _import_model_modules() -> None:
    # model files register themselves on import; importing lazily keeps `scdm --help` fast
    import importlib
    import pkgutil

    from scdm.embedding import models

    for info in pkgutil.iter_modules(models.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"scdm.embedding.models.{info.name}")


def available_models() -> dict[str, type[Adapter]]:
    """Registered adapters by name, sorted."""
    _import_model_modules()
    return dict(sorted(_REGISTRY.items()))


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the registered models and the closest match.
    """
    models = available_models()
    if name in models:
        return models[name]
    import difflib

    from scdm.embedding.baselines import BASELINES

    close = difflib.get_close_matches(name, [*BASELINES, *models], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    msg = (f"Unknown model {name!r}. Available: {', '.join(BASELINES)} (baselines, no checkpoint), {', '.join(models)} "
           f"(`scdm models` lists their checkpoint files).{hint}")
    raise UnknownModelError(msg)


@contextlib.contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's own bars (loading weights, fetching files) follow scdm's: off under ``-q``."""
    from scdm.store.progress import progress_enabled

    if enabled and progress_enabled():
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off, hf_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_off:
            enable_progress_bars()
        if hf_was_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def own_load_report() -> Iterator[None]:
    """transformers' report of a checkpoint's unused and missing weights off while an adapter loads it.

    The adapters ask for the same facts (``output_loading_info=True``) and say what matters in their
    own words (:func:`check_unused_weights`): missing weights are an error; the pretraining heads an
    embedding never runs (Geneformer's masked-LM ``cls.*``, the ``lm_head`` of tGPT and of causal
    LLMs) are in every official checkpoint, and transformers' table of them ("not ok if you expect
    identical arch") printed on every load only worries users. Errors are still raised.
    """
    from transformers.utils import logging as hf_logging

    # transformers 5 checks a tensor-parallel plan whenever the loader's level is WARNING or above
    # and warns of every layer "not sharded": that logger is quieted too
    quieted = [hf_logging.get_logger(name) for name in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")]
    levels = [log.level for log in quieted]
    for log in quieted:
        log.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quieted, levels):
            log.setLevel(level)


@contextlib.contextmanager
def readable_weights(checkpoint: object, what: str) -> Iterator[None]:
    """A weight file ``from_pretrained`` cannot read is a :class:`CheckpointError` naming the folder.

    A truncated download or a damaged ``model.safetensors`` / ``pytorch_model.bin`` surfaces from
    transformers as whatever the reader raised (safetensors' ``SafetensorError``, torch's zip
    ``RuntimeError``, an ``OSError``): the user needs to hear which folder and to fetch it again.
    scdm's own errors pass through unchanged.
    """
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except ScdmError:
        raise
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = (f"Cannot read the weights in {str(checkpoint)!r} as {what} ({type(err).__name__}: {text}). The file is "
               "truncated, damaged or not a checkpoint of this model (an interrupted download?): download the model "
               "folder again.")
        raise CheckpointError(msg) from err


def check_unused_weights(info: Mapping[str, Any], checkpoint: object, *, heads: Sequence[str]) -> None:
    """Warn about checkpoint weights the model does not use, except the pretraining ``heads`` (name prefixes)."""
    unused = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(tuple(heads)))
    if unused:
        logger.warning("%d weights in %s are not used by the model (e.g. %s): is it the checkpoint of another "
                       "architecture? The embeddings use the weights that match.", len(unused), checkpoint,
                       ", ".join(unused[:3]))
