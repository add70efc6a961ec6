"""What killed or half-undone work leaves in a store: `scdm verify` lists it, `--repair` deletes it once its writer is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, _claims, example_data
from scdm.store.leftovers import GRACE_S, scan, temp_prefix

HOUR_AGO = time.time() - GRACE_S - 60


def _age(path: Path, when: float = HOUR_AGO) -> None:
    """Set the modification time of a file, or of a folder and every file in it."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def _folder(path: Path, n_bytes: int = 1000) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"\0" * n_bytes)
    return path


@pytest.fixture()
def st(tmp_path) -> Store:
    return Store(tmp_path / "store")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_copy_killed_during_ingest_is_listed_and_deleted_once_its_writer_is_gone(st, tmp_path):
    # the real thing: an ingest SIGKILLed while it copies the data into the store
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from scdm.store import Store
        def copy_then_die(src, dst, *a, **k):
            with open(dst, "wb") as fh:
                fh.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.copyfile = copy_then_die
        Store({str(st.root)!r}).ingest({example_data()!r}, name="a375")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", script], env=env, check=False).returncode == -9
    (left,) = [p for p in (st.root / "datasets").iterdir()]
    assert left.name.startswith(".") and st.datasets().empty
    report = st.verify()
    (item,) = report.leftovers
    assert item.path == left and item.size == len(b"half a file") and item.kept is None and not item.removed
    assert "interrupted ingest" in item.what and "1 leftover" in report.summary() and report.ok
    repaired = st.verify(repair=True)
    assert [x.removed for x in repaired.leftovers] == [True] and not left.exists()
    assert st.verify().leftovers == ()


def test_a_temporary_of_a_running_writer_is_left_alone(st):
    live = st.root / "datasets" / f"{temp_prefix('0123456789abcdef')}abcd1234"  # this process writes it
    live.write_bytes(b"being written")
    _age(live)  # even when it has not changed for long: its writer runs
    dead = st.root / "datasets" / f".0123456789abcdef.tmp-{_dead_pid()}-{live.name.split('-', 2)[2]}"
    dead.write_bytes(b"x")  # same host, pid gone: deleted at once, however young
    (item_live, item_dead) = sorted(st.verify(repair=True).leftovers, key=lambda x: x.path != live)
    assert item_live.kept and f"pid {os.getpid()}" in item_live.kept and live.exists()
    assert item_dead.removed and not dead.exists()


def test_temporaries_whose_writer_cannot_be_asked_go_once_untouched_for_an_hour(st):
    folder = st.root / "artifacts" / "heads"
    old_name = _folder(folder / ".0123456789abcdef-k2j4_x9q")  # a trained-head save of an older scdm: no pid
    other_host = _folder(st.root / "artifacts" / "adapters" / ".0123456789abcdef.tmp-42-othernode-1a2b3c4d")
    found = {x.path: x for x in scan(st, remove=True)}
    assert all(found[p].kept and not found[p].removed for p in (old_name, other_host))
    assert "othernode" in found[other_host].kept
    _age(old_name)
    _age(other_host)
    assert {x.path for x in scan(st, remove=True) if x.removed} == {old_name, other_host}
    assert not old_name.exists() and not other_host.exists()


def test_artifact_folders_without_a_catalog_row_are_listed_with_their_size_and_removed(st):
    adapter = _folder(st.root / "artifacts" / "adapters" / "0a1b2c3d4e5f6a7b", 3000)
    head = _folder(st.root / "artifacts" / "heads" / "1a2b3c4d5e6f7a8b", 2000)
    transfer = _folder(st.root / "artifacts" / "transfer" / "2a3b4c5d6e7f8a9b", 1000)
    demo = _folder(st.root / "artifacts" / "demo" / "tiny-model")  # not a folder of a catalog table
    report = st.verify()
    assert {x.path: x.size for x in report.leftovers} == {adapter: 3000, head: 2000, transfer: 1000}
    assert all(x.kept for x in report.leftovers)  # just written: its job may be about to add the row
    assert "6.0 kB" in report.summary()
    for p in (adapter, head, transfer):
        _age(p)
    report = st.verify(repair=True)
    assert all(x.removed for x in report.leftovers) and "deleted 3 (6.0 kB)" in report.summary()
    assert not adapter.exists() and not head.exists() and not transfer.exists() and demo.exists()


