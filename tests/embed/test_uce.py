"""UCE adapter: figshare file layout, cell sentences, token table, parity with a direct re-computation."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding._adapter import get_adapter
from scdm.embedding.models.uce import (
    N_CHROM_TOKENS,
    N_ESM2_TOKENS,
    UCEAdapter,
    write_tiny_checkpoint,
)
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from tests.untrusted import RunsCode

torch.set_num_threads(1)

GENES = [f"Gene{i}" for i in range(60)]  # mixed case on purpose: UCE matches upper-cased symbols
HUMAN_PROTEINS = "protein_embeddings/Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"
SAMPLE = 64  # genes per sentence in most tests (1024 in the real-data test)


def _counts(n_cells: int = 5, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(1.5, size=(n_cells, len(GENES))).astype(np.float32)
    dense[:, ::7] = 0
    dense[np.arange(n_cells), np.arange(n_cells) + 1] = 9.0
    return sp.csr_matrix(dense)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("uce"), genes=GENES, seed=4)


@pytest.fixture(scope="module")
def adapter(folder: Path) -> UCEAdapter:
    adapter = get_adapter("uce")(checkpoint=folder, seed=5, sample_size=SAMPLE)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    return adapter


def _embed(adapter: UCEAdapter, x: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(adapter.tokenize(x, rows)))


# ---- a direct re-computation from MODELS.md section 4, on the raw checkpoint files ---------------
def _linear(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def _layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def reference_embeddings(folder: Path, sentences: list[np.ndarray], *, float_pad_mask: bool = False, n_heads: int = 20) -> torch.Tensor:
    """evaluate.run_eval on one batch: pe -> L2 -> encoder x sqrt(d) -> + sinusoid -> layers -> decoder[CLS] -> L2.

    ``float_pad_mask`` reproduces the reference's ``src_key_padding_mask = 1 - mask`` (a float mask
    that PyTorch adds to the logits); without padding it has no effect.
    """
    state = torch.load(folder / "4layer_model.torch", weights_only=True)
    table = torch.load(folder / "all_tokens.torch", weights_only=True)  # the stored pe_embedding is zeros
    length = max(len(s) for s in sentences)
    ids = torch.zeros((len(sentences), length), dtype=torch.long)
    mask = torch.zeros((len(sentences), length))
    for i, s in enumerate(sentences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.as_tensor(s), 1.0
    x = torch.nn.functional.normalize(table[ids], dim=2)
    d = state["encoder.0.weight"].shape[0]
    x = _layer_norm(torch.nn.functional.gelu(_linear(x, state, "encoder.0")), state, "encoder.2") * math.sqrt(d)
    position = torch.arange(length)[:, None]
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    sinusoid = torch.zeros(length, d)
    sinusoid[:, 0::2], sinusoid[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    h = x + sinusoid
    bias = (1 - mask)[:, None, None, :] if float_pad_mask else torch.where(mask > 0, 0.0, float("-inf"))[:, None, None, :]
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer_encoder.layers.")})
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}"
        q, k, v = (h @ state[f"{p}.self_attn.in_proj_weight"].T + state[f"{p}.self_attn.in_proj_bias"]).split(d, dim=-1)
        q, k, v = (t.view(len(sentences), length, n_heads, d // n_heads).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // n_heads) + bias
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(len(sentences), length, d)
        h = _layer_norm(h + _linear(attn, state, f"{p}.self_attn.out_proj"), state, f"{p}.norm1")
        h = _layer_norm(h + _linear(torch.relu(_linear(h, state, f"{p}.linear1")), state, f"{p}.linear2"), state, f"{p}.norm2")
    out = h[:, 0]
    for j in range(3):
        out = torch.nn.functional.gelu(_layer_norm(_linear(out, state, f"decoder.{j}.0"), state, f"decoder.{j}.1"))
    return torch.nn.functional.normalize(_linear(out, state, "decoder.3"), dim=1)


# ---- loading -----------------------------------------------------------------------------------
def _as_loaded(table: torch.Tensor) -> torch.Tensor:
    """The token table as the loaded model holds it: rows L2-normalised once at load (the forward's first step)."""
    return torch.nn.functional.normalize(table, dim=-1)


def test_token_table_comes_from_all_tokens_when_the_stored_one_is_zeros(folder: Path, adapter: UCEAdapter) -> None:
    assert not torch.load(folder / "4layer_model.torch", weights_only=True)["pe_embedding.weight"].any()
    table = torch.load(folder / "all_tokens.torch", weights_only=True)
    torch.testing.assert_close(adapter.model.pe_embedding.weight, _as_loaded(table), rtol=0, atol=0)
    assert not adapter.model.pe_embedding.weight.requires_grad
    assert adapter.chrom_token_offset() == 7 + len(GENES)  # mouse genes, human genes, then chromosomes


def test_a_stored_token_table_of_another_size_is_replaced_by_all_tokens(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES, store_token_table=True)
    state = torch.load(tmp_path / "4layer_model.torch", weights_only=True)
    state["pe_embedding.weight"] = 1 + state["pe_embedding.weight"]  # tell the two tables apart, also once normalised
    torch.save(state, tmp_path / "4layer_model.torch")
    adapter = UCEAdapter(checkpoint=tmp_path)
    adapter.load("cpu")
    # evaluate.py keeps the stored table only at exactly 145,469 rows: same size is not enough
    table = torch.load(tmp_path / "all_tokens.torch", weights_only=True)
    torch.testing.assert_close(adapter.model.pe_embedding.weight, _as_loaded(table), rtol=0, atol=0)


@pytest.mark.parametrize("esm2_only", [False, True])
def test_at_the_released_size_the_stored_token_table_is_kept(tmp_path: Path, esm2_only: bool) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES, store_token_table=True, released_token_rows=True)
    state = torch.load(tmp_path / "4layer_model.torch", weights_only=True)
    assert state["pe_embedding.weight"].shape[0] == N_ESM2_TOKENS + N_CHROM_TOKENS == 145_469
    state["pe_embedding.weight"] = 1 + state["pe_embedding.weight"]  # tell the two tables apart, also once normalised
    torch.save(state, tmp_path / "4layer_model.torch")
    if esm2_only:  # all_tokens.torch without chromosome rows: evaluate.py appends 1,895 and keeps the stored table
        tokens = torch.load(tmp_path / "all_tokens.torch", weights_only=True)
        torch.save(tokens[:N_ESM2_TOKENS].clone(), tmp_path / "all_tokens.torch")
    adapter = UCEAdapter(checkpoint=tmp_path)
    before = torch.random.get_rng_state()
    adapter.load("cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # loading leaves the global RNG alone
    torch.testing.assert_close(adapter.model.pe_embedding.weight, _as_loaded(state["pe_embedding.weight"]), rtol=0, atol=0)
    assert adapter.chrom_token_offset() == N_ESM2_TOKENS


def test_a_non_standard_stored_table_at_the_released_size_is_refused(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES, released_token_rows=True)  # stored table: zeros
    with pytest.raises(CheckpointError, match="all zeros.*meaningless"):
        UCEAdapter(checkpoint=tmp_path).load("cpu")
    state = torch.load(tmp_path / "4layer_model.torch", weights_only=True)
    state["pe_embedding.weight"] = torch.ones((1000, state["pe_embedding.weight"].shape[1]))
    torch.save(state, tmp_path / "4layer_model.torch")
    with pytest.raises(CheckpointError, match="stores a 1,000-row token table.*145,469"):
        UCEAdapter(checkpoint=tmp_path).load("cpu")


def test_pretraining_heads_have_the_reference_layout(folder: Path) -> None:
    state = torch.load(folder / "4layer_model.torch", weights_only=True)
    heads = {k: tuple(v.shape) for k, v in state.items() if k.startswith("binary_decoder.")}
    out = state["decoder.3.weight"].shape[0]
    # model.py: full_block(output_dim + 1280, 2048), full_block(2048, 512), full_block(512, 128), Linear(128, 1)
    expected = {}
    for j, (n_in, n_out) in enumerate([(out + 1280, 2048), (2048, 512), (512, 128)]):
        expected |= {f"binary_decoder.{j}.0.weight": (n_out, n_in), f"binary_decoder.{j}.0.bias": (n_out,),
                     f"binary_decoder.{j}.1.weight": (n_out,), f"binary_decoder.{j}.1.bias": (n_out,)}
    expected |= {"binary_decoder.3.weight": (1, 128), "binary_decoder.3.bias": (1,)}
    assert heads == expected
    d, token_dim = state["encoder.0.weight"].shape
    gene_layer = {k: tuple(v.shape) for k, v in state.items() if k.startswith("gene_embedding_layer.")}
    assert gene_layer == {"gene_embedding_layer.0.weight": (d, token_dim), "gene_embedding_layer.0.bias": (d,),
                          "gene_embedding_layer.2.weight": (d,), "gene_embedding_layer.2.bias": (d,)}


def test_33_layer_variant_uses_its_own_file(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES, variant="33layer", n_layers=3)
    adapter = UCEAdapter(checkpoint=tmp_path, variant="33layer")
    adapter.check_checkpoint()
    assert adapter.architecture()["n_layers"] == 3
    with pytest.raises(CheckpointError, match="4layer_model.torch"):
        UCEAdapter(checkpoint=tmp_path, variant="4layer").check_checkpoint()


@pytest.mark.parametrize("missing", ["4layer_model.torch", "all_tokens.torch", "species_chrom.csv", "species_offsets.pkl", HUMAN_PROTEINS])
def test_missing_file_names_the_file(tmp_path: Path, missing: str) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES)
    (tmp_path / missing).unlink()
    name = "Homo_sapiens" if missing == HUMAN_PROTEINS else missing.replace(".", r"\.")
    with pytest.raises(CheckpointError, match=name):
        UCEAdapter(checkpoint=tmp_path).check_checkpoint()


