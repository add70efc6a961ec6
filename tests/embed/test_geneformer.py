"""Geneformer adapter: tiny official-format checkpoints, parity with plain transformers, safe pickles."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm.embedding import get_adapter
from scdm.embedding.models.geneformer import (
    GeneformerAdapter,
    load_gene_dictionary,
    write_tiny_checkpoint,
)
from scdm.embedding.runner import embed
from scdm.store import Store
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError
from scdm.store.genes import gene_table, map_genes

torch.set_num_threads(1)

N_GENES = 60


@pytest.fixture(scope="module")
def symbols() -> list[str]:
    table = gene_table()
    table = table[table["ensembl"] != ""]
    return list(dict.fromkeys(table["symbol"]))[:N_GENES]


@pytest.fixture(scope="module")
def ckpt_v1(tmp_path_factory: pytest.TempPathFactory, symbols: list[str]) -> Path:
    # a large init range makes attention far from uniform, so masking mistakes show up
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gf_v1"), genes=symbols, version=1, initializer_range=0.5)


@pytest.fixture(scope="module")
def ckpt_v2(tmp_path_factory: pytest.TempPathFactory, symbols: list[str]) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gf_v2"), genes=symbols, version=2, initializer_range=0.5, seed=1)


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.uniform(0.05, 2.0, size=(n_cells, 1)), size=(n_cells, n_genes)).astype(np.float32)
    return sp.csr_matrix(dense)


def _ready(folder: Path, symbols: list[str], **params) -> GeneformerAdapter:
    adapter = GeneformerAdapter(folder, **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(symbols, gene_id_kind="symbol")
    return adapter


def _run(adapter: GeneformerAdapter, cells: list[dict[str, np.ndarray]]) -> np.ndarray:
    with torch.inference_mode():
        return adapter.embed(adapter.collate(cells)).numpy()


# ---- an independent, straightforward re-computation of the reference -----------------------------


def _plain_dicts(folder: Path) -> tuple[dict, dict, dict]:
    def read(prefix: str) -> dict:
        (path,) = folder.glob(f"{prefix}*.pkl")
        with path.open("rb") as handle:
            return pickle.load(handle)  # our own freshly written test file

    return read("token_dictionary"), read("gene_median_dictionary"), read("ensembl_mapping_dict")


def reference_tokens(dense: np.ndarray, ensembl: list, folder: Path, input_size: int) -> list[np.ndarray]:
    """TranscriptomeTokenizer.tokenize_anndata, written out with pandas as the reference does it."""
    token_dict, medians, mapping = _plain_dicts(folder)
    mapping = {k: v for k, v in mapping.items() if v in token_dict}
    frame = pd.DataFrame(dense.astype(np.float64), columns=ensembl)
    totals = frame.sum(axis=1).to_numpy()[:, None]
    # sum_ensembl_ids: ids are mapped on both paths; the collapse path is taken when two ids share a
    # target (scdm also sums the same id given twice, where the reference would emit its token twice)
    in_map = [g for g in ensembl if g in mapping]
    collapsed = [mapping.get(str(g).upper()) if g is not None else None for g in ensembl]
    frame.columns = collapsed
    if len(set(in_map)) != len({mapping[g] for g in in_map}) or len(in_map) != len(set(in_map)):
        frame = frame.loc[:, [c is not None for c in frame.columns]]
        dups = [g for g, n in Counter(frame.columns).items() if n > 1]
        summed = pd.concat([frame.loc[:, frame.columns == g].sum(axis=1).rename(g) for g in dups], axis=1) if dups else None
        frame = frame.loc[:, [c not in dups for c in frame.columns]]
        if summed is not None:
            frame = pd.concat([frame, summed], axis=1)
    keep = [i for i, g in enumerate(frame.columns) if g in token_dict and not str(g).startswith("<")]
    genes = [frame.columns[i] for i in keep]
    norm = frame.iloc[:, keep].to_numpy() / totals * 10_000 / np.array([medians[g] for g in genes])
    tokens = np.array([token_dict[g] for g in genes])
    special = "<cls>" in token_dict
    out = []
    for row in norm:
        nonzero = np.nonzero(row)[0]
        ranked = tokens[nonzero][np.argsort(-row[nonzero])]
        if special:
            ranked = np.concatenate([[token_dict["<cls>"]], ranked[: input_size - 2], [token_dict["<eos>"]]])
        else:
            ranked = ranked[:input_size]
        out.append(ranked.astype(np.int64))
    return out


def reference_embedding(folder: Path, tokens: list[np.ndarray], hidden_index: int, pooling: str, v2: bool) -> np.ndarray:
    """EmbExtractor: full BertForMaskedLM, one unpadded cell at a time, eager attention."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids in tokens:
            hidden = model(torch.as_tensor(ids)[None], output_hidden_states=True).hidden_states[hidden_index][0]
            if pooling == "cls":
                out.append(hidden[0])
            else:
                out.append(hidden[1:-1].mean(0) if v2 else hidden.mean(0))
    return torch.stack(out).numpy()


