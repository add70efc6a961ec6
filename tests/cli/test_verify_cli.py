"""`scdm verify`, repair by rerunning `scdm embed`, read-only stores and damaged catalogs on the command line."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.embedding.runner import embed, embed_baseline
from scdm.store import Store, example_data
from tests.store.conftest import make_counts_adata

EMBED = ["embed", "a375", "--model", "pca", "--n-hvg", "50", "--n-comps", "5", "--chunk-rows", "16", "-q"]
"""The command that made the template's embedding (7 chunks of 16 cells)."""


def damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[5] ^= 0xFF
        data[-9] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    else:
        os.truncate(path, 17)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify-cli") / "store"
    st = Store(root)
    st.ingest(example_data(), label_key="response_PLX4720", name="a375")
    embed_baseline(st, ["a375"], model="pca", n_hvg=50, n_comps=5, chunk_rows=16, progress=False)
    return root


@pytest.fixture()
def store(template, tmp_path):
    """A copy of the template store: (run, embedding id, clean values, path of chunk file i, store root)."""
    root = tmp_path / "store"
    shutil.copytree(template, root)
    st = Store(root)
    eid = str(st.embeddings()["embedding_id"].iloc[0])
    runner = CliRunner()

    def run(*args, ok=True, env=None):
        result = runner.invoke(main, ["--store", str(root), *args], catch_exceptions=False, env=env)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return run, eid, st.read_embedding(eid), lambda i: st.embedding(eid).path / "c" / str(i) / "0", root


def _reads_fail(run, eid: str, out, head: str) -> list[str]:
    """The outputs of an export and an evaluate of a damaged embedding: each an error line, no file written."""
    outputs = []
    for args in (["export", "--embedding", eid, "--out", str(out)],
                 ["evaluate", "--embedding", eid, "--scenario", "pooled", "--by", "all", "--heads", head, "--folds", "2", "-q"]):
        result = run(*args, ok=False)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        outputs.append(result.output)
    assert not out.exists()
    return outputs


@pytest.mark.parametrize("how", ["flip", "delete", "truncate"])
def test_damaged_chunk_fails_export_and_evaluate_then_scdm_embed_repairs_it(store, tmp_path, how):
    run, eid, clean, chunk, _ = store
    damage(chunk(3), how)
    out = tmp_path / "x.npy"
    for output in _reads_fail(run, eid, out, "logreg"):
        assert f"Embedding {eid} (pca, frozen) of dataset 'a375' is damaged: chunk 3 of 7" in output
        assert str(chunk(3)) in output and "scdm embed a375 --model pca --n-hvg 50 --n-comps 5" in output

    result = run("verify", ok=False)
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and f"{eid}  pca  a375  chunk 3 (rows 48-63)" in bad[0] and str(chunk(3)) in bad[0]
    assert "1 bad chunk(s) in 1 embedding(s)" in result.output

    assert "computed 1 chunk(s)" in run(*EMBED).output
    assert "all match their checksums" in run("verify").output
    run("export", "--embedding", eid, "--out", str(out))
    assert np.load(out).tobytes() == clean.tobytes()


def test_verify_repair_recomputes_baseline_chunks_bit_identically(store, tmp_path):
    run, eid, clean, chunk, _ = store
    damage(chunk(0), "flip")
    damage(chunk(6), "truncate")
    result = run("verify", "--repair", "-q")
    assert f"repaired {eid} (pca, a375): recomputed chunk(s) 0, 6" in result.output
    assert "all match" in run("verify", "--embedding", eid).output
    run("export", "--embedding", eid, "--out", str(tmp_path / "x.npy"))
    assert np.load(tmp_path / "x.npy").tobytes() == clean.tobytes()


