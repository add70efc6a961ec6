"""No package source unpickles a file, except through the listed restricted unpicklers.

A pickle runs code when it is loaded, and anyone who can write a (shared) store or a checkpoint
folder can plant one. So ``pickle.load(s)``, ``joblib.load``, ``pandas.read_pickle``, ``torch.load``
without ``weights_only=True`` and ``np.load(..., allow_pickle=True)`` are banned from the
packages; the few places that must read a pickle are listed here with the reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["src/scdm"]

ALLOWED: dict[tuple[str, str], str] = {
    ("src/scdm/embedding/_safe_load.py", "RestrictedUnpickler"):
        "pickle.Unpickler subclass whose find_class admits only allow-listed globals",
    ("src/scdm/classify/trained_heads.py", "_load_legacy_pickle"):
        "joblib.load of a head pickled by an older scdm, only under an explicit trust_pickle / --trust-pickle",
}
"""(file, enclosing function or class) -> why it may unpickle."""

_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "joblib", "dill", "cloudpickle"}


def _python_files() -> Iterator[Path]:
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            yield path
        else:
            files = sorted(path.rglob("*.py"))
            assert files, f"{name} holds no Python files: update SOURCES after moving the package"
            yield from files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _unsafe(node: ast.AST) -> str | None:
    """Why this node unpickles, or None."""
    if isinstance(node, ast.ImportFrom) and node.module in _PICKLE_MODULES:
        names = {a.name for a in node.names} & {"load", "loads", "Unpickler"}
        return f"from {node.module} import {', '.join(sorted(names))}" if names else None
    if isinstance(node, ast.ClassDef):
        bases = {_dotted(b) for b in node.bases}
        return "subclasses pickle.Unpickler" if bases & {"pickle.Unpickler", "_pickle.Unpickler"} else None
    if not isinstance(node, ast.Call):
        return None
    name = _dotted(node.func)
    module, _, attr = name.rpartition(".")
    if module in _PICKLE_MODULES and attr in ("load", "loads", "Unpickler"):
        return f"{name}()"
    if attr == "read_pickle" and module in ("pd", "pandas"):
        return f"{name}()"
    if name == "torch.load" and (not _is_true(_keyword(node, "weights_only"))
                                 or any(k.arg is None for k in node.keywords)):
        return "torch.load() without weights_only=True"
    allow_pickle = _keyword(node, "allow_pickle")
    if name in ("np.load", "numpy.load") and allow_pickle is not None \
            and not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
        return "np.load() with allow_pickle other than False"
    return None


def _findings() -> list[tuple[str, str, int, str]]:
    """(file, enclosing definition, line, why) of every unpickling site."""
    found = []
    for path in _python_files():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=relative)

        def visit(node: ast.AST, owner: str) -> None:
            why = _unsafe(node)
            if why:
                name = node.name if isinstance(node, ast.ClassDef) else owner
                found.append((relative, name, getattr(node, "lineno", 0), why))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                owner = node.name
            for child in ast.iter_child_nodes(node):
                visit(child, owner)

        visit(tree, "<module>")
    return found


def test_no_source_unpickles_outside_the_restricted_unpicklers() -> None:
    offending = [f"{f}:{line} ({owner}): {why}" for f, owner, line, why in _findings() if (f, owner) not in ALLOWED]
    assert not offending, "Unpickling outside the allow-list (a planted file could run code):\n" + "\n".join(offending)


def test_every_allowed_unpickler_still_exists() -> None:
    sites = {(f, owner) for f, owner, _, _ in _findings()}
    assert set(ALLOWED) <= sites, f"stale ALLOWED entries: {sorted(set(ALLOWED) - sites)}"


def test_the_checker_catches_what_it_bans(tmp_path: Path) -> None:
    code = """
import pickle, joblib, torch, numpy as np, pandas as pd
from pickle import loads
pickle.load(f); pickle.loads(b); joblib.load(p); pd.read_pickle(p)
torch.load(p); torch.load(p, weights_only=False); torch.load(p, **kw)
np.load(p, allow_pickle=True)
class U(pickle.Unpickler): pass
torch.load(p, weights_only=True); np.load(p); np.load(p, allow_pickle=False)
"""
    tree = ast.parse(code)
    flagged = [why for node in ast.walk(tree) if (why := _unsafe(node))]
    assert len(flagged) == 10, flagged
