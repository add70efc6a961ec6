"""Concurrent embedding jobs: shared chunks, a killed claimer, removal during a job, the leftovers
of an old racing removal, and the checks that run before any work (sizes, value kind, empty cells)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scdm.embedding.runner import embed, embed_baseline
from scdm.store import InputDataError, Store, _claims
from scdm.store.errors import ScdmWarning
from tests.embed import _embed_proc, toy_adapter
from tests.store.conftest import make_counts_adata

ROOT = Path(__file__).resolve().parents[2]
PROC = Path(_embed_proc.__file__)
ROWS = 40  # 300 PC9 cells: 8 chunks


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory, pc9_counts_path):
    genes = ad.read_h5ad(pc9_counts_path, backed="r").var_names[:3000].tolist()
    return toy_adapter.write_toy_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy", genes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pc9_counts_path, toy_ckpt) -> np.ndarray:
    """The embedding as one undisturbed process computes it."""
    clean = Store(tmp_path_factory.mktemp("clean") / "store")
    clean.ingest(pc9_counts_path, name="d")
    return clean.read_embedding(embed(clean, "d", "toy-test", toy_ckpt, chunk_rows=ROWS, progress=False).embedding_id)


@pytest.fixture()
def st(tmp_path, pc9_counts_path) -> Store:
    st = Store(tmp_path / "s")
    st.ingest(pc9_counts_path, name="d")
    return st


def _start(st: Store, ckpt: Path, *, delay: float, go: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "SCDM_TOY_DELAY": str(delay), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if go is not None:
        env["SCDM_TEST_GO"] = str(go)
    proc = subprocess.Popen([sys.executable, str(PROC), str(st.root), "d", str(ckpt), str(ROWS)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _wait_until(check, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _chunks_done(st: Store) -> int:
    emb = st.embeddings()
    return int(emb["chunks_done"].iloc[0]) if len(emb) else 0


def test_two_processes_share_one_embedding(st, toy_ckpt, reference, tmp_path):
    go = tmp_path / "go"
    procs = [_start(st, toy_ckpt, delay=0.3, go=go) for _ in range(2)]
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    computed = [r["computed"] for r in results]
    assert sum(computed) == 8 and min(computed) > 0, computed  # every chunk once, shared between the two
    emb = st.embedding(results[0]["embedding_id"])
    assert emb.status == "complete" and results[1]["embedding_id"] == emb.embedding_id
    assert st.read_embedding(emb.embedding_id).tobytes() == reference.tobytes()


def test_a_sigkilled_claimer_does_not_block_the_job(st, toy_ckpt, reference):
    stuck = _start(st, toy_ckpt, delay=120)  # claims chunk 0, then sleeps in its tokeniser

    def claimed() -> bool:
        emb = st.embeddings()
        return len(emb) == 1 and _claims._is_locked(_claims.claims_folder(st.root, emb["embedding_id"].item()) / "chunk-0.lock")

    _wait_until(claimed)

    def kill_once_the_rest_is_done() -> None:
        _wait_until(lambda: _chunks_done(st) == 7)
        stuck.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_once_the_rest_is_done)
    killer.start()
    try:
        result = embed(st, "d", "toy-test", toy_ckpt, chunk_rows=ROWS, progress=False)  # waits for chunk 0, then takes it
    finally:
        killer.join(timeout=120)
        with contextlib.suppress(ProcessLookupError):
            stuck.kill()
        stuck.wait(timeout=30)
    assert stuck.returncode == -signal.SIGKILL and result.computed_chunks == 8
    assert st.read_embedding(result.embedding_id).tobytes() == reference.tobytes()


def test_rm_during_a_job_is_refused_and_the_job_completes(st, toy_ckpt, reference):
    from scdm.cli import main

    proc = _start(st, toy_ckpt, delay=0.4)
    _wait_until(lambda: _chunks_done(st) >= 1)
    emb_id = st.embeddings()["embedding_id"].item()
    out = CliRunner().invoke(main, ["--store", str(st.root), "rm", "--embedding", emb_id])
    assert out.exit_code == 1 and f"pid {proc.pid}" in out.output and "is writing it" in out.output
    assert json.loads(proc.communicate(timeout=120)[0].splitlines()[-1])["embedding_id"] == emb_id
    assert proc.returncode == 0
    data = st.read_embedding(emb_id)
    assert data.tobytes() == reference.tobytes() and np.abs(data).sum(axis=1).min() > 0
    out = CliRunner().invoke(main, ["--store", str(st.root), "rm", "--embedding", emb_id])
    assert out.exit_code == 0 and st.embeddings().empty


def _interrupted_run(st: Store, ckpt: Path, monkeypatch) -> object:
    """A run stopped after its first chunks are committed: a pending embedding."""
    calls = {"n": 0}
    original = toy_adapter.ToyAdapter.embed

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(self, batch)

    with monkeypatch.context() as m:
        m.setattr(toy_adapter.ToyAdapter, "embed", interrupted)
        with pytest.raises(KeyboardInterrupt):
            embed(st, "d", "toy-test", ckpt, chunk_rows=ROWS, progress=False)
    emb = st.embedding(st.embeddings()["embedding_id"].item())
    assert 0 < len(emb.written_chunks()) < 8
    return emb


def _rerun(st: Store, ckpt: Path, embedding_id: str) -> np.ndarray:
    result = embed(st, "d", "toy-test", ckpt, chunk_rows=ROWS, progress=False)
    assert result.embedding_id == embedding_id and st.embedding(embedding_id).status == "complete"
    data = st.read_embedding(embedding_id)
    assert np.abs(data).sum(axis=1).min() > 0  # no all-zero rows
    return data


def test_the_old_rm_during_a_job_story_ends_with_a_correct_embedding(st, toy_ckpt, reference, monkeypatch):
    """rm mid-job as scdm did before (no refusal) and the job's late writes: the rerun is correct."""
    emb = _interrupted_run(st, toy_ckpt, monkeypatch)
    with monkeypatch.context() as m:  # the old, unguarded removal ...
        m.setattr(_claims, "exclusive", lambda *a, **k: contextlib.nullcontext())
        st.remove_embedding(emb.embedding_id)
    # ... and what the still-running job then left: a chunk file without zarr.json, orphan rows
    (emb.path / "c" / "5").mkdir(parents=True)
    (emb.path / "c" / "5" / "0").write_bytes(np.ones((ROWS, 16), np.float32).tobytes())
    for c in range(6):
        st.catalog.execute("INSERT INTO embedding_chunks (embedding_id, chunk, n_rows, checksum, seconds, written_at) VALUES (?, ?, 40, 'crc32:00000000', NULL, now())", [emb.embedding_id, c])
    assert _rerun(st, toy_ckpt, emb.embedding_id).tobytes() == reference.tobytes()


