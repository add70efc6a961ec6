"""scGPT adapter: official-format loading, tokenisation, parity with a direct re-computation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding._adapter import get_adapter
from scdm.embedding.models.scgpt import ScGPTAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from tests.untrusted import RunsCode

torch.set_num_threads(1)

GENES = [f"GENE{i}" for i in range(40)]


def _counts(n_cells: int = 6, n_genes: int = 40, seed: int = 0) -> sp.csr_matrix:
    """Counts with many ties and cells of different lengths."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    for i in range(n_cells):  # vary the number of non-zero genes per cell
        dense[i, rng.choice(n_genes, size=rng.integers(0, n_genes // 2), replace=False)] = 0
        dense[i, i] = 7.0  # never empty
    return sp.csr_matrix(dense)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("scgpt"), genes=GENES, seed=1)


@pytest.fixture(scope="module")
def adapter(folder: Path) -> ScGPTAdapter:
    adapter = get_adapter("scgpt")(checkpoint=folder, seed=3)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    return adapter


def _embed(adapter: ScGPTAdapter, x: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(adapter.tokenize(x, rows)))


# ---- a direct re-computation from MODELS.md section 2, on the raw checkpoint files ---------------
def _layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def _attention(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Plain softmax attention over one unpadded sequence x (length, d)."""
    length, d = x.shape
    q, k, v = (x @ w.T + b).split(d, dim=-1)
    heads = [t.view(length, n_heads, d // n_heads).transpose(0, 1) for t in (q, k, v)]
    scores = heads[0] @ heads[1].transpose(1, 2) / (d // n_heads) ** 0.5
    out = (scores.softmax(-1) @ heads[2]).transpose(0, 1).reshape(length, d)
    return out @ w_out.T + b_out


def reference_cell_embedding(folder: Path, gene_ids: np.ndarray, values: np.ndarray) -> torch.Tensor:
    """One cell, no padding: gene emb + value emb -> post-LN layers (Wqkv keys) -> CLS -> L2."""
    state = torch.load(folder / "best_model.pt", weights_only=True)
    args = json.loads((folder / "args.json").read_text())
    ids, vals = torch.as_tensor(gene_ids), torch.as_tensor(values)[:, None]
    x = _layer_norm(state["encoder.embedding.weight"][ids], state, "encoder.enc_norm")
    v = torch.relu(vals.clamp(max=512) @ state["value_encoder.linear1.weight"].T + state["value_encoder.linear1.bias"])
    v = v @ state["value_encoder.linear2.weight"].T + state["value_encoder.linear2.bias"]
    h = x + _layer_norm(v, state, "value_encoder.norm")
    for i in range(args["nlayers"]):
        p = f"transformer_encoder.layers.{i}"
        attn = _attention(h, state[f"{p}.self_attn.Wqkv.weight"], state[f"{p}.self_attn.Wqkv.bias"],
                          state[f"{p}.self_attn.out_proj.weight"], state[f"{p}.self_attn.out_proj.bias"], args["nheads"])  # fmt: skip
        h = _layer_norm(h + attn, state, f"{p}.norm1")
        ff = torch.relu(h @ state[f"{p}.linear1.weight"].T + state[f"{p}.linear1.bias"]) @ state[f"{p}.linear2.weight"].T + state[f"{p}.linear2.bias"]
        h = _layer_norm(h + ff, state, f"{p}.norm2")
    return h[0] / h[0].norm()


def reference_tokens(folder: Path, dense_row: np.ndarray, seed: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero vocabulary genes, <cls> first with value -2, 51-bin quantile binning with random ties."""
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = np.array([vocab[g] for g in GENES])
    nonzero = np.flatnonzero(dense_row)
    values = dense_row[nonzero].astype(np.float32)
    bins = np.quantile(values, np.linspace(0, 1, 50))
    left, right = np.digitize(values, bins), np.digitize(values, bins, right=True)
    uniform = np.random.default_rng([seed, row]).random(len(values))  # the documented per-cell stream
    binned = np.ceil(uniform * (right - left) + left)
    return np.concatenate([[vocab["<cls>"]], ids[nonzero]]), np.concatenate([[-2.0], binned]).astype(np.float32)


# ---- loading -----------------------------------------------------------------------------------
def test_loads_flash_attn_wqkv_keys_into_in_proj(folder: Path, adapter: ScGPTAdapter) -> None:
    state = torch.load(folder / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state  # the released key names
    assert "decoder.fc.0.weight" in state  # heads ship too and are skipped
    loaded = adapter.model.state_dict()
    torch.testing.assert_close(loaded["transformer_encoder.layers.1.self_attn.in_proj_weight"], state["transformer_encoder.layers.1.self_attn.Wqkv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["encoder.embedding.weight"], state["encoder.embedding.weight"], rtol=0, atol=0)


def test_in_proj_keys_load_to_the_same_model(tmp_path: Path, adapter: ScGPTAdapter) -> None:
    plain = write_tiny_checkpoint(tmp_path, genes=GENES, seed=1, flash_keys=False)
    other = ScGPTAdapter(checkpoint=plain, seed=3)
    other.load("cpu")
    other.prepare(GENES, gene_id_kind="symbol")
    x = _counts()
    torch.testing.assert_close(_embed(other, x, np.arange(6)), _embed(adapter, x, np.arange(6)), rtol=0, atol=0)


def test_state_dict_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES)
    args = json.loads((tmp_path / "args.json").read_text())
    (tmp_path / "args.json").write_text(json.dumps({**args, "nlayers": 3}))
    with pytest.raises(CheckpointError, match="does not match args.json"):
        ScGPTAdapter(checkpoint=tmp_path).load("cpu")


@pytest.mark.parametrize("missing", ["best_model.pt", "args.json", "vocab.json"])
def test_missing_file_names_the_file(tmp_path: Path, missing: str) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES)
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        ScGPTAdapter(checkpoint=tmp_path).check_checkpoint()


# ---- embeddings --------------------------------------------------------------------------------
def test_embedding_shape_dtype_and_norm(adapter: ScGPTAdapter) -> None:
    emb = _embed(adapter, _counts(), np.arange(6))
    assert emb.shape == (6, adapter.emb_dim) == (6, 32)
    assert emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))


def test_parity_with_direct_unbatched_recomputation(folder: Path, adapter: ScGPTAdapter) -> None:
    x = _counts()
    rows = np.arange(100, 106)
    cells = adapter.tokenize(x, rows)
    assert len({len(c["input_ids"]) for c in cells}) > 1  # the batch really is padded
    with torch.inference_mode():
        batched = adapter.embed(adapter.collate(cells))
    for i, cell in enumerate(cells):
        expected = reference_cell_embedding(folder, cell["input_ids"], cell["values"])
        assert (batched[i] - expected).abs().max() <= 1e-5


def test_tokens_follow_the_reference_recipe(folder: Path, adapter: ScGPTAdapter) -> None:
    x = _counts()
    dense = x.toarray()
    for i, cell in enumerate(adapter.tokenize(x, np.arange(50, 56))):
        ids, values = reference_tokens(folder, dense[i], seed=3, row=50 + i)
        np.testing.assert_array_equal(cell["input_ids"], ids)
        np.testing.assert_array_equal(cell["values"], values)
        assert cell["values"][1:].min() >= 1 and cell["values"][1:].max() <= 50


def test_ties_are_spread_over_the_bins_they_span(adapter: ScGPTAdapter) -> None:
    x = sp.csr_matrix(np.array([[1] * 30 + [2, 3, 5, 8, 13, 21, 34, 55, 89, 144]], dtype=np.float32))
    bins = adapter.tokenize(x, np.array([0]))[0]["values"][1:]
    assert len(set(bins[:30])) > 5  # thirty tied 1s do not all land in one bin
    assert bins[-1] == 50 and (np.diff(bins[30:]) > 0).all()


def test_batch_composition_does_not_change_a_cell(adapter: ScGPTAdapter) -> None:
    x = _counts()
    rows = np.arange(6)
    together = _embed(adapter, x, rows)
    alone = torch.cat([_embed(adapter, x[i], rows[i : i + 1]) for i in range(6)])
    reversed_ = _embed(adapter, x[::-1], rows[::-1]).flip(0)
    assert (together - alone).abs().max() <= 1e-6
    assert (together - reversed_).abs().max() <= 1e-6


def test_tokenize_is_deterministic_and_chunk_independent(adapter: ScGPTAdapter) -> None:
    x = _counts()
    rows = np.arange(10, 16)
    once = adapter.tokenize(x, rows)
    chunked = adapter.tokenize(x[:2], rows[:2]) + adapter.tokenize(x[2:], rows[2:])
    for a, b in zip(once, chunked):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["values"], b["values"])
    other_seed = ScGPTAdapter(checkpoint=adapter.checkpoint, seed=4)
    other_seed.prepare(GENES, gene_id_kind="symbol")
    assert any(not np.array_equal(a["values"], b["values"]) for a, b in zip(once, other_seed.tokenize(x, rows)))


def test_long_cells_keep_a_seeded_subsample_binned_before_sampling(folder: Path) -> None:
    x = sp.csr_matrix(np.arange(1, 41, dtype=np.float32)[None, :])
    full, short = ScGPTAdapter(checkpoint=folder, seed=0), ScGPTAdapter(checkpoint=folder, seed=0, max_length=11)
    for a in (full, short):
        a.prepare(GENES, gene_id_kind="symbol")
    whole = full.tokenize(x, np.array([7]))[0]
    cut = short.tokenize(x, np.array([7]))[0]
    assert len(whole["input_ids"]) == 41 and len(cut["input_ids"]) == 11  # <cls> + 10 genes
    pairs = set(zip(whole["input_ids"].tolist(), whole["values"].tolist()))
    assert set(zip(cut["input_ids"].tolist(), cut["values"].tolist())) <= pairs
    assert cut["input_ids"][0] == whole["input_ids"][0]  # <cls> kept first


# ---- bad input ---------------------------------------------------------------------------------
def test_negative_counts_are_refused(adapter: ScGPTAdapter) -> None:
    x = sp.csr_matrix(np.array([[1.0, -2.0] + [0.0] * 38], dtype=np.float32))
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x, np.array([0]))