def test_wrong_head_count_is_a_checkpoint_error(folder: Path) -> None:
    with pytest.raises(CheckpointError, match="nhead=3"):
        UCEAdapter(checkpoint=folder, nhead=3).load("cpu")


# ---- cell sentences ----------------------------------------------------------------------------
def _gene_info(folder: Path, species: str = "human") -> pd.DataFrame:
    """Token row, chromosome code and start per upper-cased symbol, straight from the files."""
    offsets = pickle.loads((folder / "species_offsets.pkl").read_bytes())
    proteins = torch.load(folder / HUMAN_PROTEINS, weights_only=True)
    chroms = pd.read_csv(folder / "species_chrom.csv", dtype={"chromosome": str})
    chroms["code"] = pd.Categorical(chroms["species"] + "_" + chroms["chromosome"]).codes
    spec = chroms[chroms["species"] == species].set_index("gene_symbol")
    token = {g.upper(): offsets[species] + i for i, g in enumerate(proteins)}
    return pd.DataFrame({"token": token}).join(spec[["code", "start"]])


def test_sentences_follow_the_reference_layout(folder: Path, adapter: UCEAdapter) -> None:
    info = _gene_info(folder)
    by_token = info.set_index("token")
    offset = adapter.chrom_token_offset()
    x = _counts()
    dense = x.toarray()
    for i, cell in enumerate(adapter.tokenize(x, np.arange(5))):
        s = cell["input_ids"]
        assert s[0] == 3 and s[-1] == 2  # CLS first, a chromosome closes last
        opens = np.flatnonzero(s >= offset)
        closes = np.flatnonzero(s == 2)
        assert len(opens) == len(closes) and (closes[:-1] + 1 == opens[1:]).all()
        assert len(set(s[opens])) == len(opens)  # each chromosome once
        genes = np.concatenate([s[o + 1 : c] for o, c in zip(opens, closes)])
        assert len(genes) == SAMPLE
        expressed = {info.loc[GENES[j].upper(), "token"] for j in np.flatnonzero(dense[i])}
        assert set(genes) <= expressed  # only genes with counts are sampled
        for o, c in zip(opens, closes):
            block = by_token.loc[s[o + 1 : c]]
            assert (block["code"] + offset == s[o]).all()  # every gene sits on its chromosome
            assert (np.diff(block["start"].to_numpy()) >= 0).all()  # in genomic order


