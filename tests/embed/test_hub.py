"""Checkpoints by Hugging Face Hub id, resolved offline from a Hub cache laid out in tmp_path.

Nothing here may touch the network: every test runs with the socket layer refusing connections
(and counting the tries), and the offline tests assert that nothing tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

import anndata as ad
import huggingface_hub
import numpy as np
import pytest
import torch

from scdm.embedding.finetune import finetune
from scdm.embedding.hub import hub_cache_dir, hub_offline, parse_hub_id, resolve_checkpoint
from scdm.embedding.models.geneformer import write_tiny_checkpoint
from scdm.embedding.runner import checkpoint_hash, embed, embed_command
from scdm.store import Store
from scdm.store.errors import CheckpointError
from tests.embed.test_finetune import FAST, _planted, _store

torch.set_num_threads(1)

REPO = "tiny-org/tiny-geneformer"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class NetworkRefused(OSError):
    """What a socket raises in these tests (an OSError, as a real connection failure is)."""


@pytest.fixture(autouse=True)
def network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Refuse (and record) every attempt to resolve a host name or open a connection."""
    tries: list[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            tries.append(f"{what}{args[1:2] if what.startswith('socket.') else args[:1]}")
            raise NetworkRefused(f"network access in a test: {what}")
        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return tries


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline (env read at call time, not at import)."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture(scope="module")
def genes(pc9_counts_path: Path) -> list[str]:
    return ad.read_h5ad(pc9_counts_path, backed="r").var_names[:3000].tolist()


@pytest.fixture(scope="module")
def gf(tmp_path_factory: pytest.TempPathFactory, genes: list[str]) -> Path:
    """A tiny Geneformer V1 checkpoint (config.json, model.safetensors, three dictionaries)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gf") / "ckpt", genes=genes, initializer_range=0.5)


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path | None, *, commit: str = COMMIT, refs: Iterable[str] = ("main",),
                      skip: Iterable[str] = (), extra: dict[str, bytes] | None = None) -> Path:
    """Put ``source``'s files into ``cache`` as huggingface_hub does: blobs by hash, snapshot symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()} if source else {}
    files = {rel: data for rel, data in files.items() if not any(fnmatch(rel, s) for s in skip)}
    for rel, data in {**files, **(extra or {})}.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


# ---- parsing and settings ---------------------------------------------------------------------------
def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("ctheodoris/Geneformer") == ("ctheodoris/Geneformer", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for path in ("./org/name", "/abs/org/name", "~/ckpt/gf", "a/b/c", "name", "org/na--me", "org/name@", "org//name"):
        assert parse_hub_id(path) is None, path


def test_cache_and_offline_follow_the_environment_at_call_time(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


# ---- resolution offline ------------------------------------------------------------------------------
def test_repo_id_branch_and_commit_resolve_offline_to_the_snapshot(cache, gf, network):
    # another model of the repo in a subfolder, a README and both weight formats: none of it counts
    snapshot = lay_out_hub_cache(cache, REPO, gf, extra={"README.md": b"# tiny", "other-model/config.json": b"{}",
                                                         "pytorch_model.bin": b"not the weights used"})
    for asked, revision in ((REPO, "main"), (f"{REPO}@main", "main"), (f"{REPO}@{COMMIT}", COMMIT)):
        got = resolve_checkpoint(asked, "geneformer")
        assert got.path == snapshot and (got.hub_id, got.revision, got.commit) == (REPO, revision, COMMIT)
        assert got.provenance() == {"hub_id": REPO, "revision": revision, "commit": COMMIT}
    local = sorted(p.name for p in gf.iterdir())
    assert list(got.files or ()) == local  # safetensors chosen over the .bin; README and subfolder left out
    assert "model.safetensors" in local and "pytorch_model.bin" not in local
    # identity: the Hub snapshot hashes as the folder holding the same files
    assert checkpoint_hash(got) == checkpoint_hash(gf)
    assert checkpoint_hash(snapshot) != checkpoint_hash(gf)  # (the whole snapshot holds more)
    assert resolve_checkpoint(got, "geneformer") is got
    assert os.fspath(got) == str(snapshot)
    assert network == []


def test_cache_under_hf_home_is_found(tmp_path, gf, monkeypatch, network):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = lay_out_hub_cache(tmp_path / "hf-home" / "hub", REPO, gf)
    assert resolve_checkpoint(REPO, "geneformer").path == snapshot
    assert network == []


def test_legacy_bin_weights_are_taken_when_the_repo_has_no_safetensors(cache, tmp_path, genes, network):
    legacy = write_tiny_checkpoint(tmp_path / "legacy", genes=genes[:50], legacy_bin=True)
    lay_out_hub_cache(cache, REPO, legacy)
    got = resolve_checkpoint(REPO, "geneformer")
    assert "pytorch_model.bin" in (got.files or ()) and "model.safetensors" not in (got.files or ())
    assert checkpoint_hash(got) == checkpoint_hash(legacy)
    assert network == []


def test_a_tag_resolves_through_its_ref_and_each_commit_is_its_own_snapshot(cache, gf, tmp_path, genes, network):
    lay_out_hub_cache(cache, REPO, gf, refs=("main",))
    newer = write_tiny_checkpoint(tmp_path / "newer", genes=genes[:50], seed=3)
    lay_out_hub_cache(cache, REPO, newer, commit=OTHER_COMMIT, refs=("v2",))
    assert resolve_checkpoint(f"{REPO}@v2", "geneformer").commit == OTHER_COMMIT
    assert resolve_checkpoint(REPO, "geneformer").commit == COMMIT
    assert checkpoint_hash(resolve_checkpoint(f"{REPO}@v2", "geneformer")) == checkpoint_hash(newer)
    assert network == []


def test_a_local_folder_named_like_a_repo_id_wins(cache, gf, tmp_path, genes, monkeypatch, network):
    lay_out_hub_cache(cache, REPO, gf)
    work = tmp_path / "work"
    local = write_tiny_checkpoint(work / REPO, genes=genes[:50], seed=5)
    monkeypatch.chdir(work)
    got = resolve_checkpoint(REPO, "geneformer")
    assert got.hub_id is None and got.commit is None and got.path == Path(REPO)
    assert got.provenance() == {"path": str(local)}
    assert checkpoint_hash(got) == checkpoint_hash(local)
    assert network == []


# ---- errors --------------------------------------------------------------------------------------------
def test_a_repo_missing_from_the_cache_offline_says_how_to_get_it(cache, gf, network):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("tiny-org/absent", "geneformer")
    text = str(err.value)
    assert "is not in the Hugging Face cache at" in text and str(cache) in text and "HF_HUB_OFFLINE=1" in text
    assert "download tiny-org/absent" in text and "pass a local folder" in text
    lay_out_hub_cache(cache, REPO, gf)
    with pytest.raises(CheckpointError, match=r"tiny-org/tiny-geneformer@v9 is not a local folder.*--revision v9"):
        resolve_checkpoint(f"{REPO}@v9", "geneformer")  # the repo is cached, that revision is not
    with pytest.raises(CheckpointError, match="is not in the Hugging Face cache"):
        resolve_checkpoint(f"{REPO}@{OTHER_COMMIT}", "geneformer")
    assert network == []


def test_offline_a_revision_the_cache_cannot_resolve_names_the_cached_commits(cache, gf, network):
    # A short commit (as `git log --oneline` and the Hub's web page show it) of a cached snapshot, offline,
    # was "not in the Hugging Face cache ... download it once with `hf download ... --revision 0123456`",
    # although the cache holds that commit; and a cache filled by commit (no refs/main) said the same of org/name.
    lay_out_hub_cache(cache, REPO, gf, refs=("v1",))
    with pytest.raises(CheckpointError, match=rf"holds commit {COMMIT}, which '0123456' matches.*pass {REPO}@{COMMIT}\."):
        resolve_checkpoint(f"{REPO}@{COMMIT[:7]}", "geneformer")
    with pytest.raises(CheckpointError, match=rf"holds {REPO} at commit {COMMIT} \(v1\): pass {REPO}@<commit>"):
        resolve_checkpoint(REPO, "geneformer")
    assert resolve_checkpoint(f"{REPO}@{COMMIT}", "geneformer").commit == COMMIT  # as advised
    assert network == []


def test_a_path_that_is_neither_a_folder_nor_a_repo_id(cache, tmp_path):
    for asked in (str(tmp_path / "nope"), "./nope/gf", "a/b/c"):
        with pytest.raises(CheckpointError, match=r"No such folder .*org/name@revision"):
            resolve_checkpoint(asked, "geneformer")


def test_a_snapshot_without_a_required_file_names_it(cache, gf, network):
    lay_out_hub_cache(cache, REPO, gf, skip=["gene_median_dictionary*"])
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(REPO, "geneformer")
    text = str(err.value)
    assert f"{REPO}@main (commit {COMMIT[:12]})" in text and "'gene_median_dictionary*.pkl'" in text
    assert f"--revision {COMMIT}" in text  # offline: the snapshot is incomplete, fetch that commit again
    lay_out_hub_cache(cache, "tiny-org/no-weights", gf, skip=["*.safetensors"])
    with pytest.raises(CheckpointError, match=r"missing the weights: expected model.safetensors or pytorch_model.bin"):
        resolve_checkpoint("tiny-org/no-weights", "geneformer")
    assert network == []


def test_links_to_missing_blobs_are_named_not_read_as_missing_files(cache, gf, tmp_path, pc9_counts_path, network):
    # A snapshot copied out of the cache with `cp -r` keeps its relative links into blobs/ without the blobs:
    # it was refused as "missing 'config.json'" (which `ls` shows there), and a link to nothing the loader
    # globs (the optional mapping dictionary, a deleted blob) failed with a bare FileNotFoundError.
    snapshot = lay_out_hub_cache(cache, REPO, gf)
    copied = shutil.copytree(snapshot, tmp_path / "copied", symlinks=True)  # as `cp -r` copies it
    st = Store(tmp_path / "st")
    st.ingest(pc9_counts_path, name="pc9")
    with pytest.raises(CheckpointError, match=r"links to files that do not exist: 'config.json' -> '\.\./.*blobs/.*`cp -rL`"):
        embed(st, "pc9", "geneformer", copied, max_length=64, progress=False)
    (snapshot / "ensembl_mapping_dict_gc30M.pkl").resolve().unlink()  # the cache lost one blob
    with pytest.raises(CheckpointError, match=r"commit 0123456789ab.*'ensembl_mapping_dict_gc30M.pkl' -> .*download the model again"):
        embed(st, "pc9", "geneformer", REPO, max_length=64, progress=False)
    assert st.embeddings().empty and network == []


def test_an_llm_repo_without_the_optional_tokenizer_files_resolves(cache, tmp_path, network):
    """Meta-Llama-3-8B has no added_tokens.json; many repos lack special_tokens_map.json or generation_config.json."""
    from scdm.embedding.models.llm import write_tiny_checkpoint as write_tiny_llm

    local = write_tiny_llm(tmp_path / "llm", genes=["TP53", "EGFR", "MYC"])
    assert not (local / "added_tokens.json").exists()
    for name in ("special_tokens_map.json", "generation_config.json"):
        (local / name).unlink(missing_ok=True)
    lay_out_hub_cache(cache, "tiny-org/tiny-llm", local)
    got = resolve_checkpoint("tiny-org/tiny-llm", "llm")
    assert got.files == tuple(sorted(p.name for p in local.iterdir()))
    assert checkpoint_hash(got) == checkpoint_hash(local)
    lay_out_hub_cache(cache, "tiny-org/no-tokenizer", local, skip=["tokenizer.json"])
    with pytest.raises(CheckpointError, match=r"missing 'tokenizer.json'"):  # a required file still is
        resolve_checkpoint("tiny-org/no-tokenizer", "llm")
    assert network == []


def test_a_repo_not_laid_out_for_the_model_fails_before_its_weights_are_fetched(cache, gf, monkeypatch, network):
    # config and weights at the top, the dictionaries in a folder the model does not look in
    files = {p.name: p.read_bytes() for p in gf.iterdir()}
    lay_out_hub_cache(cache, REPO, None, extra={name if name.endswith((".json", ".safetensors")) else f"dicts/{name}": data
                                                for name, data in files.items()})
    asked: list[list[str]] = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        asked.append(list(kwargs["allow_patterns"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    with pytest.raises(CheckpointError, match=r"missing 'token_dictionary\*\.pkl'.*not laid out as a geneformer checkpoint folder"):
        resolve_checkpoint(REPO, "geneformer")
    assert asked and not any("model.safetensors" in p for patterns in asked for p in patterns)
    assert network == []


def test_online_without_a_network_falls_back_to_the_cache(cache, gf, monkeypatch, network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    lay_out_hub_cache(cache, REPO, gf)
    assert resolve_checkpoint(REPO, "geneformer").commit == COMMIT  # the Hub is unreachable: refs/main decides
    assert network, "the online path should have tried (and been refused) the network"
    tried = len(network)
    assert resolve_checkpoint(f"{REPO}@{COMMIT}", "geneformer").commit == COMMIT
    assert len(network) == tried  # a commit the cache holds needs no network
    with pytest.raises(CheckpointError, match=r"could not be reached, and it is not in the cache"):
        resolve_checkpoint("tiny-org/absent", "geneformer")


# ---- embedding and fine-tuning by Hub id ----------------------------------------------------------------
def test_embed_by_hub_id_equals_the_local_folder_and_records_the_commit(cache, gf, tmp_path, pc9_counts_path, network):
    lay_out_hub_cache(cache, REPO, gf, extra={"README.md": b"# tiny"})
    hub_store, local_store = Store(tmp_path / "hub"), Store(tmp_path / "local")
    for st in (hub_store, local_store):
        st.ingest(pc9_counts_path, name="pc9")
    by_hub = embed(hub_store, "pc9", "geneformer", REPO, max_length=64, chunk_rows=128, progress=False)
    by_folder = embed(local_store, "pc9", "geneformer", gf, max_length=64, chunk_rows=128, progress=False)
    assert by_hub.embedding_id == by_folder.embedding_id  # one identity: same files, same parameters
    np.testing.assert_array_equal(hub_store.read_embedding(by_hub.embedding_id), local_store.read_embedding(by_folder.embedding_id))

    def recorded(st: Store, embedding_id: str) -> dict:
        row = st.query("SELECT telemetry, params, checkpoint_hash FROM embeddings WHERE embedding_id = ?", [embedding_id]).iloc[0]
        assert "hub_id" not in row["params"] and "commit" not in row["params"]  # provenance is not identity
        assert row["checkpoint_hash"] == checkpoint_hash(gf)
        return json.loads(row["telemetry"])["checkpoint"]

    assert recorded(hub_store, by_hub.embedding_id) == {"hub_id": REPO, "revision": "main", "commit": COMMIT}
    assert recorded(local_store, by_folder.embedding_id) == {"path": str(gf)}
    assert hub_store.embeddings()["checkpoint_source"].tolist() == [f"{REPO}@{COMMIT}"]
    assert local_store.embeddings()["checkpoint_source"].tolist() == [str(gf)]
    again = embed(hub_store, "pc9", "geneformer", f"{REPO}@{COMMIT}", max_length=64, chunk_rows=128, progress=False)
    assert again.computed_chunks == 0 and again.embedding_id == by_hub.embedding_id
    assert f"--checkpoint {REPO}@{COMMIT}" in embed_command(hub_store, by_hub.embedding_id)
    assert "--checkpoint DIR" in embed_command(local_store, by_folder.embedding_id)
    assert network == []


def test_ls_and_export_show_the_checkpoint_an_embedding_was_made_with(cache, gf, tmp_path, pc9_counts_path, network):
    from click.testing import CliRunner

    from scdm.cli import main

    lay_out_hub_cache(cache, REPO, gf, refs=("main", "v1"))
    st = Store(tmp_path / "st")
    st.ingest(pc9_counts_path, name="pc9")
    by_tag = embed(st, "pc9", "geneformer", f"{REPO}@v1", max_length=64, chunk_rows=128, progress=False)
    other = embed(st, "pc9", "geneformer", gf, max_length=32, chunk_rows=128, progress=False)
    embed(st, "pc9", "pca", n_comps=4, progress=False)

    def scdm(*args: str) -> str:
        result = CliRunner().invoke(main, ["--store", str(st.root), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    listed = {row["embedding_id"]: row["checkpoint"] for row in json.loads(scdm("ls", "--what", "embeddings", "--format", "json"))}
    assert listed[by_tag.embedding_id] == f"{REPO}@{COMMIT}"  # the commit the tag resolved to, not the tag
    assert listed[other.embedding_id] == str(gf) and sorted(listed.values())[0] == ""  # pca: no checkpoint
    assert "checkpoint" in scdm("ls", "--what", "embeddings")
    scdm("export", "--embedding", by_tag.embedding_id, "--out", str(tmp_path / "pc9.h5ad"))
    recorded = ad.read_h5ad(tmp_path / "pc9.h5ad").uns["scdm"]["X_geneformer"]
    assert recorded["checkpoint_hash"] == checkpoint_hash(gf)
    assert json.loads(recorded["checkpoint"]) == {"hub_id": REPO, "revision": "v1", "commit": COMMIT}
    scdm("export", "--dataset", "pc9", "--model", "pca", "--out", str(tmp_path / "pca.h5ad"))
    assert set(ad.read_h5ad(tmp_path / "pca.h5ad").uns["scdm"]["X_pca"]) == {"embedding_id", "params"}
    from scdm.classify.report import write_report

    page = write_report(st, tmp_path / "report", projection="none").read_text()
    assert f"{REPO}@{COMMIT} (hash {checkpoint_hash(gf)[:12]})" in page and f"{gf} (hash " in page
    assert network == []


def test_finetune_by_hub_id_reuses_the_adapter_of_the_same_files(cache, tmp_path, network):
    small = _planted(36, 80, 12)
    st = _store(tmp_path, small)
    local = write_tiny_checkpoint(tmp_path / "gf-small", genes=small.var_names.tolist())
    lay_out_hub_cache(cache, REPO, local)
    (by_hub,) = finetune(st, model="geneformer", checkpoint=REPO, dataset="planted", fold=0, **FAST)
    (by_folder,) = finetune(st, model="geneformer", checkpoint=local, dataset="planted", fold=0, **FAST)
    assert by_folder.reused and by_folder.adapter_id == by_hub.adapter_id
    tuned = st.query("SELECT telemetry FROM embeddings WHERE embedding_id = ?", [by_hub.embedding_ids[0]])["telemetry"].iloc[0]
    assert json.loads(tuned)["checkpoint"] == {"hub_id": REPO, "revision": "main", "commit": COMMIT}
    assert network == []


def _cluttered_copy(gf: Path, into: Path) -> Path:
    """``gf`` as users keep checkpoint folders: notes, caches, another format and another model beside it."""
    shutil.copytree(gf, into)
    (into / "README.md").write_text("# downloaded for the erlotinib screen")
    (into / "__pycache__").mkdir()
    (into / "__pycache__" / "tools.cpython-312.pyc").write_bytes(b"\x00" * 32)
    (into / "optimizer.pt").write_bytes(os.urandom(4096))  # large and never read
    (into / "pytorch_model.bin").write_bytes(b"the .bin of the same weights: safetensors is read first")
    (into / "Geneformer-V2-316M").mkdir()
    (into / "Geneformer-V2-316M" / "config.json").write_text("{}")
    return into


def test_a_local_folder_counts_the_files_the_model_reads(gf, tmp_path):
    cluttered = _cluttered_copy(gf, tmp_path / "cluttered")
    got = resolve_checkpoint(cluttered, "geneformer")
    assert got.hub_id is None and got.provenance() == {"path": str(cluttered)}
    assert got.files == tuple(sorted(p.name for p in gf.iterdir()))  # what the loader reads, nothing else
    assert checkpoint_hash(got) == checkpoint_hash(resolve_checkpoint(gf, "geneformer")) == checkpoint_hash(gf)
    (cluttered / "gene_median_dictionary_gc30M.pkl").write_bytes((gf / "token_dictionary_gc30M.pkl").read_bytes())
    assert checkpoint_hash(resolve_checkpoint(cluttered, "geneformer")) != checkpoint_hash(gf)  # a file it reads
    (cluttered / "model.safetensors").unlink()  # now the .bin is the weights the loader reads
    assert "pytorch_model.bin" in (resolve_checkpoint(cluttered, "geneformer").files or ())


def test_the_dictionaries_counted_are_those_beside_the_token_dictionary(gf, tmp_path):
    # The loader reads the median and mapping dictionaries from the token dictionary's folder (geneformer/ when the
    # top level has none), but the hash took each from the first alternative holding one: with a mapping copied to the
    # top level too, editing geneformer/'s mapping (the one read) kept the hash, and the stale embedding was reused.
    from scdm.embedding.models.geneformer import locate_files

    folder = shutil.copytree(gf, tmp_path / "gf")
    (folder / "geneformer").mkdir()
    for name in ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl", "ensembl_mapping_dict_gc30M.pkl"):
        shutil.copy(folder / name, folder / "geneformer" / name)
    for name in ("token_dictionary_gc30M.pkl", "gene_median_dictionary_gc30M.pkl"):
        (folder / name).unlink()
    read = locate_files(folder)
    assert read.mapping_dictionary == folder / "geneformer" / "ensembl_mapping_dict_gc30M.pkl"
    before = checkpoint_hash(resolve_checkpoint(folder, "geneformer"))
    read.mapping_dictionary.write_bytes(read.mapping_dictionary.read_bytes() + b"\0")  # other bytes, same name
    assert checkpoint_hash(resolve_checkpoint(folder, "geneformer")) != before
    assert resolve_checkpoint(gf, "geneformer").files == tuple(sorted(p.name for p in gf.iterdir()))  # the usual layout: as before


def test_a_note_in_the_checkpoint_folder_keeps_its_embedding(gf, cache, tmp_path, pc9_counts_path, network):
    folder = shutil.copytree(gf, tmp_path / "gf")
    lay_out_hub_cache(cache, REPO, gf)
    st = Store(tmp_path / "st")
    st.ingest(pc9_counts_path, name="pc9")
    first = embed(st, "pc9", "geneformer", folder, max_length=64, chunk_rows=128, progress=False)
    _cluttered_copy(gf, tmp_path / "cluttered")
    for path in (tmp_path / "cluttered").iterdir():
        if not (folder / path.name).exists():
            shutil.move(path, folder / path.name)
    again = embed(st, "pc9", "geneformer", folder, max_length=64, chunk_rows=128, progress=False)
    by_hub = embed(st, "pc9", "geneformer", REPO, max_length=64, chunk_rows=128, progress=False)
    assert again.embedding_id == by_hub.embedding_id == first.embedding_id
    assert again.computed_chunks == by_hub.computed_chunks == 0 and len(st.embeddings()) == 1
    assert network == []


def test_a_peft_adapter_saved_into_the_folder_counts(gf, cache, tmp_path, network):
    """transformers' from_pretrained applies an adapter_config.json it finds beside the weights: that changes the numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    folder = shutil.copytree(gf, tmp_path / "gf")
    plain = checkpoint_hash(resolve_checkpoint(folder, "geneformer"))
    tuned = get_peft_model(BertModel.from_pretrained(gf), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    tuned.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors beside the base weights
    resolved = resolve_checkpoint(folder, "geneformer")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(resolved.files or ())
    assert checkpoint_hash(resolved) != plain
    lay_out_hub_cache(cache, REPO, folder)  # a snapshot that holds one too (another tool fetched everything)
    assert checkpoint_hash(resolve_checkpoint(REPO, "geneformer")) == checkpoint_hash(resolved)
    assert network == []
    tokens = torch.arange(8)[None]
    with torch.no_grad():
        base, loaded = BertModel.from_pretrained(gf), BertModel.from_pretrained(folder, local_files_only=True)
        assert not torch.equal(base(tokens).last_hidden_state, loaded(tokens).last_hidden_state)  # why it must count


def test_a_model_that_names_no_files_counts_every_file(tmp_path):
    from tests.embed.toy_adapter import ToyAdapter

    class Unlisted(ToyAdapter):
        checkpoint_files = ()

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w")
    (folder / "notes.txt").write_text("read by this model's load() for all scdm knows")
    got = resolve_checkpoint(folder, Unlisted)
    assert got.files is None and checkpoint_hash(got) == checkpoint_hash(folder)


def test_the_official_geneformer_layout_with_dictionaries_in_the_package_folder(cache, gf, tmp_path, pc9_counts_path, network):
    # ctheodoris/Geneformer keeps config and weights at the top and the dictionaries in geneformer/
    official = tmp_path / "official"
    shutil.copytree(gf, official)
    (official / "geneformer").mkdir()
    for pkl in official.glob("*.pkl"):
        pkl.rename(official / "geneformer" / pkl.name)
    lay_out_hub_cache(cache, "ctheodoris/Geneformer", official)
    st = Store(tmp_path / "st")
    st.ingest(pc9_counts_path, name="pc9")
    by_hub = embed(st, "pc9", "geneformer", "ctheodoris/Geneformer", max_length=64, chunk_rows=128, progress=False)
    flat = embed(st, "pc9", "geneformer", gf, max_length=64, chunk_rows=128, progress=False)
    np.testing.assert_array_equal(st.read_embedding(by_hub.embedding_id), st.read_embedding(flat.embedding_id))
    assert network == []


def test_a_link_to_nothing_that_the_loader_does_not_glob_is_no_refusal(tmp_path):
    # UCE globs *.torch at the top of its folder; a dead link in a subfolder (old/) is never read, but
    # fnmatch's '*' crossed the '/' and refused the folder as holding a link to a missing model file
    from scdm.embedding.models.uce import UCEAdapter

    (tmp_path / "old").mkdir()
    os.symlink("../gone/33l.torch", tmp_path / "old" / "33l_8ep_1024t_1280.torch")
    with pytest.raises(CheckpointError, match=r"missing") as refused:
        UCEAdapter(tmp_path).check_checkpoint()  # the folder holds no model: refused for that
    assert "links to files that do not exist" not in str(refused.value)
    os.symlink("gone.torch", tmp_path / "33l_8ep_1024t_1280.torch")  # one the loader globs is still named
    with pytest.raises(CheckpointError, match=r"links to files that do not exist: '33l_8ep_1024t_1280.torch'"):
        UCEAdapter(tmp_path).check_checkpoint()
