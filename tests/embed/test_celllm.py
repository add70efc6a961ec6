"""CellLM adapter: official file layout, parity with a direct re-computation, batch independence.

The direct re-computation follows MODELS.md section 7 (``PerformerLM_CellLM.forward``) one cell at
a time: every cell padded to ``max_seq_len`` with pad keys left in the FAVOR+ normaliser and pad
values zeroed. It is written with plain tensor ops on the state dict and shares no code with the
adapter.
"""

from __future__ import annotations

import math
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scdm.embedding import get_adapter
from scdm.embedding.models.celllm import GENES_FILE, WEIGHTS_FILE, CellLMAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from scdm.store.genes import map_genes

MAX_LENGTH = 40


# ---- the reference, written out from MODELS.md -------------------------------------------------
def _kernel(t: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    normalizer = t.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = (normalizer * t) @ projection.T
    diag = (t**2).sum(-1, keepdim=True) / 2.0 * normalizer**2
    stab = dash.max(dim=-1, keepdim=True).values if is_query else dash.max()  # key: one max, whole tensor
    return ratio * (torch.exp(dash - diag - stab) + 1e-4)


def fork_forward(
    state: dict[str, torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The fork's encoder with ``mask`` zeroing pad values only; (b, n) -> (b, n, dim)."""
    dim = state["token_emb.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("performer.net.layers."))
    x = F.embedding(tokens, state["token_emb.weight"])
    x = (x.double() + state["pos_emb.emb.weight"][positions]).float()  # x += float64 gene2vec
    b, n, _ = x.shape
    for i in range(depth):
        p = f"performer.net.layers.{i}."
        projection = state[p + "0.fn.fast_attention.projection_matrix"]
        dim_head = projection.shape[1]
        h = F.layer_norm(x, (dim,), state[p + "0.norm.weight"], state[p + "0.norm.bias"])
        q, k, v = (
            (h @ state[p + f"0.fn.to_{s}.weight"].T).reshape(b, n, -1, dim_head).transpose(1, 2) for s in "qkv"
        )
        if mask is not None:
            v = v.masked_fill(~mask[:, None, :, None], 0.0)
        qp, kp = _kernel(q, projection, is_query=True), _kernel(k, projection, is_query=False)
        d_inv = 1.0 / (qp @ kp.sum(dim=-2).unsqueeze(-1)).squeeze(-1)
        out = (qp @ (kp.transpose(-1, -2) @ v)) * d_inv.unsqueeze(-1)
        out = out.transpose(1, 2).reshape(b, n, -1)
        x = x + out @ state[p + "0.fn.to_out.weight"].T + state[p + "0.fn.to_out.bias"]
        h = F.layer_norm(x, (dim,), state[p + "1.norm.weight"], state[p + "1.norm.bias"])
        h = F.gelu(h @ state[p + "1.fn.fn.w1.weight"].T + state[p + "1.fn.fn.w1.bias"])
        x = x + h @ state[p + "1.fn.fn.w2.weight"].T + state[p + "1.fn.fn.w2.bias"]
    return F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"])


def log_normalised(counts: np.ndarray, dataset_genes: list[str], model_genes: list[str]) -> np.ndarray:
    """scBERT-style input over the model's genes: align, normalise to 1e4, log2(1 + x)."""
    first: dict[str, int] = {}
    for j, gene in enumerate(dataset_genes):
        first.setdefault(gene, j)
    aligned = np.array([counts[first[g]] if g in first else 0.0 for g in model_genes])
    return np.log1p(aligned / aligned.sum() * 1e4) / math.log(2) if aligned.sum() > 0 else aligned


def reference_inputs(expression: np.ndarray, n_tokens: int, *, pad: bool) -> tuple[torch.Tensor, ...]:
    """The loop at the top of ``PerformerLM_CellLM.forward`` for one cell (num_tokens = 8)."""
    gene_num = len(expression)
    nonzero = np.flatnonzero(expression > 0)
    tokens = np.floor(np.minimum(expression[nonzero], 5)).astype(np.int64)
    tokens = np.concatenate([[6], tokens])[:n_tokens]
    positions = np.concatenate([[gene_num], nonzero])[:n_tokens]
    width = n_tokens if pad else len(tokens)
    ids = torch.full((1, width), 7, dtype=torch.long)
    pos = torch.full((1, width), gene_num + 1, dtype=torch.long)
    mask = torch.zeros((1, width), dtype=torch.bool)
    ids[0, : len(tokens)] = torch.from_numpy(tokens)
    pos[0, : len(tokens)] = torch.from_numpy(positions)
    mask[0, : len(tokens)] = True
    return ids, pos, mask


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pc9() -> anndata.AnnData:
    return anndata.read_h5ad(Path(__file__).resolve().parents[1] / "data" / "PC9_erlotinib_subsample300.h5ad")


@pytest.fixture(scope="module")
def model_genes(pc9: anndata.AnnData) -> list[str]:
    return list(pc9.var_names[::40]) + ["NOT_A_GENE"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, model_genes: list[str]) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("celllm"), genes=model_genes, seed=5)


@pytest.fixture(scope="module")
def state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / WEIGHTS_FILE, weights_only=True)["model_state_dict"]


ROWS = [0, 1, 17, 64, 120, 250, 299]


def _adapter(ckpt: Path, pc9: anndata.AnnData, **params: object) -> CellLMAdapter:
    adapter = CellLMAdapter(ckpt, max_length=MAX_LENGTH, **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    return adapter


def _cells(adapter: CellLMAdapter, pc9: anndata.AnnData, rows: list[int]) -> list[dict[str, np.ndarray]]:
    return adapter.tokenize(sp.csr_matrix(pc9.X[rows], dtype=np.float32), np.asarray(rows))


# ---- tests ---------------------------------------------------------------------------------
def test_official_folder_loads_and_embeds(ckpt: Path, pc9: anndata.AnnData) -> None:
    assert get_adapter("celllm") is CellLMAdapter
    names = {p.name for p in ckpt.iterdir()}
    assert {WEIGHTS_FILE, GENES_FILE} <= names and any(n.startswith("gene2vec_") for n in names)
    adapter = _adapter(ckpt, pc9)
    cells = _cells(adapter, pc9, ROWS)
    lengths = [len(c["input_ids"]) for c in cells]
    assert min(lengths) < MAX_LENGTH and max(lengths) == MAX_LENGTH  # padded and truncated cells
    emb = adapter.embed(adapter.collate(cells))
    assert emb.shape == (len(ROWS), adapter.emb_dim) == (len(ROWS), 32)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert adapter.params()["pad_masking"] == "reference" and adapter.params()["pooling"] == "cls"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("pad_masking", ["reference", "masked"])
def test_parity_with_direct_per_cell_recomputation(
    ckpt: Path,
    pc9: anndata.AnnData,
    model_genes: list[str],
    state: dict[str, torch.Tensor],
    pooling: str,
    pad_masking: str,
) -> None:
    adapter = _adapter(ckpt, pc9, pooling=pooling, pad_masking=pad_masking)
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate(_cells(adapter, pc9, ROWS)))
    dense = pc9.X[ROWS].toarray()
    for i in range(len(ROWS)):
        expression = log_normalised(dense[i], list(pc9.var_names), model_genes)
        # "reference": the cell padded to max_seq_len, pads in the normaliser; "masked": no pads at all
        ids, pos, mask = reference_inputs(expression, MAX_LENGTH, pad=pad_masking == "reference")
        hidden = fork_forward(state, ids, pos, mask)[0] * mask[0, :, None]
        n = int(mask.sum())
        expected = hidden[0] if pooling == "cls" else hidden[1:n].mean(0)
        assert torch.max(torch.abs(emb[i] - expected)) <= 1e-5


@pytest.mark.parametrize("pad_masking", ["reference", "masked"])
def test_embeddings_do_not_depend_on_batch_mates(ckpt: Path, pc9: anndata.AnnData, pad_masking: str) -> None:
    adapter = _adapter(ckpt, pc9, pad_masking=pad_masking)
    cells = _cells(adapter, pc9, ROWS)
    with torch.inference_mode():
        together = adapter.embed(adapter.collate(cells))
        alone = torch.cat([adapter.embed(adapter.collate([c])) for c in cells])
        reordered = adapter.embed(adapter.collate([cells[3], cells[0], cells[6]]))
    assert torch.max(torch.abs(together - alone)) <= 1e-5
    assert torch.max(torch.abs(reordered - together[[3, 0, 6]])) <= 1e-5


@pytest.mark.parametrize("params", [{"key_max": "batch"}, {"reference_quirks": True}])
def test_batch_key_max_reproduces_a_batched_reference_run(
    ckpt: Path, pc9: anndata.AnnData, model_genes: list[str], state: dict[str, torch.Tensor], params: dict
) -> None:
    adapter = _adapter(ckpt, pc9, **params)
    assert adapter.key_max == "batch" and adapter.batch_dependent is True  # the runner keeps row batches
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate(_cells(adapter, pc9, ROWS)))
    dense = pc9.X[ROWS].toarray()
    inputs = [
        reference_inputs(log_normalised(d, list(pc9.var_names), model_genes), MAX_LENGTH, pad=True) for d in dense
    ]
    ids, pos, mask = (torch.cat(parts) for parts in zip(*inputs))
    expected = fork_forward(state, ids, pos, mask)[:, 0]
    assert torch.max(torch.abs(emb - expected)) <= 1e-5


def test_tokens_keep_expressed_genes_in_gene_order(ckpt: Path, pc9: anndata.AnnData, model_genes: list[str]) -> None:
    adapter = CellLMAdapter(ckpt, max_length=MAX_LENGTH)
    adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    x = sp.csr_matrix(pc9.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(pc9.n_obs))
    gene_num = len(model_genes)
    for cell, counts in zip(cells, pc9.X.toarray()):
        expression = log_normalised(counts, list(pc9.var_names), model_genes)
        expressed = np.flatnonzero(expression > 0)
        assert cell["input_ids"][0] == 6 and cell["gene_pos"][0] == gene_num
        # truncation keeps the first genes by index, not the most expressed ones
        np.testing.assert_array_equal(cell["gene_pos"][1:], expressed[: MAX_LENGTH - 1])
        tokens = np.floor(np.minimum(expression[expressed], 5))
        np.testing.assert_array_equal(cell["input_ids"][1:], tokens[: MAX_LENGTH - 1])
        assert cell["n_pad"][0] == MAX_LENGTH - len(cell["input_ids"])
    again = adapter.tokenize(x[5:9], np.arange(5, 9))
    for a, b in zip(cells[5:9], again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_lora_gradients_are_finite_with_padding(ckpt: Path, pc9: anndata.AnnData) -> None:
    peft = pytest.importorskip("peft")
    adapter = _adapter(ckpt, pc9)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(CellLMAdapter.lora_target_modules))
    adapter.model = peft.get_peft_model(adapter.model, config)
    emb = adapter.embed(adapter.collate(_cells(adapter, pc9, ROWS)))
    emb.pow(2).sum().backward()
    grads = [p.grad for n, p in adapter.model.named_parameters() if "lora_B" in n]
    assert len(grads) == 2 * 6 and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_wrong_gene_id_kind_raises_gene_mapping_error(ckpt: Path, pc9: anndata.AnnData) -> None:
    ensembl = [e for e in map_genes(list(pc9.var_names[:300]), src="symbol", dst="ensembl") if e]
    with pytest.raises(GeneMappingError, match="vocabulary"):
        CellLMAdapter(ckpt).prepare(ensembl, gene_id_kind="symbol")


@pytest.mark.parametrize("bad", [-2.0, np.nan])
def test_negative_or_nan_counts_are_refused(ckpt: Path, pc9: anndata.AnnData, bad: float) -> None:
    adapter = CellLMAdapter(ckpt)
    adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    x = sp.csr_matrix(pc9.X[:2], dtype=np.float32)
    x.data[3] = bad
    with pytest.raises(InputDataError):
        adapter.tokenize(x, np.arange(2))


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, GENES_FILE, "gene2vec_*.npy"])
def test_missing_file_is_named(tmp_path: Path, model_genes: list[str], missing: str) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=model_genes[:20])
    for path in folder.glob(missing):
        path.unlink()
    with pytest.raises(CheckpointError, match=missing.replace("*", r"\*")):
        CellLMAdapter(folder).check_checkpoint()


