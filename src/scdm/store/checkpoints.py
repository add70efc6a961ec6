"""The files of a checkpoint folder that its content hash (part of every embedding's identity) covers.

Shared by the embedding stage and the prompting arm, which hash the folders they load from.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["checkpoint_files"]


def checkpoint_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every file under ``folder`` but hidden ones and those in hidden folders, through symlinked sub-folders too.

    A checkpoint folder may link a large shared folder in (UCE's ``protein_embeddings/``, a
    Geneformer ``geneformer/``): the loaders read through the link, so the hash must too
    (``Path.rglob`` does not descend into a linked folder). A folder reached twice (a link to one
    of its parents) is walked once.

    Hidden folders are tools' bookkeeping that no loader reads: ``hf download --local-dir`` writes
    ``.cache/huggingface/download/*.metadata`` with the time of the download (counted, the same
    files downloaded twice would be two checkpoints), and a ``git clone`` of a model repo keeps
    every version's weights again under ``.git/``.
    """
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root) / n for n in names if not n.startswith(".") and (Path(root) / n).is_file()]
    return files
