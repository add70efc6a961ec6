"""scdm: an embedding store and classifier service for single-cell drug response.

The notebook API (see :mod:`scdm.api`)::

    import scdm
    scdm.embed(adata, model="pca")          # adata.obsm["X_pca"], cached in a store
    scdm.evaluate(adata, heads=["logreg"])  # DataFrame: mean, sd, n per metric
    scdm.results()                          # every result in the store
    st = scdm.open_store("scdm-store")      # everything else

Importing ``scdm`` is light: the API and the packages below it (``scdm.store``,
``scdm.embedding``, ``scdm.classify``, ...) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "default_store_path", "embed", "evaluate", "open_store", "results"]

if TYPE_CHECKING:
    from scdm.api import default_store_path, embed, evaluate, open_store, results

_API = frozenset(__all__) - {"__version__"}
_PACKAGES = frozenset({"api", "classify", "cli", "demo", "embedding", "prompt", "server", "store"})


def __getattr__(name: str) -> Any:
    # lazy: `import scdm.classify.heads` runs this file too, and must not pull in the API's imports
    if name in _API:
        from scdm import api

        return getattr(api, name)
    if name in _PACKAGES:  # `scdm.store.example_data(...)` after a plain `import scdm`
        import importlib

        return importlib.import_module(f"scdm.{name}")
    msg = f"module 'scdm' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API | _PACKAGES)
