"""Heads: one contract for all (HeadContract), ridge against its closed form, leakage alarm."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from scdm.classify.heads import (
    HEADS,
    MLP_PROFILES,
    GramStats,
    MLPHead,
    NotFittedError,
    get_head,
    linear_scores,
    mlp_batch_size,
    mlp_learning_rate,
    mlp_patience,
    mlp_train_flops,
    ridge_from_stats,
)
from scdm.store.errors import InputDataError


def planted(n: int = 400, dim: int = 12, seed: int = 0, offset: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose first two dims carry the label (far from zero mean, uneven scales)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    Z = rng.normal(size=(n, dim))
    Z[:, 0] += 2.5 * y
    Z[:, 1] -= 2.0 * y
    return (Z * rng.uniform(0.5, 4.0, dim) + offset).astype(np.float32), y


class HeadContract:
    """Behaviour every head must have; subclasses set ``name`` and small ``params``."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {}
    learns: ClassVar[bool] = True
    bad_params: ClassVar[dict[str, Any] | None] = None

    def make(self, **extra: Any) -> Any:
        return get_head(self.name, **{**self.params, **extra})

    def test_registered_under_its_name(self) -> None:
        assert type(self.make()) is HEADS[self.name]
        assert HEADS[self.name].name == self.name

    def test_fit_returns_self_and_proba_is_one_column_of_probabilities(self) -> None:
        X, y = planted()
        head = self.make()
        assert head.fit(X[:300], y[:300]) is head
        p = head.proba_sensitive(X[300:])
        assert p.shape == (100,)
        np.testing.assert_array_equal(head.predict_proba(X[300:]), np.column_stack([1 - p, p]))
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()

    def test_predict_before_fit_raises(self) -> None:
        with pytest.raises(NotFittedError, match="not fitted"):
            self.make().proba_sensitive(np.zeros((3, 12), np.float32))

    def test_fitted_state_ends_with_underscore_and_params_untouched(self) -> None:
        X, y = planted()
        head = self.make()
        before = head.get_params()
        head.fit(X, y)
        assert head.get_params() == before
        assert head.n_features_in_ == X.shape[1]
        assert set(head.get_params()) == set(type(head)._param_names())

    def test_wrong_number_of_columns_is_explained(self) -> None:
        X, y = planted()
        head = self.make().fit(X, y)
        with pytest.raises(InputDataError, match="columns"):
            head.proba_sensitive(X[:, :5])

    def test_invalid_parameter_is_caught_in_fit_not_init(self) -> None:
        if self.bad_params is None:
            pytest.skip("head has no parameters")
        head = self.make(**self.bad_params)  # stored, not validated
        X, y = planted()
        with pytest.raises(InputDataError, match=f"parameter {next(iter(self.bad_params))}="):
            head.fit(X, y)

    def test_same_seed_same_predictions(self) -> None:
        X, y = planted()
        a = self.make().fit(X[:300], y[:300]).proba_sensitive(X[300:])
        b = self.make().fit(X[:300], y[:300]).proba_sensitive(X[300:])
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    def test_planted_signal_is_recovered(self) -> None:
        X, y = planted(n=600)
        p = self.make().fit(X[:400], y[:400]).proba_sensitive(X[400:])
        auroc = roc_auc_score(y[400:], p)
        if self.learns:
            assert auroc > 0.9
        else:
            assert abs(auroc - 0.5) < 0.15

    def test_single_class_training_cells(self) -> None:
        X, _ = planted()
        head = self.make()
        if head.needs_both_classes:
            with pytest.raises(InputDataError, match="both classes"):
                head.fit(X, np.ones(len(X), int))
        else:
            assert (head.fit(X, np.ones(len(X), int)).proba_sensitive(X) == 1.0).all()


class TestRidge(HeadContract):
    name = "ridge"
    params = {"alpha": 2.0}
    bad_params = {"alpha": -1.0}


class TestLogReg(HeadContract):
    name = "logreg"
    params = {"C": 1.0}
    bad_params = {"C": 0}


class TestLightGBM(HeadContract):
    name = "lightgbm"
    params = {"n_estimators": 30, "n_jobs": 1}
    bad_params = {"num_leaves": 1}


class TestMLPDefault(HeadContract):
    name = "mlp"
    params = {"hidden": 32, "min_steps": 100}
    bad_params = {"profile": "turbo"}