def test_gene_list_must_match_gene2vec_rows(tmp_path: Path, model_genes: list[str]) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=model_genes[:20])
    (folder / GENES_FILE).write_text("\n".join(model_genes[:19]))
    with pytest.raises(CheckpointError, match="19 genes"):
        CellLMAdapter(folder).load()


def test_bad_parameters_are_refused(ckpt: Path) -> None:
    with pytest.raises(InputDataError, match="key_max='cell' contradicts reference_quirks=True"):
        CellLMAdapter(ckpt, key_max="cell", reference_quirks=True)
    with pytest.raises(InputDataError, match="key_max='global' is not supported"):
        CellLMAdapter(ckpt, key_max="global")
    with pytest.raises(InputDataError, match="must be True or False"):
        CellLMAdapter(ckpt, reference_quirks="true")
    assert CellLMAdapter(ckpt).batch_dependent is False and CellLMAdapter(ckpt).params()["reference_quirks"] is False
    with pytest.raises(InputDataError, match="pad_masking"):
        CellLMAdapter(ckpt, pad_masking="leaky")
    with pytest.raises(InputDataError, match="pad_masking='masked' contradicts reference_quirks=True"):
        CellLMAdapter(ckpt, pad_masking="masked", reference_quirks=True)
    with pytest.raises(InputDataError, match="max_length"):
        CellLMAdapter(ckpt, max_length=1)
    with pytest.raises(InputDataError, match="Unknown celllm parameter"):
        CellLMAdapter(ckpt, layer=-2)
