"""Metrics of a fold's test predictions: defined once in :mod:`store.metrics` (both stages score
with it, so a stored value means the same whoever wrote it); re-exported here."""

from scdm.store.metrics import METRICS, FoldMetrics, compute_metrics

__all__ = ["METRICS", "FoldMetrics", "compute_metrics"]
