"""Small helpers shared by the Hugging Face-family adapters (Geneformer, tGPT, LLM)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scdm.store.errors import CheckpointError, InputDataError

__all__ = ["PEFT_ADAPTER_FILES", "read_hf_config", "check_expression", "require_int_param", "aggregation_matrix", "top_expressed", "dtype_argument", "masked_mean", "half_dtype", "hold_weights_in"]

PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
"""A PEFT adapter saved into a model folder: ``from_pretrained`` applies it onto the weights it loads
(with peft installed, as scdm has it), so these files change the numbers and the checkpoint's hash
counts them when the folder holds them (each Hugging Face model's ``read_if_present``; not fetched
for a Hub id)."""


def read_hf_config(folder: Path, kind: str) -> dict[str, Any]:
    """``folder/config.json`` as a dict, or a :class:`CheckpointError` naming the file and ``kind``."""
    path = folder / "config.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        msg = f"Cannot read {str(path)!r} as a Hugging Face {kind} config ({err})."
        raise CheckpointError(msg) from None


def check_expression(x: sp.csr_matrix, model: str) -> None:
    """Ranking needs finite, non-negative expression (counts or log-normalised)."""
    data = x.data
    if data.size and not np.isfinite(data).all():
        msg = f"{model} ranks genes by expression, but the matrix holds NaN or inf values. Clean the matrix (e.g. replace them with 0) and ingest it again."
        raise InputDataError(msg)
    if data.size and (data < 0).any():
        msg = (
            f"{model} ranks each cell's genes by expression, but the matrix has negative values (it looks "
            "z-scored or scaled), which would rank genes by deviation instead. Ingest raw counts or "
            "log-normalised values."
        )
        raise InputDataError(msg)


def require_int_param(model: str, name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int, or a clear error: a float (``--param layer=1.5``), bool or string is not silently cast."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        msg = f"{model} {name}={value!r} must be an integer{bound}."
        raise InputDataError(msg)
    return int(value)


def aggregation_matrix(column_of_gene: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """Sparse (n_genes, n_columns) 0/1 matrix: ``x @ A`` reorders genes and sums duplicates."""
    used = np.flatnonzero(column_of_gene >= 0)
    ones = np.ones(used.size, dtype=np.float64)
    return sp.csr_matrix((ones, (used, column_of_gene[used])), shape=(column_of_gene.size, n_columns))


def top_expressed(columns: sp.csr_matrix, n_top: int, names: np.ndarray) -> list[np.ndarray]:
    """Per cell, the column indices of its ``n_top`` highest non-zero values, highest first.

    Ties are broken by ``names`` (the word each column becomes in the model's input, one per column),
    in ascending code-point order: never by the dataset's column order, which differs between studies
    (alphabetical in one, genomic position in another) and would otherwise decide which tied genes
    make the cut and in what order, so that one cell state got different tokens in two datasets.
    """
    columns = columns.tocsr()
    columns.sort_indices()
    columns.eliminate_zeros()
    names = np.asarray(names, dtype=object)
    if names.shape != (columns.shape[1],):
        msg = f"top_expressed needs one name per column: {columns.shape[1]} columns, {names.size} names."
        raise ValueError(msg)
    _, alphabetical = np.unique(names, return_inverse=True)
    out = []
    for i in range(columns.shape[0]):
        start, end = columns.indptr[i], columns.indptr[i + 1]
        cols = columns.indices[start:end]
        order = np.lexsort((alphabetical[cols], -columns.data[start:end]))[:n_top]
        out.append(cols[order])
    return out


def dtype_argument(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword for the weight dtype (transformers 5 renamed ``torch_dtype``).

    Always given: transformers 5 otherwise loads weights in the dtype they were saved in.
    """
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the kept positions in float32; a cell with none gets zeros (never NaN)."""
    # torch.where, not a multiply: fully padded rows can hold NaN that 0 * NaN would keep
    summed = torch.where(keep[..., None], hidden.float(), 0.0).sum(dim=1)
    return summed / keep.sum(dim=1, keepdim=True).clamp(min=1).float()


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NORM_LAYERS: tuple[type[torch.nn.Module], ...] = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
"""Modules whose parameters stay float32 when the weights are held in half precision."""


def half_dtype(precision: str | None) -> torch.dtype | None:
    """The torch dtype of ``Adapter.weight_precision`` (``"bf16"``/``"fp16"``), None for float32 weights."""
    return None if precision is None else HALF_DTYPES[precision]


def hold_weights_in(model: torch.nn.Module, dtype: torch.dtype | None, *, keep: tuple[torch.nn.Module, ...] = ()) -> torch.nn.Module:
    """Cast the floating-point parameters of ``model`` to ``dtype`` in place, normalisation layers excepted.

    For inference under autocast of the same dtype: the matrix products already run in ``dtype``
    (autocast casts fp32 weights on every use), so only embedding tables and additive parameters
    round differently. Normalisation layers keep float32 parameters: autocast computes them in
    float32 anyway, and they are tiny. Buffers (positional tables, masks) are left as they are.
    ``dtype=None`` leaves the model unchanged. Modules in ``keep`` (and their children) stay float32
    too: those an adapter runs in float32 outside autocast.
    """
    if dtype is None:
        return model
    kept = {id(sub) for module in keep for sub in module.modules()}
    for module in model.modules():
        if isinstance(module, NORM_LAYERS) or id(module) in kept:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model
