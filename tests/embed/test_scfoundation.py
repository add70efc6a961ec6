"""scFoundation adapter: models.ckpt sub-models, gene index, parity with a direct re-computation."""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding._adapter import get_adapter
from scdm.embedding.models.scfoundation import ScFoundationAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from tests.untrusted import RunsCode

torch.set_num_threads(1)

MODEL_GENES = [f"G{i}" for i in range(50)]
# the dataset has 30 of the model's genes, in another order, plus 5 the model does not know
DATASET_GENES = [f"G{i}" for i in range(49, 19, -1)] + [f"X{i}" for i in range(5)]


def _counts(n_cells: int = 6, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(n_cells, len(DATASET_GENES))).astype(np.float32)
    for i in range(n_cells):
        dense[i, rng.choice(30, size=rng.integers(0, 25), replace=False)] = 0  # different lengths
        dense[i, i] = 5.0
    return sp.csr_matrix(dense)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("scfoundation"), genes=MODEL_GENES, seed=2)


@pytest.fixture(scope="module")
def adapter(folder: Path) -> ScFoundationAdapter:
    adapter = get_adapter("scfoundation")(checkpoint=folder)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(DATASET_GENES, gene_id_kind="symbol")
    return adapter


def _embed(adapter: ScFoundationAdapter, x: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(adapter.tokenize(x, rows)))


