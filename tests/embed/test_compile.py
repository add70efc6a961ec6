"""``scdm embed --compile``: the model runs through torch.compile and gives the same embedding.

Most tests swap the backend for one that records the graphs Dynamo captures and runs them
eagerly (seconds, no C++ build); one slow test builds real Inductor kernels on CPU.
"""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from scdm.cli import main
from scdm.embedding import chunks
from scdm.embedding._ray_executor import EmbedWorker, WorkerSpec
from scdm.embedding.runner import embed
from scdm.store import Store
from scdm.store.errors import ScdmError
from tests.embed import toy_adapter


@pytest.fixture()
def st(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture()
def pc9(st, pc9_counts_path):
    return st.ingest(pc9_counts_path, name="pc9")


@pytest.fixture()
def toy_ckpt(tmp_path, pc9_counts_path):
    genes = ad.read_h5ad(pc9_counts_path, backed="r").var_names[:3000].tolist()
    return toy_adapter.write_toy_checkpoint(tmp_path / "toy", genes)


@pytest.fixture()
def graphs(monkeypatch):
    """The FX graphs torch.compile hands its backend (run eagerly); Dynamo's caches are reset around the test."""
    captured: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(chunks, "COMPILE_BACKEND", recording_backend)
    yield captured
    torch._dynamo.reset()


def _telemetry(st: Store, embedding_id: str) -> dict:
    return json.loads(st.query("SELECT telemetry FROM embeddings WHERE embedding_id = ?", [embedding_id]).iloc[0, 0])


def test_a_compiled_run_is_the_same_embedding(tmp_path, st, pc9, pc9_counts_path, toy_ckpt, graphs):
    other = Store(tmp_path / "eager")
    eager = embed(other, other.ingest(pc9_counts_path, name="pc9").name, "toy-test", toy_ckpt, chunk_rows=128, progress=False)
    assert not graphs
    compiled = embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, torch_compile=True, progress=False)
    # the model really ran through Dynamo: its layers are in the captured graphs
    assert graphs and any(n.op == "call_function" or n.op == "call_module" for g in graphs for n in g.graph.nodes)
    np.testing.assert_allclose(st.read_embedding(compiled.embedding_id), other.read_embedding(eager.embedding_id), atol=1e-5)
    assert st.embedding(compiled.embedding_id).params == other.embedding(eager.embedding_id).params
    assert _telemetry(st, compiled.embedding_id)["torch_compile"] is True
    assert _telemetry(other, eager.embedding_id)["torch_compile"] is False
    # not part of the identity: an eager run finds the compiled embedding and computes nothing
    again = embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, progress=False)
    assert again.embedding_id == compiled.embedding_id and again.computed_chunks == 0


def test_batches_of_other_lengths_and_sizes_do_not_recompile_each_time(st, pc9, toy_ckpt, graphs):
    """Dynamic shapes: length-sorted batches of 300 cells (dozens of lengths) need a handful of graphs."""
    embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=64, batch_size=7, max_genes=400, torch_compile=True, progress=False)
    assert 1 <= len(graphs) <= 4, f"{len(graphs)} graphs compiled"
    sizes = [n for g in graphs for n in g.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)]
    assert sizes, "the graphs were specialised to one batch shape"


def test_a_backend_that_cannot_compile_says_to_run_without_compile(st, pc9, toy_ckpt, monkeypatch):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    monkeypatch.setattr(chunks, "COMPILE_BACKEND", broken_backend)
    try:
        with pytest.raises(ScdmError, match=r"could not compile the toy-test model.*no C\+\+ compiler.*without --compile"):
            embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, torch_compile=True, progress=False)
    finally:
        torch._dynamo.reset()
    # nothing is lost: the same command without --compile completes the same embedding
    done = embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, progress=False)
    assert done.status == "complete" and st.read_embedding(done.embedding_id).shape == (300, 16)


def test_ray_actors_compile_the_model_they_load(st, pc9, toy_ckpt, graphs):
    spec = WorkerSpec(adapter_cls=toy_adapter.ToyAdapter, checkpoint=str(toy_ckpt), seed=0, model_params={}, lora_dir=None,
                      device="cpu", precision="fp32", dataset_path=str(st.root / "datasets" / f"{pc9.dataset_id}.h5ad"),
                      gene_id_kind=pc9.gene_id_kind, batch_size=8, sort=True, torch_compile=True)
    worker = EmbedWorker(spec, st.genes(pc9.dataset_id)["gene_id"].astype(str).tolist())
    assert worker.adapter.model._compiled_call_impl is not None


def test_cli_compile_flag(tmp_path, pc9_counts_path, toy_ckpt, graphs):
    store = tmp_path / "cli-store"
    result = CliRunner().invoke(main, ["embed", str(pc9_counts_path), "--model", "toy-test", "-c", str(toy_ckpt), "--compile",
                                       "--store", str(store), "-q"])
    assert result.exit_code == 0, result.output
    st = Store(store)
    (embedding_id,) = st.query("SELECT embedding_id FROM embeddings")["embedding_id"]
    assert _telemetry(st, embedding_id)["torch_compile"] is True and graphs
    refused = CliRunner().invoke(main, ["embed", str(pc9_counts_path), "--model", "pca", "--compile", "--store", str(tmp_path / "s2")])
    assert refused.exit_code == 2 and "--compile applies to foundation models; pca" in refused.output
    assert not (tmp_path / "s2" / "datasets").exists() or not any((tmp_path / "s2" / "datasets").iterdir())  # refused before ingesting
    assert "--compile" in CliRunner().invoke(main, ["embed", "--help"]).output


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="Inductor builds its CPU kernels with a C++ compiler, and none is installed")
def test_inductor_kernels_match_eager_on_a_published_architecture(tmp_path):
    """Real code generation (C++ on CPU) on tiny Geneformer: the embedding equals the eager one to fp32 rounding."""
    import scipy.sparse as sp

    from scdm.embedding.models.geneformer import GeneformerAdapter, _default_genes, write_tiny_checkpoint

    genes = _default_genes(200)
    adapter = GeneformerAdapter(write_tiny_checkpoint(tmp_path, genes=genes))
    adapter.load("cpu")
    adapter.prepare(genes, gene_id_kind="ensembl")
    x = sp.random(48, 200, density=0.3, random_state=0, format="csr", dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    cells = adapter.tokenize(x, np.arange(48))
    batches = chunks.batches_by_length([adapter.token_length(c) for c in cells], 16)
    eager = chunks.embed_cells(adapter, cells, batches, "cpu", "fp32", {})
    torch._dynamo.reset()
    try:
        chunks.compile_model(adapter)
        compiled = chunks.embed_cells(adapter, cells, batches, "cpu", "fp32", {})
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(compiled, np.zeros_like(compiled))


def test_a_lora_tuned_model_compiles_with_its_adapter_weights(tmp_path, graphs):
    """LoRA is injected before compiling, so the compiled graphs run the tuned weights (same embedding)."""
    from scdm.embedding.finetune import finetune
    from tests.embed.test_finetune import FAST, _checkpoint, _planted, _store

    small = _planted(36, 80, 12)
    st = _store(tmp_path, small)
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    (res,) = finetune(st, model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
    tuned = st.read_embedding(res.embedding_ids[0])
    st.remove_embedding(res.embedding_ids[0])
    graphs.clear()
    again = embed(st, "planted", "geneformer", ckpt, lora_dir=res.adapter_dir, torch_compile=True, progress=False)
    assert any("lora" in str(node.target) for g in graphs for node in g.graph.nodes)
    np.testing.assert_allclose(st.read_embedding(again.embedding_id), tuned, atol=1e-5)