def test_sampling_frequency_follows_log1p_counts(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=GENES, seed=4, max_len=20100)  # room for a long sentence
    adapter = UCEAdapter(checkpoint=folder, sample_size=20000, seed=1)
    adapter.prepare(GENES, gene_id_kind="symbol")
    counts = np.zeros((1, len(GENES)), dtype=np.float32)
    counts[0, :6] = [1, 3, 10, 100, 0, 2.9]  # 2.9 truncates to 2, as the reference's int64 store does
    sentence = adapter.tokenize(sp.csr_matrix(counts), np.array([0]))[0]["input_ids"]
    info = _gene_info(folder)
    tokens = [info.loc[g.upper(), "token"] for g in GENES[:6]]
    observed = np.array([(sentence == t).sum() for t in tokens]) / 20000
    expected = np.log1p([1, 3, 10, 100, 0, 2]) / np.log1p([1, 3, 10, 100, 0, 2]).sum()
    np.testing.assert_allclose(observed, expected, atol=0.015)


def test_tokenize_is_deterministic_and_chunk_independent(adapter: UCEAdapter) -> None:
    x = _counts()
    rows = np.arange(20, 25)
    once = adapter.tokenize(x, rows)
    chunked = adapter.tokenize(x[:3], rows[:3]) + adapter.tokenize(x[3:], rows[3:])
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(once, chunked))
    shifted = adapter.tokenize(x, rows + 1)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(once, shifted))