# ---- tests ---------------------------------------------------------------------------------------


def test_registered() -> None:
    assert get_adapter("geneformer") is GeneformerAdapter
    assert GeneformerAdapter.gene_id_kind == "ensembl"


@pytest.mark.parametrize("version", [1, 2])
def test_embeddings_shape_dtype_finite(version: int, ckpt_v1: Path, ckpt_v2: Path, symbols: list[str]) -> None:
    adapter = _ready(ckpt_v1 if version == 1 else ckpt_v2, symbols)
    assert adapter.version_ == version
    emb = _run(adapter, adapter.tokenize(_counts(5, N_GENES), np.arange(5)))
    assert emb.shape == (5, adapter.emb_dim) == (5, 32)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()


@pytest.mark.parametrize("version", [1, 2])
def test_tokens_match_reference(version: int, ckpt_v1: Path, ckpt_v2: Path, symbols: list[str]) -> None:
    folder = ckpt_v1 if version == 1 else ckpt_v2
    adapter = _ready(folder, symbols, max_length=20)
    x = _counts(12, N_GENES, seed=3)
    got = adapter.tokenize(x, np.arange(12))
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    expected = reference_tokens(x.toarray(), ensembl, folder, input_size=20)
    for cell, ref in zip(got, expected):
        np.testing.assert_array_equal(cell["input_ids"], ref)
    assert max(len(c["input_ids"]) for c in got) == 20  # some cells are truncated
    if version == 2:
        assert all(c["input_ids"][0] == 2 and c["input_ids"][-1] == 3 for c in got)


@pytest.mark.parametrize(
    ("version", "layer", "pooling", "hidden_index"),
    [(1, -2, "auto", 1), (1, -1, "mean", 2), (1, 0, "auto", 0), (2, -2, "auto", 1), (2, -2, "mean", 1), (2, -1, "cls", 2)],
)
def test_parity_with_transformers(version, layer, pooling, hidden_index, ckpt_v1, ckpt_v2, symbols) -> None:
    folder = ckpt_v1 if version == 1 else ckpt_v2
    adapter = _ready(folder, symbols, layer=layer, pooling=pooling)
    cells = adapter.tokenize(_counts(6, N_GENES, seed=4), np.arange(6))
    assert len({len(c["input_ids"]) for c in cells}) > 1  # the batch really is padded
    got = _run(adapter, cells)
    resolved = "cls" if (pooling == "cls" or (pooling == "auto" and version == 2)) else "mean"
    expected = reference_embedding(folder, [c["input_ids"] for c in cells], hidden_index, resolved, version == 2)
    assert np.abs(got - expected).max() <= 1e-5
    assert adapter.model.config.num_hidden_layers == hidden_index  # later layers are not computed


@pytest.mark.parametrize("version", [1, 2])
def test_batch_composition_does_not_change_embeddings(version, ckpt_v1, ckpt_v2, symbols) -> None:
    adapter = _ready(ckpt_v1 if version == 1 else ckpt_v2, symbols, pooling="mean")
    cells = adapter.tokenize(_counts(7, N_GENES, seed=5), np.arange(7))
    together = _run(adapter, cells)
    alone = np.concatenate([_run(adapter, [c]) for c in cells])
    order = [6, 2, 0, 5]
    subset = _run(adapter, [cells[i] for i in order])
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(subset, alone[order], atol=1e-5, rtol=0)


