"""LLM (cell sentence) adapter: tiny LLaMA folder, parity with plain transformers, padding invariance."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding import get_adapter
from scdm.embedding.models.llm import LLMAdapter, write_tiny_checkpoint
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from scdm.store.genes import gene_table, map_genes

torch.set_num_threads(1)

N_GENES = 50
TEMPLATE = "Top expressed genes of this cell: {genes}."


@pytest.fixture(scope="module")
def symbols() -> list[str]:
    table = gene_table()
    table = table[table["ensembl"] != ""]
    return [*list(dict.fromkeys(table["symbol"]))[: N_GENES - 1], "HLA-B"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, symbols: list[str]) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llm"), genes=symbols, initializer_range=0.3)


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.uniform(0.05, 2.0, size=(n_cells, 1)), size=(n_cells, n_genes)).astype(np.float32)
    return sp.csr_matrix(dense)


def _ready(folder: Path, symbols: list[str], **params) -> LLMAdapter:
    adapter = LLMAdapter(folder, **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(symbols, gene_id_kind="symbol")
    return adapter


def _run(adapter: LLMAdapter, cells: list[dict[str, np.ndarray]]) -> np.ndarray:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(cells)).numpy()


def reference_embedding(folder: Path, dense: np.ndarray, symbols: list[str], k: int, template: str) -> np.ndarray:
    """Cell sentence by hand, the folder's tokenizer, plain LlamaModel, one unpadded cell at a time."""
    from transformers import AutoTokenizer, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaModel.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for row in dense:
            top = [s for _, s in sorted((-row[j], symbols[j]) for j in np.flatnonzero(row > 0))][:k]  # ties: by symbol
            text = template.replace("{genes}", " ".join(top))
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out.append(model(ids).last_hidden_state[0].mean(dim=0))
    return torch.stack(out).numpy()


def test_registered() -> None:
    assert get_adapter("llm") is LLMAdapter


@pytest.mark.parametrize("template", ["{genes}", TEMPLATE])
def test_parity_with_plain_transformers(ckpt, symbols, template: str) -> None:
    adapter = _ready(ckpt, symbols, top_k=12, template=template)
    x = _counts(6, N_GENES, seed=1)
    cells = adapter.tokenize(x, np.arange(6))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # a padded batch
    assert all(c["input_ids"][0] == 0 for c in cells)  # the tokenizer's BOS
    got = _run(adapter, cells)
    expected = reference_embedding(ckpt, x.toarray(), symbols, 12, template)
    assert got.shape == (6, adapter.emb_dim) == (6, 32) and got.dtype == np.float32
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-5


def test_left_and_right_padding_agree(ckpt, symbols) -> None:
    right = _ready(ckpt, symbols, top_k=15)
    left = _ready(ckpt, symbols, top_k=15, padding_side="left")
    cells = right.tokenize(_counts(5, N_GENES, seed=2), np.arange(5))
    batch = left.collate(cells)
    assert batch["attention_mask"][:, 0].min() == 0  # really left-padded
    np.testing.assert_allclose(_run(left, cells), _run(right, cells), atol=1e-5, rtol=0)


def test_batch_composition_does_not_change_embeddings(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols, top_k=20)
    cells = adapter.tokenize(_counts(5, N_GENES, seed=3), np.arange(5))
    alone = np.concatenate([_run(adapter, [c]) for c in cells])
    np.testing.assert_allclose(_run(adapter, cells), alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_run(adapter, [cells[4], cells[0]]), alone[[4, 0]], atol=1e-5, rtol=0)


def test_tokenize_deterministic_and_k_limits_genes(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols[:-1], top_k=5, separator=" , ")  # one token per symbol (no HLA-B)
    x = sp.csr_matrix(_counts(3, N_GENES - 1, seed=4).toarray() + 1)
    first = adapter.tokenize(x, np.arange(3))
    for a, b in zip(first, adapter.tokenize(x, np.arange(3))):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert [len(c["input_ids"]) for c in first] == [1 + 5 + 4] * 3  # BOS + 5 genes + 4 separators
    assert adapter.params() == {"top_k": 5, "separator": " , ", "template": "{genes}", "max_length": None,
                                "tie_break": "descending value, then official symbol"}


def test_tied_genes_do_not_depend_on_the_datasets_column_order(ckpt, symbols) -> None:
    # counts of 1 and 2 tie at the top-k cut; before, tied genes kept column order and the same cells
    # in another column order (another study) got another sentence
    x = sp.csr_matrix(np.minimum(_counts(5, N_GENES, seed=6).toarray(), 2))
    shuffled = np.random.default_rng(1).permutation(N_GENES)
    adapter, other = _ready(ckpt, symbols, top_k=20), _ready(ckpt, [symbols[j] for j in shuffled], top_k=20)
    cells = adapter.tokenize(x, np.arange(5))
    moved = other.tokenize(sp.csr_matrix(x[:, shuffled]), np.arange(5))
    for a, b in zip(cells, moved):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(_run(adapter, cells), _run(other, moved))
    twos = [s for s in symbols if x[0, symbols.index(s)] == 2]
    sentence = adapter.tokenizer_.decode(cells[0]["input_ids"][1:].tolist())
    assert sentence.startswith(" ".join(sorted(twos)[:20]))  # the most expressed genes, by symbol


