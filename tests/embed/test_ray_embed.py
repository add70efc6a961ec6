"""The Ray executor of embedding jobs, and embedding arrays at fsspec URLs.

A local 2-CPU Ray cluster (``ray_local``) runs a tiny real model (the toy adapter: one masked
transformer layer). Each test compares with the local executor bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from scdm.embedding import _ray_executor
from scdm.embedding._adapter import register_adapter
from scdm.embedding.runner import embed
from scdm.store import Store
from scdm.store._store import ChunkRecord
from scdm.store.errors import InputDataError, ScdmError
from tests.embed.test_unknown_genes import unknown_only  # noqa: F401
from tests.embed.toy_adapter import ToyAdapter, write_toy_checkpoint
from tests.ray_fixtures import RETRY_A_RAY_CRASH, ray_local  # noqa: F401

pytestmark = RETRY_A_RAY_CRASH

ROOT = Path(__file__).resolve().parents[2]
CHUNK_ROWS = 64  # 300 cells -> 5 chunks


@register_adapter
class FlakyToyAdapter(ToyAdapter):
    """The toy model with injected faults and delays (neither is part of the embedding's identity).

    A marker file ``raise-<row>`` or ``exit-<row>`` in ``fault_dir`` makes the tokenisation of the
    chunk starting at ``row`` raise, or kill its worker process, once: the marker is removed
    first, so the retry succeeds. ``baddata-<row>`` raises :class:`InputDataError` (an error in the
    user's data, which is never retried). Ray workers import this module to unpickle the class.
    """

    name = "toy-flaky"

    def __init__(self, checkpoint=None, *, seed=0, max_genes=12, fault_dir=None, delay_s=0.0, **params):
        super().__init__(checkpoint, seed=seed, max_genes=max_genes)
        self.fault_dir = fault_dir
        self.delay_s = delay_s

    def tokenize(self, x, rows):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fault_dir:
            for kind in ("baddata", "raise", "exit"):
                try:
                    (Path(self.fault_dir) / f"{kind}-{int(rows[0])}").unlink()  # claim the fault: only the first attempt fails
                except FileNotFoundError:
                    continue
                if kind == "raise":
                    raise RuntimeError(f"injected failure at row {int(rows[0])}")
                if kind == "baddata":
                    raise InputDataError(f"injected bad data at row {int(rows[0])}")
                os._exit(1)
        return super().tokenize(x, rows)


@register_adapter
class ZeroPoolToyAdapter(ToyAdapter):
    """The toy model returning all zeros for a cell without a known gene, as models that mean-pool with a clamped count do."""

    name = "toy-zeropool"

    def embed(self, batch):
        out = super().embed(batch)
        out[~batch["mask"].any(1)] = 0
        return out


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory, pc9_counts_path):
    genes = ad.read_h5ad(pc9_counts_path, backed="r").var_names[:3000].tolist()
    return write_toy_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy", genes)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, pc9_counts_path, toy_ckpt):
    """The local executor's embedding of the 300 PC9 cells (the values every Ray run must match)."""
    st = Store(tmp_path_factory.mktemp("local") / "store")
    ds = st.ingest(pc9_counts_path)
    res = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, progress=False)
    return st.read_embedding(res.embedding_id), res.embedding_id


def _chunk_rows_of(st: Store, embedding_id: str) -> list[int]:
    return st.query("SELECT chunk FROM embedding_chunks WHERE embedding_id = ? ORDER BY chunk", [embedding_id])["chunk"].tolist()


@pytest.mark.usefixtures("ray_local")
def test_ray_equals_local_bit_for_bit_with_arrays_at_a_file_url(tmp_path, pc9_counts_path, toy_ckpt, local_reference):
    expected, expected_id = local_reference
    arrays = tmp_path / "shared-arrays"
    st = Store(tmp_path / "store", arrays_url=arrays.as_uri())
    ds = st.ingest(pc9_counts_path)
    res = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, executor="ray", progress=False)
    assert res.embedding_id == expected_id and res.computed_chunks == 5
    np.testing.assert_array_equal(st.read_embedding(res.embedding_id), expected)
    # the catalog records the array's URL; the array lives there, not in the store directory
    path = st.query("SELECT array_path FROM embeddings WHERE embedding_id = ?", [res.embedding_id])["array_path"].iloc[0]
    assert path == f"{arrays.as_uri()}/{res.embedding_id}.zarr"
    assert (arrays / f"{res.embedding_id}.zarr" / "zarr.json").exists() and not any((tmp_path / "store" / "embeddings").iterdir())
    assert _chunk_rows_of(st, res.embedding_id) == [0, 1, 2, 3, 4] and st.verify_embedding(res.embedding_id) == []
    tele = res.telemetry
    assert tele["executor"] == "ray" and tele["actors"] == 2 and tele["chunks"] == 5 and tele["retries"] == 0
    assert tele["cells"] == 300 and tele["n_parameters"] > 0 and tele["device"] == "cpu"
    again = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, executor="ray", progress=False)
    assert again.computed_chunks == 0 and again.embedding_id == res.embedding_id