# ---- embeddings --------------------------------------------------------------------------------
def test_embedding_shape_dtype_and_norm(adapter: UCEAdapter) -> None:
    emb = _embed(adapter, _counts(), np.arange(5))
    assert emb.shape == (5, adapter.emb_dim) == (5, 24)
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))


def test_parity_with_direct_unbatched_recomputation(folder: Path, adapter: UCEAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(5))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # the batch really is padded
    with torch.inference_mode():
        batched = adapter.embed(adapter.collate(cells))
    for i, cell in enumerate(cells):
        expected = reference_embeddings(folder, [cell["input_ids"]])[0]
        assert (batched[i] - expected).abs().max() <= 1e-5


def test_batch_composition_does_not_change_a_cell(adapter: UCEAdapter) -> None:
    x = _counts()
    rows = np.arange(5)
    together = _embed(adapter, x, rows)
    alone = torch.cat([_embed(adapter, x[i], rows[i : i + 1]) for i in range(5)])
    assert (together - alone).abs().max() <= 1e-5


def test_reference_float_mask_is_batch_dependent_ours_is_not(folder: Path, adapter: UCEAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(5))
    sentences = sorted((c["input_ids"] for c in cells), key=len)
    assert len(sentences[0]) < len(sentences[-1])
    alone = reference_embeddings(folder, [sentences[0]])[0]
    padded_reference = reference_embeddings(folder, [sentences[0], sentences[-1]], float_pad_mask=True)[0]
    with torch.inference_mode():
        padded_ours = adapter.embed(adapter.collate([{"input_ids": sentences[0]}, {"input_ids": sentences[-1]}]))[0]
    assert (padded_reference - alone).abs().max() > 1e-4  # pads leak into the reference's attention
    assert (padded_ours - alone).abs().max() <= 1e-5


# ---- genes and bad input -----------------------------------------------------------------------
def test_genes_match_case_insensitively_and_need_a_chromosome(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path, genes=GENES)
    chroms = pd.read_csv(tmp_path / "species_chrom.csv", dtype={"chromosome": str})
    chroms[chroms["gene_symbol"] != "GENE5"].to_csv(tmp_path / "species_chrom.csv", index=False)
    audit = UCEAdapter(checkpoint=tmp_path).prepare(["gene1", "GENE2", "Gene5", "Other"], gene_id_kind="symbol")
    assert audit.n_matched == 2 and audit.extra["n_without_chromosome"] == 1
    assert audit.unmatched_examples == ("Gene5", "Other")


def test_other_species_use_their_offset(folder: Path) -> None:
    adapter = UCEAdapter(checkpoint=folder, species="mouse", sample_size=16)
    adapter.prepare([f"Mmgene{i}" for i in range(7)], gene_id_kind="symbol")
    sentence = adapter.tokenize(sp.csr_matrix(np.ones((1, 7), dtype=np.float32)), np.array([0]))[0]["input_ids"]
    is_chrom = sentence >= adapter.chrom_token_offset()
    assert len(sentence) == 1 + 16 + 2 * is_chrom.sum()
    assert set(sentence[1:][~is_chrom[1:]]) <= set(range(7))  # mouse rows come first in the tiny table


def test_wrong_gene_id_kind_is_a_gene_mapping_error(folder: Path) -> None:
    with pytest.raises(GeneMappingError, match="gene id type"):
        UCEAdapter(checkpoint=folder).prepare([f"ENSG{i:011d}" for i in range(60)], gene_id_kind="symbol")


def test_negative_counts_are_refused(adapter: UCEAdapter) -> None:
    x = _counts()
    x.data[3] = -4.0
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x, np.arange(5))


