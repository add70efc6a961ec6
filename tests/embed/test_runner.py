from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdm.embedding.runner import batches_by_length, embed, embed_baseline
from scdm.store import InputDataError, Store, example_data
from scdm.store.errors import CheckpointError, GeneMappingError, ScdmWarning, UnknownModelError
from tests.embed import toy_adapter
from tests.store.conftest import make_counts_adata

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def st(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture()
def pc9(st, pc9_counts_path):
    return st.ingest(pc9_counts_path, label_key="scDEAL_GSE149383_label", unknown_values=["not_in_scDEAL_set"])


@pytest.fixture()
def toy_ckpt(tmp_path, pc9_counts_path):
    genes = ad.read_h5ad(pc9_counts_path, backed="r").var_names[:3000].tolist()
    return toy_adapter.write_toy_checkpoint(tmp_path / "toy", genes)


def _emb(st, result):
    return st.read_embedding(result.embedding_id)


def test_batches_are_sorted_by_length_and_cover_every_cell():
    lengths = [3, 9, 1, 9, 5]
    batches = batches_by_length(lengths, 2)
    assert [list(b) for b in batches] == [[1, 3], [4, 0], [2]]
    assert sorted(np.concatenate(batches)) == list(range(5))


def test_results_do_not_depend_on_batch_size_chunking_or_sorting(tmp_path, pc9_counts_path, toy_ckpt):
    outs = []
    for i, (bs, rows) in enumerate([(1, 300), (7, 64), (64, 37)]):
        st = Store(tmp_path / f"s{i}")
        ds = st.ingest(pc9_counts_path)
        outs.append(_emb(st, embed(st, ds.name, "toy-test", toy_ckpt, batch_size=bs, chunk_rows=rows, progress=False)))
    assert outs[0].shape == (300, 16)
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], atol=1e-5)


def test_rerun_is_a_noop_and_telemetry_is_recorded(st, pc9, toy_ckpt):
    first = embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, max_genes=400, progress=False)
    assert first.computed_chunks == 3 and first.telemetry["cells_per_s"] > 0
    assert 0 < first.telemetry["padding_saved"] < 1
    again = embed(st, pc9.name, "toy-test", toy_ckpt, chunk_rows=128, max_genes=400, progress=False)
    assert again.computed_chunks == 0 and again.embedding_id == first.embedding_id
    row = st.query("SELECT telemetry, audit FROM embeddings WHERE embedding_id = ?", [first.embedding_id]).iloc[0]
    assert '"device":"cpu"' in row.telemetry and '"tokens_per_cell_max":400' in row.audit
    # the executor is recorded for local runs too (Ray's telemetry says "ray"), so SQL can tell them apart
    assert first.telemetry["executor"] == "local" and '"executor":"local"' in row.telemetry


def test_seed_and_params_are_part_of_identity(st, pc9, toy_ckpt):
    a = embed(st, pc9.name, "toy-test", toy_ckpt, seed=0, progress=False)
    b = embed(st, pc9.name, "toy-test", toy_ckpt, seed=1, progress=False)
    c = embed(st, pc9.name, "toy-test", toy_ckpt, max_genes=5, progress=False)
    assert len({a.embedding_id, b.embedding_id, c.embedding_id}) == 3
    assert not np.allclose(_emb(st, a), _emb(st, b))


@pytest.mark.filterwarnings("ignore:.*that another column maps to as well")
def test_a_seed_given_as_a_numpy_int_is_the_same_embedding(st, pc9, toy_ckpt):
    # numpy.int64(1) was keyed "1" (a string) beside 1: the same numbers computed again under a second id
    a = embed(st, pc9.name, "toy-test", toy_ckpt, seed=1, max_genes=50, progress=False)
    b = embed(st, pc9.name, "toy-test", toy_ckpt, seed=np.int64(1), max_genes=50, progress=False)
    assert b.embedding_id == a.embedding_id and b.computed_chunks == 0


