"""A planted pickle: unpickling :class:`RunsCode` creates a file, which tests assert never appears."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


class RunsCode:
    """Unpickling this runs ``touch <marker>``: the stand-in for an attacker's payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)
