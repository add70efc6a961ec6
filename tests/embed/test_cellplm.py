"""CellPLM adapter: official file layout, parity with a direct re-computation of the same batch.

CellPLM attends across the cells of one forward call, so "parity" means: the same group of cells,
computed directly from the state dict following MODELS.md section 8 (dense ``log1p(X) @ emb``,
Flow-Attention written out, GMVAE mean with the modal cluster), shares no code with the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scdm.embedding import get_adapter
from scdm.embedding.models.cellplm import CellPLMAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from scdm.store.genes import map_genes

PREFIX = "tiny_cellplm"


# ---- the reference, written out from MODELS.md -------------------------------------------------
def flow_attention(x: torch.Tensor, state: dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    """Flow_Attention over one sequence of cells x (n, d); eps 1e-6, sigmoid kernel."""
    eps = 1e-6
    n, d = x.shape

    def project(name: str) -> torch.Tensor:
        y = x @ state[f"{p}{name}.weight"].T + state[f"{p}{name}.bias"]
        return y.reshape(n, heads, d // heads).permute(1, 0, 2)  # (heads, n, dh)

    q = torch.sigmoid(project("query_projection"))
    k = torch.sigmoid(project("key_projection"))
    v = project("value_projection")
    sink_in = 1.0 / ((q + eps) @ (k.sum(1) + eps).unsqueeze(-1)).squeeze(-1)
    source_out = 1.0 / ((k + eps) @ (q.sum(1) + eps).unsqueeze(-1)).squeeze(-1)
    cons_sink = ((q + eps) @ ((k * source_out[..., None]).sum(1) + eps).unsqueeze(-1)).squeeze(-1)
    cons_source = ((k + eps) @ ((q * sink_in[..., None]).sum(1) + eps).unsqueeze(-1)).squeeze(-1)
    cons_source = cons_source.clamp(-1.0, 1.0)
    allocation = torch.sigmoid(cons_sink)  # the reference scales by L / S, which is 1 here
    competition = torch.softmax(cons_source, dim=-1) * n
    out = ((q * sink_in[..., None]) @ (k.transpose(1, 2) @ (v * competition[..., None]))) * allocation[..., None]
    out = out.permute(1, 0, 2).reshape(n, d)
    return out @ state[f"{p}out_projection.weight"].T + state[f"{p}out_projection.bias"]


def cellplm_reference(
    state: dict[str, torch.Tensor], config: dict, counts: np.ndarray, gene_idx: list[int], *, gumbel: bool = False
) -> torch.Tensor:
    """OmicsFormer(head_type='embedder') in eval mode with y = onehot(argmax logits).

    ``gumbel``: y is the reference's hard Gumbel-softmax sample drawn from the global torch RNG
    (``rand_like(logits)``), followed by the ``randn_like`` of the reparameterised z.
    """
    heads = config.get("enc_head", 8)
    x = torch.log1p(torch.tensor(counts, dtype=torch.float32))
    h = x @ state["embedder.feat_enc.emb"][gene_idx]
    h = F.relu(h @ state["embedder.extra_linear.0.weight"].T + state["embedder.extra_linear.0.bias"])
    h = F.group_norm(h, 4, state["embedder.extra_linear.3.weight"], state["embedder.extra_linear.3.bias"])
    width = h.shape[1]
    for i in range(config["enc_layers"]):
        p = f"encoder.layers.{i}."
        y = F.layer_norm(h, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        h = h + flow_attention(y, state, p + "self_attn.", heads)
        y = F.layer_norm(h, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        y = F.gelu(y @ state[p + "_ff_block.0.weight"].T + state[p + "_ff_block.0.bias"])
        h = h + y @ state[p + "_ff_block.3.weight"].T + state[p + "_ff_block.3.bias"]
    h = F.layer_norm(h, (width,), state["pre_latent_norm.norm.weight"], state["pre_latent_norm.norm.bias"])
    p = "latent.layers.1.inference."
    logits = h @ state[p + "inference_qyx.0.logits.weight"].T + state[p + "inference_qyx.0.logits.bias"]
    onehot = F.one_hot(logits.argmax(1), logits.shape[1]).float()
    if gumbel:
        soft = F.softmax(logits - torch.log(-torch.log(torch.rand_like(logits) + 1e-20) + 1e-20), dim=-1)
        onehot = (F.one_hot(soft.argmax(1), soft.shape[1]).float() - soft).detach() + soft
    z = F.relu(torch.cat([h, onehot], 1) @ state[p + "inference_qzyx.0.weight"].T + state[p + "inference_qzyx.0.bias"])
    mu = z @ state[p + "inference_qzyx.2.mu.weight"].T + state[p + "inference_qzyx.2.mu.bias"]
    if gumbel:
        torch.randn_like(mu)  # Gaussian.reparameterize draws z's noise even though only mu is returned
    return mu


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pc9() -> anndata.AnnData:
    return anndata.read_h5ad(Path(__file__).resolve().parents[1] / "data" / "PC9_erlotinib_subsample300.h5ad")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, pc9: anndata.AnnData) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cellplm"), genes=list(pc9.var_names[::10]), seed=2)


@pytest.fixture(scope="module")
def official(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    state = torch.load(ckpt / f"{PREFIX}.best.ckpt", weights_only=True)["model_state_dict"]
    return state, json.loads((ckpt / f"{PREFIX}.config.json").read_text())


def _adapter(ckpt: Path, pc9: anndata.AnnData, **params: object) -> CellPLMAdapter:
    adapter = CellPLMAdapter(ckpt, **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    return adapter


def _cells(adapter: CellPLMAdapter, pc9: anndata.AnnData, rows: slice) -> list[dict[str, np.ndarray]]:
    x = sp.csr_matrix(pc9.X[rows], dtype=np.float32)
    return adapter.tokenize(x, np.arange(x.shape[0]))


# ---- tests ---------------------------------------------------------------------------------
def test_official_pair_loads_and_embeds(ckpt: Path, pc9: anndata.AnnData) -> None:
    assert get_adapter("cellplm") is CellPLMAdapter and CellPLMAdapter.batch_dependent is True
    assert {p.name for p in ckpt.iterdir()} == {f"{PREFIX}.best.ckpt", f"{PREFIX}.config.json"}
    adapter = CellPLMAdapter(ckpt)
    assert adapter.emb_dim == 16  # from config.json, before load
    adapter = _adapter(ckpt, pc9)
    emb = adapter.embed(adapter.collate(_cells(adapter, pc9, slice(0, 40))))
    assert emb.shape == (40, 16) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert adapter.params() == {
        "prefix": PREFIX,
        "cluster_assignment": "argmax",
        "embedding": "gmvae_posterior_mean",
        "batch_dependent": True,
        "reference_quirks": False,
    }


def test_parity_with_direct_recomputation_of_the_same_batch(
    ckpt: Path, pc9: anndata.AnnData, official: tuple[dict[str, torch.Tensor], dict]
) -> None:
    state, config = official
    adapter = _adapter(ckpt, pc9)
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate(_cells(adapter, pc9, slice(100, 160))))
    # the pipeline's gene handling: symbols -> Ensembl, keep genes in gene_list (first duplicate wins)
    ensembl = map_genes(list(pc9.var_names), src="symbol", dst="ensembl")
    index = {g: i for i, g in enumerate(config["gene_list"])}
    cols, gene_idx, seen = [], [], set()
    for col, gene in enumerate(ensembl):
        if gene in index and gene not in seen:
            seen.add(gene)
            cols.append(col)
            gene_idx.append(index[gene])
    expected = cellplm_reference(state, config, pc9.X[100:160][:, cols].toarray(), gene_idx)
    assert torch.max(torch.abs(emb - expected)) <= 1e-5


def test_deterministic_and_order_free_within_a_batch(ckpt: Path, pc9: anndata.AnnData) -> None:
    adapter = _adapter(ckpt, pc9)
    cells = _cells(adapter, pc9, slice(0, 48))
    order = np.random.default_rng(0).permutation(48)
    with torch.inference_mode():
        first = adapter.embed(adapter.collate(cells))
        second = adapter.embed(adapter.collate(cells))
        shuffled = adapter.embed(adapter.collate([cells[i] for i in order]))
    assert torch.equal(first, second)
    assert torch.max(torch.abs(shuffled - first[order])) <= 1e-5


def test_batch_composition_changes_the_embedding(ckpt: Path, pc9: anndata.AnnData) -> None:
    # documented behaviour of the reference: cells attend to each other, hence batch_dependent
    adapter = _adapter(ckpt, pc9)
    cells = _cells(adapter, pc9, slice(0, 48))
    with torch.inference_mode():
        together = adapter.embed(adapter.collate(cells))
        half = adapter.embed(adapter.collate(cells[:24]))
    assert torch.max(torch.abs(together[:24] - half)) > 1e-4


def test_tokenize_real_counts(ckpt: Path, pc9: anndata.AnnData) -> None:
    adapter = CellPLMAdapter(ckpt)
    audit = adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    assert audit.id_kind_used == "ensembl" and audit.n_matched == audit.extra["n_model_genes"] > 800
    x = sp.csr_matrix(pc9.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(pc9.n_obs))
    assert all(len(c["input_ids"]) == len(c["counts"]) > 0 for c in cells)
    assert all((c["counts"] > 0).all() and (c["counts"] == np.round(c["counts"])).all() for c in cells)
    again = adapter.tokenize(x[10:20], np.arange(10, 20))
    for a, b in zip(cells[10:20], again):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["counts"], b["counts"])


def test_versioned_ensembl_ids_are_accepted(ckpt: Path, official: tuple[dict[str, torch.Tensor], dict]) -> None:
    _, config = official
    genes = [f"{g}.7" for g in config["gene_list"][:50]] + ["ENSG00000000000"]
    audit = CellPLMAdapter(ckpt).prepare(genes, gene_id_kind="ensembl")
    assert audit.n_matched == 50 and audit.unmatched_examples == ("ENSG00000000000",)


def test_wrong_gene_id_kind_raises_gene_mapping_error(ckpt: Path, pc9: anndata.AnnData) -> None:
    with pytest.raises(GeneMappingError, match="cellplm"):
        CellPLMAdapter(ckpt).prepare(list(pc9.var_names), gene_id_kind="ensembl")


@pytest.mark.parametrize("bad", [-3.0, np.nan])
def test_negative_or_nan_counts_are_refused(ckpt: Path, pc9: anndata.AnnData, bad: float) -> None:
    adapter = CellPLMAdapter(ckpt)
    adapter.prepare(list(pc9.var_names), gene_id_kind="symbol")
    x = sp.csr_matrix(pc9.X[:2], dtype=np.float32)
    x.data[0] = bad
    with pytest.raises(InputDataError):
        adapter.tokenize(x, np.arange(2))


@pytest.mark.parametrize("suffix", [".best.ckpt", ".config.json"])
def test_missing_file_is_named(tmp_path: Path, ckpt: Path, suffix: str) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    (folder / f"{PREFIX}{suffix}").unlink()
    (folder / f"other{suffix}").write_text("{}")  # a file of another prefix does not count
    with pytest.raises(CheckpointError, match=rf"{PREFIX}{suffix}|\*{suffix}"):
        CellPLMAdapter(folder, prefix=PREFIX).check_checkpoint()


def test_several_checkpoints_need_a_prefix(tmp_path: Path, ckpt: Path, pc9: anndata.AnnData) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    for suffix in (".best.ckpt", ".config.json"):
        shutil.copy(folder / f"{PREFIX}{suffix}", folder / f"second{suffix}")
    with pytest.raises(CheckpointError, match="prefix="):
        CellPLMAdapter(folder).check_checkpoint()
    _adapter(folder, pc9, prefix="second")


def test_decoder_keys_are_ignored_but_missing_weights_are_not(tmp_path: Path, ckpt: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    path = folder / f"{PREFIX}.best.ckpt"
    blob = torch.load(path, weights_only=True)
    assert any(k.startswith("decoder.") for k in blob["model_state_dict"])
    del blob["model_state_dict"]["encoder.layers.1.norm2.weight"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="encoder.layers.1.norm2.weight"):
        CellPLMAdapter(folder).load()


def test_unsupported_architecture_is_refused(tmp_path: Path, pc9: anndata.AnnData) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=list(pc9.var_names[:30]))
    config_path = folder / f"{PREFIX}.config.json"
    config = json.loads(config_path.read_text())
    config["enc_mod"] = "performer"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="enc_mod='performer'"):
        CellPLMAdapter(folder).load()


def test_bad_parameters_are_refused(ckpt: Path) -> None:
    with pytest.raises(InputDataError, match="cluster_assignment='softmax' is not supported"):
        CellPLMAdapter(ckpt, cluster_assignment="softmax")
    with pytest.raises(InputDataError, match="contradicts reference_quirks=True"):
        CellPLMAdapter(ckpt, cluster_assignment="argmax", reference_quirks=True)
    with pytest.raises(InputDataError, match="Unknown cellplm parameter"):
        CellPLMAdapter(ckpt, pooling="cls")


# ---- reference_quirks: the seeded Gumbel draw --------------------------------------------------
def _reference_inputs(pc9: anndata.AnnData, config: dict) -> tuple[list[int], list[int]]:
    ensembl = map_genes(list(pc9.var_names), src="symbol", dst="ensembl")
    index = {g: i for i, g in enumerate(config["gene_list"])}
    cols, gene_idx, seen = [], [], set()
    for col, gene in enumerate(ensembl):
        if gene in index and gene not in seen:
            seen.add(gene)
            cols.append(col)
            gene_idx.append(index[gene])
    return cols, gene_idx


def test_reference_quirks_replay_the_pipelines_gumbel_draws_batch_after_batch(
    ckpt: Path, pc9: anndata.AnnData, official: tuple[dict[str, torch.Tensor], dict]
) -> None:
    state, config = official
    cols, gene_idx = _reference_inputs(pc9, config)
    bounds = [(0, 20), (20, 40), (40, 52)]
    torch.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_()  # CellEmbeddingPipeline's DataLoader iterator
    expected = [cellplm_reference(state, config, pc9.X[a:b][:, cols].toarray(), gene_idx, gumbel=True) for a, b in bounds]
    adapter = _adapter(ckpt, pc9, seed=5, reference_quirks=True)
    cells = _cells(adapter, pc9, slice(0, 52))
    assert adapter.params()["cluster_assignment"] == "gumbel" and adapter.params()["reference_quirks"] is True
    with torch.inference_mode():
        got = [adapter.embed(adapter.collate(cells[a:b])) for a, b in bounds]
        jumped = _adapter(ckpt, pc9, seed=5, reference_quirks=True).embed(adapter.collate(cells[20:40]))
        argmax = _adapter(ckpt, pc9).embed(adapter.collate(cells[20:40]))
    for g, e in zip(got, expected):
        assert torch.max(torch.abs(g - e)) <= 1e-5
    assert torch.equal(jumped, got[1])  # a resumed run fast-forwards the stream to its batch
    assert torch.max(torch.abs(argmax - got[1])) > 1e-3  # the sample differs from the modal cluster


def test_gumbel_batches_must_be_consecutive_rows(ckpt: Path, pc9: anndata.AnnData) -> None:
    adapter = _adapter(ckpt, pc9, reference_quirks=True)
    cells = _cells(adapter, pc9, slice(0, 8))
    with pytest.raises(InputDataError, match="consecutive rows"):
        adapter.embed(adapter.collate([cells[0], cells[3]]))


@pytest.mark.slow
def test_reference_quirks_match_the_cellplm_package(ckpt: Path, pc9: anndata.AnnData) -> None:
    """Optional: the real CellEmbeddingPipeline (pip install cellplm) on the same tiny checkpoint."""
    import warnings

    try:
        from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline
    except ImportError as err:
        pytest.skip(f"the cellplm package is not importable: {err}")
    ensembl = map_genes(list(pc9.var_names), src="symbol", dst="ensembl")
    keep, seen = [], set()
    for i, gene in enumerate(ensembl):
        if gene and gene not in seen:
            seen.add(gene)
            keep.append(i)
    cells = pc9[:52, keep].copy()  # Ensembl ids converted offline: the package would call mygene
    cells.var_names = [ensembl[i] for i in keep]
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = CellEmbeddingPipeline(pretrain_prefix=PREFIX, pretrain_directory=str(ckpt))
        torch.manual_seed(5)
        expected = pipeline.predict(cells, inference_config={"batch_size": 20}, ensembl_auto_conversion=False, device="cpu")
    adapter = _adapter(ckpt, pc9, seed=5, reference_quirks=True)
    tokens = _cells(adapter, pc9, slice(0, 52))
    with torch.inference_mode():
        got = torch.cat([adapter.embed(adapter.collate(tokens[a:b])) for a, b in ((0, 20), (20, 40), (40, 52))])
    assert torch.max(torch.abs(got - expected)) <= 1e-5