@pytest.mark.filterwarnings("ignore:.*that another column maps to as well")
def test_an_embedding_an_older_scdm_keyed_by_a_numpy_seed_is_found(st, pc9, toy_ckpt, monkeypatch):
    from scdm.embedding import runner

    with monkeypatch.context() as older:  # before 564c11b a numpy.int64(1) seed was keyed as the string "1"
        older.setattr(runner, "identity_spellings", lambda adapter, params: {"seed": [str(params["seed"])]})
        stored = embed(st, pc9.name, "toy-test", toy_ckpt, seed=np.int64(1), max_genes=50, progress=False)
    assert st.embedding(stored.embedding_id).params["seed"] == "1"
    again = embed(st, pc9.name, "toy-test", toy_ckpt, seed=1, max_genes=50, progress=False)
    assert again.embedding_id == stored.embedding_id and again.computed_chunks == 0


def test_interrupted_run_resumes_to_bit_identical_result(tmp_path, pc9_counts_path, toy_ckpt, monkeypatch):
    clean = Store(tmp_path / "clean")
    clean.ingest(pc9_counts_path, name="d")
    reference = _emb(clean, embed(clean, "d", "toy-test", toy_ckpt, chunk_rows=50, progress=False))

    st = Store(tmp_path / "crash")
    st.ingest(pc9_counts_path, name="d")
    calls = {"n": 0}
    original = toy_adapter.ToyAdapter.embed

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(toy_adapter.ToyAdapter, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed(st, "d", "toy-test", toy_ckpt, chunk_rows=50, progress=False)
    monkeypatch.setattr(toy_adapter.ToyAdapter, "embed", original)
    done_before = st.embeddings()["chunks_done"].item()
    assert 0 < done_before < 6
    resumed = embed(st, "d", "toy-test", toy_ckpt, chunk_rows=50, progress=False)
    assert resumed.computed_chunks == 6 - done_before
    assert _emb(st, resumed).tobytes() == reference.tobytes()


def test_sigkilled_run_resumes(tmp_path, pc9_counts_path, toy_ckpt):
    st = Store(tmp_path / "s")
    st.ingest(pc9_counts_path, name="d")
    env = {**os.environ, "SCDM_TOY_DELAY": "0.15", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, toy_adapter.__file__, str(st.root), "d", str(toy_ckpt), "40"], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        emb = st.embeddings()
        if len(emb) and emb["chunks_done"].item() >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert st.embeddings()["status"].item() == "pending"
    result = embed(st, "d", "toy-test", toy_ckpt, chunk_rows=40, progress=False)
    assert result.computed_chunks < 8
    clean = Store(tmp_path / "c")
    clean.ingest(pc9_counts_path, name="d")
    assert _emb(st, result).tobytes() == _emb(clean, embed(clean, "d", "toy-test", toy_ckpt, chunk_rows=40, progress=False)).tobytes()


def test_bad_inputs(st, pc9, toy_ckpt, tmp_path):
    with pytest.raises(UnknownModelError, match="Available: .*toy-test"):
        embed(st, pc9.name, "geneformr", toy_ckpt)
    (toy_ckpt / "vocab.json").rename(tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="missing 'vocab.json'"):
        embed(st, pc9.name, "toy-test", toy_ckpt)
    (tmp_path / "vocab.json").rename(toy_ckpt / "vocab.json")
    a375 = st.ingest(example_data(), name="a375")
    with pytest.raises(InputDataError, match="needs raw counts.*negative"):
        embed(st, a375.name, "toy-test", toy_ckpt)
    ensembl_only = make_counts_adata()
    ensembl_only.var_names = [f"ENSG{99000000000 + i:011d}" for i in range(ensembl_only.n_vars)]
    ds = st.ingest(ensembl_only, name="unknown-genes")
    with pytest.raises(GeneMappingError, match="Only 0 of 40 genes.*wrong gene id type"):
        embed(st, ds.name, "toy-test", toy_ckpt)


def test_gene_thresholds_are_checked_when_the_embedding_already_exists(st, pc9, toy_ckpt):
    """--min-gene-fraction / min_genes guard a stored embedding too: it is not returned past them."""
    first = embed(st, pc9.name, "toy-test", toy_ckpt, progress=False)
    audit = json.loads(st.query("SELECT audit FROM embeddings WHERE embedding_id = ?", [first.embedding_id])["audit"][0])
    assert audit["fraction_matched"] < 0.99  # the toy vocabulary holds 3000 of the dataset's genes
    with pytest.raises(GeneMappingError, match=r"need at least 1 and 99%"):
        embed(st, pc9.name, "toy-test", toy_ckpt, min_gene_fraction=0.99, progress=False)
    with pytest.raises(GeneMappingError, match=r"need at least 100000 and 0%"):
        embed(st, pc9.name, "toy-test", toy_ckpt, min_genes=100_000, progress=False)
    again = embed(st, pc9.name, "toy-test", toy_ckpt, min_gene_fraction=audit["fraction_matched"] / 2, progress=False)
    assert again.computed_chunks == 0 and again.embedding_id == first.embedding_id


def test_pca_baseline_matches_sklearn_and_is_deterministic(st, pc9):
    from sklearn.decomposition import PCA

    from scdm.embedding import baselines

    a = embed_baseline(st, [pc9.name], model="pca", n_hvg=300, n_comps=10, progress=False)[0]
    emb = _emb(st, a)
    fit = baselines.fit_baseline(st, [pc9.name], n_hvg=300, n_comps=10)
    cols = [list(baselines.gene_keys(st, pc9.name)).index(g) for g in fit.genes]
    x = ad.read_h5ad(st.root / pc9.stored_path)
    z = baselines.preprocess_block(x.X.astype(np.float32).tocsr(), as_is=False, target_sum=1e4)[:, cols].toarray()
    z = (z - z.mean(0)) / np.where(z.std(0, ddof=1) == 0, 1, z.std(0, ddof=1))
    ref = PCA(10, svd_solver="full").fit_transform(z)
    np.testing.assert_allclose(np.abs(emb), np.abs(ref), atol=2e-3)
    st.remove_embedding(a.embedding_id)
    b = embed_baseline(st, [pc9.name], model="pca", n_hvg=300, n_comps=10, progress=False)[0]
    assert _emb(st, b).tobytes() == emb.tobytes()


def test_joint_baseline_shares_one_space_and_accepts_scaled_data(st, pc9):
    a375 = st.ingest(example_data(), name="a375", gene_key="symbol")
    # z-scored A375 beside PC9's counts: accepted, but not silently (the space separates them by preprocessing)
    with pytest.warns(ScdmWarning, match=rf"scaled \(z-scored\) values \(a375\) and log-normalised or count values \({pc9.name}\)"):
        results = embed_baseline(st, [pc9.name, a375.name], model="hvg", n_hvg=50, progress=False)
    spaces = st.embeddings().set_index("embedding_id").loc[[r.embedding_id for r in results], "space_id"]
    assert spaces.nunique() == 1 and all(r.dim == 50 for r in results)
    solo = embed_baseline(st, [a375.name], model="pca", n_comps=5, progress=False)[0]
    assert st.embedding(solo.embedding_id).space_id not in set(spaces)
    assert np.isfinite(_emb(st, solo)).all()


def test_a_dataset_given_twice_is_fitted_once(st, pc9):
    # by name and by id (or a server upload equal to a training dataset): its cells weighed double in
    # the fit, whose std and components moved (max |diff| 0.013), and the embedding became another
    # space (fit_datasets listing the dataset twice) than the PCA fitted on the dataset once
    (once,) = embed_baseline(st, [pc9.name], model="pca", n_hvg=300, n_comps=5, progress=False)
    twice = embed_baseline(st, [pc9.name, pc9.dataset_id], model="pca", n_hvg=300, n_comps=5, progress=False)
    assert [r.embedding_id for r in twice] == [once.embedding_id] * 2
    assert len(st.embeddings()) == 1


def test_hvg_cut_inside_a_tie_of_z_scored_genes_is_said(st, pc9):
    # the bundled A375 is z-scored per gene on its 108 cells: all 2873 genes have variance 1 +- 3e-6,
    # so "the 2000 most variable" were picked by rounding noise, silently
    a375 = st.ingest(example_data(), name="a375")
    with pytest.warns(ScdmWarning, match=r"pca: 2873 of the 2873 shared genes have the same variance .* which 2000 of them .* "
                                         r"decided by rounding.*--n-hvg 2873"):
        embed_baseline(st, [a375.name], model="pca", n_comps=5, progress=False)
    with warnings.catch_warnings():  # every gene kept: nothing left to rounding
        warnings.simplefilter("error", ScdmWarning)
        embed_baseline(st, [a375.name], model="pca", n_hvg=2873, n_comps=5, progress=False)
    with warnings.catch_warnings():  # counts: variances differ, the top genes are the data's
        warnings.simplefilter("error", ScdmWarning)
        embed_baseline(st, [pc9.name], model="hvg", n_hvg=300, progress=False)


def test_tokenising_in_worker_processes_gives_identical_results(tmp_path, pc9_counts_path, toy_ckpt):
    outs = []
    for workers in (0, 1):
        st = Store(tmp_path / f"w{workers}")
        st.ingest(pc9_counts_path, name="d")
        outs.append(_emb(st, embed(st, "d", "toy-test", toy_ckpt, chunk_rows=100, workers=workers, progress=False)))
    assert outs[0].tobytes() == outs[1].tobytes()


def test_tokeniser_processes_default_to_two_on_cuda_and_none_on_the_cpu(monkeypatch):
    from scdm.embedding import runner

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert runner.tokenise_workers(None, "cuda", 10) == runner.TOKENISE_WORKERS_CUDA == 2
    assert runner.tokenise_workers(None, "cuda:1", 10) == 2
    assert runner.tokenise_workers(None, "cpu", 10) == 0  # the model's threads use every core
    assert runner.tokenise_workers(None, "cuda", 1) == 0  # nothing to overlap with
    assert runner.tokenise_workers(3, "cpu", 1) == 3 and runner.tokenise_workers(0, "cuda", 10) == 0  # asked for: kept
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert runner.tokenise_workers(None, "cuda", 10) == 1  # one CPU left beside this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert runner.tokenise_workers(None, "cuda", 10) == 0


class _MarkingChunks:
    """A ChunkTokens stand-in whose items leave a file behind, in whichever process made them."""

    def __init__(self, folder: Path, chunks: list[int]) -> None:
        self.folder, self.chunks = folder, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        (self.folder / f"chunk{self.chunks[i]}").touch()
        return self.chunks[i], [{"input_ids": np.full(3, self.chunks[i])}]


def test_worker_processes_tokenise_only_chunks_this_process_claimed(tmp_path):
    from scdm.embedding.runner import _iter_chunk_tokens

    asked: list[int] = []

    def wanted(chunk: int) -> bool:  # as ChunkWriter.claim: another run holds the odd chunks
        asked.append(chunk)
        return chunk % 2 == 0

    source = _MarkingChunks(tmp_path, list(range(20)))
    items = _iter_chunk_tokens(source, 1, wanted)  # type: ignore[arg-type]
    first = next(items)
    assert first[0] == 0 and first[1][0]["input_ids"].tolist() == [0, 0, 0]
    assert len(asked) < 10  # claimed a few chunks ahead of the model, not all at the start
    rest = list(items)
    assert [c for c, cells in [first, *rest] if cells is not None] == list(range(0, 20, 2))
    assert [c for c, cells in rest if cells is None] == list(range(1, 20, 2))
    assert sorted(int(p.name[5:]) for p in tmp_path.iterdir()) == list(range(0, 20, 2))  # none of the others' chunks


def test_tokenised_cells_pack_into_arrays_and_back_bit_for_bit():
    from scdm.embedding.runner import pack_cells, unpack_cells

    rng = np.random.default_rng(0)
    cells = [{"input_ids": rng.integers(0, 60_000, n).astype(np.int64), "values": rng.random(n).astype(np.float32),
              "pos": rng.integers(0, 9, (n, 2)).astype(np.int16)} for n in (5, 1, 300, 0, 17)]
    packed = pack_cells(cells)
    assert packed is not None and len(packed) == 7  # keys + (data, offsets) per key
    back = unpack_cells(packed, len(cells))
    assert [list(c) for c in back] == [list(c) for c in cells]
    for got, want in zip(back, cells):
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
            assert got[key].tobytes() == want[key].tobytes()
    # what does not pack travels as it is: a scalar, mixed dtypes, different keys, no cells
    assert pack_cells([{"input_ids": np.arange(3), "n_pad": 4}]) is None
    assert pack_cells([{"input_ids": np.arange(3)}, {"input_ids": np.arange(3.0)}]) is None
    assert pack_cells([{"input_ids": np.arange(3)}, {"ids": np.arange(3)}]) is None
    assert pack_cells([]) is None


def test_worker_chunks_spooled_through_files_leave_nothing_behind(tmp_path, monkeypatch):
    import tempfile

    from scdm.embedding import runner
    from scdm.embedding.runner import _iter_chunk_tokens

    read_back = []
    unspool = runner._unspool_cells
    monkeypatch.setattr(runner, "_unspool_cells", lambda spooled: read_back.append(spooled.n_cells) or unspool(spooled))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    source = _MarkingChunks(marks, list(range(6)))
    items = list(_iter_chunk_tokens(source, 2))  # type: ignore[arg-type]
    assert [c for c, _ in items] == list(range(6))
    assert all(cells[0]["input_ids"].tolist() == [c] * 3 and cells[0]["input_ids"].dtype == np.int64 for c, cells in items)
    assert read_back == [1] * 6  # every chunk came through a file, not the pipe
    assert list((tmp_path / "tmp").iterdir()) == []  # the spool folder and its files are gone
    stopped = _iter_chunk_tokens(source, 2)  # type: ignore[arg-type]
    chunk, cells = next(stopped)
    assert [p.name.startswith("scdm-tokens-") for p in (tmp_path / "tmp").iterdir()] == [True]
    stopped.close()  # an interrupted run: the workers are joined and the folder removed
    assert list((tmp_path / "tmp").iterdir()) == []


def test_default_tokenisers_are_recorded_and_the_embedding_does_not_depend_on_them(tmp_path, pc9_counts_path, toy_ckpt):
    runs = {}
    for workers in (None, 2):
        st = Store(tmp_path / f"w{workers}")
        st.ingest(pc9_counts_path, name="d")
        result = embed(st, "d", "toy-test", toy_ckpt, chunk_rows=64, workers=workers, device="cpu", progress=False)
        runs[workers] = (_emb(st, result), result.telemetry["tokenise_workers"])
    assert runs[None][1] == 0 and runs[2][1] == 2  # on the CPU none by default
    assert runs[None][0].tobytes() == runs[2][0].tobytes()


def test_reference_quirk_runs_replay_the_rng_stream_on_resume(tmp_path, pc9_counts_path, monkeypatch):
    from scdm.embedding.models import scgpt

    genes = ad.read_h5ad(pc9_counts_path, backed="r").var_names[:2000].tolist()
    ckpt = scgpt.write_tiny_checkpoint(tmp_path / "scgpt", genes=genes)
    clean = Store(tmp_path / "clean")
    clean.ingest(pc9_counts_path, name="d")
    reference = _emb(clean, embed(clean, "d", "scgpt", ckpt, chunk_rows=64, reference_quirks=True, progress=False))

    st = Store(tmp_path / "crash")
    st.ingest(pc9_counts_path, name="d")
    original = scgpt.ScGPTAdapter.embed if hasattr(scgpt, "ScGPTAdapter") else None
    cls = type(next(a for n, a in importlib.import_module("scdm.embedding").available_models().items() if n == "scgpt")())
    original = cls.embed
    calls = {"n": 0}

    def flaky(self, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(cls, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed(st, "d", "scgpt", ckpt, chunk_rows=64, reference_quirks=True, progress=False)
    monkeypatch.setattr(cls, "embed", original)
    resumed = embed(st, "d", "scgpt", ckpt, chunk_rows=64, reference_quirks=True, progress=False)
    assert 0 < resumed.computed_chunks < 5
    assert _emb(st, resumed).tobytes() == reference.tobytes()


def test_processes_hashing_one_checkpoint_at_once_share_the_hash_cache(tmp_path, toy_ckpt):
    """Two embed runs start together (one per GPU): both update the cache file; neither may fail."""
    from concurrent.futures import ThreadPoolExecutor

    from scdm.embedding.runner import checkpoint_hash

    want = checkpoint_hash(toy_ckpt)
    for round_ in range(20):
        cache = tmp_path / f"cache{round_}"
        cache.mkdir()
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: checkpoint_hash(toy_ckpt, cache_dir=cache), range(8)))
        assert got == [want] * 8
        assert [p.name for p in cache.iterdir()] == ["checkpoint-hashes.json"]  # no temporary left behind


def test_a_joint_hvg_is_the_same_fit_in_any_order_and_a_repair_matches_its_other_chunks(tmp_path):
    from scdm.embedding.runner import embed_baseline, repair

    pc9 = ad.read_h5ad(Path(__file__).resolve().parents[1] / "data" / "PC9_erlotinib_subsample300.h5ad")
    pc9[:100].copy().write_h5ad(tmp_path / "A.h5ad")
    pc9[100:200, ::-1].copy().write_h5ad(tmp_path / "B.h5ad")  # the same genes in reverse column order
    out = {}
    for order in (["A", "B"], ["B", "A"]):
        st = Store(tmp_path / "".join(order))
        for name in ("A", "B"):
            st.ingest(tmp_path / f"{name}.h5ad", name=name)
        res = embed_baseline(st, order, model="hvg", n_hvg=50, chunk_rows=25, progress=False)
        out["".join(order)] = (st, {r.dataset: r.embedding_id for r in res})
    (ab, ids_ab), (ba, ids_ba) = out["AB"], out["BA"]
    for name in ("A", "B"):
        assert ids_ab[name] == ids_ba[name]
        assert ab.read_embedding(ids_ab[name]).tobytes() == ba.read_embedding(ids_ba[name]).tobytes()
    before = ba.read_embedding(ids_ba["A"]).copy()
    ba.mark_chunks_pending(ids_ba["A"], [1])  # as scdm verify --repair does for a damaged chunk
    repair(ba, ids_ba["A"], progress=False)
    assert ba.read_embedding(ids_ba["A"]).tobytes() == before.tobytes()


def test_scgpt_embeds_log_normalised_values_as_it_embeds_their_counts(tmp_path, pc9_counts_path):
    """scGPT bins each cell's values by their order, so normalize_total + log1p changes no token."""
    from scdm.embedding.models import scgpt

    counts = ad.read_h5ad(pc9_counts_path)[:60].copy()
    genes = counts.var_names[:2000].tolist()
    ckpt = scgpt.write_tiny_checkpoint(tmp_path / "scgpt", genes=genes)
    lognorm = counts.copy()
    totals = np.asarray(lognorm.X.sum(axis=1)).ravel()
    lognorm.X = lognorm.X.multiply(1e4 / totals[:, None]).tocsr().log1p().astype(np.float32)
    st = Store(tmp_path / "store")
    st.ingest(counts, name="counts")
    st.ingest(lognorm, name="lognorm")
    assert st.dataset("lognorm").x_kind == "normalized"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScdmWarning)  # no "expects raw counts" warning either
        a = _emb(st, embed(st, "counts", "scgpt", ckpt, progress=False))
        b = _emb(st, embed(st, "lognorm", "scgpt", ckpt, progress=False))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_scgpt_refuses_scaled_values(tmp_path, pc9_counts_path):
    from scdm.embedding.models import scgpt

    scaled = ad.read_h5ad(pc9_counts_path)[:20].copy()
    dense = scaled.X.toarray()
    scaled.X = (dense - dense.mean(axis=0)).astype(np.float32)
    ckpt = scgpt.write_tiny_checkpoint(tmp_path / "scgpt", genes=scaled.var_names[:500].tolist())
    st = Store(tmp_path / "store")
    st.ingest(scaled, name="scaled")
    with pytest.raises(InputDataError, match="negative"):
        embed(st, "scaled", "scgpt", ckpt, progress=False)