@pytest.mark.usefixtures("ray_local")
def test_failed_and_killed_workers_are_retried_without_missing_or_duplicated_chunks(tmp_path, pc9_counts_path, toy_ckpt, local_reference):
    expected, _ = local_reference
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "raise-64").touch()  # chunk 1 raises on its first attempt
    (faults / "exit-192").touch()  # chunk 3 kills its worker process on its first attempt
    st = Store(tmp_path / "store")
    ds = st.ingest(pc9_counts_path)
    res = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, executor="ray", progress=False, fault_dir=str(faults))
    assert not any(faults.iterdir()), "both faults fired"
    tele = res.telemetry
    # a chunk queued behind the killed one on the same actor is lost with it and resubmitted too
    assert tele["actor_deaths"] == 1 and tele["retries"] == tele["failed_attempts"] and 2 <= tele["failed_attempts"] <= 3
    rows = st.query("SELECT chunk, count(*) AS n FROM embedding_chunks WHERE embedding_id = ? GROUP BY chunk ORDER BY chunk", [res.embedding_id])
    assert rows["chunk"].tolist() == [0, 1, 2, 3, 4] and set(rows["n"]) == {1}
    assert st.verify_embedding(res.embedding_id) == []
    np.testing.assert_array_equal(st.read_embedding(res.embedding_id), expected)


@pytest.mark.usefixtures("ray_local")
def test_errors_in_the_data_stop_the_job_without_retries(tmp_path, pc9_counts_path, toy_ckpt):
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "baddata-128").touch()
    (faults / "raise-128").touch()  # would let a retry of chunk 2 fail a second time, were it retried
    st = Store(tmp_path / "store")
    ds = st.ingest(pc9_counts_path)
    with pytest.raises(InputDataError, match="injected bad data at row 128"):
        embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, executor="ray", actors=1, progress=False, fault_dir=str(faults))
    assert (faults / "raise-128").exists(), "chunk 2 was not retried"
    emb_id = st.query("SELECT embedding_id FROM embeddings")["embedding_id"].iloc[0]
    committed = _chunk_rows_of(st, emb_id)
    assert {0, 1} <= set(committed) and 2 not in committed  # chunks finished before the error stay committed
    assert st.verify_embedding(emb_id) == []


