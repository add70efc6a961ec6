"""One head setting, one identity: ``C=1`` and ``C=1.0`` are the same fit.

Until 2026-12-07 a head's key was the JSON of its parameters as given, so ``alpha=1`` and
``alpha=1.0`` (what ``--param alpha=1`` and the default give) were two task ids: the second run
fitted all 3 folds again and the leaderboard showed two rows of one ridge configuration; a trained
head asked for with ``C=1`` was a second head beside ``C=1.0``'s. Keys are spelled by the heads'
rules now, and what an older scdm stored in the other spelling is found again, not fitted again.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.head_base import BaseHead
from scdm.classify.heads import ShuffledLabelHead, get_head
from scdm.classify.results import leaderboard
from scdm.classify.trained_heads import train_head, trained_heads
from scdm.store import Store, example_data
from tests.classify.test_trained_heads import _scores, a375_store, write_embedding


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    store = a375_store(tmp_path / "store")
    write_embedding(store, "a375", _scores(ad.read_h5ad(example_data("A375")), 6))
    return store


def _as_given(cls: type[BaseHead], params: dict) -> dict:
    return dict(params)


@pytest.fixture()
def older_scdm(monkeypatch: pytest.MonkeyPatch):
    """The scdm before keys were spelled by the rules: parameters keyed as given."""
    @contextlib.contextmanager
    def keyed_as_given() -> Iterator[None]:
        with monkeypatch.context() as m:
            m.setattr(BaseHead, "canonical_params", classmethod(_as_given))
            m.setattr(ShuffledLabelHead, "canonical_params", classmethod(_as_given))
            yield
    return keyed_as_given


@pytest.mark.parametrize(("head", "one", "other"), [
    ("logreg", {"C": 1}, {"C": 1.0}),
    ("ridge", {"alpha": 10}, {"alpha": 10.0}),
    ("lightgbm", {"n_estimators": 5.0, "learning_rate": 1}, {"n_estimators": 5, "learning_rate": 1.0}),
    ("lightgbm", {"n_estimators": np.int64(5)}, {"n_estimators": 5}),
    ("mlp", {"lr": 1, "weight_decay": 0}, {"lr": 1.0, "weight_decay": 0.0}),
    ("dann", {"hidden": [64, 32]}, {"hidden": (64, 32)}),
    ("shuffled-label", {"base": "logreg", "base_params": {"C": 2}}, {"base": "logreg", "base_params": {"C": 2.0}}),
    ("shuffled-label", {"base": "mlp", "base_params": {"lr": 1}}, {"base": "mlp", "base_params": {"lr": 1.0}}),
])
def test_two_spellings_of_one_setting_are_one_key(head, one, other) -> None:
    assert get_head(head, **one).params_key() == get_head(head, **other).params_key()
    assert get_head(head, **one).get_params() == get_head(head, **other).get_params()


def test_spelling_never_merges_different_settings() -> None:
    # True is not 1 (standardize=1 is refused by fit), a fraction is not rounded to an int
    assert get_head("ridge", standardize=True).params_key() != get_head("ridge", standardize=1).params_key()
    assert get_head("lightgbm", n_estimators=5.5).params_key() != get_head("lightgbm", n_estimators=5).params_key()
    assert get_head("logreg", C=1).params_key() != get_head("logreg", C=1.5).params_key()


def test_a_list_for_danns_hidden_layers_fits(st: Store) -> None:
    # --param hidden=[64] arrives as a JSON list: refused before ("expected tuple"), the same layers now
    head = get_head("dann", hidden=[8], epochs=1, pretrain_epochs=0, cluster_method="kmeans", n_clusters=2)
    head.validate_params()
    assert head.hidden == (8,)


def _ridge(st: Store, alpha) -> tuple[int, int]:
    run_id = evaluate(st, heads=["ridge"], head_params={"ridge": {"alpha": alpha}}, scenarios=["pooled"], by=["all"],
                      folds=3, seed=0).run_id
    row = st.query("SELECT n_done, n_reused FROM eval_runs WHERE run_id = ?", [run_id]).iloc[0]
    return int(row["n_done"]), int(row["n_reused"])


def test_int_and_float_spellings_are_one_result(st: Store) -> None:
    assert _ridge(st, 1) == (3, 0)
    assert _ridge(st, 1.0) == (0, 3)  # before: (3, 0), and two leaderboard rows
    board = leaderboard(st, metrics=["auroc"])
    assert len(board) == 1 and board["folds_done"].tolist() == [3]


def test_an_older_scdms_rows_in_the_other_spelling_are_reused_and_shown_once(st: Store, older_scdm) -> None:
    with older_scdm():
        assert _ridge(st, 1) == (3, 0)
    stored = st.query("SELECT DISTINCT CAST(head_params AS VARCHAR) AS p FROM eval_tasks")["p"].tolist()
    assert stored == ['{"alpha": 1, "standardize": "global"}']  # as the older scdm wrote its rows
    auroc = leaderboard(st, metrics=["auroc"])["mean"].tolist()

    assert _ridge(st, 1.0) == (0, 3)  # the same fit: found, not fitted again
    board = leaderboard(st, metrics=["auroc"])
    assert len(board) == 1 and board["folds_done"].tolist() == [3] and board["mean"].tolist() == auroc
    assert json.loads(board["head_params"].iloc[0]) == {"alpha": 1.0, "standardize": "global"}
    assert st.query("SELECT DISTINCT CAST(head_params AS VARCHAR) AS p FROM eval_results")["p"].tolist() == [
        '{"alpha": 1.0, "standardize": "global"}']


def test_both_spellings_stored_by_an_older_scdm_become_one_copy_of_each_fold(st: Store, older_scdm) -> None:
    with older_scdm():
        _ridge(st, 1)
        assert _ridge(st, 1.0) == (3, 0)  # the older scdm fitted it twice
        assert len(leaderboard(st, metrics=["auroc"])) == 2
    assert _ridge(st, 1) == (0, 3)
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == 3
    assert st.query("SELECT count(DISTINCT task_id) AS n FROM eval_predictions")["n"][0] == 3
    board = leaderboard(st, metrics=["auroc"])
    assert len(board) == 1 and board["folds_done"].tolist() == [3]


def test_a_trained_head_is_one_head_whatever_the_spelling(st: Store, older_scdm) -> None:
    with older_scdm():
        old = train_head(st, dataset="a375", model="pca-test", head="logreg", C=1)
    assert train_head(st, dataset="a375", model="pca-test", head="logreg", C=1) == old
    assert train_head(st, dataset="a375", model="pca-test", head="logreg", C=1.0) == old
    assert len(trained_heads(st)) == 1

    new = train_head(st, dataset="a375", model="pca-test", head="ridge", alpha=2)
    assert train_head(st, dataset="a375", model="pca-test", head="ridge", alpha=2.0) == new
    assert json.loads(trained_heads(st).set_index("head_id").loc[new, "head_params"]) == {
        "alpha": 2.0, "standardize": "global"}
