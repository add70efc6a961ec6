"""tGPT adapter: tiny official-format checkpoints, parity with the reference README recipe."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding import get_adapter
from scdm.embedding.models.tgpt import TGPTAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from scdm.store.genes import gene_table, map_genes

torch.set_num_threads(1)

N_GENES = 90


@pytest.fixture(scope="module")
def symbols() -> list[str]:
    table = gene_table()
    table = table[table["ensembl"] != ""]
    plain = list(dict.fromkeys(table["symbol"]))[: N_GENES - 3]
    # symbols with "-" and "." exercise the reference's "_" spelling (HLA-B -> HLA_B)
    return [*plain, "HLA-B", "NKX3-2", "LL22NC03-63E9.3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, symbols: list[str]) -> Path:
    # the vocabulary lacks the last 10 plain symbols: they must be dropped, not become <unk>
    genes = symbols[: N_GENES - 13] + symbols[-3:]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tgpt"), genes=genes, initializer_range=0.5)


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.uniform(0.05, 3.0, size=(n_cells, 1)), size=(n_cells, n_genes)).astype(np.float32)
    return sp.csr_matrix(dense)


def _ready(folder: Path, symbols: list[str], **params) -> TGPTAdapter:
    adapter = TGPTAdapter(folder, **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(symbols, gene_id_kind="symbol")
    return adapter


def _run(adapter: TGPTAdapter, cells: list[dict[str, np.ndarray]]) -> np.ndarray:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(cells)).numpy()


# ---- the reference recipe (deeplearningplus/tGPT README), written out ---------------------------


def reference_lines(dense: np.ndarray, symbols: list[str], vocab: set[str], n_genes: int) -> list[str]:
    """Gene-ranking lines: vocabulary genes by expression, descending, ``-``/``.`` -> ``_``.

    The reference starts from ranking files and names no tie rule; ties here follow scdm's (the word).
    """
    regex = re.compile(r"\-|\.")
    lines = []
    for row in dense:
        ranked = sorted((-row[j], regex.sub("_", symbols[j])) for j in np.flatnonzero(row > 0))
        lines.append(" ".join([w for _, w in ranked if w in vocab][:n_genes]))
    return lines


def reference_embedding(folder: Path, lines: list[str], max_len: int = 64) -> np.ndarray:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>")
    model = GPT2LMHeadModel.from_pretrained(folder, output_hidden_states=True, attn_implementation="eager").transformer.eval()
    batch = tokenizer(lines, max_length=max_len, truncation=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    eos_idx = batch["attention_mask"].sum(dim=1) - 1
    return torch.stack([hidden[j, 1 : int(eos_idx[j])].mean(dim=0) for j in range(len(lines))]).numpy()


def _vocab(folder: Path) -> set[str]:
    from tokenizers import Tokenizer

    return set(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()) - {"<pad>", "</b>", "</s>", "<unk>"}


# ---- tests ---------------------------------------------------------------------------------------


def test_registered() -> None:
    assert get_adapter("tgpt") is TGPTAdapter


def test_tokens_follow_the_reference(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(6, N_GENES, seed=1).tolil()
    x[0, N_GENES - 3] = 1000.0  # HLA-B first in cell 0
    x = x.tocsr()
    cells = adapter.tokenize(x, np.arange(6))
    lines = reference_lines(x.toarray(), symbols, _vocab(ckpt), 62)
    assert lines[0].split()[0] == "HLA_B"
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    expected = tokenizer(lines, max_length=64, truncation=True)["input_ids"]
    for cell, ref in zip(cells, expected):
        np.testing.assert_array_equal(cell["input_ids"], ref)
    assert all(c["input_ids"][0] == 1 and c["input_ids"][-1] == 2 for c in cells)
    assert 3 not in np.concatenate([c["input_ids"] for c in cells])  # no <unk>
    assert max(len(c["input_ids"]) for c in cells) == 64


def test_parity_with_reference_recipe(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(7, N_GENES, seed=2)
    cells = adapter.tokenize(x, np.arange(7))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # a padded batch
    got = _run(adapter, cells)
    expected = reference_embedding(ckpt, reference_lines(x.toarray(), symbols, _vocab(ckpt), 62))
    assert got.shape == (7, adapter.emb_dim) == (7, 32) and got.dtype == np.float32
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5


def test_batch_composition_does_not_change_embeddings(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    cells = adapter.tokenize(_counts(6, N_GENES, seed=3), np.arange(6))
    alone = np.concatenate([_run(adapter, [c]) for c in cells])
    np.testing.assert_allclose(_run(adapter, cells), alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_run(adapter, [cells[5], cells[1]]), alone[[5, 1]], atol=1e-5, rtol=0)


def test_tokenize_deterministic_and_scale_invariant(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(5, N_GENES, seed=4)
    first = adapter.tokenize(x, np.arange(5))
    again = adapter.tokenize(x, np.arange(5))
    lognorm = sp.csr_matrix(np.log1p(x.toarray() / x.toarray().sum(1, keepdims=True) * 1e4).astype(np.float32))
    scaled = adapter.tokenize(lognorm, np.arange(5))
    for a, b, c in zip(first, again, scaled):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["input_ids"], c["input_ids"])


def test_max_length_128_variant(tmp_path, symbols) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols, n_positions=128)
    adapter = _ready(folder, symbols, max_length=80)
    cells = adapter.tokenize(sp.csr_matrix(_counts(3, N_GENES, seed=5).toarray() + 1), np.arange(3))  # every gene expressed
    assert [len(c["input_ids"]) for c in cells] == [80, 80, 80]
    assert adapter.params() == {"max_length": 80, "tie_break": "descending value, then vocabulary word"}


def test_tied_genes_do_not_depend_on_the_datasets_column_order(ckpt, symbols) -> None:
    # Drop-seq-like cells: most counts 1 or 2, so the 62-gene cut falls inside a tie; before, tied genes
    # kept column order and the same cells in another column order (another study) got other tokens
    x = sp.csr_matrix(np.minimum(_counts(6, N_GENES, seed=7).toarray(), 2))
    shuffled = np.random.default_rng(0).permutation(N_GENES)
    adapter, other = _ready(ckpt, symbols), _ready(ckpt, [symbols[j] for j in shuffled])
    cells = adapter.tokenize(x, np.arange(6))
    moved = other.tokenize(sp.csr_matrix(x[:, shuffled]), np.arange(6))
    assert max(len(c["input_ids"]) for c in cells) == 64  # the cut is reached
    for a, b in zip(cells, moved):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(_run(adapter, cells), _run(other, moved))
    words = adapter.tokenizer_.decode(cells[0]["input_ids"][1:-1].tolist()).split()
    ones = [w for w, v in zip(words, sorted(x[0].data, reverse=True)) if v == 1]
    assert ones == sorted(ones)  # genes of one count are listed by their vocabulary word


def test_ensembl_input_is_mapped_to_symbols(ckpt, symbols) -> None:
    ensembl = [e if e is not None else f"ENSG0000000000{i}" for i, e in enumerate(map_genes(symbols, src="symbol", dst="ensembl"))]
    adapter = TGPTAdapter(ckpt)
    audit = adapter.prepare(ensembl, gene_id_kind="ensembl")
    assert audit.n_matched >= 70


def test_legacy_bin_with_attn_bias_buffers_loads(tmp_path, symbols) -> None:
    safetensors = write_tiny_checkpoint(tmp_path / "st", genes=symbols, seed=5)
    legacy = write_tiny_checkpoint(tmp_path / "bin", genes=symbols, seed=5, legacy_bin=True)
    x = _counts(3, N_GENES, seed=6)
    a, b = _ready(safetensors, symbols), _ready(legacy, symbols)
    np.testing.assert_array_equal(_run(a, a.tokenize(x, np.arange(3))), _run(b, b.tokenize(x, np.arange(3))))


def test_cell_without_vocabulary_genes_gives_zeros(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(2, N_GENES, seed=7).tolil()
    x[1, :] = 0
    cells = adapter.tokenize(x.tocsr(), np.arange(2))
    assert list(cells[1]["input_ids"]) == [1, 2]
    emb = _run(adapter, cells)
    assert np.isfinite(emb).all() and not emb[1].any()


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_raises_checkpoint_error(tmp_path, symbols, missing: str) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols[:20])
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(missing)):
        TGPTAdapter(folder).check_checkpoint()


def test_wrong_gene_id_kind_raises(ckpt, symbols) -> None:
    with pytest.raises(GeneMappingError, match="Only 0 of"):
        TGPTAdapter(ckpt).prepare(symbols, gene_id_kind="ensembl")


def test_negative_values_raise(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(2, N_GENES).tolil()
    x[0, 3] = -0.5
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x.tocsr(), np.arange(2))


def test_lora_targets_train_through_embed(ckpt, symbols) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = _ready(ckpt, symbols)
    config = LoraConfig(r=2, target_modules=list(TGPTAdapter.lora_target_modules), fan_in_fan_out=True)
    adapter.model = get_peft_model(adapter.model, config)
    emb = adapter.embed(adapter.collate(adapter.tokenize(_counts(2, N_GENES), np.arange(2))))
    emb.sum().backward()
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in adapter.model.named_parameters() if "lora_" in n and p.grad is not None}
    assert lora == {"c_attn", "c_proj", "c_fc"}


def test_a_scaled_dataset_is_refused_before_the_model_loads_and_leaves_no_embedding(tmp_path, monkeypatch) -> None:
    # the z-scored JHU006 matrix: refused only at the first chunk, after loading the model (minutes for
    # an 8B LLM), and a 'pending 0/1' embedding stayed in `scdm ls` that no rerun could finish
    import anndata as ad

    from scdm.embedding.runner import embed
    from scdm.store import Store

    jhu = Path(__file__).resolve().parents[1] / "data" / "JHU006_HNSCC_Kinker2020.h5ad"
    folder = write_tiny_checkpoint(tmp_path / "tgpt", genes=list(ad.read_h5ad(jhu, backed="r").var["symbol"][:200]))
    st = Store(tmp_path / "store")
    st.ingest(jhu, name="jhu006")
    monkeypatch.setattr(TGPTAdapter, "load", lambda self, device: pytest.fail("loaded the model for data it refuses"))
    with pytest.raises(InputDataError, match="tgpt ranks each cell's genes by expression, but dataset 'jhu006' holds negative"):
        embed(st, "jhu006", "tgpt", folder, progress=False, device="cpu")
    assert st.embeddings().empty


def test_max_length_given_as_a_numpy_int_is_the_same_embedding(ckpt) -> None:
    # numpy.int64(80) was keyed "80" (a string): another embedding id for the same tokens
    assert TGPTAdapter(ckpt, max_length=np.int64(80)).params() == TGPTAdapter(ckpt, max_length=80).params()
    with pytest.raises(InputDataError, match=r"tgpt max_length=80.0 must be an integer >= 1"):
        TGPTAdapter(ckpt, max_length=80.0)
