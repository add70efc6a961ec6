"""CellPLM (OmicsML/CellPLM ``OmicsFormer``): cells are the tokens of one Flowformer sequence.

Checkpoint folder (MODELS.md section 8.1)::

    <prefix>.best.ckpt      torch.save({'model_state_dict': ...}), e.g. 20230926_85M.best.ckpt
    <prefix>.config.json    model config incl. ``gene_list`` (19,374 Ensembl ids for 20230926_85M)

Forward pass of the embedding pipeline (``CellEmbeddingPipeline`` = ``head_type='embedder'``),
eval mode, as implemented here:

1. ``h = log1p(counts) @ embedder.feat_enc.emb[genes]`` over the dataset genes found in
   ``gene_list``; then ``embedder.extra_linear``: Linear → ReLU → (Dropout) → GroupNorm(4)
   (or the configured norm). The spatial encoding is computed as 0 by the reference and unused.
2. ``encoder.layers.{i}``: pre-norm Flowformer layers; **all cells of the forward call form one
   sequence**, so a cell's embedding depends on the other cells of its batch.
3. ``pre_latent_norm.norm`` (LayerNorm), then the GMVAE inference net
   ``latent.layers.1.inference``: cluster logits → one-hot ``y`` → ``mu(relu(W[h; y]))`` (512-d).

The reference draws ``y`` with Gumbel noise even in eval mode (``hard=True``), so its output is
random. By default ``cluster_assignment="argmax"`` takes ``y = onehot(argmax(logits))``, the
noise-free mode of the same distribution, which makes the embedding deterministic for a given
batch. ``reference_quirks=True`` (``cluster_assignment="gumbel"``) samples as the reference does
and replays its torch RNG: a generator seeded with ``seed`` makes the DataLoader iterator's one
int64 draw, then each forward draws ``rand(n_cells, num_clusters)`` for the Gumbel noise and
``randn(n_cells, post_latent_dim)`` for the (unused) reparameterised sample, batch after batch in
row order; ``y = (onehot - soft).detach() + soft`` with ``soft = softmax(logits + gumbel)``. That
is bit-for-bit ``CellEmbeddingPipeline.predict(adata, inference_config={'batch_size': bs})`` on
CPU after ``torch.manual_seed(seed)`` (cells without an ``obs['batch']`` column, in row order).
Each row consumes ``num_clusters + post_latent_dim`` 32-bit draws, so a batch that does not
follow the previous one (a resumed run) fast-forwards the generator instead of replaying the
model. The noise is drawn on the CPU in float32 also when the model runs on CUDA (a CUDA
reference run draws from the CUDA generator, which is not replayed).

Batches: because attention runs across cells, the runner must feed fixed, reproducible groups of
cells (``batch_dependent = True``); embedding the same group again gives the same numbers, and
the order of cells inside a group does not matter (Flow-Attention has no positions).

Gene ids: the vocabulary is Ensembl; symbols are converted with scdm's shipped table
(``store.genes.map_genes``), never over the network (the reference calls mygene). When several
dataset columns map to one Ensembl id the first is kept (the reference's ``var_names_make_unique``
renames the later ones, which then match nothing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scdm.embedding._adapter import Adapter, GeneAudit, check_counts, register_adapter, require_matches
from scdm.embedding._safe_load import damaged_torch_file
from scdm.store.errors import CheckpointError, InputDataError
from scdm.store.genes import as_gene_id_kind, map_genes, strip_ensembl_version

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["CellPLMAdapter", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

CKPT_SUFFIX = ".best.ckpt"
CONFIG_SUFFIX = ".config.json"
CLUSTER_ASSIGNMENTS = ("argmax", "gumbel")
_GUMBEL_EPS = 1e-20
_FLOW_EPS = 1e-6
_UNUSED_PREFIXES = ("decoder.", "embedder.pe_enc.", "embedder.norm0.", "head.", "objective.")
"""Keys of the official checkpoint the embedding does not use (the pipeline drops the decoder;
the spatial encoding is multiplied out; ``norm0`` is commented out in the reference)."""


# ---- model (names follow the checkpoint) ----------------------------------------------------
@dataclass(frozen=True)
class CellPLMConfig:
    """The fields of ``<prefix>.config.json`` that shape the embedding network."""

    n_genes: int
    """Length of ``gene_list``."""
    enc_hid: int
    """Width of the cell tokens (1024)."""
    enc_layers: int
    """Flowformer layers (4)."""
    enc_head: int
    """Attention heads (8: the reference default, absent from the official config)."""
    post_latent_dim: int
    """Embedding size (512)."""
    num_clusters: int
    """GMVAE mixture components (16)."""
    norm: str
    """Norm of the embedder (``groupnorm``)."""

    @classmethod
    def from_json(cls, config: dict[str, Any], source: str) -> CellPLMConfig:
        """Validate the official config and keep what the embedding needs.

        Raises
        ------
        CheckpointError
            A missing field, or a variant this implementation does not cover.
        """
        required = ("gene_list", "enc_hid", "enc_layers", "post_latent_dim")
        missing = [k for k in required if k not in config]
        if missing:
            msg = f"{source} lacks {', '.join(missing)}; expected an official CellPLM <prefix>.config.json."
            raise CheckpointError(msg)
        supported = {
            "enc_mod": ("flowformer",),
            "latent_mod": ("gmvae",),
            "norm": ("groupnorm", "layernorm"),
            "dsbn": (False,),
            "input_covariate": (False,),
            "cat_pe": (False,),
        }
        # OmicsFormer's defaults for fields a config may leave out
        defaults = {
            "enc_mod": None,
            "latent_mod": "vae",
            "norm": "layernorm",
            "dsbn": False,
            "input_covariate": False,
            "cat_pe": True,
        }
        for key, allowed in supported.items():
            value = config.get(key, defaults[key])
            if value not in allowed:
                msg = (
                    f"{source}: {key}={value!r} is not supported by scdm's CellPLM (supported: {list(allowed)}); "
                    "the released 20230926_85M checkpoint uses flowformer + gmvae + groupnorm."
                )
                raise CheckpointError(msg)
        return cls(
            n_genes=len(config["gene_list"]),
            enc_hid=int(config["enc_hid"]),
            enc_layers=int(config["enc_layers"]),
            enc_head=int(config.get("enc_head", 8)),
            post_latent_dim=int(config["post_latent_dim"]),
            num_clusters=int(config.get("num_clusters", 16)),
            norm=str(config.get("norm", "layernorm")),
        )


def _norm(kind: str, width: int) -> nn.Module:
    # CellPLM's create_norm: GroupNorm uses 4 groups
    return nn.GroupNorm(4, width) if kind == "groupnorm" else nn.LayerNorm(width)


def flow_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Flow-Attention on (batch, heads, n, d) tensors after the sigmoid kernel, float32.

    Incoming/outgoing flows, conservation refinement, then sink allocation (sigmoid) and source
    competition (softmax scaled by n), as ``Flow_Attention.forward`` in CellPLM/layer/flowformer.py.
    """
    eps = _FLOW_EPS
    sink_incoming = 1.0 / torch.einsum("nhld,nhd->nhl", q + eps, k.sum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("nhld,nhd->nhl", k + eps, q.sum(dim=2) + eps)
    conserved_sink = torch.einsum("nhld,nhd->nhl", q + eps, (k * source_outgoing[..., None]).sum(dim=2) + eps)
    conserved_source = torch.einsum("nhld,nhd->nhl", k + eps, (q * sink_incoming[..., None]).sum(dim=2) + eps)
    conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
    sink_allocation = torch.sigmoid(conserved_sink * (float(q.shape[2]) / float(k.shape[2])))
    source_competition = torch.softmax(conserved_source, dim=-1) * float(k.shape[2])
    kv = torch.einsum("nhld,nhlm->nhdm", k, v * source_competition[..., None])
    qkv = torch.einsum("nhld,nhdm->nhlm", q * sink_incoming[..., None], kv)
    return qkv * sink_allocation[..., None]


class FlowAttention(nn.Module):
    """``Flow_Attention``: query/key/value/out projections around :func:`flow_attention_core`."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_cells, width = x.shape
        q, k, v = (
            proj(x).reshape(1, n_cells, self.n_heads, -1).transpose(1, 2)
            for proj in (self.query_projection, self.key_projection, self.value_projection)
        )
        # flow normalisers divide sums over all cells: keep them in float32 under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = flow_attention_core(torch.sigmoid(q.float()), torch.sigmoid(k.float()), v.float())
        out = out.transpose(1, 2).reshape(n_cells, width).to(x.dtype)
        return self.out_projection(out)


class FlowformerLayer(nn.Module):
    """Pre-norm block over the cells of one forward call: ``x + SA(norm1(x))``, ``x + FF(norm2(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.self_attn = FlowAttention(width, heads)
        self._ff_block = nn.Sequential(
            nn.Linear(width, width * 2), nn.GELU(), nn.Dropout(0.0), nn.Linear(width * 2, width), nn.Dropout(0.0)
        )
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self._ff_block(self.norm2(x))


class _FeatureEncoder(nn.Module):
    def __init__(self, n_genes: int, width: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.zeros(n_genes, width))


class _Embedder(nn.Module):
    def __init__(self, cfg: CellPLMConfig) -> None:
        super().__init__()
        self.feat_enc = _FeatureEncoder(cfg.n_genes, cfg.enc_hid)
        self.extra_linear = nn.Sequential(
            nn.Linear(cfg.enc_hid, cfg.enc_hid), nn.ReLU(), nn.Dropout(0.0), _norm(cfg.norm, cfg.enc_hid)
        )

    def forward(self, gene_idx: torch.Tensor, log_counts: torch.Tensor) -> torch.Tensor:
        # embedding bag log1p(x) @ emb over the cell's genes, in float32 like the reference's sparse mm
        with torch.autocast(device_type=log_counts.device.type, enabled=False):
            dense = torch.zeros(gene_idx.shape[0], self.feat_enc.emb.shape[0], device=gene_idx.device)
            dense.scatter_add_(1, gene_idx, log_counts.float())
            h = dense @ self.feat_enc.emb.float()
        return self.extra_linear(h)


class _Encoder(nn.Module):
    def __init__(self, cfg: CellPLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FlowformerLayer(cfg.enc_hid, cfg.enc_head) for _ in range(cfg.enc_layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class _PreLatentNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)


class _GumbelSoftmax(nn.Module):
    def __init__(self, width: int, n_clusters: int) -> None:
        super().__init__()
        self.logits = nn.Linear(width, n_clusters)


class _Gaussian(nn.Module):
    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        self.mu = nn.Linear(width, latent)
        self.var = nn.Linear(width, latent)


class _InferenceNet(nn.Module):
    """GMVAE q(y|x) and q(z|x,y); hidden width 512 is hard-coded in the reference."""

    def __init__(self, width: int, latent: int, n_clusters: int, hidden: int = 512) -> None:
        super().__init__()
        self.inference_qyx = nn.ModuleList([_GumbelSoftmax(width, n_clusters)])
        self.inference_qzyx = nn.ModuleList(
            [nn.Linear(width + n_clusters, hidden), nn.ReLU(), _Gaussian(hidden, latent)]
        )
        self.y_mu = nn.Linear(n_clusters, latent)
        self.y_var = nn.Linear(n_clusters, latent)

    def posterior_mean(self, h: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """``mu(relu(W[h; y]))``: the GMVAE mean given the cluster one-hot ``y``.

        Parameters
        ----------
        h
            Cell states (n_cells, width).
        uniforms
            None: ``y = onehot(argmax logits)``, the modal cluster. Else U(0, 1) draws of shape
            (n_cells, n_clusters): ``y`` is the reference's hard Gumbel-softmax sample.
        """
        logits = cast(_GumbelSoftmax, self.inference_qyx[0]).logits(h)
        if uniforms is None:
            y = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(h.dtype)
        else:
            gumbel = -torch.log(-torch.log(uniforms + _GUMBEL_EPS) + _GUMBEL_EPS)
            soft = torch.softmax(logits.float() + gumbel, dim=-1)
            hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
            y = ((hard - soft).detach() + soft).to(h.dtype)  # straight-through, as the reference
        hidden = self.inference_qzyx[1](self.inference_qzyx[0](torch.cat([h, y], dim=1)))
        return cast(_Gaussian, self.inference_qzyx[2]).mu(hidden)


class _GMVAELatent(nn.Module):
    def __init__(self, cfg: CellPLMConfig) -> None:
        super().__init__()
        self.inference = _InferenceNet(cfg.enc_hid, cfg.post_latent_dim, cfg.num_clusters)


class _Placeholder(nn.Module):
    """``latent.layers.0`` of the reference: parameter-free."""


class _Latent(nn.Module):
    def __init__(self, cfg: CellPLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Placeholder(), _GMVAELatent(cfg)])


class CellPLMEmbedder(nn.Module):
    """``OmicsFormer`` with ``head_type='embedder'``, eval mode, deterministic cluster choice."""

    def __init__(self, cfg: CellPLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embedder = _Embedder(cfg)
        self.encoder = _Encoder(cfg)
        self.pre_latent_norm = _PreLatentNorm(cfg.enc_hid)
        self.latent = _Latent(cfg)

    def forward(self, gene_idx: torch.Tensor, log_counts: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of shape (n_cells, post_latent_dim) for one group of cells.

        Parameters
        ----------
        gene_idx
            Long tensor (n_cells, n): rows of ``gene_list`` per cell (padding: any index).
        log_counts
            Float tensor (n_cells, n): ``log1p(count)``, 0 at padding.
        uniforms
            Optional U(0, 1) draws (n_cells, num_clusters) for the reference's Gumbel sample.
        """
        h = self.embedder(gene_idx, log_counts)
        h = self.encoder(h)
        h = self.pre_latent_norm.norm(h)
        return cast(_GMVAELatent, self.latent.layers[1]).inference.posterior_mean(h, uniforms)


def load_state_dict_file(path: Path, key: str = "model_state_dict") -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)[key]``, with errors that say what to do."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError variants
        damaged = damaged_torch_file(path, err, "the official CellPLM .best.ckpt")
        if damaged is not None:
            raise damaged from err
        msg = (
            f"Cannot read {str(path)!r} safely ({type(err).__name__}: {str(err)[:300]}). If you trust the file, "
            f"re-save only its weights: torch.save({{'{key}': torch.load(p, weights_only=False)['{key}']}}, p)."
        )
        raise CheckpointError(msg) from err
    if not isinstance(blob, dict) or key not in blob:
        found = list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        msg = f"{str(path)!r} has no {key!r} entry (found {found}); expected the official CellPLM .best.ckpt."
        raise CheckpointError(msg)
    return blob[key]


# ---- adapter ---------------------------------------------------------------------------------
@register_adapter
class CellPLMAdapter(Adapter):
    """CellPLM cell embeddings (GMVAE posterior mean, 512-d) from an official checkpoint.

    Parameters
    ----------
    checkpoint
        Folder with ``<prefix>.best.ckpt`` and ``<prefix>.config.json``.
    seed
        Seeds the Gumbel draws of ``reference_quirks`` (unused by the default argmax).
    prefix
        Checkpoint prefix (e.g. ``"20230926_85M"``); needed only when the folder holds several.
    cluster_assignment
        ``"argmax"``: the GMVAE cluster is the most likely one; ``"gumbel"``: sampled as the
        reference does. Default: ``"gumbel"`` with ``reference_quirks``, else ``"argmax"``.
    reference_quirks
        Sample the cluster with the reference's seeded Gumbel noise (see the module docstring).
    """

    name = "cellplm"
    description = "CellPLM Flowformer over cells (20230926_85M, 512-d GMVAE mean; batch-dependent)"
    gene_id_kind = "ensembl"
    requires_counts = True
    checkpoint_files = ("*" + CKPT_SUFFIX, "*" + CONFIG_SUFFIX)
    lora_target_modules = (
        "query_projection",
        "key_projection",
        "value_projection",
        "out_projection",
        "_ff_block.0",
        "_ff_block.3",
    )
    default_batch_size = 1024
    batch_dependent: ClassVar[bool] = True
    """Attention runs across the cells of a forward call: batches must be fixed groups of cells."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        prefix: str | None = None,
        cluster_assignment: str | None = None,
        reference_quirks: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if params:
            msg = f"Unknown cellplm parameter(s) {sorted(params)}; cellplm accepts prefix, cluster_assignment and reference_quirks."
            raise InputDataError(msg)
        if not isinstance(reference_quirks, bool):
            msg = f"cellplm reference_quirks={reference_quirks!r} must be True or False."
            raise InputDataError(msg)
        if cluster_assignment is None:
            cluster_assignment = "gumbel" if reference_quirks else "argmax"
        if cluster_assignment not in CLUSTER_ASSIGNMENTS:
            msg = f"cellplm cluster_assignment={cluster_assignment!r} is not supported; use one of {', '.join(CLUSTER_ASSIGNMENTS)}."
            raise InputDataError(msg)
        if reference_quirks and cluster_assignment != "gumbel":
            msg = (
                f"cellplm: cluster_assignment={cluster_assignment!r} contradicts reference_quirks=True, which samples the "
                "cluster as the reference does. Drop cluster_assignment, or drop reference_quirks."
            )
            raise InputDataError(msg)
        self.prefix = prefix
        self.cluster_assignment = cluster_assignment
        self.reference_quirks = reference_quirks
        self._noise: torch.Generator | None = None
        self._noise_next_row: int | None = None
        self._json: dict[str, Any] | None = None
        self._config: CellPLMConfig | None = None
        self._cols: np.ndarray | None = None
        self._model_idx: np.ndarray | None = None

    # ---- checkpoint -----------------------------------------------------------------------
    def _prefix(self) -> str:
        if self.prefix is not None:
            return self.prefix
        assert self.checkpoint is not None
        found = sorted(p.name[: -len(CKPT_SUFFIX)] for p in self.checkpoint.glob("*" + CKPT_SUFFIX))
        if len(found) != 1:
            msg = (
                f"Checkpoint folder {str(self.checkpoint)!r} holds {len(found)} CellPLM checkpoints "
                f"({', '.join(found)}); choose one with prefix=... (e.g. prefix='20230926_85M')."
            )
            raise CheckpointError(msg)
        return found[0]

    def check_checkpoint(self) -> None:
        """Also require the config and weights of the chosen prefix."""
        super().check_checkpoint()
        assert self.checkpoint is not None
        prefix = self._prefix()
        for suffix in (CKPT_SUFFIX, CONFIG_SUFFIX):
            if not (self.checkpoint / f"{prefix}{suffix}").is_file():
                msg = (
                    f"Checkpoint folder {str(self.checkpoint)!r} is missing '{prefix}{suffix}'; a CellPLM checkpoint "
                    f"is a pair {prefix}{CKPT_SUFFIX} + {prefix}{CONFIG_SUFFIX} with the same prefix."
                )
                raise CheckpointError(msg)

    def _read_config(self) -> tuple[dict[str, Any], CellPLMConfig]:
        if self._json is None or self._config is None:
            self.check_checkpoint()
            assert self.checkpoint is not None
            path = self.checkpoint / f"{self._prefix()}{CONFIG_SUFFIX}"
            try:
                self._json = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                msg = f"Cannot read CellPLM config {str(path)!r}: {err}."
                raise CheckpointError(msg) from err
            self._config = CellPLMConfig.from_json(self._json, str(path))
        return self._json, self._config

    def _load_weights(self, model: CellPLMEmbedder) -> None:
        """Keep the keys the embedding uses (the pipeline drops the decoder) and load strictly."""
        assert self.checkpoint is not None
        path = self.checkpoint / f"{self._prefix()}{CKPT_SUFFIX}"
        state = load_state_dict_file(path)
        wanted = model.state_dict()
        kept = {k: v for k, v in state.items() if k in wanted}
        unknown = [k for k in state if k not in wanted and not k.startswith(_UNUSED_PREFIXES)]
        if unknown:
            logger.info(
                "cellplm: ignoring %d checkpoint keys not used for embeddings, e.g. %s", len(unknown), unknown[:3]
            )
        missing = [k for k in wanted if k not in kept]
        if missing:
            msg = (
                f"{str(path)!r} lacks {len(missing)} weights the embedding needs (e.g. {', '.join(missing[:4])}); "
                "the file does not match its config.json or is not a CellPLM checkpoint."
            )
            raise CheckpointError(msg)
        try:
            model.load_state_dict(kept, strict=True)
        except RuntimeError as err:
            msg = f"{str(path)!r} does not match {self._prefix()}{CONFIG_SUFFIX}: {str(err)[:600]}"
            raise CheckpointError(msg) from err

    def load(self, device: str | torch.device = "cpu") -> None:
        """Read the config and weights and build the embedding network on ``device`` (eval)."""
        _, config = self._read_config()
        model = CellPLMEmbedder(config)
        self._load_weights(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        logger.info(
            "Loaded cellplm %s: %d layers, width %d, %d genes, %.1fM parameters",
            self._prefix(), config.enc_layers, config.enc_hid, config.n_genes, self.n_parameters() / 1e6,
        )

    # ---- description ----------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        """``post_latent_dim`` of the config (512 for 20230926_85M)."""
        return self._read_config()[1].post_latent_dim

    def params(self) -> dict[str, Any]:
        return {
            "prefix": self._prefix() if self.checkpoint is not None else self.prefix,
            "cluster_assignment": self.cluster_assignment,
            "embedding": "gmvae_posterior_mean",
            "batch_dependent": True,
            "reference_quirks": self.reference_quirks,
        }

    # ---- data -----------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        """Map the dataset's genes to the config's Ensembl ``gene_list`` (symbols via the shipped table)."""
        config_json, _ = self._read_config()
        ids = [str(g) for g in var_genes]
        index = {g: i for i, g in enumerate(config_json["gene_list"])}
        if gene_id_kind == "ensembl":
            ensembl: list[str | None] = list(strip_ensembl_version(ids))
        else:  # a symbol with several Ensembl ids takes the one the model has
            ensembl = list(map_genes(ids, src=as_gene_id_kind(gene_id_kind), dst="ensembl", prefer=index))
        cols: list[int] = []
        model_idx: list[int] = []
        unmatched: list[str] = []
        seen: set[int] = set()
        n_duplicates = 0
        for col, gene in enumerate(ensembl):
            pos = index.get(gene) if gene is not None else None
            if pos is None:
                if len(unmatched) < 20:
                    unmatched.append(ids[col])
            elif pos in seen:
                n_duplicates += 1
            else:
                seen.add(pos)
                cols.append(col)
                model_idx.append(pos)
        audit = GeneAudit(
            n_input_genes=len(ids),
            n_matched=len(cols),
            unmatched_examples=tuple(unmatched),
            id_kind_used="ensembl",
            extra={"n_model_genes": len(index), "n_duplicate_columns_ignored": n_duplicates},
        )
        require_matches(audit, self.name, min_genes=1)
        self._cols = np.asarray(cols, dtype=np.int64)
        self._model_idx = np.asarray(model_idx, dtype=np.int64)
        # a cell without them embeds as an empty gene bag: one constant vector (plus its batch mates' influence)
        self.known_columns_ = self._cols
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per cell: the ``gene_list`` rows of its expressed genes and their counts."""
        if self._cols is None or self._model_idx is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        sub = x[:, self._cols].tocsr()
        sub.sort_indices()
        cells = []
        for row in range(sub.shape[0]):
            start, end = sub.indptr[row], sub.indptr[row + 1]
            values = sub.data[start:end].astype(np.float32)
            keep = values > 0
            genes = self._model_idx[sub.indices[start:end][keep]].astype(np.int32)
            # the row tells a Gumbel-sampling embed() where its batch sits in the RNG stream
            cells.append({"input_ids": genes, "counts": values[keep], "row": np.asarray([rows[row]], dtype=np.int64)})
        return cells

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Pad gene indices with 0 and counts with 0 (a zero count adds nothing to the bag)."""
        width = max(1, max(len(c["input_ids"]) for c in cells))
        gene_idx = torch.zeros((len(cells), width), dtype=torch.long)
        counts = torch.zeros((len(cells), width), dtype=torch.float32)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            gene_idx[i, :n] = torch.from_numpy(cell["input_ids"].astype(np.int64))
            counts[i, :n] = torch.from_numpy(cell["counts"])
        rows = torch.from_numpy(np.concatenate([c["row"] for c in cells]).astype(np.int64))
        return {"input_ids": gene_idx, "counts": counts, "row": rows}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward over the batch as one sequence of cells: Tensor (n_cells, emb_dim), float32."""
        assert self.model is not None, "call load() first"
        log_counts = torch.log1p(batch["counts"].float())
        uniforms = None
        if self.cluster_assignment == "gumbel":
            uniforms = self._gumbel_uniforms(batch["row"]).to(log_counts.device)
        return self.model(batch["input_ids"], log_counts, uniforms).float()

    def _gumbel_uniforms(self, rows: torch.Tensor) -> torch.Tensor:
        """The reference's ``rand_like(logits)`` for this batch, from the replayed torch stream.

        The batch must be consecutive rows (the runner's fixed row ranges). The draws continue
        the previous batch's; a batch elsewhere fast-forwards a fresh stream by the 32-bit words
        the rows before it consumed (``num_clusters + post_latent_dim`` each).
        """
        rows = rows.cpu()
        first, n = int(rows[0]), len(rows)
        if not torch.equal(rows, torch.arange(first, first + n)):
            msg = f"cellplm with Gumbel sampling needs a batch of consecutive rows (the runner's fixed row ranges); got rows {rows[:5].tolist()}..."
            raise InputDataError(msg)
        _, cfg = self._read_config()
        if self._noise is None or self._noise_next_row != first:
            self._noise = torch.Generator().manual_seed(self.seed)
            torch.empty((), dtype=torch.int64).random_(generator=self._noise)  # the DataLoader iterator's base seed
            if first:
                if cfg.post_latent_dim % 16:
                    # randn of a size that is not a multiple of 16 consumes extra draws that depend on the batch sizes
                    msg = (
                        f"cellplm Gumbel replay cannot jump to row {first}: post_latent_dim={cfg.post_latent_dim} is not a "
                        "multiple of 16. Embed from scratch (delete the partial embedding) so batches are drawn in order."
                    )
                    raise InputDataError(msg)
                _skip_words(self._noise, first * (cfg.num_clusters + cfg.post_latent_dim))
        uniforms = torch.rand((n, cfg.num_clusters), generator=self._noise)
        torch.randn((n, cfg.post_latent_dim), generator=self._noise)  # Gaussian.reparameterize's draw, unused
        self._noise_next_row = first + n
        return uniforms


def _skip_words(generator: torch.Generator, n_words: int, block: int = 1 << 22) -> None:
    """Advance a CPU generator by ``n_words`` 32-bit draws (one per float32 ``rand`` element)."""
    while n_words > 0:
        step = min(n_words, block)
        torch.rand(step, generator=generator)
        n_words -= step


# ---- tiny checkpoints ------------------------------------------------------------------------
def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    prefix: str = "tiny_cellplm",
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised CellPLM checkpoint pair in the official format.

    Parameters
    ----------
    folder
        Created if needed; receives ``<prefix>.best.ckpt`` and ``<prefix>.config.json``.
    genes
        Gene symbols (mapped to Ensembl with the shipped table; unmappable ones are skipped) or
        Ensembl ids; default: the first 256 Ensembl ids of the shipped table.
    seed
        Seed of the random weights.
    prefix
        File prefix.
    **config_overrides
        Fields of the config json: ``enc_hid`` (32), ``enc_layers`` (2), ``enc_head`` (4),
        ``post_latent_dim`` (16), ``num_clusters`` (4), ...

    Returns
    -------
    Path of the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gene_list = _ensembl_vocabulary(genes)
    config: dict[str, Any] = {
        "name": prefix,
        "enc_mod": "flowformer",
        "enc_hid": 32,
        "enc_layers": 2,
        "enc_head": 4,
        "latent_mod": "gmvae",
        "lamda": 5.0,
        "post_latent_dim": 16,
        "dec_mod": "nbmlp",
        "dec_hid": 32,
        "dec_layers": 2,
        "model_dropout": 0.2,
        "mask_node_rate": 0.75,
        "mask_feature_rate": 0.25,
        "drop_node_rate": 0.3,
        "norm": "groupnorm",
        "architecture": "OmicsFormer",
        "w_li": 5.0,
        "w_en": 5.0,
        "num_clusters": 4,
        "out_dim": len(gene_list),
        "cat_pe": False,
        "max_batch_size": 4000,
        "dar": False,
        "input_covariate": False,
        "ecs": False,
        "dsbn": False,
        "dae": True,
        "mask_beta": True,
        "batch_num": 3,
        "dataset_num": 2,
    }
    config.update(config_overrides)
    config["gene_list"] = gene_list
    cfg = CellPLMConfig.from_json(config, "tiny config")
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = CellPLMEmbedder(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    # the reference initialises the gene table with 0.005·N(0,1); a larger scale gives tiny
    # models non-trivial activations
    state["embedder.feat_enc.emb"] = torch.randn(cfg.n_genes, cfg.enc_hid, generator=gen) * 0.5
    for key in ("embedder.extra_linear.3.weight", "embedder.extra_linear.3.bias"):
        state[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=gen)
    # keys of the full OmicsFormer that the embedding pipeline does not use
    state["embedder.norm0.weight"] = torch.ones(cfg.enc_hid)
    state["embedder.norm0.bias"] = torch.zeros(cfg.enc_hid)
    state["embedder.pe_enc.missing_pe"] = torch.randn(cfg.enc_hid, generator=gen) * 1e-2
    state["decoder.mlp.0.weight"] = torch.randn(cfg.enc_hid, cfg.post_latent_dim, generator=gen) * 0.1
    state["decoder.out_layer.0.weight"] = torch.randn(cfg.n_genes, cfg.enc_hid, generator=gen) * 0.1
    torch.save({"model_state_dict": state}, folder / f"{prefix}{CKPT_SUFFIX}")
    (folder / f"{prefix}{CONFIG_SUFFIX}").write_text(json.dumps(config))
    return folder


def _ensembl_vocabulary(genes: list[str] | None) -> list[str]:
    from scdm.store.genes import detect_gene_id_kind, gene_table

    if genes is None:
        table = gene_table()
        return list(dict.fromkeys(e for e in table["ensembl"] if e))[:256]
    kind = detect_gene_id_kind(genes)
    mapped = strip_ensembl_version(genes) if kind == "ensembl" else map_genes(genes, src=kind, dst="ensembl")
    vocabulary = list(dict.fromkeys(g for g in mapped if g))
    if not vocabulary:
        msg = f"None of the {len(genes)} genes given for the tiny CellPLM vocabulary map to an Ensembl id."
        raise InputDataError(msg)
    return vocabulary