def test_tokenize_is_deterministic_and_chunk_independent(ckpt_v1, symbols) -> None:
    adapter = _ready(ckpt_v1, symbols)
    x = _counts(8, N_GENES, seed=6)
    whole = adapter.tokenize(x, np.arange(8))
    again = adapter.tokenize(x, np.arange(8))
    parts = adapter.tokenize(x[:3], np.arange(3)) + adapter.tokenize(x[3:], np.arange(3, 8))
    for a, b, c in zip(whole, again, parts):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["input_ids"], c["input_ids"])


def test_empty_cell_gives_zeros_not_nan(ckpt_v1, symbols) -> None:
    adapter = _ready(ckpt_v1, symbols)
    x = _counts(3, N_GENES, seed=7).tolil()
    x[1, :] = 0
    cells = adapter.tokenize(x.tocsr(), np.arange(3))
    assert len(cells[1]["input_ids"]) == 0
    emb = _run(adapter, cells)
    assert np.isfinite(emb).all() and not emb[1].any()
    np.testing.assert_allclose(emb[[0, 2]], _run(adapter, [cells[0], cells[2]]), atol=1e-5)


def test_duplicate_genes_are_summed_like_the_reference(ckpt_v1, symbols) -> None:
    # two dataset columns carry the same Ensembl id: the reference collapses them by summing
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    dataset_ids = ensembl + [ensembl[0], ensembl[5]]
    adapter = GeneformerAdapter(ckpt_v1)
    adapter.load("cpu")
    audit = adapter.prepare(dataset_ids, gene_id_kind="ensembl")
    assert audit.extra["n_collapsed_duplicates"] == 2 and audit.extra["collapse_path"]
    x = _counts(10, len(dataset_ids), seed=8)
    got = adapter.tokenize(x, np.arange(10))
    expected = reference_tokens(x.toarray(), dataset_ids, ckpt_v1, input_size=2048)
    for cell, ref in zip(got, expected):
        np.testing.assert_array_equal(cell["input_ids"], ref)


def test_ensembl_versions_and_mapping_dict(tmp_path, symbols) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols)
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    # outdated ids that the mapping dictionary collapses onto vocabulary genes
    with (folder / "ensembl_mapping_dict_gc30M.pkl").open("rb") as handle:
        mapping = pickle.load(handle)
    mapping["ENSG99999999998"] = ensembl[20]
    mapping["ENSG99999999999"] = ensembl[3]
    with (folder / "ensembl_mapping_dict_gc30M.pkl").open("wb") as handle:
        pickle.dump(mapping, handle)
    adapter = GeneformerAdapter(folder)
    versioned = [f"{g}.7" for g in ensembl[:10]]
    audit = adapter.prepare([*versioned, "ENSG99999999998"], gene_id_kind="ensembl")
    # no two ids share a target: the reference's plain path, which maps the alias in place
    assert audit.n_matched == 11 and not audit.extra["collapse_path"]
    # the alias of a gene already present is summed into it, as the reference's collapse path does
    audit = adapter.prepare([*versioned, "ENSG99999999999"], gene_id_kind="ensembl")
    assert audit.n_matched == 11 and audit.extra["collapse_path"] and audit.extra["n_collapsed_duplicates"] == 1