def test_verify_repair_prints_the_embed_command_of_a_checkpoint_model(tmp_path):
    from tests.embed import toy_adapter

    adata = make_counts_adata(n_cells=60, n_genes=40)
    st = Store(tmp_path / "store")
    st.ingest(adata, name="toy")
    ckpt = toy_adapter.write_toy_checkpoint(tmp_path / "ckpt", adata.var_names.tolist())
    eid = embed(st, "toy", "toy-test", ckpt, chunk_rows=16, max_genes=7, seed=3, progress=False).embedding_id
    clean = st.read_embedding(eid)
    damage(st.embedding(eid).path / "c" / "2" / "0", "flip")
    runner = CliRunner()
    result = runner.invoke(main, ["--store", str(st.root), "verify", "--repair"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    command = next(line.strip() for line in result.output.splitlines() if line.strip().startswith("scdm embed"))
    args = shlex.split(command.split("  #")[0])
    assert args[:7] == ["scdm", "embed", "toy", "--model", "toy-test", "--checkpoint", "DIR"]
    assert "--param" in args and "max_genes=7" in args and "could not" not in command
    args[args.index("DIR")] = str(ckpt)
    result = runner.invoke(main, ["--store", str(st.root), *args[1:], "-q"], catch_exceptions=False)
    assert result.exit_code == 0 and f"id {eid} (computed 1 chunk(s)" in result.output, result.output
    assert Store(st.root).read_embedding(eid).tobytes() == clean.tobytes()


def test_a_read_only_store_serves_read_commands_and_refuses_writing_ones(store, tmp_path):
    run, eid, clean, _, root = store
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "claims" not in p.parts}
    for flag, env in ((["--read-only"], None), ([], {"SCDM_READ_ONLY": "1"})):
        assert "a375" in run(*flag, "ls", env=env).output
        assert "108" in run(*flag, "sql", "SELECT count(*) AS n FROM cells", env=env).output
        run(*flag, "export", "--embedding", eid, "--out", str(tmp_path / "x.npy"), env=env)
        assert np.load(tmp_path / "x.npy").tobytes() == clean.tobytes()
        run(*flag, "results", env=env)
        assert "all match" in run(*flag, "verify", env=env).output
        for args in (EMBED, ["ingest", example_data(), "--name", "b"], ["rm", "--embedding", eid],
                     ["evaluate", "--heads", "logreg", "--folds", "2", "-q"], ["verify", "--repair"]):
            result = run(*flag, *args, ok=False, env=env)
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert "is open read-only" in result.output and "so scdm cannot" in result.output
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "claims" not in p.parts} == before


