"""The files of a checkpoint folder that its content hash (part of every embedding's identity) covers.

Shared by the embedding stage and the prompting arm, which hash the folders they load from, and
which both refuse a folder that asks to run its own Python code (:func:`no_custom_code`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from scdm.store.errors import CheckpointError, CheckpointLinkWarning
from scdm.store.hashing import digests_hash, file_blake2b

__all__ = ["checkpoint_content_hash", "checkpoint_files", "custom_code_entries", "dangling_links", "no_custom_code"]

_CONFIG_FILES = ("config.json", "tokenizer_config.json")
"""Where a Hugging Face folder names classes of its own Python files (``auto_map``)."""


def checkpoint_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every file under ``folder`` but hidden ones and those in hidden folders, through symlinked sub-folders too.

    A checkpoint folder may link a large shared folder in (UCE's ``protein_embeddings/``, a
    Geneformer ``geneformer/``): the loaders read through the link, so the hash must too
    (``Path.rglob`` does not descend into a linked folder). A folder reached twice (a link to one
    of its own sub-folders, or to itself) is walked once. A link to a folder that holds the checkpoint
    folder (``ln -s / root``, a link to a parent) is not walked, with a :class:`CheckpointLinkWarning`
    naming it: it made the hash read every file around the checkpoint (a 20,000-file tree: 8 s).

    Hidden folders are tools' bookkeeping that no loader reads: ``hf download --local-dir`` writes
    ``.cache/huggingface/download/*.metadata`` with the time of the download (counted, the same
    files downloaded twice would be two checkpoints), and a ``git clone`` of a model repo keeps
    every version's weights again under ``.git/``.
    """
    files = []
    for root, _, names in _walk(folder):
        files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
    return files


def checkpoint_content_hash(folder: str | os.PathLike[str], *, files: Collection[str] | None = None,
                            digest_of: Callable[[Path], str] = file_blake2b) -> str:
    """Content hash of a checkpoint folder: each of its files' path (relative to ``folder``) and bytes.

    The files are :func:`checkpoint_files`, in sorted order; ``files`` (relative posix paths) limits
    them to those. ``digest_of`` gives a file's digest (:func:`scdm.store.hashing.file_blake2b`, or a
    cached one of it): the embedding stage and the prompting arm hash a folder alike, and the digest
    is part of every stored embedding's identity, so it never changes for the same files.
    """
    folder = Path(folder)
    wanted = None if files is None else set(files)
    paths = sorted(p for p in checkpoint_files(folder) if wanted is None or p.relative_to(folder).as_posix() in wanted)
    return digests_hash((str(p.relative_to(folder)), digest_of(p)) for p in paths)


def _walk(folder: str | os.PathLike[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` through linked sub-folders, each real folder once, hidden folders left out, and links to a
    folder that holds ``folder`` itself left out with a warning (:func:`_holds_the_checkpoint`)."""
    top = os.path.realpath(folder)
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _holds_the_checkpoint(os.path.join(root, d), top, folder)]
        yield root, dirs, names


def _holds_the_checkpoint(path: str, top: str, folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a link to a folder that holds the checkpoint folder (real path ``top``): ``/``, the
    home folder, a parent. Walked, it would be the whole tree around the checkpoint (all of ``/``: hours,
    and every file on the machine in its hash), none of which a loader reads as the checkpoint's own; it
    is left out (warned of, naming the link). A link to the folder itself is walked once, as any folder
    reached twice. A link to another folder (a shared ``protein_embeddings/``) is walked: loaders read
    through it, so the hash must too."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    if target == top or not (top + os.sep).startswith(target.rstrip(os.sep) + os.sep):
        return False
    msg = (f"The checkpoint folder {os.fspath(folder)!r} holds a link {os.path.relpath(path, folder)!r} to {target!r}, a "
           "folder that holds the checkpoint folder itself; scdm does not walk it (it would read the whole tree "
           "around the checkpoint into its content hash), so no file under it is part of the checkpoint. Remove "
           f"the link (rm {shlex.quote(path)}) if nothing reads through it.")
    warnings.warn(msg, CheckpointLinkWarning, stacklevel=2)
    return True


def custom_code_entries(folder: str | os.PathLike[str]) -> list[str]:
    """``'config.json: AutoModel -> evil.Model'`` for each class a Hugging Face folder's ``auto_map`` names.

    ``auto_map`` points ``AutoModel``/``AutoTokenizer`` at Python files in the folder itself; transformers
    imports them only when told to trust them (``trust_remote_code``).
    """
    entries = []
    for name in _CONFIG_FILES:
        try:
            config = json.loads((Path(folder) / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if isinstance(auto_map, dict):
            entries += [f"{name}: {key} -> {value}" for key, value in auto_map.items()]
    return entries


@contextlib.contextmanager
def no_custom_code(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Around a ``from_pretrained(..., trust_remote_code=False)``: its refusal of the folder's own code as a CheckpointError.

    Loaders pass ``trust_remote_code=False``: left unset, transformers asks on the terminal whether to
    run a folder's own Python files (``auto_map`` naming a class it does not ship), and one "y" runs
    them. transformers' refusal then tells the user to pass ``trust_remote_code=True``, which scdm
    never does; this says what the folder asks for and what to do instead.

    Raises
    ------
    CheckpointError
        The folder needs code of its own to load.
    """
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        named = "; ".join(custom_code_entries(folder)) or "auto_map"
        msg = (f"{str(folder)!r} asks to run Python code of its own to load {what} ({named}); scdm never runs code "
               "from a model folder. Use the official model files, whose config.json model_type and "
               "tokenizer_config.json tokenizer_class name classes transformers ships.")
        raise CheckpointError(msg) from None


def dangling_links(folder: str | os.PathLike[str]) -> list[Path]:
    """The links under ``folder`` whose target does not exist, walked as :func:`checkpoint_files` walks it.

    :func:`checkpoint_files` (and so the content hash) does not see them, and a loader reads them as
    missing files, or fails on them with a bare ``FileNotFoundError``. A snapshot folder of the Hugging
    Face cache holds relative links into its ``blobs/``: copied out with ``cp -r`` it keeps the links
    without their targets, and a blob deleted from the cache leaves its link behind.
    """
    found = []
    for root, dirs, names in _walk(folder):
        found += [Path(root) / n for n in [*names, *dirs] if not n.startswith(".") and os.path.islink(Path(root) / n)
                  and not (Path(root) / n).exists()]
    return found