def test_cell_without_counts_is_refused(adapter: UCEAdapter) -> None:
    with pytest.raises(InputDataError, match="row 9"):
        adapter.tokenize(sp.csr_matrix(np.full((1, len(GENES)), 0.5, dtype=np.float32)), np.array([9]))  # truncates to 0


# ---- real data ---------------------------------------------------------------------------------
def test_real_pc9_counts_tokenise(tmp_path: Path, pc9_counts_path: Path) -> None:
    adata = ad.read_h5ad(pc9_counts_path)
    genes = list(adata.var_names)
    write_tiny_checkpoint(tmp_path, genes=genes[::2])
    adapter = UCEAdapter(checkpoint=tmp_path, seed=0)  # 1024 sampled genes, as released
    audit = adapter.prepare(genes, gene_id_kind="symbol")
    assert audit.n_matched >= len(genes[::2])
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(adata.n_obs))
    lengths = np.array([len(c["input_ids"]) for c in cells])
    n_chroms = np.array([(c["input_ids"] >= adapter.chrom_token_offset()).sum() for c in cells])
    np.testing.assert_array_equal(lengths, 1 + 1024 + 2 * n_chroms)
    assert lengths.max() <= 1536
    adapter.load("cpu")
    with torch.inference_mode():
        emb = adapter.embed(adapter.collate(cells[:2]))
    assert torch.isfinite(emb).all()


# ---- LoRA --------------------------------------------------------------------------------------
def test_lora_targets_the_transformer_layers(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = UCEAdapter(checkpoint=folder, sample_size=SAMPLE)
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    adapter.model = get_peft_model(adapter.model, LoraConfig(r=2, target_modules=list(adapter.lora_target_modules), init_lora_weights=False))
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapter.model.named_parameters() if ".lora_A" in n})
    assert wrapped == sorted(f"base_model.model.transformer_encoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn.out_proj", "linear1", "linear2"))
    adapter.embed(adapter.collate(adapter.tokenize(_counts(), np.arange(5)))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.model.named_parameters() if "lora_" in n and "out_proj" in n)


def test_layers_match_stock_seq_first_torch_transformer_layers(adapter: UCEAdapter) -> None:
    """UCE uses nn.TransformerEncoderLayer(d, nhead, d_hid, dropout) (sequence first): same names, same maths."""
    ours = adapter.model.transformer_encoder.layers[1]
    stock = torch.nn.TransformerEncoderLayer(40, 20, 48, 0.05).eval()
    stock.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 9, 40, generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:], padding[2, 3:] = True, True
    with torch.inference_mode():
        expected, got = stock(x.transpose(0, 1), src_key_padding_mask=padding).transpose(0, 1), ours(x, padding)
    assert (expected - got)[~padding].abs().max() <= 1e-5


# ---- reference_quirks --------------------------------------------------------------------------
def reference_sentences(folder: Path, dense: np.ndarray, seed: int, sample_size: int, chrom_offset: int) -> list[np.ndarray]:
    """eval_data.sample_cell_sentences after ``np.random.seed(seed)``, cell after cell, on the full rows.

    Written from MODELS.md 4.3 with the global numpy RNG, over every dataset gene (zeros included,
    as the reference's int64 memmap rows are).
    """
    info = _gene_info(folder)
    upper = [g.upper() for g in GENES]
    tokens, chroms, starts = (info.loc[upper, c].to_numpy() for c in ("token", "code", "start"))
    np.random.seed(seed)
    out = []
    for row in dense:
        counts = torch.tensor(np.trunc(row).astype(np.int64)).unsqueeze(0)
        weights = torch.log1p(counts)
        weights = (weights / torch.sum(weights))[0].numpy()
        weights = weights / sum(weights)
        choice = np.random.choice(np.arange(len(weights)), size=sample_size, p=weights, replace=True)
        choice = choice[np.argsort(chroms[choice])]
        new_chrom, chosen_starts = chroms[choice], starts[choice]
        sentence = [3]
        unique = np.unique(new_chrom)
        np.random.shuffle(unique)
        for chrom in unique:
            loc = np.where(new_chrom == chrom)[0]
            sentence += [int(chrom) + chrom_offset, *tokens[choice[loc[np.argsort(chosen_starts[loc])]]], 2]
        out.append(np.asarray(sentence))
    return out


@pytest.fixture()
def quirky(folder: Path) -> UCEAdapter:
    adapter = UCEAdapter(checkpoint=folder, seed=7, sample_size=SAMPLE, reference_quirks=True)
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    return adapter