# ---- a direct re-computation from MODELS.md section 3, on the raw checkpoint files ---------------
def _layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def _linear(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def _attention(x: torch.Tensor, state: dict, prefix: str, n_heads: int) -> torch.Tensor:
    length, d = x.shape
    q, k, v = (x @ state[f"{prefix}.in_proj_weight"].T + state[f"{prefix}.in_proj_bias"]).split(d, dim=-1)
    heads = [t.view(length, n_heads, d // n_heads).transpose(0, 1) for t in (q, k, v)]
    scores = heads[0] @ heads[1].transpose(1, 2) / (d // n_heads) ** 0.5
    return _linear((scores.softmax(-1) @ heads[2]).transpose(0, 1).reshape(length, d), state, f"{prefix}.out_proj")


def reference_cell_embedding(folder: Path, dense_counts: np.ndarray, dataset_genes: list[str], target: float = 4.0, sub_model: str = "cell") -> torch.Tensor:
    """get_embedding.py for one cell: reindex (zero-fill), log1p(x/sum*1e4), + T, S, keep > 0, encode, pool."""
    ckpt = torch.load(folder / "models.ckpt", weights_only=True)[sub_model]
    config = {**ckpt["config"]["model_config"]["mae_autobin"], **ckpt["config"]["dataset_config"]["rnaseq"]}
    state = {k.split("model.", 1)[1]: v for k, v in ckpt["state_dict"].items()}
    gene_list = pd.read_csv(next(folder.glob("OS_scRNA_gene_index.*.tsv")), sep="\t")["gene_name"].tolist()
    frame = pd.DataFrame(dense_counts[None, :].astype(np.float64), columns=dataset_genes)
    frame = frame.reindex(columns=gene_list, fill_value=0.0)  # main_gene_selection
    row = frame.iloc[0]
    values = np.log1p(row / row.sum() * 1e4).tolist() + [target, np.log10(row.sum())]
    x = torch.tensor(values)  # float64 here (np.float64 S), as in the reference
    keep = x > 0
    vals, positions = x[keep].float(), torch.arange(len(gene_list) + 2)[keep]  # token_emb(x.float())
    hidden = torch.nn.functional.leaky_relu(_linear(vals[:, None], state, "token_emb.mlp"), 0.1)
    weights = (config["bin_alpha"] * hidden + _linear(hidden, state, "token_emb.mlp2")).softmax(-1)
    h = weights @ state["token_emb.emb.weight"] + state["pos_emb.weight"][positions]
    for i in range(config["encoder"]["depth"]):
        p = f"encoder.transformer_encoder.{i}"
        h = _layer_norm(h + _attention(h, state, f"{p}.self_attn", config["encoder"]["heads"]), state, f"{p}.norm1")
        h = _layer_norm(h + _linear(torch.relu(_linear(h, state, f"{p}.linear1")), state, f"{p}.linear2"), state, f"{p}.norm2")
    h = _layer_norm(h, state, "encoder.norm")
    return torch.cat([h[-1], h[-2], h[:-2].max(dim=0).values, h[:-2].mean(dim=0)])


# ---- loading -----------------------------------------------------------------------------------
def test_official_ckpt_layout_loads_the_chosen_sub_model(folder: Path, adapter: ScFoundationAdapter) -> None:
    ckpt = torch.load(folder / "models.ckpt", weights_only=True)
    assert set(ckpt) == {"cell", "rde", "gene"}
    assert "model.decoder.performer.net.layers.0.0.fn.to_q.weight" in ckpt["cell"]["state_dict"]
    loaded = adapter.model.state_dict()
    torch.testing.assert_close(loaded["encoder.transformer_encoder.1.self_attn.in_proj_weight"], ckpt["cell"]["state_dict"]["model.encoder.transformer_encoder.1.self_attn.in_proj_weight"], rtol=0, atol=0)
    rde = ScFoundationAdapter(checkpoint=folder, sub_model="rde")
    rde.load("cpu")
    rde.prepare(DATASET_GENES, gene_id_kind="symbol")
    x = _counts()
    assert (_embed(rde, x, np.arange(6)) - _embed(adapter, x, np.arange(6))).abs().max() > 1e-3


def test_unknown_sub_model_is_refused(folder: Path) -> None:
    with pytest.raises(InputDataError, match="sub_model='ce'"):
        ScFoundationAdapter(checkpoint=folder, sub_model="ce")


def test_gene_index_must_match_the_model(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=MODEL_GENES)
    index = next(tmp_path.glob("OS_scRNA_gene_index.*.tsv"))
    pd.DataFrame({"gene_name": MODEL_GENES[:-1], "index": range(49)}).to_csv(index, sep="\t", index=False)
    with pytest.raises(CheckpointError, match="seq_len=52"):
        ScFoundationAdapter(checkpoint=tmp_path).load("cpu")


@pytest.mark.parametrize("missing", ["models.ckpt", "OS_scRNA_gene_index.50.tsv"])
def test_missing_file_names_the_file(tmp_path: Path, missing: str) -> None:
    write_tiny_checkpoint(tmp_path, genes=MODEL_GENES)
    (tmp_path / missing).unlink()
    pattern = "models\\.ckpt" if missing == "models.ckpt" else "OS_scRNA_gene_index"
    with pytest.raises(CheckpointError, match=pattern):
        ScFoundationAdapter(checkpoint=tmp_path).check_checkpoint()


# ---- embeddings --------------------------------------------------------------------------------
def test_embedding_shape_dtype_finite(adapter: ScFoundationAdapter) -> None:
    emb = _embed(adapter, _counts(), np.arange(6))
    assert emb.shape == (6, adapter.emb_dim) == (6, 4 * 32)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()


def test_parity_with_direct_unbatched_recomputation(folder: Path, adapter: ScFoundationAdapter) -> None:
    x = _counts()
    cells = adapter.tokenize(x, np.arange(6))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # the batch really is padded
    with torch.inference_mode():
        batched = adapter.embed(adapter.collate(cells))
    dense = x.toarray()
    for i in range(6):
        expected = reference_cell_embedding(folder, dense[i], DATASET_GENES)
        assert (batched[i] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(("tgthighres", "target"), [("t4", lambda total: 4.0), ("f2", lambda total: np.log10(2 * total)), ("a1.5", lambda total: np.log10(total) + 1.5)])
def test_target_resolution_token(folder: Path, tgthighres: str, target) -> None:
    adapter = ScFoundationAdapter(checkpoint=folder, tgthighres=tgthighres)
    adapter.prepare(DATASET_GENES, gene_id_kind="symbol")
    x = _counts()
    totals = np.asarray(x[:, :30].sum(axis=1)).ravel()  # only the model's genes count
    for cell, total in zip(adapter.tokenize(x, np.arange(6)), totals):
        assert cell["input_ids"][-2:].tolist() == [50, 51]  # T and S positions
        np.testing.assert_allclose(cell["values"][-2:], [target(total), np.log10(total)], rtol=1e-6)


@pytest.mark.parametrize(("given", "key"), [("t4.0", "t4"), ("t04", "t4"), ("a1.50", "a1.5"), ("f2e0", "f2"), ("t4", "t4")])
def test_tgthighres_spellings_of_one_target_are_one_embedding(folder: Path, given: str, key: str) -> None:
    # 't4.0' and 't4' set the same T but were keyed apart: two embeddings (and spaces) of one computation
    assert ScFoundationAdapter(checkpoint=folder, tgthighres=given).params()["tgthighres"] == key
    assert ScFoundationAdapter(checkpoint=folder, tgthighres=given).params() == ScFoundationAdapter(checkpoint=folder, tgthighres=key).params()


def test_bad_tgthighres_is_refused(folder: Path) -> None:
    with pytest.raises(InputDataError, match="tgthighres='x4'"):
        ScFoundationAdapter(checkpoint=folder, tgthighres="x4")


@pytest.mark.parametrize("tgthighres", ["f0", "f-1", "tinf", "tnan", "a-inf", "fnan", 4])
def test_tgthighres_without_a_finite_target_is_refused_up_front(folder: Path, tgthighres: object) -> None:
    # were: a bare "math domain error" ValueError mid-run (f0, f-1), NaN embeddings (inf/nan), a TypeError (4)
    with pytest.raises(InputDataError, match="tgthighres"):
        ScFoundationAdapter(checkpoint=folder, tgthighres=tgthighres)  # type: ignore[arg-type]


def test_max_pooling(folder: Path, adapter: ScFoundationAdapter) -> None:
    pooled = ScFoundationAdapter(checkpoint=folder, pool_type="max")
    pooled.load("cpu")
    pooled.prepare(DATASET_GENES, gene_id_kind="symbol")
    x = _counts()
    cells = pooled.tokenize(x, np.arange(6))
    with torch.inference_mode():
        emb = pooled.embed(pooled.collate(cells))
        hidden = [pooled.model(*(torch.as_tensor(c[k])[None] for k in ("input_ids", "values")), None)[0] for c in cells]
    assert emb.shape == (6, 32)
    for i, h in enumerate(hidden):
        torch.testing.assert_close(emb[i], h.max(dim=0).values, rtol=0, atol=1e-5)


def test_batch_composition_does_not_change_a_cell(adapter: ScFoundationAdapter) -> None:
    x = _counts()
    rows = np.arange(6)
    together = _embed(adapter, x, rows)
    alone = torch.cat([_embed(adapter, x[i], rows[i : i + 1]) for i in range(6)])
    assert (together - alone).abs().max() <= 1e-5


def test_tokens_are_nonzero_genes_in_model_order_and_zero_fill_is_audited(folder: Path) -> None:
    adapter = ScFoundationAdapter(checkpoint=folder)
    audit = adapter.prepare(DATASET_GENES, gene_id_kind="symbol")
    assert audit.n_matched == 30 and audit.extra["n_zero_filled"] == 20
    x = _counts()
    dense = x.toarray()
    for i, cell in enumerate(adapter.tokenize(x, np.arange(6))):
        positions = cell["input_ids"][:-2]
        assert (np.diff(positions) > 0).all()  # gene index order
        expected = sorted(int(DATASET_GENES[j][1:]) for j in np.flatnonzero(dense[i, :30]))
        assert positions.tolist() == expected
    again = adapter.tokenize(x, np.arange(6))
    assert all(np.array_equal(a["values"], b["values"]) for a, b in zip(adapter.tokenize(x, np.arange(6)), again))


def test_duplicate_dataset_genes_keep_the_first_column(folder: Path) -> None:
    adapter = ScFoundationAdapter(checkpoint=folder)
    audit = adapter.prepare(["G1", "G2", "G1"], gene_id_kind="symbol")
    assert audit.extra["n_duplicate_columns_dropped"] == 1
    cell = adapter.tokenize(sp.csr_matrix(np.array([[3.0, 1.0, 9.0]], dtype=np.float32)), np.array([0]))[0]
    np.testing.assert_allclose(cell["values"][:2], np.log1p(np.array([3.0, 1.0]) / 4 * 1e4), rtol=1e-6)


# ---- bad input ---------------------------------------------------------------------------------
def test_negative_counts_are_refused(adapter: ScFoundationAdapter) -> None:
    x = _counts()
    x.data[0] = -1.0
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x, np.arange(6))


def test_cell_without_model_gene_counts_is_refused(adapter: ScFoundationAdapter) -> None:
    dense = np.zeros((1, len(DATASET_GENES)), dtype=np.float32)
    dense[0, -1] = 4.0  # only an unknown gene
    with pytest.raises(InputDataError, match="row 41"):
        adapter.tokenize(sp.csr_matrix(dense), np.array([41]))


def test_wrong_gene_id_kind_is_a_gene_mapping_error(folder: Path) -> None:
    with pytest.raises(GeneMappingError, match="gene id type"):
        ScFoundationAdapter(checkpoint=folder).prepare([f"ENSG{i:011d}" for i in range(30)], gene_id_kind="symbol")


# ---- real data ---------------------------------------------------------------------------------
def test_real_pc9_counts_tokenise(tmp_path: Path, pc9_counts_path: Path) -> None:
    adata = ad.read_h5ad(pc9_counts_path)
    genes = list(adata.var_names)
    model_genes = sorted(genes[::3] + ["NOT_IN_DATA1", "NOT_IN_DATA2"])
    write_tiny_checkpoint(tmp_path, genes=model_genes)
    adapter = ScFoundationAdapter(checkpoint=tmp_path)
    audit = adapter.prepare(genes, gene_id_kind="symbol")
    assert audit.n_matched == len(genes[::3]) and audit.extra["n_zero_filled"] == 2
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(adata.n_obs))
    sub = x[:, ::3]
    np.testing.assert_array_equal([len(c["input_ids"]) for c in cells], np.asarray((sub > 0).sum(axis=1)).ravel() + 2)
    totals = np.asarray(sub.sum(axis=1)).ravel()
    np.testing.assert_allclose([c["values"][-1] for c in cells], np.log10(totals), rtol=1e-6)
    adapter.load("cpu")
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate(cells[:3]))
    assert torch.isfinite(emb).all()


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_targets_the_encoder_layers(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = ScFoundationAdapter(checkpoint=folder)
    adapter.load("cpu")
    adapter.prepare(DATASET_GENES, gene_id_kind="symbol")
    adapter.model = get_peft_model(adapter.model, LoraConfig(r=2, target_modules=list(adapter.lora_target_modules), init_lora_weights=False))
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapter.model.named_parameters() if ".lora_A" in n})
    assert wrapped == sorted(f"base_model.model.encoder.transformer_encoder.{i}.{m}" for i in range(2) for m in ("self_attn.out_proj", "linear1", "linear2"))
    adapter.embed(adapter.collate(adapter.tokenize(_counts(), np.arange(6)))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.model.named_parameters() if "lora_" in n and "out_proj" in n)


def test_layers_match_stock_torch_transformer_layers(adapter: ScFoundationAdapter) -> None:
    """pytorchTransformerModule stacks nn.TransformerEncoderLayer(batch_first=True): same names, same maths."""
    ours = adapter.model.encoder.transformer_encoder[1]
    stock = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=128, batch_first=True).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:], padding[2, 3:] = True, True
    with torch.inference_mode():
        expected, got = stock(x, src_key_padding_mask=padding), ours(x, padding)
    assert (expected - got)[~padding].abs().max() <= 1e-5