def test_a_pending_embedding_whose_folder_was_deleted_is_recomputed(st, toy_ckpt, reference, monkeypatch):
    emb = _interrupted_run(st, toy_ckpt, monkeypatch)
    shutil.rmtree(emb.path)
    assert _rerun(st, toy_ckpt, emb.embedding_id).tobytes() == reference.tobytes()


def test_a_pending_embedding_with_a_deleted_chunk_file_is_repaired(st, toy_ckpt, reference, monkeypatch):
    emb = _interrupted_run(st, toy_ckpt, monkeypatch)
    (emb.path / "c" / str(emb.written_chunks()[0]) / "0").unlink()
    assert _rerun(st, toy_ckpt, emb.embedding_id).tobytes() == reference.tobytes()


def _nothing_behind(st: Store) -> None:
    assert st.embeddings().empty
    assert list((st.root / "embeddings").iterdir()) == [] and not (st.root / _claims.CLAIMS_DIR).exists()


@pytest.mark.parametrize(("option", "value", "message"), [
    ("chunk_rows", -5, "--chunk-rows .*integer >= 1; got -5"), ("chunk_rows", 0, "--chunk-rows .*>= 1"),
    ("batch_size", 0, "--batch-size .*>= 1"), ("max_genes", -3, "--max-genes .*>= 1"), ("seed", -1, "--seed .*>= 0"),
    ("workers", -2, "--workers .*>= 0"), ("min_gene_fraction", 1.5, r"--min-gene-fraction .*in \[0, 1\]"),
    ("max_length", 0, "--max-length .*>= 1"), ("actors", 0, "--actors .*>= 1"), ("max_retries", -1, "--max-retries .*>= 0"),
])
def test_invalid_sizes_are_refused_before_any_work(st, toy_ckpt, option, value, message):
    with pytest.raises(InputDataError, match=message):
        embed(st, "d", "toy-test", toy_ckpt, progress=False, **{option: value})
    _nothing_behind(st)


