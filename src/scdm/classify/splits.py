"""Train/test partitions of cells: defined once in :mod:`store.splits` (what a split and a fold
are is part of the data model that both stages share); re-exported here."""

from scdm.store.splits import (
    CATEGORY_TYPES,
    SCENARIOS,
    SampleLeakageWarning,
    Split,
    StudyLeakageWarning,
    cells_hash,
    load_split,
    make_splits,
    save_splits,
)

__all__ = ["CATEGORY_TYPES", "SCENARIOS", "SampleLeakageWarning", "Split", "StudyLeakageWarning", "cells_hash", "load_split", "make_splits",
           "save_splits"]