def test_cell_without_vocabulary_counts_is_refused(adapter: ScGPTAdapter) -> None:
    with pytest.raises(InputDataError, match="row 12"):
        adapter.tokenize(sp.csr_matrix((1, 40), dtype=np.float32), np.array([12]))


def test_wrong_gene_id_kind_is_a_gene_mapping_error(folder: Path) -> None:
    with pytest.raises(GeneMappingError, match="gene id type"):
        ScGPTAdapter(checkpoint=folder).prepare([str(i) for i in range(1, 41)], gene_id_kind="symbol")


def test_ensembl_ids_are_mapped_to_symbols(tmp_path: Path) -> None:
    from scdm.store.genes import map_genes

    symbols = ["TP53", "EGFR", "GAPDH", "ACTB"]
    write_tiny_checkpoint(tmp_path, genes=symbols)
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    audit = ScGPTAdapter(checkpoint=tmp_path).prepare([*ensembl, "ENSG00000000000"], gene_id_kind="ensembl")
    assert audit.n_matched == 4 and audit.unmatched_examples == ("ENSG00000000000",)


# ---- real data ---------------------------------------------------------------------------------
def test_real_pc9_counts_tokenise(tmp_path: Path, pc9_counts_path: Path) -> None:
    adata = ad.read_h5ad(pc9_counts_path)
    genes = list(adata.var_names)
    write_tiny_checkpoint(tmp_path, genes=genes[::2])
    adapter = ScGPTAdapter(checkpoint=tmp_path, seed=0)
    audit = adapter.prepare(genes, gene_id_kind="symbol")
    assert audit.n_matched == len(genes[::2])
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(adata.n_obs))
    lengths = np.array([len(c["input_ids"]) for c in cells])
    n_in_vocab = np.asarray((x[:, ::2] > 0).sum(axis=1)).ravel()
    np.testing.assert_array_equal(lengths, np.minimum(n_in_vocab, 1199) + 1)
    assert (n_in_vocab > 1199).any()  # some real cells are subsampled
    assert all(c["values"][1:].min() >= 1 and c["values"][1:].max() <= 50 for c in cells)
    adapter.load("cpu")
    order = np.argsort(lengths)[:4]
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate([cells[i] for i in order]))
    assert torch.isfinite(emb).all()


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_targets_train_the_transformer_layers_only(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = ScGPTAdapter(checkpoint=folder, seed=0)
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    targets = adapter.lora_target_modules
    config = LoraConfig(r=2, target_modules=targets[0] if len(targets) == 1 else list(targets), init_lora_weights=False)
    adapter.model = get_peft_model(adapter.model, config)
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapter.model.named_parameters() if ".lora_A" in n})
    expected = sorted(f"base_model.model.transformer_encoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn.out_proj", "linear1", "linear2"))
    assert wrapped == expected  # value_encoder.linear1/2 are left alone
    batch = adapter.collate(adapter.tokenize(_counts(), np.arange(6)))
    adapter.embed(batch).sum().backward()  # embed() keeps gradients
    grads = {n: p.grad for n, p in adapter.model.named_parameters() if "lora_" in n and "out_proj" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_layers_match_stock_torch_transformer_layers(adapter: ScGPTAdapter) -> None:
    """The reference's non-flash path builds nn.TransformerEncoderLayer(batch_first=True): same names, same maths."""
    ours = adapter.model.transformer_encoder.layers[0]
    stock = torch.nn.TransformerEncoderLayer(32, 4, 64, 0.2, batch_first=True).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:], padding[2, 3:] = True, True
    with torch.inference_mode():
        expected, got = stock(x, src_key_padding_mask=padding), ours(x, padding)
    assert (expected - got)[~padding].abs().max() <= 1e-5


