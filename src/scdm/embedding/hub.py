"""Checkpoints by Hugging Face Hub id: ``--checkpoint org/name`` or ``org/name@revision``.

``--checkpoint`` takes a local folder or a Hugging Face Hub model id. A local path always wins: a
string names the Hub only when no file or folder of that name exists and it has the form
``org/name`` or ``org/name@revision`` (a branch, tag or commit). scdm then fetches only the files
the model reads (its ``checkpoint_files``, or its ``hub_patterns``; ``scdm models`` lists them)
with :func:`huggingface_hub.snapshot_download` into the Hugging Face cache (``HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and loads the model from the cached snapshot.
With ``HF_HUB_OFFLINE=1`` nothing is looked up on the network: the id must already be in the cache
(``hf download org/name`` once on a machine with internet), else the error says so. The embedding
records where its checkpoint came from in its telemetry: ``{"hub_id", "revision", "commit"}`` for a
Hub id (the commit the revision resolved to), ``{"path"}`` for a local folder. A commit
(``org/name@<40 hex digits>``) whose files the cache holds is used without asking the network. With
``--executor ray`` the actors load the cached snapshot folder: put the cache on a path every node
sees, as for a local checkpoint folder.

The embedding's identity is the content hash of the files the model reads, by Hub id and by local
folder alike: the files its patterns select (below), in a cached snapshot or in the folder. Other
files do not count: another tool's downloads into the same cached snapshot, and a local folder's
README, notes, notebooks, ``__pycache__``, optimizer states or other models' files (a ``git clone``
of ctheodoris/Geneformer holds a dozen models in subfolders). So a Hub id and a local folder that
hold the same model files give the same embedding, and adding a note to a checkpoint folder keeps
its embeddings and their space. A model that names no files (``checkpoint_files`` and
``hub_patterns`` empty) counts every file of its folder.

Patterns follow ``snapshot_download``'s ``allow_patterns`` (``fnmatch`` on the repo's paths). An
entry ``"model.safetensors|pytorch_model.bin"`` means: the first of these the repo holds (so the
same weights are not fetched in two formats; in a local folder: the first it holds, the one
the loader reads). When no pattern names a subfolder, files in subfolders are left out (a repo's
other models and ``original/`` folders are not fetched).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scdm.embedding._adapter import Adapter, get_adapter
from scdm.store.checkpoints import checkpoint_files
from scdm.store.errors import CheckpointError

__all__ = ["ResolvedCheckpoint", "resolve_checkpoint", "parse_hub_id", "hub_cache_dir", "hub_offline", "hub_patterns", "model_files"]

_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)(?:@(?P<revision>[^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_REVISION = "main"
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint as the model loads it: a local folder, and where it came from.

    It is path-like (``os.fspath`` gives :attr:`path`), and :func:`resolve_checkpoint` returns it
    unchanged, so it may be passed on wherever a checkpoint is accepted.
    """

    path: Path
    """The local folder the adapter loads (for a Hub id: the cached snapshot ``.../snapshots/<commit>``)."""
    hub_id: str | None = None
    """``org/name`` on the Hugging Face Hub; None for a local folder."""
    revision: str | None = None
    """The revision asked for (``main`` when none was given); None for a local folder."""
    commit: str | None = None
    """The commit the revision resolved to; None for a local folder."""
    files: tuple[str, ...] | None = None
    """Paths (relative to :attr:`path`) that make up the checkpoint's identity (:func:`model_files`); None: every
    file of the folder."""

    def __fspath__(self) -> str:
        return str(self.path)

    def provenance(self) -> dict[str, Any]:
        """What the embedding records about its checkpoint's source (JSON-ready)."""
        if self.hub_id is None:
            return {"path": str(self.path.absolute())}
        return {"hub_id": self.hub_id, "revision": self.revision, "commit": self.commit}

    def describe(self) -> str:
        """``org/name@revision (commit 0123456789ab)`` or the folder, for messages."""
        if self.hub_id is None:
            return str(self.path)
        return f"{self.hub_id}@{self.revision} (commit {str(self.commit)[:12]})"


# ---- the Hugging Face settings, read when asked (not when huggingface_hub was imported) -----------
def hub_cache_dir() -> Path:
    """The Hugging Face cache folder: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default.

    Read from the environment at each call, with huggingface_hub's precedence, so a variable set
    after ``huggingface_hub`` was imported still counts.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: then nothing goes to the network."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return value.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``text`` has the form ``org/name[@revision]``, else None."""
    match = _REPO_ID.fullmatch(text.strip())
    if match is None:
        return None
    repo = match["repo"]
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, match["revision"]