def test_max_length_truncates(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols, top_k=30, max_length=8)
    cells = adapter.tokenize(sp.csr_matrix(_counts(2, N_GENES).toarray() + 1), np.arange(2))
    assert [len(c["input_ids"]) for c in cells] == [8, 8]


def test_ensembl_input_and_unknown_symbols(ckpt, symbols) -> None:
    adapter = LLMAdapter(ckpt)
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    assert adapter.prepare(ensembl, gene_id_kind="ensembl").n_matched == N_GENES
    audit = adapter.prepare([*symbols, "NOT_A_GENE_1", "AC012345.1"], gene_id_kind="symbol")
    assert audit.n_matched == N_GENES and set(audit.unmatched_examples) == {"NOT_A_GENE_1", "AC012345.1"}


def test_sizes_given_as_numpy_ints_are_the_same_embedding_and_fractions_are_refused(ckpt) -> None:
    # numpy.int64(5) was keyed "5" (a string): another embedding id for the same sentences; top_k=5.0 passed
    # the options check and ended in a TypeError (slice indices) in the middle of the job
    assert LLMAdapter(ckpt, top_k=np.int64(5), max_length=np.int64(64)).params() == LLMAdapter(ckpt, top_k=5, max_length=64).params()
    for option in ({"top_k": 5.0}, {"top_k": "5"}, {"max_length": 64.5}, {"top_k": 0}):
        with pytest.raises(InputDataError, match=rf"llm {next(iter(option))}=.* must be an integer >= 1"):
            LLMAdapter(ckpt, **option)


def test_bad_template_raises(ckpt) -> None:
    with pytest.raises(InputDataError, match="must contain '{genes}' exactly once"):
        LLMAdapter(ckpt, template="no genes here").load("cpu")


@pytest.mark.parametrize(("missing", "named"), [("config.json", "config.json"), ("tokenizer.json", "tokenizer.json"), ("model.safetensors", "safetensors")])
def test_missing_file_raises_checkpoint_error(tmp_path, symbols, missing: str, named: str) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols[:10])
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=re.escape(named)):
        LLMAdapter(folder).check_checkpoint()


def test_wrong_gene_id_kind_raises(ckpt, symbols) -> None:
    with pytest.raises(GeneMappingError, match="Only 0 of"):
        LLMAdapter(ckpt).prepare(symbols, gene_id_kind="ensembl")


def test_negative_values_raise(ckpt, symbols) -> None:
    adapter = _ready(ckpt, symbols)
    x = _counts(2, N_GENES).tolil()
    x[1, 1] = -2.0
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x.tocsr(), np.arange(2))


def test_lora_targets_train_through_embed(ckpt, symbols) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = _ready(ckpt, symbols, top_k=6)
    adapter.model = get_peft_model(adapter.model, LoraConfig(r=2, target_modules=list(LLMAdapter.lora_target_modules)))
    emb = adapter.embed(adapter.collate(adapter.tokenize(_counts(2, N_GENES), np.arange(2))))
    emb.sum().backward()
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in adapter.model.named_parameters() if "lora_" in n and p.grad is not None}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_bf16_checkpoint_loads_as_float32_on_cpu(tmp_path, symbols) -> None:
    from transformers import LlamaForCausalLM

    folder = write_tiny_checkpoint(tmp_path, genes=symbols[:10])
    LlamaForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)  # like LLaMA-3's files
    adapter = LLMAdapter(folder)
    adapter.load("cpu")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.float32}


# ---- right padding runs without an attention mask ----------------------------------------------------
def test_right_padded_batches_run_without_a_mask_and_give_the_same_numbers(ckpt, symbols) -> None:
    from scdm.embedding.models._common import masked_mean

    adapter = _ready(ckpt, symbols, template=TEMPLATE)
    cells = adapter.tokenize(_counts(8, N_GENES), np.arange(8))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # the batch really is padded
    batch = adapter.collate(cells)
    calls: list[object] = []
    hook = adapter.model.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        with torch.inference_mode():
            got = adapter.embed(batch)
            masked = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    finally:
        hook.remove()
    assert calls[0] is None  # causal attention: the real tokens never see the pads behind them
    assert (got - masked_mean(masked, batch["attention_mask"].bool())).abs().max() == 0


def test_a_model_that_is_not_causal_everywhere_keeps_the_mask() -> None:
    from transformers import BertConfig, BertModel

    from scdm.embedding.models.llm import _causal

    assert not _causal(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))