def test_alias_of_a_present_gene_is_summed_like_the_reference(tmp_path, symbols) -> None:
    # an outdated id that the mapping dictionary sends onto a vocabulary gene the dataset also has:
    # the reference sums their counts (scdm used to drop the alias's counts: 9 of 30 here)
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))[:6]
    folder = write_tiny_checkpoint(tmp_path, genes=ensembl)
    mapping = load_gene_dictionary(folder / "ensembl_mapping_dict_gc30M.pkl")
    mapping["ENSG99999999999"] = ensembl[2]
    with (folder / "ensembl_mapping_dict_gc30M.pkl").open("wb") as handle:
        pickle.dump(mapping, handle)
    dataset_ids = [*ensembl, "ENSG99999999999"]
    adapter = GeneformerAdapter(folder)
    audit = adapter.prepare(dataset_ids, gene_id_kind="ensembl")
    assert audit.n_matched == 7 and audit.extra["collapse_path"]
    x = sp.csr_matrix(np.array([[1, 2, 3, 4, 5, 6, 9], [0, 0, 1, 0, 0, 2, 40]], dtype=np.float32))
    got = adapter.tokenize(x, np.arange(2))
    expected = reference_tokens(x.toarray(), dataset_ids, folder, input_size=2048)
    for cell, ref in zip(got, expected):
        np.testing.assert_array_equal(cell["input_ids"], ref)
    assert got[1]["input_ids"][0] == adapter.token_ids_[ensembl[2]]  # 1 + 40 counts: the top gene


def test_legacy_pytorch_model_bin_gives_same_embeddings(tmp_path, symbols) -> None:
    safetensors = write_tiny_checkpoint(tmp_path / "st", genes=symbols, seed=3)
    legacy = write_tiny_checkpoint(tmp_path / "bin", genes=symbols, seed=3, legacy_bin=True)
    assert (legacy / "pytorch_model.bin").is_file() and not (legacy / "model.safetensors").exists()
    x = _counts(4, N_GENES, seed=9)
    a, b = _ready(safetensors, symbols), _ready(legacy, symbols)
    np.testing.assert_array_equal(_run(a, a.tokenize(x, np.arange(4))), _run(b, b.tokenize(x, np.arange(4))))


@pytest.mark.parametrize(
    "missing", ["config.json", "token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl", "model.safetensors"]
)
def test_missing_file_raises_checkpoint_error(tmp_path, symbols, missing: str) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols)
    (folder / missing).unlink()
    stem = missing.split("_gc30M")[0].split(".")[0]
    with pytest.raises(CheckpointError, match=stem):
        GeneformerAdapter(folder).check_checkpoint()


def test_missing_weights_inside_file_raise(tmp_path, symbols) -> None:
    folder = write_tiny_checkpoint(tmp_path, genes=symbols, legacy_bin=True)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if "layer.1." not in k}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lacks .* BERT weights"):
        GeneformerAdapter(folder).load("cpu")