def test_report_of_a_read_only_store_goes_elsewhere(store, tmp_path):
    run, *_ = store
    run("--read-only", "report", "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / "index.html").is_file()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_catalog_is_one_message_without_traceback(store, how):
    run, *_, root = store
    catalog = root / "catalog.duckdb"
    if how == "truncated":
        os.truncate(catalog, 4096 * 3)
    else:
        catalog.write_bytes(b"\x00garbage" * 4096)
    result = run("ls", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"The catalog '{catalog}" in result.output and "damaged" in result.output and "backup" in result.output


def test_a_complete_embedding_missing_a_chunk_record_fails_reads_and_verify_repair_recomputes_it(store, tmp_path):
    run, eid, clean, chunk, root = store
    Store(root).catalog.execute("DELETE FROM embedding_chunks WHERE chunk = 3")
    chunk(3).unlink()  # it would read as zeros
    out = tmp_path / "x.npy"
    result = run("export", "--embedding", eid, "--out", str(out), ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output and not out.exists()
    assert "is damaged: chunk 3 of 7 (rows 48-63) failed verification, no record" in result.output
    result = run("verify", ok=False)
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and f"{eid}  pca  a375  chunk 3 (rows 48-63) no record" in bad[0]
    assert "checked 1 embedding(s), 6 committed chunk(s): 1 bad chunk(s) in 1 embedding(s)" in result.output
    assert f"repaired {eid} (pca, a375): recomputed chunk(s) 3" in run("verify", "--repair", "-q").output
    assert "7 committed chunk(s): all match" in run("verify").output
    run("export", "--embedding", eid, "--out", str(out))
    assert np.load(out).tobytes() == clean.tobytes()


def _edit_metadata(array: Path, how: str) -> None:
    if how == "deleted":
        (array / "zarr.json").unlink()
        return
    meta = json.loads((array / "zarr.json").read_text())
    if how == "rows":
        meta["shape"][0] = 96
    else:
        meta["data_type"] = "int32"
    (array / "zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["rows", "dtype", "deleted"])
def test_a_damaged_zarr_json_fails_reads_cleanly_and_verify_repair_rewrites_it(store, tmp_path, how):
    run, eid, clean, chunk, root = store
    array = chunk(0).parent.parent.parent
    _edit_metadata(array, how)
    out = tmp_path / "x.npy"
    for output in _reads_fail(run, eid, out, "ridge"):
        assert f"Embedding {eid} (pca, frozen) of dataset 'a375' is damaged: its array metadata file {array / 'zarr.json'}" in output
        assert f"scdm verify --repair --embedding {eid}" in output
    result = run("verify", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and f"{eid}  pca  a375  array metadata file {array / 'zarr.json'}" in bad[0]
    assert "1 damaged array metadata file(s) in 1 embedding(s)" in result.output
    result = run("verify", "--repair", "-q")
    assert f"repaired {eid} (pca, a375): rewrote its array metadata from the catalog" in result.output
    assert "all match" in run("verify").output
    run("export", "--embedding", eid, "--out", str(out))
    assert np.load(out).tobytes() == clean.tobytes()


def test_scdm_embed_rewrites_a_deleted_zarr_json_and_computes_nothing(store):
    run, eid, clean, chunk, root = store
    _edit_metadata(chunk(0).parent.parent.parent, "deleted")
    assert "already in the store" in run(*EMBED).output
    assert "all match" in run("verify").output
    assert Store(root).read_embedding(eid).tobytes() == clean.tobytes()


def test_verify_reports_and_verify_repair_deletes_temporary_files_of_killed_writes(store):
    run, eid, clean, chunk, root = store
    leftover = chunk(2).with_name(f"0.{'cd' * 16}.partial")
    leftover.write_bytes(chunk(2).read_bytes())  # a killed writer's full-size temporary file
    result = run("verify")
    assert "all match their checksums; 1 temporary file(s) left by interrupted writes (`scdm verify --repair` deletes them)" in result.output
    assert leftover.exists()
    assert "1 temporary file(s) left by interrupted writes (deleted)" in run("verify", "--repair").output
    assert not leftover.exists() and "temporary" not in run("verify").output
    assert Store(root).read_embedding(eid).tobytes() == clean.tobytes()


def test_verify_reports_a_value_kind_given_before_ingest_checked_it_and_its_fix_command_clears_it(tmp_path, monkeypatch):
    # log1p values ingested with --x-kind counts before ingest refused a given kind the values contradict:
    # the store kept 'counts' (pca normalised and logged them again, count models took them as counts) and
    # `scdm verify` said nothing about it
    from scdm.store import _ingest

    adata = make_counts_adata()
    adata.X = adata.X.log1p()
    path = tmp_path / "logged.h5ad"
    adata.write_h5ad(path)
    root = tmp_path / "store"
    runner = CliRunner()

    def run(*args):
        return runner.invoke(main, ["--store", str(root), *args], catch_exceptions=False)

    with monkeypatch.context() as old_ingest:
        old_ingest.setattr(_ingest, "check_given_x_kind", lambda given, scan: None)
        assert run("ingest", str(path), "--name", "logged", "--x-kind", "counts").exit_code == 0
    assert Store(root).dataset("logged").x_kind == "counts"
    nnz = adata.X.nnz

    result = run("verify")
    assert result.exit_code == 1, result.output
    assert (f"BAD dataset logged: stored with value kind 'counts', given at ingest, but --x-kind counts does not fit these "
            f"values (detected: 'normalized'): {nnz} of the {nnz} stored values (100.0%) are not whole numbers") in result.output
    (fix,) = [line for line in result.output.splitlines() if line.startswith("fix dataset logged (values show 'normalized'): ")]
    command = fix.split(": ", 1)[1].split(" (or ", 1)[0]
    assert command == f"scdm ingest {shlex.quote(str(path))} --name logged --x-kind normalized --update"
    assert [w.dataset for w in Store(root).verify().datasets] == ["logged"]

    result = run(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert Store(root).dataset("logged").x_kind == "normalized"
    result = run("verify")
    assert result.exit_code == 0 and "BAD" not in result.output, result.output


def test_verify_leaves_a_given_kind_the_values_fit_alone(tmp_path):
    st = Store(tmp_path / "store")
    st.ingest(make_counts_adata(), name="counts", x_kind="counts")  # whole numbers given as counts: right
    logged = make_counts_adata(seed=1)
    logged.X = logged.X.log1p()
    st.ingest(logged, name="logged", x_kind="normalized")
    report = st.verify()
    assert report.ok and report.datasets == ()