@pytest.mark.filterwarnings("ignore:pca.*the same variance")
def test_a_baselines_sizes_and_target_sum_are_one_embedding_in_any_spelling(st):
    # target_sum=10000 keyed {"target_sum": 10000} beside the default 1e4's 10000.0, and a numpy int n_comps
    # the string "5": three embeddings (and spaces) of one computation, each fitted again
    a375 = st.ingest(example_data(), name="a375", gene_key="symbol")
    (default,) = embed_baseline(st, [a375.name], model="pca", n_comps=5, progress=False)
    (spelled,) = embed_baseline(st, [a375.name], model="pca", n_comps=np.int64(5), target_sum=10000, progress=False)
    assert spelled.embedding_id == default.embedding_id and spelled.computed_chunks == 0
    assert len(st.embeddings()) == 1


@pytest.mark.filterwarnings("ignore:pca.*the same variance")
def test_a_baseline_an_older_scdm_keyed_as_given_is_found_again(st, tmp_path):
    a375 = st.ingest(example_data(), name="a375", gene_key="symbol")
    other = Store(tmp_path / "other")
    other.ingest(example_data(), name="a375", gene_key="symbol")
    (made,) = embed_baseline(other, ["a375"], model="pca", n_comps=5, target_sum=10000, progress=False)
    # the row and array as the older scdm wrote them: its params keyed target_sum as given, an int
    params = {**other.embedding(made.embedding_id).params, "target_sum": 10000}
    older = st.create_embedding(a375.name, model="pca", params=params, dim=made.dim)
    values = other.read_embedding(made.embedding_id)
    for chunk in range(older.n_chunks):
        lo, hi = older.chunk_bounds(chunk)
        older.write_chunk(chunk, values[lo:hi])
    older.finalize()
    (again,) = embed_baseline(st, [a375.name], model="pca", n_comps=5, target_sum=10000, progress=False)
    assert again.embedding_id == older.embedding_id and again.computed_chunks == 0


