"""scdm: an embedding store and classifier service for single-cell drug response."""

from __future__ import annotations

__version__ = "0.1.0"