def test_a_cuda_run_other_than_bf16_records_the_bf16_weights_it_computes_with(ckpt) -> None:
    # configure_precision only decides (no GPU needed): CUDA holds the weights in bf16 whatever the autocast
    assert LLMAdapter(ckpt).configure_precision("cpu", "fp32") == {}
    assert LLMAdapter(ckpt).configure_precision("cuda", "bf16") == {}  # the ids of bf16 runs stay as they were
    for precision in ("fp32", "fp16"):
        adapter = LLMAdapter(ckpt)
        assert adapter.configure_precision("cuda:1", precision) == {"weights": "bf16"}
        assert adapter.weight_precision == "bf16"


def test_a_cell_expressing_no_gene_with_a_symbol_is_refused(ckpt, symbols, tmp_path) -> None:
    """Its cell sentence would be empty: the bare template's vector, the same for every such cell."""
    import anndata as ad

    from scdm.embedding.runner import embed
    from scdm.store import Store

    genes = [*symbols[:20], "NOT_A_GENE_1", "NOT_A_GENE_2"]
    dense = _counts(6, len(genes)).toarray()
    dense[0] = 0
    dense[0, -2:] = 4  # only genes the gene table does not know
    dense[1:, -2:] = 0
    dense[1:, 0] += 1
    adata = ad.AnnData(X=sp.csr_matrix(dense))
    adata.var_names = genes
    adata.write_h5ad(tmp_path / "cells.h5ad")
    st = Store(tmp_path / "store")
    name = st.ingest(tmp_path / "cells.h5ad").name
    with pytest.raises(InputDataError, match=r"rows 0 \(1 in all\) express none of the genes the model knows"):
        embed(st, name, "llm", ckpt, batch_size=4, progress=False)
    kept = embed(st, name, "llm", ckpt, batch_size=4, progress=False, allow_empty_cells=True)
    assert np.isfinite(st.read_embedding(kept.embedding_id)).all()


def test_sentences_longer_than_the_models_positions_are_refused(tmp_path, symbols) -> None:
    # a 16-position LLaMA fed 30-gene sentences (31 tokens) returned vectors without a word: rotary
    # positions past the trained ones raise nothing
    folder = write_tiny_checkpoint(tmp_path / "short", genes=symbols[:-1], max_position_embeddings=16)
    x = sp.csr_matrix(_counts(3, N_GENES - 1, seed=4).toarray() + 1)
    adapter = _ready(folder, symbols[:-1], top_k=30)
    with pytest.raises(InputDataError, match=r"rows 0, 1, 2\) take up to 31 tokens, more than the 16 positions.*top_k.*max_length=16"):
        adapter.tokenize(x, np.arange(3))
    cut = _ready(folder, symbols[:-1], top_k=30, max_length=16)
    assert [len(c["input_ids"]) for c in cut.tokenize(x, np.arange(3))] == [16] * 3
    assert len(_ready(folder, symbols[:-1], top_k=15).tokenize(x, np.arange(1))[0]["input_ids"]) == 16
    with pytest.raises(InputDataError, match="max_length=17 is longer than the 16 positions"):
        _ready(folder, symbols[:-1], max_length=17)


def test_a_previous_symbol_is_written_under_its_official_name(tmp_path) -> None:
    """A matrix annotated before RACK1's rename calls it GNB2L1; the sentence dropped it (often a top gene)."""
    folder = write_tiny_checkpoint(tmp_path, genes=["RACK1", "TP53", "GAPDH"])
    adapter = _ready(folder, ["GNB2L1", "TP53", "GAPDH"], top_k=3)
    assert list(adapter.column_symbols_) == ["RACK1", "TP53", "GAPDH"]
    cells = adapter.tokenize(sp.csr_matrix(np.array([[9.0, 1.0, 3.0]], dtype=np.float32)), np.arange(1))
    assert adapter.tokenizer_.decode(cells[0]["input_ids"], skip_special_tokens=True).split() == ["RACK1", "GAPDH", "TP53"]
    # beside a column under the official name, the old name is not read as a second copy of the gene
    both = _ready(folder, ["GNB2L1", "RACK1", "TP53"])
    assert list(both.column_symbols_) == ["RACK1", "TP53"] and both.known_columns_.tolist() == [1, 2]


def test_columns_of_one_symbol_are_reported(ckpt, symbols) -> None:
    """Two columns of one symbol were summed into one gene of the sentence and counted twice in n_matched, with
    nothing in the audit saying so (geneformer and tGPT report n_collapsed_duplicates)."""
    adapter = LLMAdapter(ckpt)
    audit = adapter.prepare([*symbols, symbols[0], symbols[3]], gene_id_kind="symbol")
    assert audit.n_matched == N_GENES + 2 and audit.extra["n_symbols"] == N_GENES
    assert audit.extra["n_collapsed_duplicates"] == 2
    assert adapter.prepare(symbols, gene_id_kind="symbol").extra["n_collapsed_duplicates"] == 0
