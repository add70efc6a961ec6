"""The six custom-architecture adapters end to end: official-format tiny checkpoint -> runner -> store.

Per family: shape/finite values in the store; an idempotent rerun; values independent of batch
size and chunking in the default mode (CellPLM, which attends across the cells of a batch, instead:
deterministic, batches are fixed row ranges, chunking does not matter); ``reference_quirks`` is
part of the identity; LoRA targets resolve to Linear modules that a gradient reaches through
``embed``. Data: 24 real PC9 cells over their 400 most-counted genes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from scdm.embedding._adapter import Adapter, get_adapter
from scdm.embedding.models import celllm, cellplm, scbert, scfoundation, scgpt, uce
from scdm.embedding.runner import embed
from scdm.store import Store

torch.set_num_threads(1)

N_CELLS, N_GENES = 24, 400
WRITERS = {
    "scgpt": lambda folder, genes: scgpt.write_tiny_checkpoint(folder, genes=genes, seed=1),
    "scfoundation": lambda folder, genes: scfoundation.write_tiny_checkpoint(folder, genes=genes, seed=1),
    "uce": lambda folder, genes: uce.write_tiny_checkpoint(folder, genes=genes, seed=1),
    "scbert": lambda folder, genes: scbert.write_tiny_checkpoint(folder, genes=genes, seed=1),
    "celllm": lambda folder, genes: celllm.write_tiny_checkpoint(folder, genes=genes, seed=1),
    "cellplm": lambda folder, genes: cellplm.write_tiny_checkpoint(folder, genes=genes, seed=1),
}
FAMILIES = list(WRITERS)
PARAMS: dict[str, dict[str, Any]] = {"uce": {"sample_size": 48}}  # short sentences of varying length
# quirk modes whose numbers depend on the batch (fixed row ranges in the runner)
BATCH_DEPENDENT = {("uce", True), ("scbert", True), ("celllm", True), ("cellplm", False), ("cellplm", True)}


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_pc9(tmp_path_factory: pytest.TempPathFactory, pc9_counts_path: Path) -> Path:
    """24 real PC9 cells x their 400 most-counted genes, raw counts, symbols as var_names."""
    full = ad.read_h5ad(pc9_counts_path)
    x = sp.csr_matrix(full.X)
    genes = np.sort(np.argsort(-np.asarray(x.sum(axis=0)).ravel(), kind="stable")[:N_GENES])
    small = ad.AnnData(X=sp.csr_matrix(x[:N_CELLS][:, genes], dtype=np.float32))
    small.obs_names = full.obs_names[:N_CELLS]
    small.var_names = full.var_names[genes]
    path = tmp_path_factory.mktemp("data") / "pc9small.h5ad"
    small.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, small_pc9: Path) -> dict[str, Path]:
    genes = ad.read_h5ad(small_pc9, backed="r").var_names.tolist()
    root = tmp_path_factory.mktemp("ckpt")
    return {family: write(root / family, genes) for family, write in WRITERS.items()}


def _store(path: Path, data: Path) -> Store:
    st = Store(path)
    st.ingest(data, name="pc9")
    return st


def _run(st: Store, family: str, ckpt: Path, **kwargs: Any) -> tuple[Any, np.ndarray]:
    result = embed(st, "pc9", family, ckpt, progress=False, **PARAMS.get(family, {}), **kwargs)
    return result, st.read_embedding(result.embedding_id)


def _loaded(family: str, ckpt: Path, data: Path, **params: Any) -> tuple[Adapter, list[dict[str, np.ndarray]]]:
    adata = ad.read_h5ad(data)
    adapter = get_adapter(family)(checkpoint=ckpt, seed=0, **PARAMS.get(family, {}), **params)
    adapter.check_checkpoint()
    adapter.load("cpu")
    adapter.prepare(adata.var_names.tolist(), gene_id_kind="symbol")
    cells = adapter.tokenize(sp.csr_matrix(adata.X, dtype=np.float32), np.arange(adata.n_obs))
    return adapter, cells


# ---- the runner path -------------------------------------------------------------------------
@dataclass
class Runs:
    """Embeddings of one family computed through the runner (shared by the tests below)."""

    family: str
    first: Any
    rerun: Any
    quirky: Any
    values: dict[str, np.ndarray]
    params: dict[str, dict[str, Any]]


@pytest.fixture(scope="module", params=FAMILIES)
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, small_pc9: Path, checkpoints: dict[str, Path]) -> Runs:
    family = request.param
    ckpt = checkpoints[family]
    one = _store(tmp_path_factory.mktemp(f"{family}-a"), small_pc9)
    first, default_a = _run(one, family, ckpt, batch_size=4, chunk_rows=8)
    rerun, default_rerun = _run(one, family, ckpt, batch_size=4, chunk_rows=8)
    quirky, quirk_a = _run(one, family, ckpt, batch_size=4, chunk_rows=8, reference_quirks=True)
    params = one.embeddings().set_index("embedding_id")["params"].map(json.loads).to_dict()
    # another store: other batch size (not for CellPLM, whose batch is part of the result) and chunking
    two = _store(tmp_path_factory.mktemp(f"{family}-b"), small_pc9)
    default_b = _run(two, family, ckpt, batch_size=4 if family == "cellplm" else 16, chunk_rows=20 if family == "cellplm" else 7)[1]
    quirk_b = _run(two, family, ckpt, batch_size=4, chunk_rows=20, reference_quirks=True)[1]  # 20 = whole batches of 4
    values = {"default_a": default_a, "default_rerun": default_rerun, "default_b": default_b, "quirk_a": quirk_a, "quirk_b": quirk_b}
    return Runs(family, first, rerun, quirky, values, params)


def test_embeds_into_the_store_and_a_rerun_computes_nothing(runs: Runs) -> None:
    values = runs.values["default_a"]
    assert runs.first.status == "complete" and runs.first.computed_chunks == 3
    assert values.shape == (N_CELLS, runs.first.dim) and values.dtype == np.float32 and np.isfinite(values).all()
    assert np.unique(values.round(5), axis=0).shape[0] == N_CELLS  # every cell its own vector
    assert runs.rerun.computed_chunks == 0 and runs.rerun.embedding_id == runs.first.embedding_id
    assert runs.values["default_rerun"].tobytes() == values.tobytes()


def test_reference_quirks_is_part_of_the_identity(runs: Runs) -> None:
    assert runs.quirky.embedding_id != runs.first.embedding_id and runs.quirky.computed_chunks == 3
    assert np.isfinite(runs.values["quirk_a"]).all()
    assert runs.params[runs.first.embedding_id]["reference_quirks"] is False
    assert runs.params[runs.quirky.embedding_id]["reference_quirks"] is True
    for embedding_id, quirks in ((runs.first.embedding_id, False), (runs.quirky.embedding_id, True)):
        # batch-dependent modes carry their batch size in the identity
        assert ("batch_size" in runs.params[embedding_id]) == ((runs.family, quirks) in BATCH_DEPENDENT)


def test_default_mode_ignores_batch_size_and_chunking(runs: Runs) -> None:
    a, b = runs.values["default_a"], runs.values["default_b"]
    if runs.family == "cellplm":  # same batches of 4 rows, other chunks: bit-identical
        assert b.tobytes() == a.tobytes()
    else:  # batch size 4 -> 16 and chunks 8 -> 7: only float rounding may differ
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_quirk_mode_ignores_chunking(runs: Runs) -> None:
    # batch-dependent quirk modes keep fixed row batches; scGPT/UCE replay one RNG stream in row order
    a, b = runs.values["quirk_a"], runs.values["quirk_b"]
    if (runs.family, True) in BATCH_DEPENDENT or runs.family == "scgpt":
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 if runs.family == "scgpt" else 0)
    else:
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quirks", [False, True])
def test_batch_dependent_modes_embed_fixed_row_batches(runs: Runs, small_pc9: Path, checkpoints: dict[str, Path], quirks: bool) -> None:
    adapter, cells = _loaded(runs.family, checkpoints[runs.family], small_pc9, reference_quirks=quirks)
    dependent = (runs.family, quirks) in BATCH_DEPENDENT
    assert bool(getattr(adapter, "batch_dependent", False)) is dependent
    if not dependent:
        return
    # the runner's batches were rows [0, 4), [4, 8), ...: the adapter on those groups, directly
    with torch.inference_mode():
        direct = np.concatenate([adapter.embed(adapter.collate(cells[lo:lo + 4])).numpy() for lo in range(0, N_CELLS, 4)])
        together = adapter.embed(adapter.collate(cells[:8])).numpy()
    np.testing.assert_allclose(runs.values["quirk_a" if quirks else "default_a"], direct, rtol=0, atol=1e-6)
    assert np.abs(together - direct[:8]).max() > 1e-7  # the batch really matters, hence batch_size in the identity


# ---- LoRA --------------------------------------------------------------------------------------
def _peft_targets(targets: tuple[str, ...]) -> str | list[str]:
    """peft takes one string as a full-match regex and a list as name suffixes."""
    if len(targets) == 1 and re.search(r"[\\*()|]", targets[0]):
        return targets[0]
    return list(targets)


def _matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_linear_and_a_gradient_reaches_them_through_embed(
    small_pc9: Path, checkpoints: dict[str, Path], family: str
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    adapter, cells = _loaded(family, checkpoints[family], small_pc9)
    targets = _peft_targets(type(adapter).lora_target_modules)
    assert adapter.model is not None
    matched = {name: module for name, module in adapter.model.named_modules() if _matches(name, targets)}
    assert matched and all(isinstance(m, nn.Linear) for m in matched.values()), {n: type(m).__name__ for n, m in matched.items()}
    if isinstance(targets, list):  # every listed target names something
        assert all(any(_matches(n, [t]) for n in matched) for t in targets)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False), adapter.model)
    lora = {n: m for n, m in adapter.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert set(lora) == set(matched)
    emb = adapter.embed(adapter.collate(cells[:6]))  # no inference mode: the fine-tuning path
    weights = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    (emb * weights).sum().backward()
    for name, module in lora.items():
        grads = [p.grad for p in (*module.lora_A.parameters(), *module.lora_B.parameters())]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {name}"
