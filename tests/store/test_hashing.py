"""Every stored file digest keeps its value: each call site of ``scdm.store.hashing`` hashes known bytes to
the digest that its own code (before the one helper replaced it) wrote, so a store an older scdm wrote
still verifies (a trained head's ``file_hash``, an adapter's ``adapter_hash``, a checkpoint's content hash
in every embedding's identity, a report's manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scdm.store.checkpoints import checkpoint_content_hash
from scdm.store.hashing import digests_hash, file_blake2b, file_sha256

PINNED_BYTES = b"scdm pinned bytes\n" * 100_000
"""1.8 MB: several chunks of every chunk size the call sites read with."""


@pytest.fixture
def pinned_file(tmp_path: Path) -> Path:
    path = tmp_path / "f.bin"
    path.write_bytes(PINNED_BYTES)
    return path


def _checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 50_000)
    (folder / ".hidden").write_text("x")  # tools' bookkeeping: not counted
    return folder


CHECKPOINT = "60c20aaccfe0ea89378edc4dcde18a81"
"""The content hash of :func:`_checkpoint`'s folder, as scdm computed it before ``scdm.store.hashing``."""
CHECKPOINT_WEIGHTS_ONLY = "9d6b4351dca57c84b9a0d56b54143776"
"""... limited to ``sub/w.bin`` (a checkpoint resolved for a model counts the files it reads)."""


@pytest.mark.parametrize("chunk_size", [1, 1000, 1 << 20, 1 << 22, 1 << 30])
def test_the_chunk_size_never_changes_a_digest(pinned_file: Path, chunk_size: int) -> None:
    assert file_sha256(pinned_file, chunk_size=chunk_size) == "92e1ff8f7fa006b5b6c8b4a4d46c7730b381389472a9b1a6b85e24654dc62b16"
    assert file_blake2b(pinned_file, chunk_size=chunk_size) == "91b9847bb894b055afa048f699c196d8"


def test_a_chunk_size_below_one_byte_is_refused(pinned_file: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size must be a positive number of bytes, got 0"):
        file_sha256(pinned_file, chunk_size=0)


def test_a_report_manifest_keeps_its_sha256(tmp_path: Path, pinned_file: Path) -> None:
    """``scdm report`` removes an earlier report's file only while its sha256 is the one its manifest recorded."""
    from scdm.classify import report

    manifest = report._Outputs(tmp_path)
    manifest.record(pinned_file)
    assert manifest.written == {"f.bin": "92e1ff8f7fa006b5b6c8b4a4d46c7730b381389472a9b1a6b85e24654dc62b16"}


def test_a_trained_heads_file_hash_is_kept(pinned_file: Path) -> None:
    """``trained_heads.file_hash`` of an artifact (checked at every load) is blake2b-128 of its bytes."""
    assert file_blake2b(pinned_file) == "91b9847bb894b055afa048f699c196d8"


def test_an_adapters_hash_is_kept(tmp_path: Path) -> None:
    from scdm.embedding import lora_card

    folder = tmp_path / "adapter"
    folder.mkdir()
    for i, name in enumerate(lora_card._HASHED_FILES):
        (folder / name).write_bytes(name.encode() * (i + 1))
    assert lora_card._files_hash(folder) == "02258c5ff92062f76e3201b5587b8646"
    assert digests_hash((name, file_blake2b(folder / name)) for name in lora_card._HASHED_FILES) == "02258c5ff92062f76e3201b5587b8646"


def test_an_adapter_without_its_head_file_is_refused(tmp_path: Path) -> None:
    from scdm.embedding import lora_card
    from scdm.store.errors import CheckpointError

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is missing 'adapter_model.safetensors'; it is not a complete"):
        lora_card._files_hash(tmp_path)


def test_a_checkpoints_content_hash_is_kept(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path)
    assert checkpoint_content_hash(folder) == CHECKPOINT
    assert checkpoint_content_hash(folder, files=["sub/w.bin"]) == CHECKPOINT_WEIGHTS_ONLY


def test_the_embedding_stage_and_the_prompting_arm_keep_a_checkpoints_hash(tmp_path: Path) -> None:
    from scdm.embedding.runner import checkpoint_hash
    from scdm.prompt.local import checkpoint_hash as prompt_checkpoint_hash

    folder = _checkpoint(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    assert checkpoint_hash(folder) == prompt_checkpoint_hash(folder) == CHECKPOINT
    assert checkpoint_hash(folder, cache_dir=cache) == checkpoint_hash(folder, cache_dir=cache) == CHECKPOINT  # cached
    assert checkpoint_hash(folder, cache_dir=cache, files=["sub/w.bin"]) == CHECKPOINT_WEIGHTS_ONLY