@pytest.mark.parametrize(("kw", "message"), [({"n_comps": 0}, "--n-comps"), ({"n_hvg": -1}, "--n-hvg"),
                                             ({"chunk_rows": 0}, "--chunk-rows"), ({"target_sum": 0}, "target_sum")])
def test_invalid_baseline_sizes_are_refused_before_any_work(st, kw, message):
    with pytest.raises(InputDataError, match=message):
        embed_baseline(st, ["d"], model="pca", progress=False, **kw)
    with pytest.raises(InputDataError, match=message):
        embed(st, "d", "pca", progress=False, **kw)
    _nothing_behind(st)


@pytest.mark.parametrize(("args", "message"), [
    (["--chunk-rows", "-5"], "Invalid value for '--chunk-rows': -5 is not in the range x>=1"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"), (["--max-genes", "-1"], "Invalid value for '--max-genes'"),
    (["--min-gene-fraction", "2"], "Invalid value for '--min-gene-fraction'"), (["--workers", "-1"], "Invalid value for '--workers'"),
    (["--n-comps", "0"], "Invalid value for '--n-comps'"), (["--actors", "0"], "Invalid value for '--actors'"),
])
def test_cli_refuses_invalid_sizes_before_ingesting(tmp_path, pc9_counts_path, toy_ckpt, args, message):
    from scdm.cli import main

    store = tmp_path / "cli-store"
    out = CliRunner().invoke(main, ["--store", str(store), "embed", str(pc9_counts_path), "--model", "toy-test", "-c", str(toy_ckpt), *args])
    assert out.exit_code == 2 and message in out.output
    assert not store.exists()  # not even the store was created


def test_cli_refuses_a_size_given_as_param_before_ingesting(tmp_path, pc9_counts_path, toy_ckpt):
    from scdm.cli import main

    store = tmp_path / "cli-store"
    out = CliRunner().invoke(main, ["--store", str(store), "embed", str(pc9_counts_path), "--model", "toy-test", "-c", str(toy_ckpt),
                                    "--param", "max_length=0"])
    assert out.exit_code == 1 and "--max-length (max_length=) must be an integer >= 1; got 0" in out.output
    assert Store(store).datasets().empty


def test_finetune_cli_refuses_invalid_sizes(tmp_path, toy_ckpt):
    from scdm.cli import main

    for args, option in ((["--rank", "0"], "--rank"), (["--epochs", "0"], "--epochs"), (["--lr", "0"], "--lr"),
                         (["--dropout", "1"], "--dropout"), (["--batch-size", "0"], "--batch-size"), (["--fold", "-1"], "--fold")):
        out = CliRunner().invoke(main, ["--store", str(tmp_path / "s2"), "finetune", "-m", "toy-test", "-c", str(toy_ckpt),
                                        "--dataset", "d", "--fold", "0", *args] if args[0] != "--fold" else
                                 ["--store", str(tmp_path / "s2"), "finetune", "-m", "toy-test", "-c", str(toy_ckpt), "--dataset", "d", *args])
        assert out.exit_code == 2 and f"Invalid value for '{option}'" in out.output


# ---- what the model is fed -------------------------------------------------------------------
def _small(tmp_path, adata: ad.AnnData) -> tuple[Store, Path]:
    st = Store(tmp_path / "small")
    st.ingest(adata, name="d")
    ckpt = toy_adapter.write_toy_checkpoint(tmp_path / "toy20", adata.var_names[:20].tolist())
    return st, ckpt


def test_non_count_data_is_refused_unless_allowed(tmp_path):
    adata = make_counts_adata(n_cells=40)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    st, ckpt = _small(tmp_path, adata)
    assert st.dataset("d").x_kind == "normalized"
    with pytest.raises(InputDataError, match=r"expects raw counts.*holds normalized values.*adata\.raw\.X saved as X.*--allow-non-counts"):
        embed(st, "d", "toy-test", ckpt, progress=False)
    _nothing_behind(st)
    with pytest.warns(ScdmWarning, match="expects raw counts"):
        result = embed(st, "d", "toy-test", ckpt, progress=False, allow_non_counts=True)
    assert st.embedding(result.embedding_id).status == "complete"
    # allow_non_counts is not part of the identity: a run without it was handed the stored embedding of
    # the log1p values (computed_chunks 0), where computing it refuses them
    with pytest.raises(InputDataError, match=r"expects raw counts.*holds normalized values.*--allow-non-counts"):
        embed(st, "d", "toy-test", ckpt, progress=False)


def test_cells_without_expressed_genes_are_refused_before_any_work(tmp_path):
    adata = make_counts_adata(n_cells=40)
    x = adata.X.toarray()
    x[[3, 7]] = 0
    adata.X = sp.csr_matrix(x)
    st, ckpt = _small(tmp_path, adata)
    with pytest.raises(InputDataError, match=r"cells at rows 3, 7 \(2 in all\) express no gene at all.*--allow-empty-cells"):
        embed(st, "d", "toy-test", ckpt, progress=False)
    _nothing_behind(st)


def test_cells_whose_genes_the_model_does_not_know_are_refused_unless_allowed(tmp_path, monkeypatch):
    adata = make_counts_adata(n_cells=40)
    x = adata.X.toarray()
    x[[5, 9], :20] = 0  # these two express only genes outside the toy vocabulary
    x[[5, 9], 25] = 3
    adata.X = sp.csr_matrix(x)
    st, ckpt = _small(tmp_path, adata)
    with pytest.raises(InputDataError, match=r"NaN or inf for the cells at rows 5, 9"):
        embed(st, "d", "toy-test", ckpt, progress=False)  # the toy model pools nothing into NaN: never stored
    original = toy_adapter.ToyAdapter.embed

    def zero_when_empty(self, batch):  # as models that mean-pool with a clamped count return it
        out = original(self, batch)
        out[~batch["mask"].any(1)] = 0
        return out

    monkeypatch.setattr(toy_adapter.ToyAdapter, "embed", zero_when_empty)
    with pytest.raises(InputDataError, match=r"rows 5, 9 \(2 in all\) got an all-zero embedding.*--allow-empty-cells"):
        embed(st, "d", "toy-test", ckpt, progress=False)
    result = embed(st, "d", "toy-test", ckpt, progress=False, allow_empty_cells=True)
    data = st.read_embedding(result.embedding_id)
    assert np.flatnonzero(~data.any(axis=1)).tolist() == [5, 9]
    audit = json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [result.embedding_id])["audit"].item())
    assert audit["zero_rows"] == 2 and audit["cells_without_expressed_genes"] == 0


@pytest.mark.parametrize("model", ["toy-test", "pca"])
def test_a_run_finalizes_through_its_writer_in_one_commit(st, toy_ckpt, monkeypatch, model):
    """The last chunks' rows and the mark complete share one catalog transaction (no second finalize)."""
    from scdm.store import Embedding

    calls = []
    monkeypatch.setattr(Embedding, "finalize", lambda self, **kw: calls.append(kw))
    result = embed(st, "d", model, toy_ckpt if model == "toy-test" else None, progress=False)
    emb = st.embedding(result.embedding_id)
    assert calls == [] and emb.status == "complete" and emb.missing_chunks() == []
    telemetry = json.loads(st.query("SELECT telemetry FROM embeddings WHERE embedding_id = ?", [emb.embedding_id])["telemetry"].iloc[0])
    assert telemetry["cells"] == emb.n_cells
