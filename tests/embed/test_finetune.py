"""LoRA fine-tuning: weights, gradient check, adapter round trip, catalog rows, fold invariant, caching."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm.classify.metrics import compute_metrics
from scdm.classify.results import leaderboard
from scdm.classify.splits import make_splits, save_splits
from scdm.embedding import finetune as ft
from scdm.embedding._adapter import get_adapter
from scdm.embedding.finetune import (
    LORA_HEAD,
    LoraTrainingError,
    cells_hash,
    finetune,
    read_lora_card,
)
from scdm.embedding.lora_card import make_card, save_adapter
from scdm.embedding.lora_training import TrainSettings, train_lora
from scdm.embedding.runner import checkpoint_hash, embed
from scdm.store import Store
from scdm.store.errors import CheckpointError, GeneMappingError, InputDataError, ScdmError, ScdmWarning
from scdm.store.genes import gene_table
from tests.embed import toy_adapter

torch.set_num_threads(1)

ALL_MODELS = ("geneformer", "tgpt", "llm", "scgpt", "scfoundation", "uce", "scbert", "celllm", "cellplm")
EXTRA = {"uce": {"sample_size": 48}}  # UCE samples 1024 genes per cell by default: slow on a CPU
FAST = {"epochs": 1, "lr": 1e-2, "batch_size": 8, "progress": False}


def _genes(n: int) -> list[str]:
    table = gene_table()
    return table.loc[table["ensembl"] != "", "symbol"].drop_duplicates().iloc[:n].tolist()


def _planted(n_cells: int, n_genes: int, n_background: int, seed: int = 0) -> ad.AnnData:
    """Counts whose label is carried by one marker gene among random background genes.

    Every cell expresses ``n_background`` random genes; sensitive cells also express gene 0 and
    resistant cells gene 1. Cells alternate between two tissues and two studies.
    """
    rng = np.random.default_rng(seed)
    genes = _genes(n_genes)
    y = rng.integers(0, 2, n_cells)
    x = np.zeros((n_cells, n_genes), np.float32)
    for i in range(n_cells):
        pick = rng.choice(np.arange(2, n_genes), n_background, replace=False)
        x[i, pick] = rng.integers(1, 6, n_background)
        x[i, 0 if y[i] else 1] = rng.integers(1, 6)
    obs = pd.DataFrame({"label": np.where(y == 1, "sensitive", "resistant"),
                        "tissue": np.where(np.arange(n_cells) % 2, "lung", "skin"),
                        "study": np.where(np.arange(n_cells) % 3, "S1", "S2")},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


def _store(tmp_path: Path, adata: ad.AnnData, *, by: tuple[str, ...] = ("all",), scenarios=("pooled",), n_folds: int = 3) -> Store:
    st = Store(tmp_path / "store")
    st.ingest(adata, name="planted", label_key="label", tissue_key="tissue", study_key="study")
    save_splits(st, make_splits(st.cells(["planted"]), scenarios=scenarios, by=by, n_folds=n_folds))
    return st


def _checkpoint(name: str, folder: Path, genes: list[str], seed: int = 0) -> Path:
    module = importlib.import_module(f"scdm.embedding.models.{name}")
    return module.write_tiny_checkpoint(folder, genes=genes, seed=seed)


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return _planted(36, 80, 12)


@pytest.fixture()
def gf_store(tmp_path: Path, small: ad.AnnData) -> tuple[Store, Path]:
    st = _store(tmp_path, small, by=("all", "tissue"), scenarios=("pooled", "cross"), n_folds=2)
    return st, _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())


def _split_cells(st: Store, split_id: str) -> pd.DataFrame:
    return st.query('SELECT dataset_id, "row", fold FROM split_assignments WHERE split_id = ? ORDER BY "row"', [split_id])


# ---- training, base weights, round trip (every adapter) -----------------------------------------
@pytest.mark.parametrize("name", ALL_MODELS)
def test_lora_trains_only_adapter_weights_and_round_trips_exactly(name, tmp_path, small, monkeypatch):
    genes = small.var_names.tolist()
    ckpt = _checkpoint(name, tmp_path / "ckpt", genes)
    adapter = get_adapter(name)(checkpoint=ckpt, **EXTRA.get(name, {}))
    adapter.load("cpu")
    adapter.prepare(genes, gene_id_kind="symbol")
    cells = adapter.tokenize(small.X.astype(np.float32).tocsr(), np.arange(small.n_obs))
    labels = (small.obs["label"] == "sensitive").to_numpy(np.int64)

    import peft

    at_injection = {}
    real = peft.get_peft_model

    def spy(model, config, *args, **kwargs):  # the parameters right after LoRA is put in
        wrapped = real(model, config, *args, **kwargs)
        at_injection.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return wrapped

    monkeypatch.setattr(peft, "get_peft_model", spy)
    settings = TrainSettings(rank=4, alpha=8, dropout=0.05, target_modules=tuple(adapter.lora_target_modules), epochs=1,
                             lr=1e-2, weight_decay=0.01, batch_size=8, precision="fp32", seed=0)
    trained = train_lora(adapter, cells, labels, settings, device="cpu", precision="fp32", gradient_checkpointing=False, progress=False)

    # base weights: unchanged, frozen, equal to a fresh load of the checkpoint
    fresh = get_adapter(name)(checkpoint=ckpt, **EXTRA.get(name, {}))
    fresh.load("cpu")
    base = fresh.model.state_dict()
    tuned = trained.adapter.model.state_dict()
    lora_keys = [k for k in tuned if ".lora_" in k]
    assert lora_keys and len(trained.lora_modules) >= 2
    for key, value in tuned.items():
        if ".lora_" in key:
            assert not torch.equal(value, at_injection[key]), f"{key} did not train"
        else:
            assert torch.equal(value, at_injection[key]), f"base weight {key} changed"
            assert torch.equal(value, base[key.replace(".base_layer.", ".")]), key
    assert not any(p.requires_grad for n, p in trained.adapter.model.named_parameters() if ".lora_" not in n)

    # save -> load into a fresh model reproduces the tuned embeddings bit for bit
    batch = adapter.collate(cells[:9])
    with torch.inference_mode():
        tuned_emb = trained.adapter.embed(batch)
        head_logits = trained.head(tuned_emb)
    card = make_card(trained, settings, adapter_id="a1", tuning_id="t1", checkpoint_hash=checkpoint_hash(ckpt), split_id="s1",
                     fold=0, scenario="pooled", category_type="all", category="all")
    save_adapter(trained, tmp_path / "adapter", card)
    loaded = read_lora_card(tmp_path / "adapter")
    loaded.check_base(fresh, checkpoint_hash(ckpt))
    head = loaded.apply(fresh)
    with torch.inference_mode():
        again = fresh.embed(batch)
        frozen_adapter = get_adapter(name)(checkpoint=ckpt, **EXTRA.get(name, {}))
        frozen_adapter.load("cpu")
        frozen = frozen_adapter.embed(batch)
        assert torch.equal(head(again), head_logits)
    assert torch.equal(again, tuned_emb)
    assert not torch.allclose(frozen, tuned_emb, atol=1e-6)


def test_lora_curve_and_gradient_checkpointing_give_the_same_training(tmp_path, small):
    genes = small.var_names.tolist()
    ckpt = _checkpoint("geneformer", tmp_path / "ckpt", genes)
    labels = (small.obs["label"] == "sensitive").to_numpy(np.int64)
    settings = TrainSettings(rank=8, alpha=8, dropout=0.0, target_modules=("query", "value"), epochs=2, lr=1e-2,
                             weight_decay=0.01, batch_size=8, precision="fp32", seed=0)
    curves = []
    for checkpointing in (False, True):
        adapter = get_adapter("geneformer")(checkpoint=ckpt)
        adapter.load("cpu")
        adapter.prepare(genes, gene_id_kind="symbol")
        cells = adapter.tokenize(small.X.astype(np.float32).tocsr(), np.arange(small.n_obs))
        trained = train_lora(adapter, cells, labels, settings, device="cpu", precision="fp32",
                             gradient_checkpointing=checkpointing, progress=False)
        assert trained.telemetry["gradient_checkpointing"] is checkpointing
        curves.append([c["loss"] for c in trained.curve])
    assert len(curves[0]) == 2 and all(np.isfinite(curves[0]))
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)


def _geneformer_cells(tmp_path: Path, adata: ad.AnnData, **overrides):
    genes = adata.var_names.tolist()
    ckpt = _checkpoint("geneformer", tmp_path / "ckpt", genes) if not overrides else \
        importlib.import_module("scdm.embedding.models.geneformer").write_tiny_checkpoint(tmp_path / "ckpt", genes=genes, **overrides)

    def make():
        adapter = get_adapter("geneformer")(checkpoint=ckpt)
        adapter.load("cpu")
        adapter.prepare(genes, gene_id_kind="symbol")
        return adapter, adapter.tokenize(adata.X.astype(np.float32).tocsr(), np.arange(adata.n_obs))

    return make, (adata.obs["label"] == "sensitive").to_numpy(np.int64)


def test_out_of_memory_backoff_accumulates_to_the_same_update(tmp_path, small):
    # no dropout anywhere, so splitting a batch into micro-batches changes nothing but rounding
    make, labels = _geneformer_cells(tmp_path, small, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings = TrainSettings(rank=4, alpha=8, dropout=0.0, target_modules=("query", "value", "output.dense"), epochs=1,
                             lr=1e-3, weight_decay=0.01, batch_size=12, precision="fp32", seed=0)
    runs = []
    for simulate_oom in (False, True):
        adapter, cells = make()
        if simulate_oom:
            real = adapter.embed

            def embed_small_batches_only(batch, real=real):
                if batch["input_ids"].shape[0] > 4:
                    raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
                return real(batch)

            adapter.embed = embed_small_batches_only
        trained = train_lora(adapter, cells, labels, settings, device="cpu", precision="fp32", gradient_checkpointing=False, progress=False)
        runs.append(trained)
    assert runs[0].telemetry["oom_backoffs"] == 0 and runs[1].telemetry["oom_backoffs"] == 2
    assert runs[1].telemetry["final_micro_batch"] == 3
    np.testing.assert_allclose(runs[0].curve[0]["loss"], runs[1].curve[0]["loss"], rtol=1e-5)
    # Adam divides by the gradient's size, so rounding differences of tiny gradients show at ~lr/100
    a, b = (run.adapter.model.state_dict() for run in runs)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-3)


def test_batch_dependent_model_is_never_split_on_out_of_memory(tmp_path, small):
    genes = small.var_names.tolist()
    adapter = get_adapter("cellplm")(checkpoint=_checkpoint("cellplm", tmp_path / "ckpt", genes))
    adapter.load("cpu")
    adapter.prepare(genes, gene_id_kind="symbol")
    cells = adapter.tokenize(small.X.astype(np.float32).tocsr(), np.arange(small.n_obs))

    def out_of_memory(batch):
        raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")

    adapter.embed = out_of_memory
    settings = TrainSettings(rank=4, alpha=8, dropout=0.0, target_modules=tuple(adapter.lora_target_modules), epochs=1,
                             lr=1e-2, weight_decay=0.01, batch_size=12, precision="fp32", seed=0)
    labels = (small.obs["label"] == "sensitive").to_numpy(np.int64)
    with pytest.raises(ScdmError, match="cells attend to each other, so the batch is part of the model"):
        train_lora(adapter, cells, labels, settings, device="cpu", precision="fp32", gradient_checkpointing=False, progress=False)


def test_bf16_autocast_trains(tmp_path, small):
    make, labels = _geneformer_cells(tmp_path, small)
    adapter, cells = make()
    settings = TrainSettings(rank=4, alpha=8, dropout=0.05, target_modules=("query", "value"), epochs=1, lr=1e-2,
                             weight_decay=0.01, batch_size=12, precision="bf16", seed=0)
    trained = train_lora(adapter, cells, labels, settings, device="cpu", precision="bf16", gradient_checkpointing=False, progress=False)
    assert np.isfinite(trained.curve[0]["loss"])
    assert all(p.dtype == torch.float32 for n, p in trained.adapter.model.named_parameters() if ".lora_" in n)


def test_gradient_checkpointing_warns_where_unsupported(tmp_path, small):
    st = _store(tmp_path, small)
    ckpt = _checkpoint("scgpt", tmp_path / "ckpt", small.var_names.tolist())
    with pytest.warns(ScdmWarning, match="not supported by the scgpt model"):
        finetune(st, model="scgpt", checkpoint=ckpt, dataset="planted", fold=0, gradient_checkpointing=True, **FAST)


# ---- the gradient check --------------------------------------------------------------------------
@pytest.fixture()
def toy_store(tmp_path: Path, small: ad.AnnData) -> tuple[Store, Path]:
    st = _store(tmp_path, small)
    return st, toy_adapter.write_toy_checkpoint(tmp_path / "toy", small.var_names.tolist())


def test_gradient_check_names_a_module_that_gets_no_gradient(toy_store):
    st, ckpt = toy_store
    # a stock nn.MultiheadAttention reads out_proj.weight directly: LoRA on out_proj is bypassed
    with pytest.raises(LoraTrainingError, match=r"not training 1 of 2 toy-test modules: layer\.self_attn\.out_proj received no gradient"):
        finetune(st, model="toy-test", checkpoint=ckpt, dataset="planted", fold=0,
                 target_modules=["self_attn.out_proj", "linear1"], **FAST)
    assert st.query("SELECT count(*) AS n FROM adapters")["n"].iloc[0] == 0
    assert not list((st.root / "artifacts" / "adapters").glob("*"))  # nothing half-saved


def test_lora_that_eval_mode_bypasses_is_refused(toy_store):
    st, ckpt = toy_store
    # linear1/linear2 train in train mode, but the fused eval fast path of nn.TransformerEncoderLayer skips them
    with pytest.raises(LoraTrainingError, match="do not change the toy-test embedding in eval mode"):
        finetune(st, model="toy-test", checkpoint=ckpt, dataset="planted", fold=0, target_modules=["linear1", "linear2"], **FAST)


def test_unknown_lora_targets_list_the_available_modules(tmp_path, small):
    st = _store(tmp_path, small)
    ckpt = _checkpoint("scgpt", tmp_path / "ckpt", small.var_names.tolist())
    with pytest.raises(CheckpointError, match=r"\['to_q'\] are not in the scgpt architecture.*transformer_encoder\.layers\.\{i\}\.linear1"):
        finetune(st, model="scgpt", checkpoint=ckpt, dataset="planted", fold=0, target_modules=["linear1", "to_q"], **FAST)


# ---- catalog rows, tuned embeddings, fold invariant ------------------------------------------------
def test_finetune_stores_adapter_tuned_embeddings_and_head_results(gf_store):
    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=1, **FAST)
    assert res.variant == f"lora:{res.adapter_id}" and not res.reused and res.fold == 1
    folder = Path(res.adapter_dir)
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "scdm_adapter.json"} <= {p.name for p in folder.iterdir()}
    assert folder.parent == st.root / "artifacts" / "adapters"

    row = st.query("SELECT * FROM adapters WHERE adapter_id = ?", [res.adapter_id]).iloc[0]
    assert row["model"] == "geneformer" and row["checkpoint_hash"] == checkpoint_hash(ckpt)
    assert row["split_id"] == res.split_id and row["fold"] == 1 and row["device"] == "cpu" and row["wall_seconds"] > 0
    lora = json.loads(row["lora_config"])
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (8, 8.0, 0.05) and lora["matched_modules"]
    assert [c["epoch"] for c in json.loads(row["train_curve"])] == [1]

    emb = st.query("SELECT * FROM embeddings WHERE embedding_id = ?", [res.embedding_ids[0]]).iloc[0]
    assert emb["variant"] == res.variant and emb["adapter_hash"] == res.adapter_hash == row["adapter_hash"]
    params = json.loads(emb["params"])
    assert params["lora"]["split_id"] == res.split_id and params["lora"]["fold"] == 1
    frozen = embed(st, "planted", "geneformer", ckpt, progress=False)
    assert frozen.embedding_id not in res.embedding_ids
    tuned, plain = st.read_embedding(res.embedding_ids[0]), st.read_embedding(frozen.embedding_id)
    assert tuned.shape == plain.shape and not np.allclose(tuned, plain, atol=1e-5)

    # the stored embedding is what the saved adapter computes (reloaded through the card)
    adapter = get_adapter("geneformer")(checkpoint=ckpt)
    adapter.load("cpu")
    read_lora_card(folder).apply(adapter)
    genes = st.genes("planted")["gene_id"].tolist()
    adapter.prepare(genes, gene_id_kind="symbol")
    x = st.open_anndata("planted", backed=False).X
    with torch.inference_mode():
        direct = adapter.embed(adapter.collate(adapter.tokenize(sp.csr_matrix(x, dtype=np.float32), np.arange(x.shape[0]))))
    np.testing.assert_allclose(direct.numpy(), tuned, atol=1e-5)

    task = st.query("SELECT * FROM eval_tasks WHERE task_id = ?", [res.task_id]).iloc[0]
    assert task["head"] == LORA_HEAD and task["variant"] == res.variant and task["fold"] == 1
    assert json.loads(task["embedding_ids"]) == list(res.embedding_ids)
    assert task["n_train"] == res.n_train and task["n_test"] == res.n_test and res.n_train + res.n_test == 36
    assert set(res.metrics) >= {"auroc", "accuracy", "f1"} and 0 <= res.metrics["accuracy"] <= 1


def test_fold_variant_is_only_evaluated_on_its_test_cells(gf_store):
    st, ckpt = gf_store
    results = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", all_folds=True, **FAST)
    assert [r.fold for r in results] == [0, 1] and len({r.adapter_id for r in results}) == 2
    covered = set()
    for res in results:
        cells = _split_cells(st, res.split_id)
        train = {int(r) for r in cells.loc[cells["fold"] != res.fold, "row"]}
        test = {int(r) for r in cells.loc[cells["fold"] == res.fold, "row"]}
        # the (split, fold) the variant belongs to is in its embeddings' params: the cells a grid may
        # evaluate it on are exactly that fold's test cells
        params = json.loads(st.query("SELECT params FROM embeddings WHERE embedding_id = ?", [res.embedding_ids[0]])["params"].iloc[0])
        scope = st.query('SELECT "row" FROM split_assignments WHERE split_id = ? AND fold = ?',
                         [params["lora"]["split_id"], params["lora"]["fold"]])
        assert {int(r) for r in scope["row"]} == test
        # what was written: predictions only on the fold's test cells, never on a training cell
        predicted = {int(r) for r in st.query("SELECT row FROM eval_predictions WHERE task_id = ?", [res.task_id])["row"]}
        assert predicted == test and not predicted & train
        tasks = st.query("SELECT split_id, fold FROM eval_tasks WHERE variant = ?", [res.variant])
        assert (tasks["split_id"] == res.split_id).all() and (tasks["fold"] == res.fold).all()
        # the adapter trained on exactly the other folds' cells
        row = st.query("SELECT n_train, train_cells_hash FROM adapters WHERE adapter_id = ?", [res.adapter_id]).iloc[0]
        train_frame = cells[cells["fold"] != res.fold]
        assert row["n_train"] == len(train) and row["train_cells_hash"] == cells_hash(train_frame)
        covered |= predicted
    assert covered == set(range(36))


def test_leaderboard_shows_frozen_and_lora_heads_side_by_side(gf_store):
    from scdm.classify.grid import evaluate

    st, ckpt = gf_store
    frozen = embed(st, "planted", "geneformer", ckpt, progress=False)
    evaluate(st, [frozen.embedding_id], scenarios=["pooled"], by=["all"], heads=["logreg"], folds=2, silent=True)
    finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    board = leaderboard(st, metrics=["auroc"], scenarios=["pooled"], category_types=["all"])
    assert {"logreg", LORA_HEAD} <= set(board["head"])
    lora_row = board[board["head"] == LORA_HEAD].iloc[0]
    assert lora_row["variant"].startswith("lora:") and lora_row["datasets"] == "planted"


def test_category_split_of_a_subset_and_cross_scenario(gf_store):
    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", by="tissue", category="lung", fold=0, **FAST)
    cells = _split_cells(st, res.split_id)
    assert len(cells) == 18 and res.category == "lung"
    lung = set(st.query("SELECT row FROM cells WHERE tissue = 'lung'")["row"])
    assert set(cells["row"]) == lung
    (cross,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", scenario="cross", fold=1, **FAST)
    assert cross.scheme == "study" and cross.n_test == 12  # held-out study S2: every third cell


# ---- caching --------------------------------------------------------------------------------------
def test_rerun_reuses_adapter_embeddings_and_results(gf_store, monkeypatch):
    st, ckpt = gf_store
    (first,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    counts = {t: st.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0] for t in ("adapters", "embeddings", "eval_tasks", "eval_runs")}

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(ft, "train_lora", no_training)
    (again,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert again.reused and not first.reused
    assert (again.adapter_id, again.embedding_ids, again.task_id, again.metrics) == (first.adapter_id, first.embedding_ids, first.task_id, first.metrics)
    assert counts == {t: st.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0] for t in counts}
    # another setting is another adapter
    monkeypatch.undo()
    (other,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **{**FAST, "lr": 5e-3})
    assert other.adapter_id != first.adapter_id and other.embedding_ids != first.embedding_ids


def test_a_seed_given_as_a_numpy_int_is_the_same_tuning(gf_store, monkeypatch):
    # numpy.int64(0) was keyed "0" (a string) into the tuning id: the same adapter trained again under a second id
    st, ckpt = gf_store
    (first,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **{**FAST, "seed": 0})

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(ft, "train_lora", no_training)
    (again,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **{**FAST, "seed": np.int64(0)})
    assert again.reused and again.adapter_id == first.adapter_id


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_seed_that_is_no_whole_number_is_refused_before_any_work(gf_store, seed):
    st, ckpt = gf_store
    with pytest.raises(InputDataError, match=r"seed=\) must be an integer >= 0"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **{**FAST, "seed": seed})
    assert st.query("SELECT count(*) AS n FROM adapters")["n"].iloc[0] == 0


def test_retraining_a_lost_adapter_into_other_weights_replaces_its_results(gf_store, monkeypatch):
    # The adapter's folder is deleted and it trains again into other weights (GPU training is not
    # bit-reproducible): the old tuned space must not stay beside the new one under the same
    # variant, or the leaderboard averages both as two folds of one (split, fold) (n_folds 2 of 1).
    import shutil

    st, ckpt = gf_store
    (first,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    shutil.rmtree(first.adapter_dir)
    real = ft.train_lora

    def other_weights(*args, **kwargs):
        trained = real(*args, **kwargs)
        with torch.no_grad():
            trained.head[-1].bias.add_(0.01)
        return trained

    monkeypatch.setattr(ft, "train_lora", other_weights)
    (again,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert again.adapter_id == first.adapter_id and again.adapter_hash != first.adapter_hash
    tuned = st.query("SELECT embedding_id, adapter_hash FROM embeddings WHERE variant = ?", [again.variant])
    assert tuned["embedding_id"].tolist() == list(again.embedding_ids) and set(tuned["adapter_hash"]) == {again.adapter_hash}
    assert st.query("SELECT task_id FROM eval_tasks")["task_id"].tolist() == [again.task_id]
    board = leaderboard(st, metrics=["auroc"], heads=[LORA_HEAD])
    assert len(board) == 1 and board["n_folds"].iloc[0] == 1 and board["folds_done"].iloc[0] == 1


@pytest.mark.parametrize("damage", ["missing head", "changed weights", "unreadable card"])
def test_a_damaged_adapter_folder_is_trained_again_not_reused(gf_store, damage, caplog):
    # A stored adapter whose folder lost a file (or whose bytes changed) was reused as long as its
    # outputs existed, and once they were gone `scdm finetune` failed on it for good ("missing
    # 'head.safetensors'"): the advice "fine-tune again" could never succeed.
    st, ckpt = gf_store
    (first,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    folder = Path(first.adapter_dir)
    if damage == "missing head":
        (folder / "head.safetensors").unlink()
    elif damage == "changed weights":
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    else:
        (folder / "scdm_adapter.json").write_text("{not json")
    with caplog.at_level("WARNING", logger="scdm"):
        (again,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert not again.reused and "training it again" in caplog.text
    assert (again.adapter_id, again.adapter_hash) == (first.adapter_id, first.adapter_hash)  # CPU: the same weights
    assert read_lora_card(folder).damage() is None
    assert (again.embedding_ids, again.task_id, again.metrics) == (first.embedding_ids, first.task_id, first.metrics)
    for embedding_id in again.embedding_ids:  # the adapter embeds again from its folder
        st.remove_embedding(embedding_id)
    (third,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert third.reused and third.embedding_ids == first.embedding_ids


def test_the_adapter_hash_does_not_depend_on_the_checkpoint_folder(tmp_path, small):
    # the same checkpoint in two folders trains the same weights: the same adapter, hash and space
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    import shutil

    shutil.copytree(ckpt, tmp_path / "elsewhere")
    results = [finetune(_store(tmp_path / name, small, n_folds=2), model="geneformer", checkpoint=path,
                        dataset="planted", fold=0, **FAST)[0] for name, path in (("a", ckpt), ("b", tmp_path / "elsewhere"))]
    assert results[0].adapter_id == results[1].adapter_id
    assert results[0].adapter_hash == results[1].adapter_hash
    assert str(tmp_path) not in (Path(results[1].adapter_dir) / "adapter_config.json").read_text()


# ---- the planted signal -----------------------------------------------------------------------------
def test_lora_learns_a_planted_signal_the_frozen_random_model_misses(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    adata = _planted(240, 300, 30)
    st = _store(tmp_path, adata, n_folds=4)
    ckpt = _checkpoint("geneformer", tmp_path / "gf", adata.var_names.tolist())
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, epochs=8, lr=3e-3,
                      batch_size=16, progress=False)
    cells = st.query('SELECT a."row", a.fold, c.response FROM split_assignments a JOIN cells c USING (dataset_id, "row") '
                     'WHERE a.split_id = ? ORDER BY a."row"', [res.split_id])
    test = (cells["fold"] == 0).to_numpy()
    rows, y = cells["row"].to_numpy(), cells["response"].to_numpy()
    frozen = st.read_embedding(embed(st, "planted", "geneformer", ckpt, progress=False).embedding_id)[rows]
    frozen_auroc = roc_auc_score(y[test], LogisticRegression(max_iter=2000).fit(frozen[~test], y[~test]).predict_proba(frozen[test])[:, 1])
    # seed 0: about 1.0 against 0.73; other data seeds gave 0.90-1.0 against 0.76-0.83
    assert res.metrics["auroc"] > frozen_auroc + 0.1, (res.metrics["auroc"], frozen_auroc)
    assert res.train_curve[-1]["loss"] < res.train_curve[0]["loss"]


# ---- bad input --------------------------------------------------------------------------------------
def test_missing_split_names_the_command_that_makes_it(tmp_path, small):
    st = Store(tmp_path / "store")
    st.ingest(small, name="planted", label_key="label")
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    with pytest.raises(InputDataError, match=r"no pooled split by all of the cells of planted.*scdm evaluate --dataset planted --scenario pooled --by all"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)


def test_a_label_set_whose_split_is_stored_under_another_name_is_named(tmp_path, small):
    # JHU006's Vorinostat and AR-42 label the same cells alike: `scdm evaluate --label-set AR-42` stores their
    # split once, under the first name, so `scdm finetune --label-set AR-42` said the catalog held no split and
    # advised the `scdm evaluate` command (without --label-set) that had already run: a dead end
    adata = small.copy()
    adata.obs["same"] = adata.obs["label"]
    adata.obs["flipped"] = adata.obs["label"].map({"sensitive": "resistant", "resistant": "sensitive"})
    st = Store(tmp_path / "store")
    st.ingest(adata, name="planted", label_key="label", tissue_key="tissue", study_key="study")
    for key in ("same", "flipped"):
        st.ingest(adata, label_key=key)
    save_splits(st, make_splits(st.cells(["planted"], label_set="label"), scenarios=["pooled"], by=["all"], n_folds=2))
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    split_id = st.query("SELECT split_id FROM splits")["split_id"].iloc[0]
    with pytest.raises(InputDataError, match=rf"Label set 'same' labels the cells of planted exactly as 'label' does.*"
                                             rf"{split_id}.*--label-set label\)"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, label_set="same", **FAST)
    # other labels: no split yet, and the command that makes it names the label set
    with pytest.raises(InputDataError, match=r"no pooled split by all.*`scdm evaluate --dataset planted --scenario pooled "
                                             r"--by all --label-set flipped`"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, label_set="flipped", **FAST)


def _bad_input(case: str) -> tuple[ad.AnnData, list[str]]:
    """The planted data made into what `scdm embed --model geneformer` refuses, and the genes its checkpoint knows."""
    adata = _planted(36, 80, 12)
    genes, x = adata.var_names.tolist(), adata.X.toarray()
    if case == "log1p":  # log-normalised values given to a model that expects raw counts
        x = np.log1p(x)
    elif case == "empty":  # a cell with no expressed gene
        x[5] = 0
    elif case == "unknown":  # a cell whose only expressed gene the model does not know
        x[:, 60:] = 0
        x[5] = 0
        x[5, 70] = 3
        genes = genes[:60]
    adata.X = sp.csr_matrix(x.astype(np.float32))
    return adata, genes


@pytest.mark.parametrize(("case", "refusal"), [
    ("log1p", r"geneformer expects raw counts, but dataset 'planted' holds normalized values.*--allow-non-counts"),
    ("empty", r"cells at rows 5 \(1 in all\) express no gene at all.*--allow-empty-cells"),
    ("unknown", r"cells at rows 5 \(1 in all\) express none of the genes the model knows.*--allow-empty-cells"),
])
def test_input_scdm_embed_refuses_is_refused_before_any_adapter_is_trained(tmp_path, case, refusal):
    # finetune tokenised the training cells without the runner's checks: on log1p values, a cell expressing
    # nothing or only genes the model does not know, it trained and stored an adapter (a row in `adapters`)
    # and only the tuned embedding step that follows refused the data, with no flag to allow it
    adata, genes = _bad_input(case)
    st = _store(tmp_path, adata)
    ckpt = _checkpoint("geneformer", tmp_path / "gf", genes)
    with pytest.raises(InputDataError, match=refusal):
        embed(st, "planted", "geneformer", ckpt, progress=False)
    with pytest.raises(InputDataError, match=refusal):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert st.query("SELECT * FROM adapters").empty


def test_finetune_takes_the_flags_of_scdm_embed(tmp_path):
    adata, genes = _bad_input("unknown")  # 60 of 80 genes known, cell 5 expresses none of them
    st = _store(tmp_path, adata)
    ckpt = _checkpoint("geneformer", tmp_path / "gf", genes)
    with pytest.raises(GeneMappingError, match=r"Only 60 of 80 genes \(75.0%\).*need at least 1 and 90%"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, min_gene_fraction=0.9, **FAST)
    assert st.query("SELECT * FROM adapters").empty
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, allow_empty_cells=True, **FAST)
    audit = json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [res.embedding_ids[0]])["audit"].iloc[0])
    assert audit["cells_without_known_genes"] == 1

    adata, genes = _bad_input("log1p")
    st = _store(tmp_path / "log1p", adata)
    with pytest.warns(ScdmWarning, match="expects raw counts; embedding the normalized values"):
        (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, allow_non_counts=True, **FAST)
    assert len(res.embedding_ids) == 1 and res.n_train + res.n_test == 36


def test_missing_category_or_fold_lists_the_available_ones(gf_store):
    st, ckpt = gf_store
    with pytest.raises(InputDataError, match=r"Category 'liver' .* Available categories: lung, skin\."):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", by="tissue", category="liver", fold=0, **FAST)
    with pytest.raises(InputDataError, match=r"Fold 7 does not exist .* Available folds: 0, 1\."):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=7, **FAST)
    with pytest.raises(InputDataError, match=r"Available folds: 0 \(held-out S1\), 1 \(held-out S2\)"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", scenario="cross", fold=5, **FAST)
    with pytest.raises(InputDataError, match="exactly one of fold=k"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", **FAST)
    with pytest.raises(InputDataError, match="exactly one of fold=k"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, all_folds=True, **FAST)
    save_splits(st, make_splits(st.cells(["planted"]), scenarios=["pooled"], by=["all"], n_folds=3))
    with pytest.raises(InputDataError, match=r"Category 'all' has 2 stored pooled splits by all: .*2 folds.*3 folds.*split_id="):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    with pytest.raises(InputDataError, match="rank=0 must be an integer >= 1"):
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, rank=0, **FAST)


def test_a_skipped_category_is_left_out_not_refusing_the_others(tmp_path, small):
    # `finetune --by tissue --all-folds` (every category) refused the whole run because one tissue's cells
    # were all one class ('... is skipped ... Choose another category'), where the grid leaves that category out
    adata = small.copy()
    sensitive = np.flatnonzero(adata.obs["label"].to_numpy() == "sensitive")[:4]
    adata.obs["tissue"] = adata.obs["tissue"].astype(str)
    adata.obs.iloc[sensitive, adata.obs.columns.get_loc("tissue")] = "liver"
    st = _store(tmp_path, adata, by=("tissue",), n_folds=2)
    assert st.query("SELECT status FROM splits WHERE category = 'liver'")["status"].tolist() == ["skipped"]
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    with pytest.warns(ScdmWarning, match=r"category 'liver' is skipped: .*Left out; the other categories are tuned"):
        results = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", by="tissue", fold=0, **FAST)
    assert [r.category for r in results] == ["lung", "skin"]
    with pytest.raises(InputDataError, match=r"category 'liver' is skipped: .*Choose another category"):  # asked for
        finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", by="tissue", category="liver", fold=0, **FAST)


def test_adapter_refuses_another_checkpoint_or_parameters(gf_store, tmp_path, small):
    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    other = _checkpoint("geneformer", tmp_path / "other", small.var_names.tolist(), seed=1)
    with pytest.raises(CheckpointError, match="LoRA weights only fit the exact checkpoint"):
        embed(st, "planted", "geneformer", other, progress=False, lora_dir=res.adapter_dir)
    with pytest.raises(CheckpointError, match="was trained with geneformer parameters"):
        embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=res.adapter_dir, layer=-1)
    with pytest.raises(CheckpointError, match="trained on 'geneformer', not 'scgpt'"):
        embed(st, "planted", "scgpt", _checkpoint("scgpt", tmp_path / "sg", small.var_names.tolist()), progress=False,
              lora_dir=res.adapter_dir)
    with pytest.raises(CheckpointError, match="not an scdm LoRA adapter folder"):
        embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=tmp_path)
    weights = Path(res.adapter_dir) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    st.remove_embedding(res.embedding_ids[0])
    with pytest.raises(CheckpointError, match="do not match their recorded hash"):
        embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=res.adapter_dir)


def test_a_changed_adapter_is_refused_not_answered_with_its_stored_embedding(gf_store):
    # Tuned embeddings are looked up by the card's adapter hash, which the files were not checked against
    # before the lookup: weights changed under the card got the embedding of the original weights back
    # (same embedding id, computed_chunks 0), where computing one refuses them.
    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=res.adapter_dir)  # stored: reused as it is
    weights = Path(res.adapter_dir) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match=r"do not match their recorded hash .*Fine-tune again"):
        embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=res.adapter_dir)
    with pytest.raises(CheckpointError, match=r"do not match their recorded hash"):  # by its id too
        embed(st, "planted", "geneformer", ckpt, progress=False, lora_dir=res.adapter_id)


# ---- the LoRA head is scored by the same code as every head ---------------------------------------
def test_lora_rows_are_scored_by_the_shared_metrics(gf_store):
    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    preds = st.query("SELECT y_true, proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, row", [res.task_id])
    stored = st.query("SELECT metric, value, label_set, datasets, n_folds FROM eval_results WHERE task_id = ?", [res.task_id])
    expected = compute_metrics(preds["y_true"].to_numpy(), preds["proba"].to_numpy())
    got = {m: (None if pd.isna(v) else v) for m, v in zip(stored["metric"], stored["value"])}
    assert got == pytest.approx(expected.values, nan_ok=True)
    assert set(stored["label_set"]) == {"label"} and set(stored["datasets"]) == {"planted"}
    assert not hasattr(ft, "_fold_metrics")  # no second implementation of the metrics


def test_a_lora_head_an_older_scdm_scored_in_float32_is_scored_again_not_reused(gf_store, monkeypatch):
    # 3b6c41f moved the lora-mlp softmax to float64 but kept its task ids: a fold an older scdm had scored in
    # float32 (an overconfident tuned head: 13 of 19 test cells exactly 1.0, AUROC 0.845 for its own 0.917) was
    # reused by `scdm finetune` (reused, same task id) and shown by the leaderboard as current
    from scdm.classify.results import stale_notes

    st, ckpt = gf_store
    real_train = ft.train_lora

    def overconfident(*args, **kwargs):
        trained = real_train(*args, **kwargs)
        with torch.no_grad():
            trained.head[-1].weight.mul_(100)
            trained.head[-1].bias.mul_(100)
        return trained

    def float32_softmax(store, card, head, embeddings, test):  # the older scdm's scoring
        proba = np.empty(len(test), np.float32)
        for dataset_id, group in test.groupby("dataset_id", sort=True):
            x = store.read_embedding(embeddings[str(dataset_id)], rows=group["row"].to_numpy(np.int64))
            with torch.inference_mode():
                proba[group.index.to_numpy()] = torch.softmax(head(torch.from_numpy(x)).float(), dim=1)[:, 1].numpy()
        return proba

    monkeypatch.setattr(ft, "train_lora", overconfident)
    monkeypatch.setattr(ft, "_head_predictions", float32_softmax)
    monkeypatch.setattr(ft, "_REVISION", 1, raising=False)  # it recorded no revision: read as 1
    (old,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    monkeypatch.undo()
    n_tied = int((st.query("SELECT proba FROM eval_predictions")["proba"] == 1).sum())
    assert n_tied >= 2  # tied at exactly 1.0
    assert leaderboard(st, metrics=["auroc"], heads=[LORA_HEAD]).empty  # left out, and said so
    assert any("lora-mlp tasks were fitted by an older scdm" in n and "scdm finetune" in n for n in stale_notes(st))

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(ft, "train_lora", no_training)  # the stored adapter's head is scored again
    (now,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    assert now.reused and now.adapter_hash == old.adapter_hash and now.task_id != old.task_id
    preds = st.query("SELECT y_true, proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, row", [now.task_id])
    assert int((preds["proba"] == 1).sum()) < n_tied  # float64 ranks cells the float32 softmax tied
    expected = compute_metrics(preds["y_true"].to_numpy(), preds["proba"].to_numpy()).values
    assert now.metrics == pytest.approx(expected, nan_ok=True) and now.metrics["auroc"] != old.metrics["auroc"]
    assert st.query("SELECT task_id FROM eval_tasks")["task_id"].tolist() == [now.task_id]  # the old one replaced
    board = leaderboard(st, metrics=["auroc"], heads=[LORA_HEAD])
    assert len(board) == 1 and board["n_folds"].iloc[0] == 1 and board["mean"].iloc[0] == pytest.approx(now.metrics["auroc"])
    assert stale_notes(st) == []


def test_split_pooled_over_two_datasets_gives_one_tuned_space(tmp_path, small):
    st = Store(tmp_path / "store")
    for name, part in (("first", small[:20]), ("second", small[20:])):
        st.ingest(part.copy(), name=name, label_key="label", tissue_key="tissue", study_key="study")
    save_splits(st, make_splits(st.cells(["first", "second"]), scenarios=["pooled"], by=["all"], n_folds=2))
    ckpt = _checkpoint("scbert", tmp_path / "ckpt", small.var_names.tolist())
    with pytest.raises(InputDataError, match="no pooled split by all of the cells of first"):
        finetune(st, model="scbert", checkpoint=ckpt, dataset="first", fold=0, **FAST)  # the split covers both
    (res,) = finetune(st, model="scbert", checkpoint=ckpt, dataset=["first", "second"], fold=0, **FAST)
    assert len(res.embedding_ids) == 2
    spaces = st.query("SELECT DISTINCT space_id, variant FROM embeddings WHERE list_contains(?, embedding_id)", [list(res.embedding_ids)])
    assert len(spaces) == 1 and spaces["variant"].iloc[0] == res.variant
    predicted = st.query("SELECT dataset_id, row FROM eval_predictions WHERE task_id = ?", [res.task_id])
    test = st.query('SELECT dataset_id, "row" FROM split_assignments WHERE split_id = ? AND fold = 0', [res.split_id])
    assert predicted["dataset_id"].nunique() == 2
    assert set(map(tuple, predicted.to_numpy())) == set(map(tuple, test.to_numpy()))


def test_grid_evaluates_a_lora_variant_only_on_its_own_folds_test_cells(gf_store):
    from scdm.classify.grid import evaluate

    st, ckpt = gf_store
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=1, **FAST)
    tuned = st.query("SELECT embedding_id FROM embeddings WHERE variant LIKE 'lora:%'")["embedding_id"].tolist()
    evaluate(st, tuned, scenarios=["pooled", "cross"], by=["all", "tissue"], heads=["logreg"], folds=2, silent=True)
    tasks = st.query("SELECT task_id, split_id, fold FROM eval_tasks WHERE head = 'logreg' AND variant LIKE 'lora:%'")
    assert len(tasks) >= 1 and set(tasks["split_id"]) == {res.split_id} and set(tasks["fold"]) == {1}
    trained = set(_split_cells(st, res.split_id).query("fold != 1")["row"])
    predicted = set(st.query("SELECT p.row FROM eval_predictions p JOIN eval_tasks t USING (task_id) "
                             "WHERE t.head = 'logreg' AND t.variant LIKE 'lora:%'")["row"])
    assert predicted and not (predicted & trained)


def test_tuned_embeddings_of_a_removed_split_are_left_out_with_a_warning(gf_store, caplog):
    from scdm.classify.grid import evaluate

    st, ckpt = gf_store
    finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    embed(st, "planted", "geneformer", ckpt, progress=False)  # a frozen space beside the tuned one
    st.ingest(st.open_anndata("planted", backed=False), study="one study", update=True)  # the splits' strata change
    assert st.query("SELECT count(*) AS n FROM splits")["n"].iloc[0] == 0
    with caplog.at_level("WARNING", logger="scdm"):
        summary = evaluate(st, heads=["majority"], scenarios=["pooled"], by=["all"], folds=2, split_scheme="cell", silent=True)
    assert "tuned embeddings" in caplog.text and "fine-tune again" in caplog.text
    assert summary.n_done == 2  # the frozen space is still evaluated, on the new split


def test_a_tuned_space_is_evaluated_with_the_labels_and_cells_it_was_tuned_on(tmp_path, small):
    from scdm.classify.grid import evaluate

    adata = small.copy()
    adata.obs["partial"] = adata.obs["label"].astype(str)
    adata.obs.loc[adata.obs_names[:12], "partial"] = "unknown"  # the default leaves 12 cells unlabelled
    st = Store(tmp_path / "store")
    st.ingest(adata, name="planted", label_key="partial", unknown_values=["unknown"], tissue_key="tissue", study_key="study")
    st.ingest(adata, label_key="label")
    save_splits(st, make_splits(st.cells(["planted"], label_set="label"), scenarios=["pooled"], by=["all"], n_folds=3))
    ckpt = _checkpoint("geneformer", tmp_path / "gf", adata.var_names.tolist())
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, label_set="label", **FAST)
    evaluate(st, list(res.embedding_ids), heads=["logreg"], folds=3, silent=True)  # no label set asked: the tuned one
    task = st.query("SELECT task_id, label_set, n_test FROM eval_tasks WHERE head = 'logreg'").iloc[0]
    test = _split_cells(st, res.split_id).query("fold == 0")
    assert task["label_set"] == "label" and task["n_test"] == len(test)
    stored = st.query('SELECT "row", y_true FROM eval_predictions WHERE task_id = ? ORDER BY "row"', [task["task_id"]])
    truth = st.cells("planted", label_set="label").set_index("row")["response"]
    assert stored["row"].tolist() == test["row"].tolist()  # every test cell once, none read as another
    assert stored["y_true"].tolist() == truth.loc[stored["row"]].tolist()
    asked = evaluate(st, list(res.embedding_ids), heads=["logreg"], folds=3, label_set="partial", silent=True)
    assert asked.spaces == ()  # tuned on other labels: left out, never scored against these


# ---- a tuned space outside the grid: never scored as held-out on the cells it was tuned on --------------
@pytest.fixture()
def two_datasets_tuned(tmp_path: Path):
    """first + second pooled in one split; scbert tuned on fold 0 (its training cells are in both datasets)."""
    adata = _planted(48, 80, 12)
    st = Store(tmp_path / "store")
    for name, part in (("first", adata[:24]), ("second", adata[24:])):
        st.ingest(part.copy(), name=name, label_key="label", tissue_key="tissue", study_key="study")
    save_splits(st, make_splits(st.cells(["first", "second"]), scenarios=["pooled"], by=["all"], n_folds=2))
    ckpt = _checkpoint("scbert", tmp_path / "ckpt", adata.var_names.tolist())
    (res,) = finetune(st, model="scbert", checkpoint=ckpt, dataset=["first", "second"], fold=0, **FAST)
    tuned = st.embeddings().set_index("dataset_name")
    tuned = tuned[tuned["variant"] == res.variant]["embedding_id"].to_dict()
    cells = st.query('SELECT d.name, a."row", a.fold FROM split_assignments a JOIN datasets d USING (dataset_id) '
                     'WHERE a.split_id = ? ORDER BY d.name, a."row"', [res.split_id])
    seen = {name: set(group.loc[group["fold"] != 0, "row"].astype(int)) for name, group in cells.groupby("name")}
    return st, ckpt, res, tuned, seen


def test_transfer_refuses_a_target_embedding_tuned_on_target_cells(two_datasets_tuned, tmp_path):
    # transfer scored every labelled target cell with a tuned target embedding, although the adapter
    # had trained on the labels of half of them (AUROC on cells the embedding was tuned on)
    from scdm.classify.transfer import transfer

    st, ckpt, res, tuned, seen = two_datasets_tuned
    assert seen["second"]
    fast = {"epochs": 1, "pretrain_epochs": 1, "cluster_method": "kmeans", "progress": False}
    with pytest.raises(InputDataError, match=rf"{res.variant}, a LoRA adapter tuned with the labels of {len(seen['second'])} of its cells"):
        transfer(st, source="first", target="second", features=tuned["second"], **fast)
    assert st.query("SELECT count(*) AS n FROM transfer_runs")["n"].iloc[0] == 0
    # a dataset the adapter never saw is a fair target in the tuned space
    other = _planted(20, 80, 12, seed=3)
    st.ingest(other, name="unseen", label_key="label")
    unseen = embed(st, "unseen", "scbert", ckpt, progress=False, lora_dir=res.adapter_dir).embedding_id
    result = transfer(st, source="first", target="unseen", features=unseen, **fast)
    assert result.metrics["auroc"] is not None
    # nor may tuned cells select the model as the target-validation set
    with pytest.raises(InputDataError, match=r"of the validation 'second' is lora:.*select its model on cells"):
        transfer(st, source="first", target="unseen", validation="second", features=unseen, **fast)


def test_a_tuned_space_selected_without_every_dataset_of_its_split_is_left_out_and_named(two_datasets_tuned, caplog):
    # `scdm evaluate --dataset first` selected first's tuned embedding only; its split pools second too, whose
    # cells had no row in the space, and every head stopped on a bare KeyError of second's dataset id
    from scdm.classify.grid import evaluate

    st, _, res, tuned, _ = two_datasets_tuned
    with caplog.at_level("WARNING", logger="scdm"):
        summary = evaluate(st, [tuned["first"]], heads=["logreg"], folds=2, silent=True)
    assert summary.spaces == () and summary.n_done == 0
    assert f"also pools second, and their tuned embeddings {tuned['second']} are not selected" in caplog.text
    both = evaluate(st, list(tuned.values()), heads=["logreg"], folds=2, silent=True)
    assert both.n_done == 1


def test_predict_marks_cells_that_tuned_the_embedding_as_not_held_out(two_datasets_tuned):
    # a head trained on the tuned embedding of `first` predicted `second` with trained_on all False,
    # although the adapter had trained on the labels of half of second's cells
    from scdm.classify.trained_heads import predict, train_head

    st, _, res, tuned, seen = two_datasets_tuned
    head_id = train_head(st, embeddings=[tuned["first"]], head="logreg")
    frame = predict(st, head_id, "second")
    assert set(frame.loc[frame["trained_on"], "row"].astype(int)) == seen["second"]
    own = predict(st, head_id, "first")
    assert own["trained_on"].all()  # the head's own training cells, as before
    # once the split is gone (the cells' metadata changed) the tuned cells cannot be told apart: none is held-out
    st.ingest(st.open_anndata("second", backed=False), study="one study", update=True)
    assert st.query("SELECT count(*) AS n FROM splits")["n"].iloc[0] == 0
    assert predict(st, head_id, "second")["trained_on"].all()


def test_a_tuned_head_names_the_way_a_new_dataset_gets_into_its_space(two_datasets_tuned):
    # predicting a new dataset with a head on tuned embeddings advised `scdm embed new --model scbert`,
    # which makes the frozen space: following it only led to a second, vaguer refusal
    from scdm.classify.trained_heads import SpaceMismatchError, predict, train_head

    st, ckpt, res, tuned, _ = two_datasets_tuned
    head_id = train_head(st, embeddings=[tuned["first"]], head="logreg")
    st.ingest(_planted(20, 80, 12, seed=3), name="unseen", label_key="label")
    embed(st, "unseen", "scbert", ckpt, progress=False)
    with pytest.raises(SpaceMismatchError, match=rf"`scdm embed` without --lora makes the frozen scbert space.*--lora "
                       rf"{res.adapter_id}.*lora_dir='{re.escape(res.adapter_dir)}'"):
        predict(st, head_id, "unseen")
    from click.testing import CliRunner

    from scdm.cli import main

    def scdm(*args: str):
        return CliRunner().invoke(main, ["--store", str(st.root), "embed", "unseen", "--model", "scbert", "-c", str(ckpt),
                                         "-q", *args])

    refused = scdm("--lora", "lora:0000000000000000")
    assert refused.exit_code != 0 and "neither a folder nor an adapter of this store" in refused.output
    done = scdm("--lora", res.adapter_id)  # what the message says
    assert done.exit_code == 0, done.output
    frame = predict(st, head_id, "unseen")
    assert len(frame) == 20 and not frame["trained_on"].any()
    # the variant name and the folder name the same adapter: the same embedding, already stored
    again = [scdm("--lora", how) for how in (res.variant, str(res.adapter_dir))]
    assert all(r.exit_code == 0 and "already in the store" in r.output for r in again)
    assert list(st.embeddings().query("dataset_name == 'unseen'")["variant"]) == ["frozen", res.variant]


@pytest.mark.parametrize(("model", "trained_with"), [("tgpt", {"max_length": 64}),
                                                     ("geneformer", {"layer": -2, "pooling": "auto", "max_length": None})])
def test_an_adapter_of_an_older_tokenization_names_it_instead_of_asking_for_its_parameters(model, trained_with) -> None:
    """tGPT's tie_break and Geneformer's gene_collapse joined params() (no option sets them): an adapter
    fine-tuned before was refused with 'Use the same parameters', although the user passed the same ones."""
    from scdm.embedding.lora_card import LoraCard

    card = LoraCard(path=Path("adapter"), adapter_id="a1", tuning_id="t1", adapter_hash="h", model=model,
                    checkpoint_hash="c", model_params={**trained_with, "seed": 0}, seed=0, split_id="s1", fold=0,
                    scenario="pooled", category_type="all", category="all", lora={}, train={}, lora_modules=(), emb_dim=8)
    adapter = get_adapter(model)(None, seed=0, **trained_with)
    with pytest.raises(CheckpointError) as err:
        card.check_base(adapter, "c")
    assert "fine-tuned by an older scdm" in str(err.value) and "unrecorded then" in str(err.value)
    assert "Use the same parameters" not in str(err.value) and "scdm finetune" in str(err.value)