@pytest.mark.usefixtures("ray_local")
def test_killed_driver_leaves_an_embedding_the_local_executor_completes(tmp_path, pc9_counts_path, toy_ckpt, local_reference):
    expected, _ = local_reference
    store = tmp_path / "store"
    ds = Store(store).ingest(pc9_counts_path)
    # the driver runs the CLI in its own process, joined to this test's cluster; each chunk takes >= 0.4 s
    code = "import sys; import tests.embed.test_ray_embed; from scdm.cli import main; main()"
    args = [sys.executable, "-c", code, "--store", str(store), "embed", ds.name, "--model", "toy-flaky", "--checkpoint", str(toy_ckpt),
            "--chunk-rows", "32", "--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address,
            "--actors", "1", "--param", "delay_s=0.4", "--quiet"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        done: list[int] = []
        deadline = time.monotonic() + 60
        while len(done) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
            rows = Store(store).query("SELECT e.embedding_id FROM embeddings e")
            done = _chunk_rows_of(Store(store), rows["embedding_id"].iloc[0]) if len(rows) else []
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else "driver ended early"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = Store(store)
    emb_id = st.query("SELECT embedding_id FROM embeddings")["embedding_id"].iloc[0]
    committed = _chunk_rows_of(st, emb_id)
    assert st.embeddings()["status"].tolist() == ["pending"] and 2 <= len(committed) < 10
    res = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=32, executor="local", progress=False)
    assert res.embedding_id == emb_id and res.computed_chunks == 10 - len(committed)
    assert _chunk_rows_of(st, emb_id) == list(range(10)) and st.verify_embedding(emb_id) == []
    np.testing.assert_array_equal(st.read_embedding(emb_id), expected)  # chunking does not change the values


def test_chunk_commit_is_idempotent_and_checks_the_array(tmp_path, pc9_counts_path):
    st = Store(tmp_path / "store")
    ds = st.ingest(pc9_counts_path)
    emb = st.create_embedding(ds.name, model="synthetic", params={}, dim=4, chunk_rows=100)
    target = emb.target()
    block = np.arange(400, dtype=np.float32).reshape(100, 4)
    assert target.stored_checksum(1) is None
    record = target.write(1, block, seconds=0.5)
    assert target.stored_checksum(1) == record.checksum
    assert emb.commit_chunks([record]) == [1]
    assert emb.commit_chunks([record]) == []  # committed once, whoever reports it again
    assert _chunk_rows_of(st, emb.embedding_id) == [1] and emb.missing_chunks() == [0, 2]
    with pytest.raises(InputDataError, match=r"needs an array of shape \(100, 4\)"):
        target.write(0, block[:10])
    stale = ChunkRecord(1, 100, "crc32:00000000")
    assert emb.commit_chunks([stale]) == [1]  # a changed checksum replaces the row (the array holds the newest write)


def test_arrays_at_a_remote_url_round_trip_through_zarr(tmp_path, pc9_counts_path):
    url = f"memory://scdm-test-{uuid.uuid4().hex}"
    st = Store(tmp_path / "store", arrays_url=url)
    ds = st.ingest(pc9_counts_path)
    emb = st.create_embedding(ds.name, model="synthetic", params={}, dim=8, chunk_rows=128)
    data = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    with emb.writer() as w:
        for c in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(c)
            w.write(c, data[lo:hi])
    emb.finalize()
    assert emb.location == f"{url}/{emb.embedding_id}.zarr"
    np.testing.assert_array_equal(st.read_embedding(emb.embedding_id), data)
    np.testing.assert_array_equal(st.read_embedding(emb.embedding_id, rows=[299, 3, 130]), data[[299, 3, 130]])
    assert st.verify_embedding(emb.embedding_id) == []
    with pytest.raises(Exception, match="not on a local path"):
        emb.path  # noqa: B018
    st.remove_embedding(emb.embedding_id)
    import fsspec

    assert not fsspec.filesystem("memory").exists(emb.location)


def test_bad_arrays_url_and_ray_options_are_refused_with_the_fix():
    with pytest.raises(InputDataError, match="Unknown storage scheme 'nope'"):
        Store(Path("unused"), arrays_url="nope://bucket/x")
    with pytest.raises(InputDataError, match="use --device cuda"):
        _ray_executor.actor_device("cuda:1", None, None)
    with pytest.raises(InputDataError, match="CPU actors need no GPU"):
        _ray_executor.actor_device("cpu", 1, None)
    assert _ray_executor.actor_device("auto", 0, None) == ("cpu", 0.0)
    assert _ray_executor.actor_device("auto", 0.5, None) == ("cuda", 0.5)
    quirky = FlakyToyAdapter(None)
    quirky.sequential_tokenize = True
    with pytest.raises(InputDataError, match="--executor local"):
        _ray_executor.check_supported(quirky)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ScdmError, match=r"pip install 'scdm\[ray\]'"):
        _ray_executor.connect(None)


