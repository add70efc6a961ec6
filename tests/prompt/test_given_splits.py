"""A stored split given with --split-id is scored with the labels it stores: they must be the label set's."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from scdm.prompt import prompt
from scdm.prompt.backends import Backend, Reply
from scdm.store import Store
from scdm.store.errors import InputDataError
from scdm.store.splits import make_splits, save_splits
from tests.prompt.conftest import marker_adata


class AllSensitive(Backend):
    """Answers 'sensitive' for every cell, without a server."""

    kind, model = "test", "all-sensitive"

    def decoding(self) -> dict[str, Any]:
        return {}

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        body = {"cells": [{"cell": i, "response": "sensitive"} for i in range(1, n_cells + 1)]}
        return Reply(text=json.dumps(body), raw={})


def test_split_of_another_label_set_is_refused(tmp_path, symbols) -> None:
    adata = marker_adata(symbols)
    adata.obs["inverse"] = np.where(adata.obs["response"] == "sensitive", "resistant", "sensitive")
    st = Store(tmp_path / "store")
    st.ingest(adata, name="marker", label_key="response", study_key="study", sample_key="patient", drug="Erlotinib",
              label_set="A")
    st.ingest(adata, name="marker", label_key="inverse", study_key="study", sample_key="patient", drug="Gefitinib",
              label_set="B")
    split = make_splits(st.cells(["marker"], label_set="A"), scenarios=["pooled"], by=["all"], n_folds=2)[0]
    save_splits(st, [split])
    # B's examples and drug in the prompts, A's labels as the truth, the result filed under A: refused
    with pytest.raises(InputDataError, match="differ from those of --label-set B on 64 of its 64 cells"):
        prompt(st, ["marker"], backend=AllSensitive(), split_ids=[split.split_id], label_set="B", shots=2, silent=True)
    assert st.query("SELECT count(*) AS n FROM prompt_requests")["n"][0] == 0
    summary = prompt(st, ["marker"], backend=AllSensitive(), split_ids=[split.split_id], label_set="A", shots=2,
                     silent=True)
    assert summary.n_tasks == 2


def test_a_category_that_no_given_split_is_of_is_refused(tmp_path, symbols) -> None:
    # `scdm prompt --split-id S --category X` dropped --category and scored split S (category 'all') as asked
    st = Store(tmp_path / "store")
    st.ingest(marker_adata(symbols), name="marker", label_key="response", study_key="study", sample_key="patient")
    split = make_splits(st.cells(["marker"]), scenarios=["pooled"], by=["all"], n_folds=2)[0]
    save_splits(st, [split])
    with pytest.raises(InputDataError, match=rf"--category Melanoma does not select among given splits: {split.split_id} "
                                             r"\(all=all\) is of another category"):
        prompt(st, ["marker"], backend=AllSensitive(), split_ids=[split.split_id], category="Melanoma", silent=True)
    assert st.query("SELECT count(*) AS n FROM prompt_requests")["n"][0] == 0
    summary = prompt(st, ["marker"], backend=AllSensitive(), split_ids=[split.split_id], category="all", silent=True)
    assert summary.n_tasks == 2