class TestMLPPaper(HeadContract):
    name = "mlp"
    params = {"profile": "paper", "hidden": 32, "epochs": 30, "lr": 1e-3}
    bad_params = {"standardize": "yes"}


class TestMLPFast(HeadContract):
    name = "mlp"
    params = {"profile": "fast", "hidden": 32, "batch_size": 64, "epochs": 20, "lr": 3e-3}
    bad_params = {"validation_fraction": 0.9}


class TestMajority(HeadContract):
    name = "majority"
    learns = False


class TestShuffledLabel(HeadContract):
    name = "shuffled-label"
    params = {"base": "ridge"}
    learns = False
    bad_params = {"base": "majority"}


# ---------------------------------------------------------------------------------------------
def test_ridge_matches_closed_form_on_standardised_features() -> None:
    X, y = planted(n=300, dim=20, offset=100.0)
    head = get_head("ridge", alpha=5.0, standardize=True).fit(X, y)
    scaler = StandardScaler().fit(X.astype(np.float64))
    ref = Ridge(alpha=5.0).fit(scaler.transform(X.astype(np.float64)), y)
    np.testing.assert_allclose(head.coef_ * scaler.scale_, ref.coef_, rtol=1e-4, atol=1e-7)
    # and explicitly: w_z = (Z'Z + a I)^-1 Z'(y - mean y)
    Z = scaler.transform(X.astype(np.float64))
    w = np.linalg.solve(Z.T @ Z + 5.0 * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
    np.testing.assert_allclose(head.coef_ * scaler.scale_, w, rtol=1e-4, atol=1e-7)
    # decision_function is centred at the 0.5 threshold: positive where class 1 is predicted
    np.testing.assert_allclose(head.decision_function(X), Z @ w + y.mean() - 0.5, atol=1e-4)


def test_ridge_without_standardising_matches_sklearn() -> None:
    X, y = planted(n=200, dim=8)
    head = get_head("ridge", alpha=3.0, standardize=False).fit(X, y)
    ref = Ridge(alpha=3.0).fit(X.astype(np.float64), y)
    np.testing.assert_allclose(head.coef_, ref.coef_, rtol=1e-4, atol=1e-8)
    assert head.intercept_ == pytest.approx(ref.intercept_, rel=1e-4)


def test_global_scaling_is_one_shared_scale() -> None:
    """standardize="global": ridge and logreg on X equal the unscaled fits on (X - mean) / rms."""
    X, y = planted(n=300, dim=8, offset=50.0)
    centred = X.astype(np.float64) - X.mean(axis=0)
    rms = np.sqrt(np.mean(centred.var(axis=0)))
    ridge = get_head("ridge", alpha=3.0).fit(X, y)
    assert ridge.standardize == "global"
    ref = Ridge(alpha=3.0).fit(centred / rms, y)
    np.testing.assert_allclose(ridge.coef_ * rms, ref.coef_, rtol=1e-4, atol=1e-7)
    logreg = get_head("logreg", C=0.5, tol=1e-8, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(logreg.scale_, np.full(8, rms, np.float32), rtol=1e-5)
    plain = get_head("logreg", C=0.5, tol=1e-8, max_iter=1000, standardize=False).fit(centred / rms, y)
    np.testing.assert_allclose(logreg.coef_, plain.coef_, rtol=1e-3, atol=1e-5)
    mlp = get_head("mlp", hidden=8, min_steps=1, epochs=1).fit(X, y)
    np.testing.assert_allclose(mlp.scale_, np.full(8, rms, np.float32), rtol=1e-5)


def test_fold_downdate_equals_fitting_the_training_rows() -> None:
    X, y = planted(n=500, dim=10)
    shift = X[:50].mean(axis=0)
    folds = np.arange(500) % 5
    per_fold = [GramStats.from_rows(X[folds == f], y[folds == f], shift=shift, block_rows=37) for f in range(5)]
    total = GramStats.zeros(10, shift)
    for stats in per_fold:
        total.iadd(stats)
    for f in range(5):
        coef, b = ridge_from_stats(total, 1.5, minus=per_fold[f])
        direct = get_head("ridge", alpha=1.5).fit(X[folds != f], y[folds != f])
        np.testing.assert_allclose(coef, direct.coef_, rtol=1e-5, atol=1e-8)
        assert b == pytest.approx(direct.intercept_, rel=1e-4)


def test_shuffled_labels_score_at_chance() -> None:
    aurocs = []
    for seed in range(8):
        X, y = planted(n=800, seed=seed)
        p = get_head("shuffled-label", base="logreg", seed=seed).fit(X[:600], y[:600]).proba_sensitive(X[600:])
        aurocs.append(roc_auc_score(y[600:], p))
    assert abs(np.mean(aurocs) - 0.5) < 0.05
    # the same data with true labels is clearly learnable: the alarm measures leakage, not noise
    X, y = planted(n=800)
    assert roc_auc_score(y[600:], get_head("logreg").fit(X[:600], y[:600]).proba_sensitive(X[600:])) > 0.9


def test_mlp_paper_profile_is_scdrugmaps_reference_code() -> None:
    """benchmarking_main_EBD.py: D-512-512-2 ReLU, BCEWithLogitsLoss on one-hot labels, AdamW 1e-4, batch 128, 10 epochs."""
    head = MLPHead(profile="paper")
    settings = head.resolved()
    assert {k: settings[k] for k in ("epochs", "batch_size", "lr", "min_steps", "early_stopping", "standardize", "loss")} \
        == {"epochs": 10, "batch_size": 128, "lr": 1e-4, "min_steps": 0, "early_stopping": False, "standardize": False,
            "loss": "onehot"}
    net = head.build_network(3072)
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(512, 3072), (512,), (512, 512), (512,), (2, 512), (2,)]
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    key = json.loads(head.params_key())
    assert key["profile"] == "paper" and key["batch_size"] == 128 and key["standardize"] is False
    assert get_head("mlp", **key).params_key() == head.params_key()
    # a ~100-cell fold: 10 optimiser steps, embeddings as they are, the last epoch kept
    X, y = planted(n=97)
    fitted = get_head("mlp", profile="paper", hidden=16).fit(X, y)
    assert fitted.n_steps_ == 10 and fitted.mean_ is None and fitted.best_epoch_ == 9
    assert fitted.weight_decay == 0.01  # torch's AdamW default, which the reference uses
    # 6 FLOPs per multiply-add per cell per epoch, minus the unneeded input gradient
    assert mlp_train_flops(1, 3072, epochs=1) == 6 * (3072 * 512 + 512 * 512 + 1024) - 2 * 3072 * 512


def test_mlp_paper_loss_is_bce_on_one_hot_labels() -> None:
    import torch

    head = MLPHead(profile="paper")
    head.output_ = "onehot"
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    targets = head._targets(np.array([1, 0]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert float(head._loss(logits, targets)) == pytest.approx(float(expected))


def test_mlp_default_profile_scales_to_the_fold() -> None:
    assert MLPHead().profile == "default" and MLP_PROFILES["default"]["min_steps"] == 500
    assert [mlp_batch_size(n) for n in (53, 90, 2_000, 9_000, 300_000)] == [16, 16, 128, 512, 512]
    assert mlp_learning_rate(256) == pytest.approx(1e-3) and mlp_learning_rate(16) == pytest.approx(2.5e-4)
    assert [mlp_patience(k) for k in (4, 100, 600)] == [10, 10, 2]
    X, y = planted(n=90, dim=6)
    head = get_head("mlp", hidden=16).fit(X, y)
    # 81 training cells in batches of 16: 6 steps an epoch, at least 500 steps, the best epoch after them kept
    assert head.batch_size_ == 16 and head.lr_ == pytest.approx(2.5e-4)
    assert head.n_steps_ >= 500 and head.history_[head.best_epoch_]["steps"] >= 500
    kept = [r for r in head.history_ if r["steps"] >= 500]
    assert head.history_[head.best_epoch_]["val_loss"] == min(r["val_loss"] for r in kept)
    assert head.output_ == "logit" and head.model_[-1].out_features == 1


def test_mlp_default_is_mirror_symmetric_under_a_label_flip() -> None:
    """Swapping the labels gives scores 1 - p: the same validation cells, a zero output layer, a symmetric loss."""
    X, y = planted(n=120, dim=10, seed=3)
    train, test = np.arange(120) % 5 != 0, np.arange(120) % 5 == 0
    a = get_head("mlp", hidden=32, min_steps=200).fit(X[train], y[train])
    b = get_head("mlp", hidden=32, min_steps=200).fit(X[train], 1 - y[train])
    assert a.best_epoch_ == b.best_epoch_
    np.testing.assert_allclose(b.proba_sensitive(X[test]), 1 - a.proba_sensitive(X[test]), atol=1e-4)
    carve = MLPHead()._carve_validation(y[train], True)[1], MLPHead()._carve_validation(1 - y[train], True)[1]
    np.testing.assert_array_equal(*carve)


def test_mlp_default_matches_ridge_on_a_small_pca_like_fold_set() -> None:
    """Fast variant of the real-data acceptance: ~100 cells, 30 PCA-like columns, 10 folds."""
    rng = np.random.default_rng(7)
    n, dim = 100, 30
    y = np.r_[np.ones(n // 2, int), np.zeros(n // 2, int)]
    Z = rng.normal(size=(n, dim)) * np.geomspace(8.0, 0.5, dim)  # variances decreasing, like PCs
    Z[:, 1] += 8.0 * (2 * y - 1)  # the label lives in PC2
    folds = np.arange(n) % 10
    scores = {}
    for name, params in {"ridge": {}, "mlp": {"hidden": 64}}.items():
        aurocs = []
        for k in range(10):
            tr, te = folds != k, folds == k
            aurocs.append(roc_auc_score(y[te], get_head(name, **params).fit(Z[tr], y[tr]).proba_sensitive(Z[te])))
        scores[name] = np.mean(aurocs)
    assert scores["ridge"] > 0.8  # seeds 7-9: ridge 0.86-0.92, mlp 0.91-0.93
    assert scores["mlp"] >= scores["ridge"] - 0.05


def test_mlp_heads_saved_with_two_softmax_outputs_still_predict() -> None:
    """Heads fitted before ``output_`` existed (two outputs, softmax cross-entropy) keep their meaning."""
    import torch

    X, y = planted(n=120, dim=6)
    head = get_head("mlp", profile="paper", hidden=8, epochs=2).fit(X, y)
    del head.output_
    with torch.no_grad():
        logits = head.model_(torch.from_numpy(X[:5]))
    np.testing.assert_allclose(head.proba_sensitive(X[:5]), torch.softmax(logits, 1)[:, 1].numpy(), rtol=1e-5)


def test_mlp_standardises_with_training_cells_only() -> None:
    X, y = planted(n=200)
    head = get_head("mlp", hidden=8, epochs=1, min_steps=0, standardize=True).fit(X[:100], y[:100])
    np.testing.assert_allclose(head.mean_, X[:100].mean(axis=0), rtol=1e-5)
    assert not np.allclose(head.mean_, X.mean(axis=0), rtol=1e-6)


def test_mlp_fast_profile_stops_early_and_records_history() -> None:
    X, y = planted(n=400)
    head = get_head("mlp", profile="fast", hidden=16, batch_size=64, epochs=30, lr=1e-2, patience=1).fit(X, y)
    assert "val_loss" in head.history_[0]
    assert len(head.history_) <= 30


def test_heads_and_the_transfer_code_import_no_cycle() -> None:
    """heads -> _transfer_dann -> head_base; transfer -> _transfer_*: no module imports one that imports it back."""
    import subprocess
    import sys

    code = ("import sys, scdm.classify._transfer_dann, scdm.classify._transfer_model; "
            "bad = [m for m in ('scdm.classify.heads', 'scdm.classify.transfer') if m in sys.modules]; "
            "import scdm.classify.heads; bad += ['scdm.classify.transfer'] if 'scdm.classify.transfer' in sys.modules else []; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert get_head("dann").name == "dann"


@pytest.mark.parametrize(("installed", "method"), [(("leidenalg", "igraph"), "leiden"), (("louvain",), "louvain"), ((), "kmeans")])
def test_dann_identity_names_the_clusters_auto_stands_for(monkeypatch, installed, method) -> None:
    """cluster_method='auto' is Leiden, Louvain or KMeans by the packages installed: the task id must say which,
    or folds clustered with Leiden on one machine and KMeans on another are averaged as one result."""
    import importlib.util

    real = importlib.util.find_spec
    graph = ("leidenalg", "igraph", "louvain")

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in graph:
            return object() if name in installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    key = json.loads(get_head("dann").params_key())
    assert key["cluster_method"] == method
    assert get_head("dann").params_key() == get_head("dann", cluster_method=method).params_key()  # the same fit
    assert get_head("dann", cluster_method="kmeans").get_params()["cluster_method"] == "kmeans"


def test_unknown_head_and_parameter_are_explained() -> None:
    with pytest.raises(InputDataError, match="Did you mean 'ridge'"):
        get_head("rige")
    with pytest.raises(InputDataError, match="takes no parameter gamma"):
        get_head("ridge", gamma=1)


def test_mlp_fits_in_parallel_threads_equal_a_lone_fit():
    """jobs=N runs fits in threads: a fit must not depend on its neighbours' draws from torch's RNG."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 16)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int8)

    def fit(_: int) -> np.ndarray:
        return get_head("mlp", epochs=2, batch_size=64, min_steps=0).fit(X, y).proba_sensitive(X)

    alone = fit(0)
    with ThreadPoolExecutor(4) as pool:
        for proba in pool.map(fit, range(8)):
            np.testing.assert_array_equal(proba, alone)


def test_ridge_in_place_solve_recovers_from_a_singular_system():
    """The Cholesky runs in place; a failed factorisation rebuilds the system and adds a jitter."""
    from scdm.classify.heads import GramStats, ridge_from_stats

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 500))
    X = np.stack([a, a, b], axis=1).astype(np.float32)  # two identical columns: singular at alpha=0
    y = (a + 0.5 * b + rng.normal(0, 0.1, 500) > 0).astype(np.float64)
    stats = GramStats.from_rows(X, y)
    work = np.zeros((3, 3), order="F")
    coef, intercept = ridge_from_stats(stats, 0.0, standardize=False, work=work)
    assert np.isfinite(coef).all()
    expected = np.linalg.lstsq(np.c_[np.ones(500), a, b], y, rcond=None)[0]
    np.testing.assert_allclose([coef[0] + coef[1], coef[2], intercept], expected[[1, 2, 0]], atol=1e-3)
    # a well-posed fold gives the same answer with or without the reusable work matrix
    again = ridge_from_stats(stats, 1.0, work=work)
    np.testing.assert_allclose(again[0], ridge_from_stats(stats, 1.0)[0], rtol=1e-12)


def test_gram_stats_of_selected_rows_equal_those_of_their_copy():
    from scdm.classify.heads import GramStats

    rng = np.random.default_rng(4)
    X = rng.standard_normal((1000, 6)).astype(np.float32)
    y = rng.integers(0, 2, 1000)
    rows = np.sort(rng.choice(1000, 333, replace=False))
    shift = X.mean(0)
    for out in (None, np.zeros((6, 6), np.float32, order="F")):
        picked = GramStats.from_rows(X, y, rows=rows, shift=shift, block_rows=100, out=out)
        copied = GramStats.from_rows(X[rows], y[rows], shift=shift, block_rows=100)
        np.testing.assert_allclose(np.tril(picked.sxx), np.tril(copied.sxx), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(picked.sx, copied.sx, rtol=1e-6, atol=1e-5)
        assert picked.n == copied.n == 333 and picked.sy == copied.sy


@pytest.mark.parametrize("params", [{"profile": "default", "epochs": 3, "min_steps": 0},
                                    {"profile": "paper", "epochs": 2},
                                    {"profile": "fast", "epochs": 3, "batch_size": 64, "precision": "fp32"}])
def test_fit_rows_is_the_fit_of_those_rows_without_copying_them(params: dict) -> None:
    # the evaluation grid hands a head the space's whole matrix and a fold's training rows
    X, y = planted(n=600, dim=16, seed=3)
    rows = np.random.default_rng(0).permutation(600)[:450]
    copied = MLPHead(**params).fit(X[rows], y[rows])
    in_place = MLPHead(**params).fit_rows(X, rows, y)
    assert in_place.n_train_ == copied.n_train_ and in_place.history_ == copied.history_
    if copied.mean_ is not None:
        assert np.array_equal(in_place.mean_, copied.mean_) and np.array_equal(in_place.scale_, copied.scale_)
    assert np.array_equal(in_place.proba_sensitive(X), copied.proba_sensitive(X))  # the same bits
    test = np.setdiff1d(np.arange(600), rows)[::-1]
    assert np.array_equal(in_place.predict_proba_rows(X, test), in_place.proba_sensitive(X[test]))


def test_fit_rows_and_predict_proba_rows_read_the_matrix_in_place() -> None:
    import tracemalloc

    X, y = planted(n=20_000, dim=128, seed=4)  # 10 MB of float32
    rows = np.arange(0, 20_000, 2)  # 5 MB of training cells
    head = MLPHead(profile="fast", epochs=1, precision="fp32")
    tracemalloc.start()
    try:
        head.fit_rows(X, rows, y)
        head.predict_proba_rows(X, rows + 1)
        _, peak_in_place = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        MLPHead(profile="fast", epochs=1, precision="fp32").fit(X[rows], y[rows])
        _, peak_copied = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_copied > X[rows].nbytes  # the copy of the training cells (numpy's allocations are traced)
    assert peak_in_place < X[rows].nbytes / 2  # no copy: labels, one block of rows, the targets


def test_fit_rows_of_other_heads_and_of_read_only_matrices_fit_a_copy() -> None:
    X, y = planted(n=300, dim=8, seed=5)
    rows = np.arange(1, 300, 3)
    ridge = get_head("ridge").fit_rows(X, rows, y)
    assert np.array_equal(ridge.proba_sensitive(X), get_head("ridge").fit(X[rows], y[rows]).proba_sensitive(X))
    assert np.array_equal(ridge.predict_proba_rows(X, rows[::-1]), ridge.proba_sensitive(X[rows[::-1]]))
    for name, params in (("majority", {}), ("shuffled-label", {"base": "mlp", "base_params": {"profile": "paper", "epochs": 1}}),
                         ("shuffled-label", {"base": "ridge"})):
        in_place = get_head(name, **params).fit_rows(X, rows, y)
        copied = get_head(name, **params).fit(X[rows], y[rows])
        assert np.array_equal(in_place.predict_proba_rows(X, rows[::-1]), copied.proba_sensitive(X[rows[::-1]]))
    frozen = X.copy()
    frozen.flags.writeable = False
    mlp = MLPHead(profile="paper", epochs=1).fit_rows(frozen, rows, y)
    assert np.array_equal(mlp.proba_sensitive(X), MLPHead(profile="paper", epochs=1).fit(X[rows], y[rows]).proba_sensitive(X))
    with pytest.raises(InputDataError, match="No training cells"):
        MLPHead().fit_rows(X, np.array([], dtype=np.int64), y)
    with pytest.raises(InputDataError, match="300 rows but y has 10 labels"):
        MLPHead().fit_rows(X, rows, y[:10])
    with pytest.raises(InputDataError, match=r"positions in 0\.\.299 .* got -1\.\.298"):
        MLPHead().fit_rows(X, np.r_[-1, rows], y)  # numpy would read the last cell; refused instead
    with pytest.raises(InputDataError, match=r"got 3\.\.300"):
        mlp.predict_proba_rows(X, rows + 2)
    with pytest.raises(InputDataError, match="integer positions"):
        mlp.predict_proba_rows(X, rows.astype(float))


def test_dann_probabilities_of_an_overconfident_net_are_not_tied() -> None:
    """The dann head's softmax ran in float32: every cell past a logit gap of ~16.6 read exactly 1.0, so four
    cells of gaps 26 to 27.2 tied where AUROC ranks them (as the mlp's sigmoid did before its float64 link)."""
    import torch

    from scdm.classify._transfer_model import TrainConfig, TransferNet, predict_target

    net = TransferNet(1, 1, TrainConfig(hidden=(2,), latent_dim=1, predictor_hidden=()))
    net.target_ae.encoder = torch.nn.Identity()  # the latent is the input itself
    last = torch.nn.Linear(1, 2)
    with torch.no_grad():  # logits (0, 4 x - 2): a gap of 26 to 27.2 on the four cells
        last.weight.copy_(torch.tensor([[0.0], [4.0]]))
        last.bias.copy_(torch.tensor([0.0, -2.0]))
    net.predictor.net = torch.nn.Sequential(last)
    X = np.array([[7.0], [7.1], [7.2], [7.3]], np.float32)
    proba, _ = predict_target(net, X)
    gap = 4.0 * X[:, 0].astype(np.float64) - 2.0
    np.testing.assert_allclose(proba, 1.0 / (1.0 + np.exp(-gap)), rtol=1e-12)
    assert len(np.unique(proba)) == 4 and get_head("dann").revision() == 2


# --------------------------------------------------------------------------------------------
# Embeddings far from the origin (foundation-model offsets, LLM massive activations), stored in float32
# --------------------------------------------------------------------------------------------
def far_embedding(kind: str, n: int = 2000, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 embeddings a linear model separates, with columns far from the origin.

    ``offset``: every column near 300 with sd 0.5; ``far``: at 1e4 with sd 0.5; ``massive``: three
    columns near 1e3 (sd 30) beside columns of size 1e-2.
    """
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, dim))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-1.5 * Z @ rng.standard_normal(dim) / np.sqrt(dim)))).astype(np.int64)
    if kind == "offset":
        X = 300.0 + rng.uniform(-50.0, 50.0, dim) + 0.5 * Z
    elif kind == "far":
        X = 1e4 + 0.5 * Z
    else:
        X = 1e-2 * Z
        X[:, :3] = 1e3 + 30.0 * rng.standard_normal((n, 3))
    return X.astype(np.float32), y


def _reference_decision(model: Any, X: np.ndarray, y: np.ndarray, train: np.ndarray, standardize: Any) -> np.ndarray:
    """scikit-learn in float64 on the head's documented inputs: the training rows centred on their mean and
    scaled as ``standardize`` says (scale 1 for False: with an unpenalised intercept, the same objective)."""
    X64 = X.astype(np.float64)
    mean, sd = X64[train].mean(axis=0), X64[train].std(axis=0)
    scale = np.sqrt(np.mean(sd**2)) if standardize == "global" else sd if standardize is True else 1.0
    fitted = model.fit((X64[train] - mean) / scale, y[train])
    return np.asarray((X64[~train] - mean) / scale @ fitted.coef_.ravel() + fitted.intercept_, np.float64)


@pytest.mark.parametrize(("kind", "standardize"), [("offset", False), ("far", False), ("massive", "global")])
def test_logreg_on_far_float32_embeddings_fits_as_scikit_learn_does_in_float64(kind: str, standardize: Any) -> None:
    # float32 rows kept scikit-learn's lbfgs in float32: it stopped after 2 to 7 iterations, without a warning,
    # far from the optimum (offset, standardize=False: AUROC 0.53 for 0.82; massive, global: 8 iterations for 21, AUROC 2e-2 off); and uncentred columns at 300
    # coupled the intercept to every weight
    from sklearn.linear_model import LogisticRegression

    X, y = far_embedding(kind, n=4000, dim=64, seed=2)
    train = np.arange(y.size) < 3000
    head = get_head("logreg", standardize=standardize).fit(X[train], y[train])
    ref = _reference_decision(LogisticRegression(C=1.0, tol=1e-4, max_iter=200), X, y, train, standardize)  # the head's
    got = head.decision_function(X[~train])
    assert abs(roc_auc_score(y[~train], got) - roc_auc_score(y[~train], ref)) < 1e-3
    assert np.abs(got - ref).max() < 1e-2 * ref.std()


@pytest.mark.parametrize("standardize", ["global", True, False])
def test_ridge_scores_far_embeddings_as_scikit_learn_does_in_float64(standardize: Any) -> None:
    # X @ coef_ summed in float32: columns at 1e4 cancelled to 0.5% of the scores' spread (7 in 10,000 pairs reordered)
    X, y = far_embedding("far")
    train = np.arange(y.size) < 1500
    head = get_head("ridge", alpha=1.0, standardize=standardize).fit(X[train], y[train])
    ref = _reference_decision(Ridge(alpha=1.0), X, y, train, standardize)
    got = head.decision_function(X[~train]) + 0.5
    assert np.abs(got - ref).max() < 1e-4 * ref.std()


def test_linear_scores_reads_only_the_rows_asked_and_never_writes_x() -> None:
    X, _ = far_embedding("far", n=300, dim=5)
    before = X.copy()
    rows = np.array([7, 2, 250, 2])
    coef, mean, scale = np.arange(1.0, 6.0), np.full(5, 1e4, np.float32), np.full(5, 0.5, np.float32)
    got = linear_scores(X, coef, 0.25, rows=rows, mean=mean, scale=scale)
    expected = (X[rows].astype(np.float64) - 1e4) / 0.5 @ coef + 0.25
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_array_equal(linear_scores(X, coef, 0.0, rows=np.array([], np.int64)), np.zeros(0))