def test_store_cli_and_runner_do_not_import_ray():
    code = "import sys, scdm.cli, scdm.store, scdm.embedding.runner, scdm.classify; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def empty_and_unknown_cells(request, tmp_path_factory) -> tuple[Path, list[str]]:
    """unknown_only's 40 PC9 cells (0 and 1 express only genes the vocabulary lacks) with cell 5 expressing nothing."""
    path, vocabulary = request.getfixturevalue("unknown_only")
    adata = ad.read_h5ad(path)
    x = adata.X.tolil()
    x[5, :] = 0
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()
    out = tmp_path_factory.mktemp("empty") / "cells.h5ad"
    adata.write_h5ad(out)
    return out, vocabulary


def _checkpoint(model: str, folder: Path, vocabulary: list[str]) -> Path:
    if model == "toy-zeropool":
        return write_toy_checkpoint(folder, vocabulary)
    from scdm.embedding.models.geneformer import write_tiny_checkpoint

    return write_tiny_checkpoint(folder, genes=vocabulary, seed=1, version=2)


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize(("model", "expected"), [
    # the toy model pools known genes only: cells 0, 1 and the empty cell 5 get all-zero vectors
    ("toy-zeropool", {"zero_rows": 3, "cells_without_expressed_genes": 1}),
    # Geneformer V2 gives them <cls><eos> alone: no zero row, but 3 cells without a known gene
    ("geneformer", {"zero_rows": 0, "cells_without_expressed_genes": 1, "cells_without_known_genes": 3}),
])
def test_ray_records_and_warns_about_empty_cells_as_the_local_executor_does(model, expected, empty_and_unknown_cells, tmp_path, caplog):
    # the Ray audit held the gene audit and token statistics only: no zero_rows, cells_without_expressed_genes
    # or cells_without_known_genes, and no line warned about the all-zero vectors it stored
    path, vocabulary = empty_and_unknown_cells
    checkpoint = _checkpoint(model, tmp_path / "ckpt", vocabulary)
    audits, telemetry, values, warnings = {}, {}, {}, {}
    for executor in ("local", "ray"):
        st = Store(tmp_path / f"store-{executor}")
        name = st.ingest(path).name
        caplog.clear()
        with caplog.at_level("WARNING", logger="scdm.embedding"):
            res = embed(st, name, model, checkpoint, batch_size=4, chunk_rows=16, executor=executor, progress=False, allow_empty_cells=True)
        raw = st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [res.embedding_id])["audit"].iloc[0]
        audits[executor], telemetry[executor] = json.loads(raw), res.telemetry
        values[executor] = st.read_embedding(res.embedding_id)
        warnings[executor] = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert audits["ray"] == audits["local"]
    assert {k: audits["ray"].get(k) for k in expected} == expected
    assert telemetry["ray"]["zero_rows"] == telemetry["local"]["zero_rows"] == expected["zero_rows"]
    assert warnings["ray"] == warnings["local"]
    assert any("cells got an all-zero" in w for w in warnings["ray"]) == (expected["zero_rows"] > 0)
    assert any("express none of the genes" in w for w in warnings["ray"]) == ("cells_without_known_genes" in expected)
    np.testing.assert_array_equal(values["ray"], values["local"])


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_audit_counts_the_all_zero_rows_of_chunks_a_resumed_run_kept(executor, empty_and_unknown_cells, tmp_path):
    # cells 0, 1 and 5 (all in chunk 0) get all-zero vectors; chunk 2 is recomputed (a repair, a resume):
    # the audit said zero_rows 0, the count of the one chunk that run computed, with 3 all-zero rows stored
    path, vocabulary = empty_and_unknown_cells
    checkpoint = write_toy_checkpoint(tmp_path / "ckpt", vocabulary)
    st = Store(tmp_path / "store")
    name = st.ingest(path).name
    first = embed(st, name, "toy-zeropool", checkpoint, chunk_rows=16, progress=False, allow_empty_cells=True)
    st.mark_chunks_pending(first.embedding_id, [2])
    again = embed(st, name, "toy-zeropool", checkpoint, chunk_rows=16, executor=executor, progress=False, allow_empty_cells=True)
    assert again.computed_chunks == 1 and again.telemetry["zero_rows"] == 0  # the telemetry describes the run
    audit = json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [first.embedding_id])["audit"].iloc[0])
    stored = st.read_embedding(first.embedding_id)
    assert audit["zero_rows"] == int((~stored.any(axis=1)).sum()) == 3  # the audit describes the stored embedding