def test_reference_quirks_replay_the_global_numpy_stream_in_cell_order(folder: Path, quirky: UCEAdapter) -> None:
    x = _counts(n_cells=6, seed=3)
    chunked = quirky.tokenize(x[:4], np.arange(4)) + quirky.tokenize(x[4:], np.arange(4, 6))
    expected = reference_sentences(folder, x.toarray(), 7, SAMPLE, quirky.chrom_token_offset())
    assert all(np.array_equal(c["input_ids"], e) for c, e in zip(chunked, expected))
    again = quirky.tokenize(x, np.arange(6))  # row 0 restarts the stream
    assert all(np.array_equal(a["input_ids"], c["input_ids"]) for a, c in zip(again, chunked))
    assert quirky.params()["reference_quirks"] is True and quirky.batch_dependent is True


def test_reference_quirks_refuse_rows_out_of_stream_order(quirky: UCEAdapter) -> None:
    x = _counts()
    with pytest.raises(InputDataError, match="row order from row 0.*workers=0"):
        quirky.tokenize(x, np.arange(10, 15))
    quirky.tokenize(x, np.arange(5))
    with pytest.raises(InputDataError, match="got rows from 7 after row 4"):
        quirky.tokenize(x, np.arange(7, 12))


def test_reference_quirks_add_the_float_padding_mask(folder: Path, quirky: UCEAdapter) -> None:
    cells = quirky.tokenize(_counts(), np.arange(5))
    assert len({len(c["input_ids"]) for c in cells}) > 1
    with torch.inference_mode():
        batched = quirky.embed(quirky.collate(cells))
    expected = reference_embeddings(folder, [c["input_ids"] for c in cells], float_pad_mask=True)
    assert (batched - expected).abs().max() <= 1e-5


def test_reference_quirks_must_be_a_bool(folder: Path) -> None:
    with pytest.raises(InputDataError, match="reference_quirks='yes' must be True or False"):
        UCEAdapter(checkpoint=folder, reference_quirks="yes")


# ---- untrusted files ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["4layer_model.torch", "all_tokens.torch", HUMAN_PROTEINS, "species_offsets.pkl"])
def test_a_planted_pickle_is_refused_without_running(tmp_path: Path, name: str) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=GENES)
    marker = tmp_path / "pwned"
    if name.endswith(".pkl"):
        (folder / name).write_bytes(pickle.dumps({"mouse": 0, "human": RunsCode(marker)}))
    elif name == "all_tokens.torch":
        torch.save(RunsCode(marker), folder / name)
    else:
        content = torch.load(folder / name, weights_only=True)
        torch.save({**content, "extra": RunsCode(marker)}, folder / name)
    adapter = UCEAdapter(checkpoint=folder, sample_size=SAMPLE)
    with pytest.raises(CheckpointError, match=rf"Refusing to load .*{Path(name).name.replace('.', r'.')}.*system"):
        adapter.load("cpu")
        adapter.prepare(GENES, gene_id_kind="symbol")
    assert not marker.exists()


def test_species_offsets_with_numpy_integers_load_and_other_content_is_refused(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=GENES)
    (folder / "species_offsets.pkl").write_bytes(pickle.dumps({"mouse": np.int64(0), "human": np.int64(7)}, protocol=2))
    adapter = UCEAdapter(checkpoint=folder, sample_size=SAMPLE)
    assert adapter.prepare(GENES, gene_id_kind="symbol").n_matched == len(GENES)
    (folder / "species_offsets.pkl").write_bytes(pickle.dumps({"mouse": 0, "human": "seven"}))
    with pytest.raises(CheckpointError, match="not a dict of species name -> integer row offset"):
        UCEAdapter(checkpoint=folder, sample_size=SAMPLE).prepare(GENES, gene_id_kind="symbol")