def hub_patterns(model: str | type[Adapter]) -> tuple[str, ...]:
    """The files a model's checkpoint is fetched with (``hub_patterns``, else ``checkpoint_files``)."""
    cls = get_adapter(model) if isinstance(model, str) else model
    return tuple(cls.hub_patterns or cls.checkpoint_files)


def model_files(folder: str | os.PathLike[str], model: str | type[Adapter]) -> tuple[str, ...] | None:
    """The files of a checkpoint folder that the model reads: the ones its embedding's identity counts.

    What :func:`hub_patterns` select, as the Hub route fetches them: every file a plain pattern
    matches, for ``"a|b"`` the files of the first alternative the folder holds (the one the loader
    reads: ``model.safetensors`` before ``pytorch_model.bin``), subfolders only when a pattern names
    one; and the model's ``read_if_present`` files the folder holds (a PEFT adapter that
    ``from_pretrained`` applies). Relative posix paths, sorted; linked sub-folders are followed and
    hidden files skipped (:func:`scdm.store.checkpoints.checkpoint_files`). None when the model
    names no files: then every file of the folder counts. For a Hub snapshot this is what was
    fetched (plus what another tool fetched that the loader would read too).
    """
    cls = get_adapter(model) if isinstance(model, str) else model
    patterns = hub_patterns(cls)
    if not patterns:
        return None
    present = _listing(Path(folder))
    ignore = _subfolders_ignored(patterns)
    chosen = set(_select(present, cls.read_if_present, ignore))
    for pattern in patterns:
        chosen.update(next((hits for alternative in pattern.split("|") if (hits := _select(present, [alternative], ignore))), []))
    return tuple(sorted(chosen))


# ---- resolution -------------------------------------------------------------------------------------
def resolve_checkpoint(
    checkpoint: str | os.PathLike[str] | ResolvedCheckpoint,
    model: str | type[Adapter],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    params: dict[str, Any] | None = None,
) -> ResolvedCheckpoint:
    """The local folder a ``--checkpoint`` value names, fetching a Hub id's files when needed.

    Parameters
    ----------
    checkpoint
        A local folder (a string or path), or a Hugging Face model id ``org/name`` /
        ``org/name@revision`` (strings only). An existing local path always wins.
    model
        The registered model (its files decide what is fetched and checked).
    cache_dir
        The Hugging Face cache (default: :func:`hub_cache_dir`).
    offline
        Look only into the cache (default: :func:`hub_offline`, i.e. ``HF_HUB_OFFLINE``).
    params
        The adapter's parameters (``variant=...``): a Hub snapshot is checked with the adapter
        built with them, since some decide which files it needs.

    Returns
    -------
    ResolvedCheckpoint
        For a local path: the path, nothing else (the adapter checks the folder). For a Hub id:
        the cached snapshot folder, the revision asked for, the commit and the files counted.

    Raises
    ------
    CheckpointError
        No such folder and not a Hub id; a Hub id that is not in the cache while offline; a
        repository or revision the Hub does not have (or that needs a login); a snapshot that
        lacks a file the model needs (naming it).
    """
    if isinstance(checkpoint, ResolvedCheckpoint):
        return checkpoint
    path = Path(os.fspath(checkpoint)).expanduser()
    if path.exists() or not isinstance(checkpoint, str):
        return ResolvedCheckpoint(path=path, files=model_files(path, model) if path.is_dir() else None)
    parsed = parse_hub_id(checkpoint)
    if parsed is None:
        msg = (f"No such folder {checkpoint!r}. --checkpoint takes a local checkpoint folder or a Hugging Face model id "
               "(org/name or org/name@revision).")
        raise CheckpointError(msg)
    repo_id, revision = parsed
    cls = get_adapter(model) if isinstance(model, str) else model
    fetch = _Fetch(repo_id=repo_id, revision=revision or DEFAULT_REVISION, asked=checkpoint, model=cls,
                   cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir(),
                   offline=hub_offline() if offline is None else offline, params=dict(params or {}))
    return fetch.resolve()


