"""The checkpoint hash (an embedding's identity) covers every file the loaders read, linked folders too."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from scdm.embedding.runner import checkpoint_hash
from scdm.prompt.local import checkpoint_hash as prompt_checkpoint_hash


def _uce_like_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose protein_embeddings/ links a shared folder, as users do for large files."""
    shared = tmp_path / "shared_proteins"
    shared.mkdir()
    (shared / "human.pt").write_bytes(b"A" * 64)
    folder = tmp_path / "uce"
    folder.mkdir()
    (folder / "4layer_model.torch").write_bytes(b"weights")
    os.symlink(shared, folder / "protein_embeddings")
    (folder / "loop").mkdir()
    os.symlink("..", folder / "loop" / "up")  # a link back to a parent is walked once, not forever
    return folder, shared / "human.pt"


@pytest.mark.parametrize("hash_of", [checkpoint_hash, prompt_checkpoint_hash], ids=["embedding", "prompt"])
def test_a_file_in_a_linked_folder_changes_the_hash(tmp_path: Path, hash_of: Callable[[Path], str]) -> None:
    folder, linked = _uce_like_folder(tmp_path)
    before = hash_of(folder)
    linked.write_bytes(b"B" * 64)  # same size: only the bytes differ
    # the loader reads protein_embeddings/human.pt through the link: a stale embedding must not be reused
    assert hash_of(folder) != before


def test_a_linked_folder_hashes_as_a_copy_of_it(tmp_path: Path) -> None:
    folder, linked = _uce_like_folder(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "4layer_model.torch").write_bytes(b"weights")
    (copy / "protein_embeddings").mkdir()
    (copy / "protein_embeddings" / "human.pt").write_bytes(linked.read_bytes())
    (folder / "loop" / "up").unlink()
    assert checkpoint_hash(folder) == checkpoint_hash(copy)


def test_a_hub_llm_counts_the_added_tokens_its_tokenizer_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoTokenizer reads added_tokens.json: fetched and hashed for a Hub id, as in a local folder."""
    import json

    from scdm.embedding.hub import resolve_checkpoint
    from scdm.embedding.models.llm import write_tiny_checkpoint
    from tests.embed.test_hub import lay_out_hub_cache

    local = write_tiny_checkpoint(tmp_path / "llm", genes=["TP53", "EGFR", "MYC"])
    (local / "added_tokens.json").write_text(json.dumps({"TP53 EGFR": 9999}))  # changes how a cell sentence tokenises
    cache = tmp_path / "hf-cache"
    lay_out_hub_cache(cache, "tiny-org/tiny-llm", local)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_checkpoint("tiny-org/tiny-llm", "llm")
    assert resolved.files is not None and "added_tokens.json" in resolved.files
    assert checkpoint_hash(resolved) == checkpoint_hash(local)


def test_the_digest_cache_sees_weights_copied_over_with_their_mtime_kept(tmp_path: Path) -> None:
    """``cp -p``/``tar x``/``touch -r`` keep size and mtime: a cache keyed on them alone kept the old identity."""
    import time

    folder = tmp_path / "ckpt"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    old = weights.stat()
    cache = tmp_path / "artifacts"
    cache.mkdir()
    before = checkpoint_hash(folder, cache_dir=cache)
    time.sleep(0.05)  # past the kernel's coarse timestamp tick
    tuned = tmp_path / "tuned.safetensors"  # other weights of the same architecture: the same size
    tuned.write_bytes(b"B" * 4096)
    os.utime(tuned, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(tuned, weights)
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert checkpoint_hash(folder, cache_dir=cache) == checkpoint_hash(folder) != before
    in_place = weights.read_bytes().replace(b"B", b"C")  # rewritten in place (same inode), mtime set back
    time.sleep(0.05)
    with open(weights, "r+b") as fh:
        fh.write(in_place)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert checkpoint_hash(folder, cache_dir=cache) == checkpoint_hash(folder) != before


@pytest.mark.parametrize("hash_of", [checkpoint_hash, prompt_checkpoint_hash], ids=["embedding", "prompt"])
def test_tool_bookkeeping_in_hidden_folders_is_not_the_checkpoint(tmp_path: Path, hash_of: Callable[[Path], str]) -> None:
    """``hf download --local-dir`` stamps each file's download time under .cache/; a git clone keeps .git/."""
    import time

    def download(into: Path) -> Path:
        into.mkdir()
        for name, data in (("config.json", b"{}"), ("model.safetensors", b"W" * 64)):
            (into / name).write_bytes(data)
            meta = into / ".cache" / "huggingface" / "download" / f"{name}.metadata"
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(f"{'0' * 40}\n\"etag\"\n{time.time()}\n")  # commit, etag, when it was downloaded
        (into / ".git" / "lfs" / "objects").mkdir(parents=True)
        (into / ".git" / "lfs" / "objects" / "old-weights").write_bytes(str(time.time()).encode())
        return into

    first = download(tmp_path / "first")
    time.sleep(0.01)
    second = download(tmp_path / "second")  # the same files, downloaded again a moment later
    assert hash_of(first) == hash_of(second)
    (second / "model.safetensors").write_bytes(b"V" * 64)
    assert hash_of(first) != hash_of(second)