# ---- speed paths: no mask for unpadded batches, the token table normalised once, half-precision weights
@pytest.mark.parametrize("quirks", [False, True])
def test_an_unpadded_batch_runs_without_a_mask_and_gives_the_same_numbers(folder: Path, quirks: bool) -> None:
    adapter = UCEAdapter(checkpoint=folder, seed=7, sample_size=SAMPLE, reference_quirks=quirks)
    adapter.load("cpu")
    adapter.prepare(GENES, gene_id_kind="symbol")
    cells = adapter.tokenize(_counts(), np.arange(5))
    shortest = min(len(c["input_ids"]) for c in cells)
    batch = adapter.collate([{"input_ids": c["input_ids"][:shortest]} for c in cells])
    assert batch["padding_mask"] is None  # decided in collate, on the CPU
    masked = {**batch, "padding_mask": torch.zeros(batch["input_ids"].shape, dtype=torch.bool)}  # quirks: a float mask of 0
    with torch.inference_mode():
        assert (adapter.embed(batch) - adapter.embed(masked)).abs().max() == 0


def test_a_padded_batch_masks_exactly_its_pads(adapter: UCEAdapter) -> None:
    cells = adapter.tokenize(_counts(), np.arange(5))
    batch = adapter.collate(cells)
    lengths = torch.tensor([len(c["input_ids"]) for c in cells])
    torch.testing.assert_close(batch["padding_mask"], torch.arange(batch["input_ids"].shape[1])[None, :] >= lengths[:, None])


def test_the_token_table_normalised_at_load_gives_the_per_forward_numbers(folder: Path, adapter: UCEAdapter) -> None:
    import copy

    assert adapter.model.tokens_normalised
    per_forward = copy.deepcopy(adapter.model)  # as before: the raw table, each looked-up row normalised in forward
    per_forward.pe_embedding.weight = torch.nn.Parameter(torch.load(folder / "all_tokens.torch", weights_only=True), requires_grad=False)
    per_forward.tokens_normalised = False
    batch = adapter.collate(adapter.tokenize(_counts(), np.arange(5)))
    with torch.inference_mode():
        assert (adapter.embed(batch) - per_forward(batch["input_ids"], batch["padding_mask"])).abs().max() <= 1e-6


def test_half_precision_weights_only_for_cuda_autocast_runs(folder: Path, adapter: UCEAdapter) -> None:
    half = UCEAdapter(checkpoint=folder, seed=5, sample_size=SAMPLE)
    assert half.configure_precision("cpu", "bf16") == {} and half.weight_precision is None
    assert half.configure_precision("cuda", "bf16") == {"weights": "bf16"}
    assert half.params() == adapter.params()  # the runner records the weights' dtype beside params()
    half.load("cpu")  # the cast does not depend on the device: checked here on the CPU
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    norms = {n for n, m in half.model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {d for n, d in dtypes.items() if n.rsplit(".", 1)[0] in norms} == {torch.float32}
    assert {d for n, d in dtypes.items() if n.rsplit(".", 1)[0] not in norms} == {torch.bfloat16}
    assert half.model.pos_encoder.pe.dtype == torch.float32  # buffers keep their dtype
    torch.testing.assert_close(half.model.pe_embedding.weight, adapter.model.pe_embedding.weight.bfloat16(), rtol=0, atol=0)
    half.prepare(GENES, gene_id_kind="symbol")
    batch = adapter.collate(adapter.tokenize(_counts(), np.arange(5)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, full = half.embed(batch), adapter.embed(batch)
    assert got.dtype == torch.float32 and (got - full).abs().max() <= 2e-2  # bf16 rounding, not other numbers


@pytest.mark.parametrize("option", [{"sample_size": 1.5}, {"sample_size": "1024"}, {"nhead": 20.0}, {"nhead": True}])
def test_non_integer_sizes_are_refused_not_truncated(folder: Path, option: dict) -> None:
    # sample_size=1.5 became 1 silently (int()), and a string size was accepted
    with pytest.raises(InputDataError, match=next(iter(option))):
        UCEAdapter(checkpoint=folder, **option)


def test_columns_of_one_gene_are_reported(tmp_path: Path) -> None:
    """'gene1' and 'GENE1' match one gene (UCE upper-cases symbols): both were sampled as genes and counted in
    n_matched, with nothing in the audit saying so (geneformer, scBERT, scFoundation report theirs)."""
    write_tiny_checkpoint(tmp_path, genes=GENES)
    audit = UCEAdapter(checkpoint=tmp_path).prepare(["gene1", "GENE1", "Gene2", "Other"], gene_id_kind="symbol")
    assert audit.n_matched == 3 and audit.extra["n_duplicate_columns_kept"] == 1
    assert UCEAdapter(checkpoint=tmp_path).prepare(["gene1", "Gene2"], gene_id_kind="symbol").extra["n_duplicate_columns_kept"] == 0