@dataclass(frozen=True)
class _Fetch:
    """One Hub id being resolved (the arguments every step needs)."""

    repo_id: str
    revision: str
    asked: str
    model: type[Adapter]
    cache_dir: Path
    offline: bool
    params: dict[str, Any]

    def resolve(self) -> ResolvedCheckpoint:
        patterns = hub_patterns(self.model)
        fixed = [p for p in patterns if "|" not in p]
        choices = [p.split("|") for p in patterns if "|" in p]
        ignore = _subfolders_ignored(patterns)
        # the small files first: a repo not laid out for the model fails before its weights are fetched. Only those
        # checkpoint_files names are required; the others (tokenizer_config.json, added_tokens.json, ...) are read when there
        folder = self._snapshot(self.revision, fixed, ignore)
        commit = folder.name  # snapshot_download returns <cache>/models--org--name/snapshots/<commit>
        self._check(ResolvedCheckpoint(path=folder, hub_id=self.repo_id, revision=self.revision, commit=commit),
                    only=[p for p in fixed if p in self.model.checkpoint_files], ignore=ignore)
        for alternatives in choices:  # the first the repo has
            for pattern in alternatives:
                # by revision, not by commit: a commit-pinned fetch retries for half a minute when the Hub is unreachable
                folder = self._snapshot(self.revision, [pattern], ignore)
                if folder.name != commit:
                    msg = (f"{self.repo_id}@{self.revision} moved from commit {commit} to {folder.name} while its files were "
                           f"fetched; run again, or pin a commit ({self.repo_id}@<commit>).")
                    raise CheckpointError(msg)
                if _matching(folder, [pattern], ignore):
                    break
            else:
                if "|".join(alternatives) in self.model.checkpoint_files:  # required: fail before the weights are fetched
                    self._check(ResolvedCheckpoint(path=folder, hub_id=self.repo_id, revision=self.revision, commit=commit),
                                only=["|".join(alternatives)], ignore=ignore)
        # the files fetched, counted by the rule a local folder is counted by (one alternative of each "a|b":
        # the one fetched, as the repo holds no other that comes first)
        resolved = ResolvedCheckpoint(path=folder, hub_id=self.repo_id, revision=self.revision, commit=commit,
                                      files=model_files(folder, self.model))
        self._check(resolved)
        return resolved

    def _snapshot(self, revision: str, allow: Sequence[str], ignore: list[str] | None) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if not self.offline and _COMMIT.fullmatch(revision):
            # a commit never changes: when the cache holds what is asked of it, the network has nothing to add
            try:
                cached = Path(snapshot_download(self.repo_id, revision=revision, cache_dir=str(self.cache_dir),
                                                allow_patterns=list(allow), ignore_patterns=ignore, local_files_only=True))
                if all(_matching(cached, [p], ignore) for p in allow):
                    return cached
            except LocalEntryNotFoundError:
                pass
        try:
            return Path(snapshot_download(self.repo_id, revision=revision, cache_dir=str(self.cache_dir),
                                          allow_patterns=list(allow), ignore_patterns=ignore, local_files_only=self.offline))
        except LocalEntryNotFoundError as err:
            raise CheckpointError(self._not_cached(err)) from None
        except RevisionNotFoundError:
            msg = (f"The Hugging Face repo {self.repo_id!r} has no revision {revision!r}: pass a branch, tag or commit "
                   f"it has ({self.repo_id}@main, {self.repo_id}@<commit>).")
            raise CheckpointError(msg) from None
        except GatedRepoError:
            msg = (f"The Hugging Face repo {self.repo_id!r} is gated: accept its terms on https://huggingface.co/{self.repo_id} "
                   "and log in (`hf auth login`, or set HF_TOKEN), or pass a local folder.")
            raise CheckpointError(msg) from None
        except RepositoryNotFoundError:
            msg = (f"{self.asked!r} is neither a local folder nor a Hugging Face repo (if the repo is private, log in with "
                   "`hf auth login` or set HF_TOKEN).")
            raise CheckpointError(msg) from None
        except HfHubHTTPError as err:
            msg = f"Cannot fetch {self.repo_id}@{revision} from the Hugging Face Hub: {err}"
            raise CheckpointError(msg) from None

    def _not_cached(self, err: Exception) -> str:
        name = f"{self.repo_id}@{self.revision}" if self.revision != DEFAULT_REVISION else self.repo_id
        download = f"{_download_command()} {self.repo_id}" + (f" --revision {self.revision}" if self.revision != DEFAULT_REVISION else "")
        if self.offline:
            return (f"{name} is not a local folder, and it is not in the Hugging Face cache at {self.cache_dir} and "
                    f"HF_HUB_OFFLINE=1: download it once with `{download}` on a machine with internet (into that cache, "
                    f"or set HF_HOME / HF_HUB_CACHE to where it is), or pass a local folder.{self._cached_commits()}")
        return (f"{name} is not a local folder, the Hugging Face Hub could not be reached, and it is not in the cache at "
                f"{self.cache_dir}: check the connection, or download it with `{download}` where there is one, or pass a "
                f"local folder. ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def _cached_commits(self) -> str:
        """What the cache holds of the repo when the revision asked for is not there (offline it cannot be looked up):
        a commit the revision abbreviates, else the cached commits and the refs pointing to them; empty if none."""
        repo = self.cache_dir / f"models--{self.repo_id.replace('/', '--')}"
        commits = sorted(p.name for p in (repo / "snapshots").glob("*") if _COMMIT.fullmatch(p.name))
        if not commits:
            return ""
        started = [c for c in commits if c.startswith(self.revision.lower())]
        if len(started) == 1:
            return (f" The cache holds commit {started[0]}, which {self.revision!r} matches; offline a commit is found "
                    f"only by its 40 lower-case hex digits: pass {self.repo_id}@{started[0]}.")
        refs = {c: sorted(r.relative_to(repo / "refs").as_posix() for r in (repo / "refs").rglob("*")
                          if r.is_file() and r.read_text().strip() == c) for c in commits}
        held = ", ".join(c + (f" ({', '.join(refs[c])})" if refs[c] else "") for c in commits)
        return f" The cache holds {self.repo_id} at commit {held}: pass {self.repo_id}@<commit> to use one of them."

    def _check(self, resolved: ResolvedCheckpoint, *, only: Sequence[str] | None = None,
               ignore: Sequence[str] | None = None) -> None:
        """The adapter's check of the snapshot folder, naming repo and commit; ``only``: just that these files are there
        (before the files fetched one alternative at a time are)."""
        try:
            if only is None:
                self.model(checkpoint=resolved.path, **self.params).check_checkpoint()
            for pattern in only or ():
                if not _matching(resolved.path, pattern.split("|"), ignore):
                    missing = " or ".join(map(repr, pattern.split("|")))
                    msg = (f"Checkpoint folder {str(resolved.path)!r} is missing {missing}; a {self.model.name} checkpoint "
                           f"needs: {', '.join(self.model.checkpoint_files)}.")
                    raise CheckpointError(msg)
        except CheckpointError as err:
            layout = (f"the repo does not hold that file at its top level, so it is not laid out as a {self.model.name} "
                      "checkpoint folder: assemble the files in a local folder (see `scdm models`) and pass that.")
            if self.offline:
                hint = (f"Either the cached snapshot is incomplete (HF_HUB_OFFLINE=1: fetch it with `{_download_command()} "
                        f"{self.repo_id} --revision {resolved.commit}` on a machine with internet), or {layout}")
            else:
                hint = layout[0].upper() + layout[1:]
            msg = f"Hugging Face checkpoint {resolved.describe()}: {err} {hint}"
            raise CheckpointError(msg) from None


def _subfolders_ignored(patterns: Sequence[str]) -> list[str] | None:
    """``ignore_patterns`` for the Hub: top-level files only, unless a pattern names a subfolder."""
    return None if any("/" in p for p in patterns) else ["*/*"]


def _listing(folder: Path) -> list[str]:
    """The files under ``folder`` (relative posix paths) as the checkpoint hash walks them."""
    if not folder.is_dir():
        return []
    return [path.relative_to(folder).as_posix() for path in checkpoint_files(folder)]


def _select(present: Sequence[str], patterns: Sequence[str], ignore: Sequence[str] | None) -> list[str]:
    """The paths of ``present`` (sorted) that ``snapshot_download`` would fetch with these patterns."""
    return sorted(rel for rel in present
                  if any(fnmatch.fnmatch(rel, p) for p in patterns) and not any(fnmatch.fnmatch(rel, p) for p in ignore or ()))


def _matching(folder: Path, patterns: Sequence[str], ignore: Sequence[str] | None) -> list[str]:
    """Files under ``folder`` (relative posix paths, sorted) that ``snapshot_download`` would fetch with these patterns."""
    return _select(_listing(folder), patterns, ignore)


def _download_command() -> str:
    """``hf download`` (huggingface_hub >= 0.34), ``huggingface-cli download`` before."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("huggingface_hub").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "hf download"
    return "hf download" if (major, minor) >= (0, 34) else "huggingface-cli download"