def test_a_trained_heads_folder_with_its_row_is_not_a_leftover(st):
    from scdm.classify.trained_heads import train_head
    from scdm.embedding.runner import embed_baseline

    st.ingest(example_data(), label_key="response_PLX4720", name="a375")
    embed_baseline(st, ["a375"], model="pca", n_hvg=50, n_comps=5, progress=False)
    head_id = train_head(st, dataset="a375", model="pca", head="logreg")
    folder = st.root / "artifacts" / "heads" / head_id
    assert folder.is_dir()
    _age(folder)
    assert st.verify(repair=True).leftovers == () and folder.is_dir()
    # the row goes (a process killed between deleting rows and files): the folder is a leftover
    st.catalog.execute("DELETE FROM trained_heads WHERE head_id = ?", [head_id])
    (item,) = st.verify(repair=True).leftovers
    assert item.path == folder and item.removed and not folder.exists()


def test_an_array_without_its_row_is_deleted_unless_its_embedding_is_held(st):
    from scdm.embedding.runner import embed_baseline

    st.ingest(example_data(), label_key="response_PLX4720", name="a375")
    eid = embed_baseline(st, ["a375"], model="pca", n_hvg=50, n_comps=5, progress=False)[0].embedding_id
    path = st.embedding(eid).path
    st.catalog.execute("DELETE FROM embedding_chunks WHERE embedding_id = ?", [eid])
    st.catalog.execute("DELETE FROM embeddings WHERE embedding_id = ?", [eid])  # a removal killed before the array went
    claims = _claims.claims_folder(st.root, eid)
    held = _claims.try_exclusive(claims)  # a creator of the same embedding at work
    assert held is not None
    try:
        (item,) = st.verify(repair=True).leftovers
        assert item.kept and path.exists()
    finally:
        _claims.release(held)
    (item,) = st.verify(repair=True).leftovers
    assert item.removed and not path.exists() and not claims.exists()


def test_a_dataset_copy_without_its_row_goes_once_old(st):
    copy = st.root / "datasets" / "0123456789abcdef.h5ad"
    shutil.copyfile(example_data(), copy)
    (item,) = st.verify(repair=True).leftovers
    assert item.kept and copy.exists() and "dataset copy" in item.what
    _age(copy)
    (item,) = st.verify(repair=True).leftovers
    assert item.removed and not copy.exists()


def test_checking_some_embeddings_leaves_the_store_scan_out(st):
    _age(_folder(st.root / "artifacts" / "adapters" / "0a1b2c3d4e5f6a7b"))
    assert st.verify([]).leftovers == ()


def test_scdm_verify_prints_leftovers_and_repair_deletes_them(st):
    adapter = _folder(st.root / "artifacts" / "adapters" / "0a1b2c3d4e5f6a7b", 2500)
    _age(adapter)
    runner = CliRunner()
    result = runner.invoke(main, ["--store", str(st.root), "verify"])
    assert result.exit_code == 0, result.output  # not damage
    assert f"LEFTOVER {adapter}  adapter folder without a catalog row, 2.5 kB (`scdm verify --repair` deletes it)" in result.output
    assert "`scdm verify --repair` deletes 1 (2.5 kB)" in result.output
    result = runner.invoke(main, ["--store", str(st.root), "--read-only", "verify"])
    assert result.exit_code == 0 and "LEFTOVER" in result.output and not (st.root / "claims").exists()
    result = runner.invoke(main, ["--store", str(st.root), "verify", "--repair"])
    assert result.exit_code == 0 and "(deleted)" in result.output and not adapter.exists()


def test_place_folder_keeps_an_equal_folder_and_replaces_another(tmp_path: Path) -> None:
    from scdm.store.leftovers import place_folder

    def made(name: str, text: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "file").write_text(text)
        return folder

    final = tmp_path / "final"
    assert place_folder(made("t1", "a"), final, same=lambda f: False, what="x") and (final / "file").read_text() == "a"
    # another run placed the same thing first: kept, and the caller's temporary is left for it to drop
    ours = made("t2", "a")
    assert not place_folder(ours, final, same=lambda f: (f / "file").read_text() == "a", what="x") and ours.exists()
    # a leftover or damaged folder is replaced whole, never mixed with ours
    assert place_folder(made("t3", "b"), final, same=lambda f: False, what="x")
    assert [p.name for p in final.iterdir()] == ["file"] and (final / "file").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "t2"]  # nothing set aside stays behind


