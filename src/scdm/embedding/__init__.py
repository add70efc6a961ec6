"""GPU batch stage: compute and cache cell embeddings from foundation-model checkpoints."""

from scdm.embedding._adapter import Adapter, GeneAudit, available_models, get_adapter, library_progress, register_adapter

__all__ = ["Adapter", "GeneAudit", "available_models", "get_adapter", "library_progress", "register_adapter"]