# ---- reference_quirks --------------------------------------------------------------------------
def test_reference_quirks_drop_non_positive_t_and_s_and_pool_by_position(folder: Path, adapter: ScFoundationAdapter) -> None:
    x = _counts(n_cells=8, seed=5)
    dense = x.toarray()
    totals = dense[:, :30].sum(axis=1)
    shift = -float(np.log10(np.median(totals)))  # T = log10(total) + shift is <= 0 for about half the cells
    quirky = ScFoundationAdapter(checkpoint=folder, tgthighres=f"a{shift}", reference_quirks=True)
    default = ScFoundationAdapter(checkpoint=folder, tgthighres=f"a{shift}")
    for a in (quirky, default):
        a.load("cpu")
        a.prepare(DATASET_GENES, gene_id_kind="symbol")
    dropped = np.log10(totals) + shift <= 0
    assert dropped.any() and not dropped.all()
    got, kept = _embed(quirky, x, np.arange(8)), _embed(default, x, np.arange(8))
    for i in range(8):
        expected = reference_cell_embedding(folder, dense[i], DATASET_GENES, target=float(np.float32(np.log10(totals[i]) + shift)))
        assert (got[i] - expected).abs().max() <= 1e-5
        assert ((kept[i] - got[i]).abs().max() > 1e-3) == dropped[i]  # only cells that lose T differ
    assert quirky.params()["reference_quirks"] is True and default.params()["reference_quirks"] is False