def test_the_files_a_model_reads_are_found_through_a_linked_folder(tmp_path: Path) -> None:
    from scdm.embedding.hub import resolve_checkpoint

    folder, linked = _uce_like_folder(tmp_path)
    (folder / "README.txt").write_text("protein embeddings linked from the shared folder")
    resolved = resolve_checkpoint(folder, "uce")
    assert resolved.files == ("4layer_model.torch", "protein_embeddings/human.pt")
    before = checkpoint_hash(resolved)
    linked.write_bytes(b"B" * 64)
    assert checkpoint_hash(resolve_checkpoint(folder, "uce")) != before


def _big_tree_holding(tmp_path: Path, n_dirs: int = 40, n_files: int = 100) -> tuple[Path, Path]:
    """A tree of ``n_dirs * n_files`` files with a checkpoint folder deep inside it (as a home folder holds one)."""
    big = tmp_path / "home"
    for d in range(n_dirs):
        (big / f"d{d}").mkdir(parents=True)
        for f in range(n_files):
            (big / f"d{d}" / f"f{f}.bin").write_bytes(b"x")
    folder = big / "models" / "llm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return big, folder


@pytest.mark.parametrize("hash_of", [checkpoint_hash, prompt_checkpoint_hash], ids=["embedding", "prompt"])
def test_a_link_to_a_folder_holding_the_checkpoint_is_not_walked(tmp_path: Path, hash_of: Callable[[Path], str]) -> None:
    """A link to ``/`` (here: to the big tree around the checkpoint) made the hash walk every file under it.

    It is left out, with a warning that names it; the checkpoint hashes as it does without the link.
    """
    from scdm.store.checkpoints import checkpoint_files
    from scdm.store.errors import CheckpointLinkWarning

    big, folder = _big_tree_holding(tmp_path)
    plain = hash_of(folder)
    os.symlink(big, folder / "root")  # as `ln -s / root` would
    os.symlink(tmp_path, folder / "sub_of_nothing")
    with pytest.warns(CheckpointLinkWarning) as caught:
        assert sorted(p.name for p in checkpoint_files(folder)) == ["config.json", "model.safetensors"]  # not its 4,000
    assert sorted(str(w.message).split(" to ")[0].rsplit(" ", 1)[-1] for w in caught) == ["'root'", "'sub_of_nothing'"]
    assert "a folder that holds the checkpoint folder itself" in str(caught[0].message)
    with pytest.warns(CheckpointLinkWarning, match="holds a link 'root' to "):
        assert hash_of(folder) == plain


def test_a_link_out_to_a_folder_not_holding_the_checkpoint_is_still_walked(tmp_path: Path) -> None:
    """The links left out are those to a folder around the checkpoint; a shared folder linked in still counts."""
    import warnings

    from scdm.store.checkpoints import checkpoint_files

    big, folder = _big_tree_holding(tmp_path, n_dirs=2, n_files=3)
    os.symlink(big / "d1", folder / "shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(p.relative_to(folder).as_posix() for p in checkpoint_files(folder)) == [
            "config.json", "model.safetensors", "shared/f0.bin", "shared/f1.bin", "shared/f2.bin"]
