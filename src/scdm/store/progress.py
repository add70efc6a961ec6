"""The one progress-bar helper every scdm package uses (tqdm on stderr, silenceable)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it", silent: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; ``silent=True`` gives a bar that prints nothing.

    Bars are also hidden when stderr is not a terminal unless ``SCDM_PROGRESS=1`` is set, so logs
    of batch jobs stay readable.
    """
    import os

    forced = os.environ.get("SCDM_PROGRESS", "") == "1"
    disable = silent or (not forced and not sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, unit_scale=True, **kwargs)