@pytest.mark.usefixtures("ray_local")
def test_a_repair_round_counts_each_computed_chunk_once(tmp_path, pc9_counts_path, toy_ckpt, local_reference, monkeypatch):
    # a chunk file gone between its commit and finalize: finalize refuses it and the chunk is computed again.
    # The result said 11 chunks computed (the first round's 5 counted twice, then the repaired one), not 6.
    from scdm.store._store import Embedding

    finalize, gone = Embedding.finalize, []

    def finalize_after_a_loss(self, **kwargs):
        if not gone:
            (self.path / "c" / "1" / "0").unlink()
            gone.append(1)
        return finalize(self, **kwargs)

    monkeypatch.setattr(Embedding, "finalize", finalize_after_a_loss)
    st = Store(tmp_path / "store")
    ds = st.ingest(pc9_counts_path)
    res = embed(st, ds.name, "toy-flaky", toy_ckpt, chunk_rows=CHUNK_ROWS, executor="ray", progress=False)
    assert gone and res.computed_chunks == res.telemetry["chunks"] == 6
    np.testing.assert_array_equal(st.read_embedding(res.embedding_id), local_reference[0])


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("executor", ["local", "ray"])
@pytest.mark.parametrize("kept", [1, 3])  # 3 of 3: every chunk committed, the run stopped before the mark complete
def test_audit_token_statistics_describe_the_whole_embedding_after_a_resume(executor, kept, empty_and_unknown_cells, tmp_path,
                                                                             monkeypatch):
    # chunk 0 holds cells 0, 1 and 5, which show the model no gene (0 tokens): a resume that computed chunks 1-2
    # recorded tokens_per_cell_min 1 and the median of 24 cells, and one that computed none recorded no statistics
    from scdm.store._store import ChunkWriter

    path, vocabulary = empty_and_unknown_cells
    checkpoint = write_toy_checkpoint(tmp_path / "ckpt", vocabulary)
    options = {"chunk_rows": 16, "progress": False, "allow_empty_cells": True}

    def audit_of(st, embedding_id):
        return json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [embedding_id])["audit"].iloc[0])

    clean = Store(tmp_path / "clean")
    reference = embed(clean, clean.ingest(path).name, "toy-zeropool", checkpoint, **options)
    expected = audit_of(clean, reference.embedding_id)
    assert expected["tokens_per_cell_min"] == 0

    st = Store(tmp_path / "store")
    name = st.ingest(path).name
    original, written = ChunkWriter.write, []

    def stopping(self, chunk, block, **kw):
        if len(written) == kept:
            raise KeyboardInterrupt
        written.append(chunk)
        return original(self, chunk, block, **kw)

    with monkeypatch.context() as m:
        m.setattr(ChunkWriter, "write", stopping)
        if kept == 3:  # all chunks written: stop in the finalize that follows
            m.setattr("scdm.embedding.chunks.Finish.__call__", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            embed(st, name, "toy-zeropool", checkpoint, **options)
    assert st.embeddings()["chunks_done"].item() == kept
    resumed = embed(st, name, "toy-zeropool", checkpoint, executor=executor, **options)
    assert resumed.embedding_id == reference.embedding_id and resumed.computed_chunks == 3 - kept
    got = audit_of(st, resumed.embedding_id)
    assert {k: v for k, v in got.items() if k.startswith("tokens_per_cell")} == {
        k: v for k, v in expected.items() if k.startswith("tokens_per_cell")}
    assert got == expected