# ---- reference_quirks --------------------------------------------------------------------------
def reference_collator_tokens(folder: Path, dense: np.ndarray, seed: int, max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference DataCollator (binning + sampling) run in-process after seeding the global RNGs.

    ``np.random.rand`` breaks the ties and ``torch.randperm`` subsamples, both global, after the
    one int64 draw a DataLoader iterator makes; written from MODELS.md 2.3.
    """
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = np.array([vocab[g] for g in GENES])
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_()
    out = []
    for row in dense:
        nonzero = np.flatnonzero(row)
        genes = torch.from_numpy(np.insert(ids[nonzero], 0, vocab["<cls>"]))
        values = torch.from_numpy(np.insert(row[nonzero].astype(np.float32), 0, -2.0))
        x = values[1:].numpy()
        bins = np.quantile(x, np.linspace(0, 1, 50))
        left, right = np.digitize(x, bins), np.digitize(x, bins, right=True)
        values[1:] = torch.from_numpy(np.ceil(np.random.rand(len(x)) * (right - left) + left).astype(np.int64))
        if len(genes) > max_length:
            keep = torch.cat([torch.arange(1), torch.randperm(len(genes) - 1)[: max_length - 1] + 1])
            genes, values = genes[keep], values[keep]
        out.append((genes.numpy(), values.numpy()))
    return out


def test_reference_quirks_replay_the_collators_global_rng_in_cell_order(folder: Path) -> None:
    quirky = ScGPTAdapter(checkpoint=folder, seed=11, max_length=12, reference_quirks=True)
    quirky.prepare(GENES, gene_id_kind="symbol")
    x = _counts(n_cells=8, seed=2)
    chunked = quirky.tokenize(x[:3], np.arange(3)) + quirky.tokenize(x[3:], np.arange(3, 8))
    expected = reference_collator_tokens(folder, x.toarray(), seed=11, max_length=12)
    assert sum(len(g) == 12 for g, _ in expected) >= 3  # some cells really are subsampled
    for cell, (genes, values) in zip(chunked, expected):
        np.testing.assert_array_equal(cell["input_ids"], genes)
        np.testing.assert_array_equal(cell["values"], values)
    params = quirky.params()
    assert params["reference_quirks"] is True and "stream in cell order" in params["binning"]
    assert not getattr(quirky, "batch_dependent", False)  # a boolean padding mask, as in the reference


def test_reference_quirks_refuse_rows_out_of_stream_order(folder: Path) -> None:
    quirky = ScGPTAdapter(checkpoint=folder, seed=11, reference_quirks=True)
    quirky.prepare(GENES, gene_id_kind="symbol")
    x = _counts()
    with pytest.raises(InputDataError, match="row order from row 0.*workers=0"):
        quirky.tokenize(x, np.arange(6, 12))
    quirky.tokenize(x[:2], np.arange(2))
    with pytest.raises(InputDataError, match="consecutive rows"):
        quirky.tokenize(x[:2], np.array([2, 4]))
    with pytest.raises(InputDataError, match="must be True or False"):
        ScGPTAdapter(checkpoint=folder, reference_quirks=1)


@pytest.mark.slow
def test_parity_with_the_scgpt_package_collator(folder: Path) -> None:
    """Optional: the real scgpt DataCollator (pip install scgpt; its package __init__ is skipped)."""
    import importlib.util
    import logging
    import sys
    import types

    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scgpt is not installed")
    saved = {k: v for k, v in sys.modules.items() if k == "scgpt" or k.startswith("scgpt.")}
    package = types.ModuleType("scgpt")  # scgpt/__init__ needs torchtext, which cannot load on this torch
    package.__path__ = list(spec.submodule_search_locations)
    package.logger = logging.getLogger("scgpt")
    sys.modules["scgpt"] = package
    try:
        from scgpt.data_collator import DataCollator
    finally:
        for key in [k for k in sys.modules if k == "scgpt" or k.startswith("scgpt.")]:
            del sys.modules[key]
        sys.modules.update(saved)
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = np.array([vocab[g] for g in GENES])
    x = _counts(n_cells=8, seed=2)
    examples = []
    for row in x.toarray():
        nonzero = np.flatnonzero(row)
        examples.append({"genes": torch.from_numpy(np.insert(ids[nonzero], 0, vocab["<cls>"])).long(),
                         "expressions": torch.from_numpy(np.insert(row[nonzero], 0, -2.0)).float()})  # fmt: skip
    collator = DataCollator(do_padding=True, pad_token_id=vocab["<pad>"], pad_value=-2, do_mlm=False, do_binning=True,
                            max_length=12, sampling=True, keep_first_n_tokens=1)  # fmt: skip
    np.random.seed(11)
    torch.manual_seed(11)
    loader = torch.utils.data.DataLoader(examples, batch_size=3, collate_fn=collator, num_workers=0)
    batches = list(loader)
    quirky = ScGPTAdapter(checkpoint=folder, seed=11, max_length=12, reference_quirks=True)
    quirky.prepare(GENES, gene_id_kind="symbol")
    cells = quirky.tokenize(x, np.arange(8))
    genes = torch.cat([b["gene"] for b in batches])
    values = torch.cat([b["expr"] for b in batches])
    for i, cell in enumerate(cells):
        n = len(cell["input_ids"])
        np.testing.assert_array_equal(genes[i, :n].numpy(), cell["input_ids"])
        np.testing.assert_array_equal(values[i, :n].numpy(), cell["values"])


# ---- untrusted files ----------------------------------------------------------------------------
def test_a_planted_pickle_in_best_model_is_refused_without_running(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=GENES)
    state = torch.load(folder / "best_model.pt", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**state, "decoder.extra": RunsCode(marker)}, folder / "best_model.pt")
    with pytest.raises(CheckpointError, match=r"Refusing to load .*best_model\.pt.*system.*could run code"):
        ScGPTAdapter(checkpoint=folder).load("cpu")
    assert not marker.exists()


def test_numpy_values_and_saved_arguments_in_best_model_still_load(tmp_path: Path, folder: Path) -> None:
    copy = write_tiny_checkpoint(tmp_path / "ckpt", genes=GENES, seed=1)
    state = torch.load(copy / "best_model.pt", weights_only=True)
    extras = {"epoch": np.int64(3), "val_loss": np.float64(0.25), "gene_order": np.arange(4),
              "args": argparse.Namespace(lr=1e-4, nlayers=2)}  # what training scripts leave behind
    torch.save({**state, **extras}, copy / "best_model.pt")
    adapter = ScGPTAdapter(checkpoint=copy, seed=3)
    adapter.load("cpu")
    reference = ScGPTAdapter(checkpoint=folder, seed=3)
    reference.load("cpu")
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(adapter.model.state_dict()[key], value, rtol=0, atol=0)


# ---- speed paths: no mask for unpadded batches, half-precision weights on CUDA ----------------------
def test_an_unpadded_batch_runs_without_a_mask_and_gives_the_same_numbers(adapter: ScGPTAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(6))
    shortest = min(len(c["input_ids"]) for c in cells)
    equal = [{k: v[:shortest] for k, v in c.items()} for c in cells]  # <cls> + the first genes: equal lengths
    batch = adapter.collate(equal)
    assert batch["padding_mask"] is None  # decided in collate, on the CPU
    masked = {**batch, "padding_mask": torch.zeros(batch["input_ids"].shape, dtype=torch.bool)}
    with torch.inference_mode():
        assert (adapter.embed(batch) - adapter.embed(masked)).abs().max() == 0


def test_a_padded_batch_masks_exactly_its_pads(adapter: ScGPTAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(6))
    batch = adapter.collate(cells)
    lengths = torch.tensor([len(c["input_ids"]) for c in cells])
    torch.testing.assert_close(batch["padding_mask"], torch.arange(batch["input_ids"].shape[1])[None, :] >= lengths[:, None])


def test_half_precision_weights_only_for_cuda_autocast_runs(folder: Path, adapter: ScGPTAdapter) -> None:
    half = ScGPTAdapter(checkpoint=folder, seed=3)
    assert half.configure_precision("cpu", "bf16") == {} and half.weight_precision is None
    assert half.configure_precision("cuda", "fp32") == {} and half.weight_precision is None
    assert half.configure_precision("cuda:0", "bf16") == {"weights": "bf16"}
    assert half.params() == adapter.params()  # the runner records the weights' dtype beside params()
    half.load("cpu")  # the cast does not depend on the device: checked here on the CPU
    with pytest.raises(RuntimeError, match="before load"):
        half.configure_precision("cuda", "bf16")
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "norm" not in n} == {torch.bfloat16}
    half.prepare(GENES, gene_id_kind="symbol")
    batch = adapter.collate(adapter.tokenize(_counts(), np.arange(6)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, full = half.embed(batch), adapter.embed(batch)
    assert got.dtype == torch.float32 and (got - full).abs().max() <= 2e-2  # bf16 rounding, not other numbers


@pytest.mark.parametrize("max_length", [1200.5, "1200", True])
def test_non_integer_max_length_is_refused_not_truncated(folder: Path, max_length: object) -> None:
    # max_length=1200.5 became 1200 silently (int())
    with pytest.raises(InputDataError, match="max_length"):
        ScGPTAdapter(checkpoint=folder, max_length=max_length)  # type: ignore[arg-type]


def test_columns_of_one_vocabulary_gene_are_reported(tmp_path: Path) -> None:
    """Two columns mapping to GENE0 were two tokens of GENE0 (as the reference) and counted twice in n_matched,
    with nothing in the audit saying so (geneformer, scBERT, scFoundation report theirs)."""
    write_tiny_checkpoint(tmp_path, genes=GENES)
    adapter = ScGPTAdapter(checkpoint=tmp_path, seed=0)
    audit = adapter.prepare([*GENES[:5], GENES[0]], gene_id_kind="symbol")
    assert audit.n_matched == 6 and audit.extra["n_duplicate_columns_kept"] == 1
    tokens = adapter.tokenize(sp.csr_matrix(np.ones((1, 6), dtype=np.float32)), np.arange(1))[0]["input_ids"]
    assert len(tokens) == 1 + 6 and len(set(tokens[1:].tolist())) == 5  # <cls>, then GENE0 twice
    assert adapter.prepare(GENES[:5], gene_id_kind="symbol").extra["n_duplicate_columns_kept"] == 0