def test_reference_quirks_refuse_a_cell_the_reference_crashes_on(folder: Path) -> None:
    quirky = ScFoundationAdapter(checkpoint=folder, reference_quirks=True)
    quirky.prepare(DATASET_GENES, gene_id_kind="symbol")
    one_count = np.zeros((1, len(DATASET_GENES)), dtype=np.float32)
    one_count[0, 3] = 1.0  # total 1: S = log10(1) = 0 is dropped, leaving one gene and T
    with pytest.raises(InputDataError, match="keeps only 2 token"):
        quirky.tokenize(sp.csr_matrix(one_count), np.array([0]))
    with pytest.raises(InputDataError, match="must be True or False"):
        ScFoundationAdapter(checkpoint=folder, reference_quirks=None)


# ---- official format and untrusted files --------------------------------------------------------
def test_tiny_checkpoint_has_what_the_reference_loader_reads(folder: Path) -> None:
    ckpt = torch.load(folder / "models.ckpt", weights_only=True)  # plain containers and tensors only
    for key in ("cell", "rde", "gene"):
        config = ckpt[key]["config"]
        # load.convertconfig: merge model_config[config['model']] and dataset_config['rnaseq'];
        # load_model_frommmf / select_model then read 'model' from the merged config
        merged = {**config["model_config"][config["model"]], **config["dataset_config"]["rnaseq"]}
        assert merged["model"] == "mae_autobin"
        assert merged["seq_len"] == len(MODEL_GENES) + 2
        assert all(k.startswith("model.") for k in ckpt[key]["state_dict"])