def _killed_writer(st: Store, embedding_id: str) -> None:
    """A process that writes ``embedding_id`` (holds its job lock and a chunk claim) SIGKILLed mid-job."""
    script = textwrap.dedent(f"""
        import os, signal
        from scdm.store import _claims
        lease = _claims.JobLease(_claims.claims_folder({str(st.root)!r}, {embedding_id!r}), {embedding_id!r}, wait_s=0)
        assert lease.try_claim(3)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", script], env=env, check=False).returncode == -9


def test_a_killed_jobs_lock_folder_is_listed_and_deleted_but_a_held_one_is_not(st):
    dead = _claims.claims_folder(st.root, "0123456789abcdef")
    _killed_writer(st, dead.name)
    assert sorted(p.name for p in dead.iterdir())[0] == "chunk-3.lock"  # what the killed job left
    live = _claims.claims_folder(st.root, "fedcba9876543210")
    with _claims.JobLease(live, live.name, wait_s=0) as lease:
        assert lease.try_claim(0)
        (item,) = st.verify().leftovers  # the live job's folder is not a leftover
        assert item.path == dead and item.kept is None and "0123456789abcdef" in item.what and "pid" in item.what
        assert "1 leftover" in st.verify().summary()
        (item,) = st.verify(repair=True).leftovers
        assert item.removed and not dead.exists()
        assert live.is_dir() and lease.holder(0) is None and not lease.closed  # never touched
    assert not live.exists() and st.verify().leftovers == ()  # the job tidied up after itself


def test_without_file_locks_only_a_lock_folder_of_dead_writers_here_goes(st, monkeypatch):
    dead = _claims.claims_folder(st.root, "0123456789abcdef")
    _killed_writer(st, dead.name)
    running = _claims.claims_folder(st.root, "fedcba9876543210")
    running.mkdir()
    (running / "job.lock").touch()
    (running / "writer-x-1-0.json").write_text(_claims.WriterInfo.here().to_json())  # this process: it runs
    monkeypatch.setattr(_claims, "fcntl", None)  # Windows: nobody's lock can be seen
    found = {x.path: x for x in st.verify(repair=True).leftovers}
    assert found[dead].removed and not dead.exists()
    assert found[running].kept and f"pid {os.getpid()}" in found[running].kept and running.is_dir()


def test_a_write_probe_left_by_a_killed_opener_goes_once_its_process_is_gone(st):
    from scdm.store.leftovers import write_probe_name

    mine = st.root / write_probe_name(1)  # this process writes it now
    host = mine.name.split("-", 4)[4].rsplit("-", 2)[0]
    dead = st.root / f".scdm-write-probe-{_dead_pid()}-{host}-1-abcd1234"
    old = st.root / ".scdm-write-probe-42-1-abcd1234"  # named before probes named their host
    for p in (mine, dead, old):
        p.write_bytes(b"")
    found = {x.path: x for x in st.verify(repair=True).leftovers}
    assert set(found) == {mine, dead, old}
    assert found[dead].removed and not dead.exists() and "write probe" in found[dead].what
    assert found[mine].kept and mine.exists() and found[old].kept and old.exists()
    _age(old)
    (item_mine, item_old) = sorted(st.verify(repair=True).leftovers, key=lambda x: x.path != mine)
    assert item_old.removed and not old.exists() and item_mine.kept


@pytest.mark.parametrize("linked", ["artifacts/heads", "artifacts/adapters", "embeddings", "datasets"])
def test_repair_deletes_nothing_in_a_store_folder_linked_outside_the_store(st: Store, tmp_path: Path, linked: str) -> None:
    # a shared store's folder replaced by a link to someone's home: its folders looked like orphans there
    home = tmp_path / "home"
    kept = [_folder(home / "thesis"), _folder(home / "old.zarr"), home / "draft.h5ad"]
    kept[-1].write_bytes(b"x" * 10)
    for path in kept:
        _age(path)
    shutil.rmtree(st.root / linked, ignore_errors=True)
    (st.root / linked).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(home, st.root / linked)
    found = scan(st, remove=True)
    assert all(path.exists() for path in kept)
    assert found and all("links outside the store" in str(item.kept) and not item.removed for item in found)