def test_load_speaks_of_unused_weights_only_beyond_the_masked_lm_head(tmp_path, symbols, capfd, caplog) -> None:
    # every official checkpoint is a BertForMaskedLM: its cls.* head is expected, and transformers'
    # own table of it ("not ok if you expect identical arch") is not printed
    folder = write_tiny_checkpoint(tmp_path, genes=symbols, legacy_bin=True)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("cls.") for k in state)
    with caplog.at_level("WARNING", logger="scdm"):
        GeneformerAdapter(folder).load("cpu")
    printed = capfd.readouterr().err
    assert "LOAD REPORT" not in printed and "UNEXPECTED" not in printed and "not sharded" not in printed
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    state["classifier.weight"] = torch.zeros(2, 4)  # a weight of another architecture
    torch.save(state, folder / "pytorch_model.bin")
    with caplog.at_level("WARNING", logger="scdm"):
        GeneformerAdapter(folder).load("cpu")
    assert "1 weights in" in caplog.text and "classifier.weight" in caplog.text


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, symbols) -> None:
    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=symbols)
    marker = tmp_path / "pwned"
    with (folder / "token_dictionary_gc30M.pkl").open("wb") as handle:
        pickle.dump({"<pad>": 0, "ENSG00000121410": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*token_dictionary_gc30M.pkl.*system"):
        GeneformerAdapter(folder).load("cpu")
    assert not marker.exists()


def test_gene_dictionary_with_other_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "gene_median_dictionary.pkl"
    with path.open("wb") as handle:
        pickle.dump({"ENSG00000121410": np.arange(3)}, handle)  # arrays need numpy reconstruct: refused
    with pytest.raises(CheckpointError, match="Refusing"):
        load_gene_dictionary(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_scalar_dictionaries_load(tmp_path, protocol: int) -> None:
    path = tmp_path / "token_dictionary.pkl"
    with path.open("wb") as handle:
        pickle.dump({"<pad>": 0, "ENSG00000121410": np.int16(2), "ENSG00000175899": np.float64(1.5)}, handle, protocol=protocol)
    loaded = load_gene_dictionary(path)
    assert loaded == {"<pad>": 0, "ENSG00000121410": 2, "ENSG00000175899": 1.5}
    assert type(loaded["ENSG00000121410"]) is int


def test_wrong_gene_id_kind_raises(ckpt_v1, symbols) -> None:
    adapter = GeneformerAdapter(ckpt_v1)
    with pytest.raises(GeneMappingError, match="Only 0 of 60 genes"):
        adapter.prepare(symbols, gene_id_kind="ensembl")  # symbols declared as Ensembl ids


def test_negative_counts_raise(ckpt_v1, symbols) -> None:
    adapter = _ready(ckpt_v1, symbols)
    x = _counts(3, N_GENES).tolil()
    x[0, 0] = -1.0
    with pytest.raises(InputDataError, match="negative"):
        adapter.tokenize(x.tocsr(), np.arange(3))


def test_bad_options_raise(ckpt_v1) -> None:
    with pytest.raises(InputDataError, match="pooling='cls' needs a V2"):
        GeneformerAdapter(ckpt_v1, pooling="cls").load("cpu")
    with pytest.raises(InputDataError, match="layer=5 is outside"):
        GeneformerAdapter(ckpt_v1, layer=5).load("cpu")
    with pytest.raises(InputDataError, match="max_length=4096"):
        GeneformerAdapter(ckpt_v1, max_length=4096).load("cpu")


def test_dictionary_of_other_version_is_refused(tmp_path, symbols) -> None:
    v1 = write_tiny_checkpoint(tmp_path / "v1", genes=symbols, version=1)
    v2 = write_tiny_checkpoint(tmp_path / "v2", genes=symbols[:20], version=2)
    for prefix in ("token_dictionary", "gene_median_dictionary"):
        (v2 / f"{prefix}_gc104M.pkl").unlink()
        (v1 / f"{prefix}_gc30M.pkl").rename(v2 / f"{prefix}_gc104M.pkl")
    with pytest.raises(CheckpointError, match="belongs to a different Geneformer model"):
        GeneformerAdapter(v2).load("cpu")


def test_params_and_lora_targets(ckpt_v2, symbols) -> None:
    adapter = _ready(ckpt_v2, symbols)
    params = adapter.params()
    assert {k: params[k] for k in ("layer", "pooling", "max_length")} == {"layer": -2, "pooling": "auto", "max_length": None}
    # embeddings made while an alias of a present gene was dropped have another identity
    assert "aliases of present genes summed" in params["gene_collapse"]
    names = [n for n, _ in adapter.model.named_modules()]
    for target in GeneformerAdapter.lora_target_modules:
        assert any(n.endswith(target) for n in names), target


def test_lora_wrapped_model_trains_through_embed(ckpt_v1, symbols) -> None:
    from peft import LoraConfig, get_peft_model

    adapter = _ready(ckpt_v1, symbols, layer=-1)
    adapter.model = get_peft_model(adapter.model, LoraConfig(r=2, target_modules=list(GeneformerAdapter.lora_target_modules)))
    emb = adapter.embed(adapter.collate(adapter.tokenize(_counts(2, N_GENES), np.arange(2))))
    emb.sum().backward()
    grads = [p.grad for n, p in adapter.model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_real_pc9_counts_with_symbols_mapped_to_ensembl(tmp_path, pc9_counts_path) -> None:
    import anndata as ad

    adata = ad.read_h5ad(pc9_counts_path)
    symbols = list(adata.var_names)
    folder = write_tiny_checkpoint(tmp_path, genes=symbols, seed=2, initializer_range=0.5)
    adapter = GeneformerAdapter(folder)
    adapter.load("cpu")
    audit = adapter.prepare(symbols, gene_id_kind="symbol")
    assert audit.n_matched > 9000 and audit.extra["n_collapsed_duplicates"] >= 1
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    cells = adapter.tokenize(x, np.arange(x.shape[0]))
    ensembl = list(map_genes(symbols, src="symbol", dst="ensembl"))
    expected = reference_tokens(x.toarray(), ensembl, folder, input_size=2048)
    for cell, ref in zip(cells, expected):
        np.testing.assert_array_equal(cell["input_ids"], ref)
    assert max(len(c["input_ids"]) for c in cells) == 2048  # the largest cells are truncated
    picked = [int(np.argmin([len(c["input_ids"]) for c in cells])), 0, 1, 2]
    got = _run(adapter, [cells[i] for i in picked])
    reference = reference_embedding(folder, [cells[i]["input_ids"] for i in picked], 1, "mean", False)
    assert np.abs(got - reference).max() <= 1e-5


# ---- speed paths: no mask for unpadded batches, half-precision weights on CUDA ----------------------
@pytest.mark.parametrize("version", [1, 2])
def test_an_unpadded_batch_runs_without_a_mask_and_gives_the_same_numbers(version, ckpt_v1, ckpt_v2, symbols) -> None:
    adapter = _ready(ckpt_v1 if version == 1 else ckpt_v2, symbols)
    cells = adapter.tokenize(_counts(6, N_GENES), np.arange(6))
    shortest = min(len(c["input_ids"]) for c in cells)
    batch = adapter.collate([{"input_ids": c["input_ids"][:shortest]} for c in cells])
    assert batch["attention_mask"] is None  # decided in collate, on the CPU
    masked = {**batch, "attention_mask": torch.ones(batch["input_ids"].shape, dtype=torch.long)}
    with torch.inference_mode():
        assert (adapter.embed(batch) - adapter.embed(masked)).abs().max() == 0
    padded = adapter.collate(cells)
    lengths = torch.tensor([len(c["input_ids"]) for c in cells])
    torch.testing.assert_close(padded["attention_mask"], (torch.arange(padded["input_ids"].shape[1])[None, :] < lengths[:, None]).long())


@pytest.mark.parametrize("version", [1, 2])
def test_a_padded_batch_hands_the_model_a_key_mask_with_the_same_numbers(version, ckpt_v1, ckpt_v2, symbols,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _ready(ckpt_v1 if version == 1 else ckpt_v2, symbols)
    batch = adapter.collate(adapter.tokenize(_counts(6, N_GENES, seed=4), np.arange(6)))
    assert batch["attention_mask"] is not None  # padded
    seen: list[torch.Tensor] = []
    forward = adapter.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["attention_mask"])
        return forward(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "forward", spy)
    with torch.inference_mode():
        got = adapter.embed(batch)
        adapter.key_mask_ = False  # the 2-D mask, expanded by transformers
        expected = adapter.embed(batch)
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x BERT takes only the 2-D mask
        assert seen[0].dtype == torch.bool and seen[0].shape == (6, 1, 1, batch["input_ids"].shape[1])
        torch.testing.assert_close(seen[0][:, 0, 0], batch["attention_mask"].bool())
    assert seen[1].dim() == 2
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_half_precision_weights_only_for_cuda_autocast_runs(ckpt_v1, symbols) -> None:
    full = _ready(ckpt_v1, symbols)
    half = GeneformerAdapter(ckpt_v1)
    assert half.configure_precision("cpu", "bf16") == {} and half.weight_precision is None
    assert half.configure_precision("cuda", "bf16") == {"weights": "bf16"}
    assert half.params() == full.params()  # the runner records the weights' dtype beside params()
    half.load("cpu")  # the cast does not depend on the device: checked here on the CPU
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "LayerNorm" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "LayerNorm" not in n} == {torch.bfloat16}
    half.prepare(symbols, gene_id_kind="symbol")
    batch = full.collate(full.tokenize(_counts(6, N_GENES), np.arange(6)))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = half.embed(batch), full.embed(batch)
    assert got.dtype == torch.float32 and (got - expected).abs().max() <= 2e-2 * expected.abs().max()  # bf16 rounding only


@pytest.mark.parametrize("option", [{"layer": 1.5}, {"layer": True}, {"layer": "1"}, {"max_length": 64.0}])
def test_non_integer_layer_or_length_is_refused_with_a_message(ckpt_v1: Path, option: dict) -> None:
    # were: TypeError tracebacks at load (a float slice index, '>=' between str and int, a transformers
    # validation error for a bool)
    with pytest.raises(InputDataError, match=next(iter(option))):
        adapter = GeneformerAdapter(ckpt_v1, **option)
        adapter.load("cpu")


# ---- identity: one computation, one embedding ---------------------------------------------------


def _store_of(tmp_path: Path, symbols: list[str], names: tuple[str, ...] = ("d",)) -> Store:
    st = Store(tmp_path / "store")
    for i, name in enumerate(names):
        cells = pd.DataFrame(index=[f"{name}{j}" for j in range(12)])
        st.ingest(ad.AnnData(X=_counts(12, N_GENES, seed=i), obs=cells, var=pd.DataFrame(index=symbols)), name=name)
    return st


@pytest.mark.parametrize(("version", "spelled"), [
    (1, {"pooling": "mean"}), (2, {"pooling": "cls"}),
    (2, {"layer": 1}),  # the default -2 on a 2-layer model: hidden_states[1]
    (1, {"max_length": 2048}),  # the default None: the model's max_position_embeddings
])
def test_a_setting_spelled_as_what_it_resolves_to_is_the_same_embedding(
        tmp_path: Path, ckpt_v1: Path, ckpt_v2: Path, symbols: list[str], version: int, spelled: dict) -> None:
    # pooling='auto' resolves to 'mean' on V1 and 'cls' on V2, but was keyed as given: the same numbers were computed
    # again under a second id and space (a second leaderboard row)
    st = _store_of(tmp_path, symbols)
    ckpt = ckpt_v1 if version == 1 else ckpt_v2
    default = embed(st, "d", "geneformer", ckpt, progress=False)
    explicit = embed(st, "d", "geneformer", ckpt, progress=False, **spelled)
    assert explicit.embedding_id == default.embedding_id and explicit.computed_chunks == 0
    assert len(st.query("SELECT embedding_id FROM embeddings")) == 1


def test_new_embeddings_are_keyed_by_what_the_settings_resolve_to(tmp_path: Path, ckpt_v2: Path, symbols: list[str]) -> None:
    st = _store_of(tmp_path, symbols)
    params = st.embedding(embed(st, "d", "geneformer", ckpt_v2, progress=False).embedding_id).params
    assert {k: params[k] for k in ("pooling", "layer", "max_length")} == {"pooling": "cls", "layer": 1, "max_length": 4096}


@pytest.mark.parametrize("spelled", [{}, {"pooling": "cls", "layer": -2}, {"pooling": "cls", "layer": 1, "max_length": 4096}])
def test_an_embedding_an_older_scdm_keyed_as_given_is_found_under_any_spelling(
        tmp_path: Path, ckpt_v2: Path, symbols: list[str], monkeypatch: pytest.MonkeyPatch, spelled: dict) -> None:
    st = _store_of(tmp_path, symbols, names=("d", "e"))
    with monkeypatch.context() as older:  # an older scdm: every setting keyed as given ('auto', -2, None: the defaults)
        older.setattr(GeneformerAdapter, "identity_spellings", lambda self: {})
        stored = embed(st, "d", "geneformer", ckpt_v2, progress=False)
    assert st.embedding(stored.embedding_id).params["pooling"] == "auto"
    again = embed(st, "d", "geneformer", ckpt_v2, progress=False, **spelled)
    assert again.embedding_id == stored.embedding_id and again.computed_chunks == 0  # found, not computed again
    # another dataset joins the space its computation has in this store, not a second one beside it
    other = st.embedding(embed(st, "e", "geneformer", ckpt_v2, progress=False, **spelled).embedding_id)
    assert other.space_id == st.embedding(stored.embedding_id).space_id and other.params["pooling"] == "auto"
    assert len(st.query("SELECT embedding_id FROM embeddings")) == 2
