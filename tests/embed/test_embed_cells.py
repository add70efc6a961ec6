"""``chunks.embed_cells``: one batch deep (the next batch is launched before the last one is read),
with the same vectors as embedding batch by batch, and CUDA out-of-memory back-off."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scdm.embedding import chunks
from scdm.store.errors import ScdmError


class RecordingAdapter:
    """Vectors from each cell's ids alone (so any batching gives the same rows); records its calls."""

    name = "recording"
    emb_dim = 3
    batch_dependent = False

    def __init__(self, events: list[tuple[str, int]], *, reuse_output: bool = False, max_batch: int | None = None) -> None:
        self.events = events
        self.reuse_output = reuse_output
        self.max_batch = max_batch
        self._buffer: torch.Tensor | None = None

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        return {"ids": torch.tensor(np.stack([c["ids"] for c in cells]), dtype=torch.float32)}

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["ids"]
        if self.max_batch is not None and len(ids) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
        self.events.append(("embed", int(ids[0, 0])))
        vecs = torch.stack([ids.sum(1), ids.prod(1), ids[:, 0] * 10], dim=1)
        if not self.reuse_output:
            return vecs
        # as an output buffer kept across calls (CUDA graphs, a static workspace) would
        if self._buffer is None or self._buffer.shape != vecs.shape:
            self._buffer = torch.empty_like(vecs)
        return self._buffer.copy_(vecs)


def _cells(n: int) -> list[dict[str, np.ndarray]]:
    return [{"ids": np.array([i, i + 1, 2], dtype=np.int64)} for i in range(n)]


def _expected(cells: list[dict[str, np.ndarray]]) -> np.ndarray:
    ids = np.stack([c["ids"] for c in cells]).astype(np.float32)
    return np.stack([ids.sum(1), ids.prod(1), ids[:, 0] * 10], axis=1)


@pytest.fixture()
def host_reads(monkeypatch):
    """Records (``"host"``, first cell) whenever a batch's vectors are copied into the chunk."""
    events: list[tuple[str, int]] = []
    real = chunks._to_host

    def to_host(out, idx, vecs):
        events.append(("host", int(idx[0])))
        real(out, idx, vecs)

    monkeypatch.setattr(chunks, "_to_host", to_host)
    return events


def test_the_next_batch_is_launched_before_the_last_is_read(host_reads):
    cells = _cells(10)
    adapter = RecordingAdapter(host_reads)
    batches = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 10)]
    out = chunks.embed_cells(adapter, cells, batches, "cpu", "fp32", {"batch_size": 4})
    np.testing.assert_array_equal(out, _expected(cells))
    assert host_reads == [("embed", 0), ("embed", 4), ("host", 0), ("embed", 8), ("host", 4), ("host", 8)]


def test_vectors_are_the_same_in_any_batch_order_and_size(host_reads):
    cells = _cells(23)
    order = np.random.default_rng(0).permutation(23)
    one_batch = chunks.embed_cells(RecordingAdapter([]), cells, [np.arange(23)], "cpu", "fp32", {})
    many = chunks.embed_cells(RecordingAdapter([]), cells, np.array_split(order, 6), "cpu", "fp32", {})
    np.testing.assert_array_equal(one_batch, many)
    np.testing.assert_array_equal(one_batch, _expected(cells))


def test_an_adapter_writing_into_one_output_buffer_still_gives_every_batch_its_vectors():
    cells = _cells(12)
    adapter = RecordingAdapter([], reuse_output=True)
    out = chunks.embed_cells(adapter, cells, [np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)], "cpu", "fp32", {})
    np.testing.assert_array_equal(out, _expected(cells))


def test_out_of_memory_keeps_the_batch_already_computed_and_halves_the_next(host_reads):
    cells = _cells(12)
    adapter = RecordingAdapter(host_reads, max_batch=4)
    state: dict[str, Any] = {"batch_size": 8}
    out = chunks.embed_cells(adapter, cells, [np.arange(0, 4), np.arange(4, 12)], "cpu", "fp32", state)
    np.testing.assert_array_equal(out, _expected(cells))
    assert state["oom_backoffs"] == 1 and state["batch_size"] == 4
    # the first batch was read when the second failed, before its halves ran
    assert host_reads == [("embed", 0), ("host", 0), ("embed", 4), ("embed", 8), ("host", 4), ("host", 8)]


def test_other_errors_propagate_unchanged():
    class Broken(RecordingAdapter):
        def embed(self, batch):
            raise RuntimeError("shape mismatch in layer 3")

    with pytest.raises(RuntimeError, match="shape mismatch in layer 3"):
        chunks.embed_cells(Broken([]), _cells(4), [np.arange(4)], "cpu", "fp32", {})


def test_a_batch_dependent_model_is_not_split_on_out_of_memory():
    adapter = RecordingAdapter([], max_batch=2)
    adapter.batch_dependent = True
    with pytest.raises(ScdmError, match="rerun with a smaller --batch-size"):
        chunks.embed_cells(adapter, _cells(4), [np.arange(4)], "cpu", "fp32", {"batch_size": 4})