def test_a_planted_pickle_in_models_ckpt_is_refused_without_running(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=MODEL_GENES)
    ckpt = torch.load(folder / "models.ckpt", weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["cell"]["config"]["trainer"] = RunsCode(marker)
    torch.save(ckpt, folder / "models.ckpt")
    with pytest.raises(CheckpointError, match=r"Refusing to load .*models\.ckpt.*system.*could run code"):
        ScFoundationAdapter(checkpoint=folder).load("cpu")
    assert not marker.exists()


def test_numpy_values_and_saved_arguments_in_models_ckpt_still_load(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=MODEL_GENES)
    ckpt = torch.load(folder / "models.ckpt", weights_only=True)
    ckpt["cell"]["config"]["model_config"]["mae_autobin"]["bin_alpha"] = np.float64(1.0)
    ckpt["cell"]["config"]["hparams"] = argparse.Namespace(lr=1e-4, gene_order=np.arange(3))
    torch.save(ckpt, folder / "models.ckpt")
    adapter = ScFoundationAdapter(checkpoint=folder)
    adapter.load("cpu")
    assert adapter.model_config()["bin_alpha"] == 1.0


# ---- speed paths: no mask for unpadded batches, half-precision weights on CUDA ----------------------
@pytest.mark.parametrize("pool_type", ["all", "max"])
def test_an_unpadded_batch_runs_without_a_mask_and_gives_the_same_numbers(folder: Path, pool_type: str) -> None:
    adapter = ScFoundationAdapter(checkpoint=folder, pool_type=pool_type)
    adapter.load("cpu")
    adapter.prepare(DATASET_GENES, gene_id_kind="symbol")
    cells = adapter.tokenize(_counts(), np.arange(6))
    genes = min(len(c["input_ids"]) for c in cells) - 2
    equal = [{k: np.concatenate([v[:genes], v[-2:]]) for k, v in c.items()} for c in cells]  # first genes + T, S
    batch = adapter.collate(equal)
    assert batch["padding_mask"] is None  # decided in collate, on the CPU
    masked = {**batch, "padding_mask": torch.zeros(batch["input_ids"].shape, dtype=torch.bool)}
    with torch.inference_mode():
        assert (adapter.embed(batch) - adapter.embed(masked)).abs().max() == 0


def test_a_padded_batch_masks_exactly_its_pads(adapter: ScFoundationAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(6))
    batch = adapter.collate(cells)
    lengths = torch.tensor([len(c["input_ids"]) for c in cells])
    torch.testing.assert_close(batch["padding_mask"], torch.arange(batch["input_ids"].shape[1])[None, :] >= lengths[:, None])


def test_half_precision_weights_only_for_cuda_autocast_runs(folder: Path, adapter: ScFoundationAdapter) -> None:
    half = ScFoundationAdapter(checkpoint=folder)
    # a half-precision run records value_bins: its bins are computed in float32 since they stopped following
    # the autocast, so an embedding made the old way is never taken for one made this way
    assert half.configure_precision("cpu", "fp32") == {}
    assert half.configure_precision("cpu", "fp16") == {"value_bins": "float32"} and half.weight_precision is None
    assert half.configure_precision("cuda", "bf16") == {"weights": "bf16", "value_bins": "float32"}
    assert half.params() == adapter.params()  # the runner records the weights' dtype beside params()
    half.load("cpu")  # the cast does not depend on the device: checked here on the CPU
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    in_float32 = ("norm", "token_emb.mlp")  # token_emb.mlp/mlp2 take the expression value in float32
    assert {d for n, d in dtypes.items() if any(k in n for k in in_float32)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not any(k in n for k in in_float32)} == {torch.bfloat16}
    half.prepare(DATASET_GENES, gene_id_kind="symbol")
    batch = adapter.collate(adapter.tokenize(_counts(), np.arange(6)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, full = half.embed(batch), adapter.embed(batch)
    assert got.dtype == torch.float32 and (got - full).abs().max() <= 5e-2 * full.abs().max()  # bf16 rounding, not other numbers


@pytest.mark.parametrize("weights", [None, "bf16"])
def test_bf16_autocast_does_not_round_the_expression_values(tmp_path: Path, weights: str | None) -> None:
    # The value enters token_emb.mlp (Linear 1 -> 100 bins) as a scalar: rounded to bf16 (8 mantissa bits) it
    # loses differences a trained, sharp auto-discretisation separates (was 8 % relative error here, now 0.4 %).
    folder = write_tiny_checkpoint(tmp_path, genes=MODEL_GENES, seed=2, bin_num=100)

    def embed(precision: str | None, autocast: bool) -> torch.Tensor:
        model = ScFoundationAdapter(checkpoint=folder)
        model.weight_precision = precision  # what configure_precision sets on CUDA; the cast is device-independent
        model.load("cpu")
        with torch.no_grad():  # sharper bins, as training makes them
            model.model.token_emb.mlp.weight.mul_(10)
            model.model.token_emb.mlp2.weight.mul_(3)
        model.prepare(DATASET_GENES, gene_id_kind="symbol")
        batch = model.collate(model.tokenize(_counts(), np.arange(6)))
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model.embed(batch).float()

    full, bf16 = embed(None, autocast=False), embed(weights, autocast=True)
    relative = (bf16 - full).norm(dim=1) / full.norm(dim=1)
    assert relative.max() < 0.02