def test_a_baseline_told_what_its_values_are_is_the_embedding_of_the_default(st, tmp_path):
    # normalized=None resolves on the dataset (scaled values here: used as they are, as normalized=True says), but was
    # keyed as given: the same fit computed again under a second id and space
    a375 = st.ingest(example_data(), name="a375", gene_key="symbol")
    default = embed(st, a375.name, "hvg", n_hvg=50, progress=False)
    told = embed(st, a375.name, "hvg", n_hvg=50, normalized=True, progress=False)
    assert told.embedding_id == default.embedding_id and told.computed_chunks == 0
    # keyed as the default (None: replayed onto an upload, each dataset's kind is detected), so stored ids stay
    assert st.embedding(default.embedding_id).params["normalized"] is None
    # an older scdm's embedding keyed True as given is found under either spelling, and keeps its id
    other = Store(tmp_path / "other")
    other.ingest(example_data(), name="a375", gene_key="symbol")
    older = other.create_embedding("a375", model="hvg", params={**st.embedding(default.embedding_id).params, "normalized": True},
                                   dim=default.dim)
    values = st.read_embedding(default.embedding_id)
    for chunk in range(older.n_chunks):
        lo, hi = older.chunk_bounds(chunk)
        older.write_chunk(chunk, values[lo:hi])
    older.finalize()
    for normalized in (None, True):
        (again,) = embed_baseline(other, ["a375"], model="hvg", n_hvg=50, normalized=normalized, progress=False)
        assert again.embedding_id == older.embedding_id and again.computed_chunks == 0


def test_a_target_sum_on_values_used_as_they_are_is_the_embedding_of_the_default(st):
    # target_sum normalises counts; values used as they are (the example's scaled ones) never meet it, but it was keyed:
    # target_sum=5000 was a second embedding and space of the default's fit
    a375 = st.ingest(example_data(), name="a375", gene_key="symbol")
    default = embed(st, a375.name, "pca", n_comps=5, progress=False)
    other = embed(st, a375.name, "pca", n_comps=5, target_sum=5000, progress=False)
    assert other.embedding_id == default.embedding_id and other.computed_chunks == 0
    assert st.embedding(default.embedding_id).params["target_sum"] == 1e4
