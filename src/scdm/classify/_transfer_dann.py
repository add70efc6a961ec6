"""The ``dann`` head: scDEAL's domain-adaptive network as a head of the evaluation grid.

In the cross-data scenario the grid trains on all studies but one and tests on the held-out
study. This head also receives the held-out study's cells -- *without labels* -- as the target
domain, and fits the scDEAL network (:mod:`scdm.classify._transfer_model`) with
CE(training cells) + alpha * MMD(training latent, held-out latent) + beta * cluster(held-out
latent), so it is directly comparable with the plain heads on the same splits and cells. The
kept epoch is chosen on a stratified validation carve-out of the *training* cells; the held-out
labels are never seen.

The grid calls ``head.fit(X_train, y_train, target=X_test)`` for heads with
``uses_target_domain = True``; a plain ``fit(X, y)`` raises :class:`InputDataError` (the grid
records the task as skipped) rather than silently fitting without adaptation.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal

import numpy as np

from scdm.classify._transfer_data import MinMax, auto_cluster_method, cluster_cells, split_source
from scdm.classify.head_base import NONE, BaseHead, IsType, OneOf, Range
from scdm.store.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["DANNHead"]


class DANNHead(BaseHead):
    """scDEAL domain adaptation on embeddings, with the held-out cells as the unlabelled target.

    Parameters
    ----------
    alpha : float, default 1.0
        Weight of the MMD term.
    beta : float, default 0.1
        Weight of the cluster regulariser (clusters of the target cells).
    rec_weight : float, default 1.0
        Weight of the denoising reconstruction terms.
    epochs, pretrain_epochs : int, default 30 and 10
    lr : float, default 1e-3
    batch_size : int, default 256
    hidden : tuple of int, default (256,)
    latent_dim : int, default 32
    dropout : float, default 0.1
    corruption : {"mask", "gaussian"}, default "mask"
        Corruption of the denoising autoencoders' inputs: scDEAL's binomial masking noise (each
        value set to 0 with probability ``mask_rate``) or additive Gaussian noise (``noise_std``).
    mask_rate, noise_std : float, default 0.2 and 0.1
    shared_encoder : bool, default False
        One encoder for both domains (see :class:`~scdm.classify._transfer_model.TrainConfig`).
    cluster_method : {"auto", "leiden", "louvain", "kmeans"}, default "auto"
    validation_fraction : float, default 0.2
        Training cells held out to choose the kept epoch.
    seed : int, default 0
    """

    name = "dann"
    uses_target_domain: ClassVar[bool] = True
    _rules: ClassVar[dict[str, list]] = {
        "alpha": [Range(float, ge=0)], "beta": [Range(float, ge=0)], "rec_weight": [Range(float, ge=0)],
        "epochs": [Range(int, ge=1)], "pretrain_epochs": [Range(int, ge=0)], "lr": [Range(float, gt=0)],
        "batch_size": [Range(int, ge=2)], "hidden": [IsType(tuple)], "latent_dim": [Range(int, ge=1)],
        "dropout": [Range(float, ge=0, le=0.9)], "noise_std": [Range(float, ge=0)],
        "corruption": [OneOf(("mask", "gaussian"))], "mask_rate": [Range(float, ge=0, le=0.95)],
        "shared_encoder": [IsType(bool)], "cluster_method": [OneOf(("auto", "leiden", "louvain", "kmeans"))],
        "validation_fraction": [Range(float, gt=0, le=0.5)], "seed": [Range(int, ge=0)],
        "n_clusters": [Range(int, ge=2), NONE],
    }

    def __init__(self, alpha: float = 1.0, *, beta: float = 0.1, rec_weight: float = 1.0, epochs: int = 30,
                 pretrain_epochs: int = 10, lr: float = 1e-3, batch_size: int = 256, hidden: tuple[int, ...] = (256,),
                 latent_dim: int = 32, dropout: float = 0.1, corruption: Literal["mask", "gaussian"] = "mask",
                 mask_rate: float = 0.2, noise_std: float = 0.1, shared_encoder: bool = False,
                 cluster_method: Literal["auto", "leiden", "louvain", "kmeans"] = "auto",
                 n_clusters: int | None = None, validation_fraction: float = 0.2, seed: int = 0) -> None:
        self.alpha = alpha
        self.beta = beta
        self.rec_weight = rec_weight
        self.epochs = epochs
        self.pretrain_epochs = pretrain_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.hidden = hidden
        self.latent_dim = latent_dim
        self.dropout = dropout
        self.corruption = corruption
        self.mask_rate = mask_rate
        self.noise_std = noise_std
        self.shared_encoder = shared_encoder
        self.cluster_method = cluster_method
        self.n_clusters = n_clusters
        self.validation_fraction = validation_fraction
        self.seed = seed

    def revision(self) -> int:
        """2: its softmax runs in float64 (before: float32, exactly 1.0 past a logit gap of ~16.6)."""
        return 2

    def _keyed_params(self) -> dict[str, Any]:
        """The parameters, ``cluster_method="auto"`` spelled as the method it stands for here.

        ``auto`` is Leiden, Louvain or KMeans depending on the packages installed: results fitted
        with different target clusters are never one result (nor folds of one), as for the mlp's precision.
        """
        params = self.get_params()
        if params["cluster_method"] == "auto":
            params["cluster_method"] = auto_cluster_method()
        return params

    def fit(self, X: np.ndarray, y: np.ndarray, *, target: np.ndarray | None = None) -> DANNHead:
        """Fit on labelled training cells ``X, y`` and unlabelled target-domain cells ``target``.

        Parameters
        ----------
        X : ndarray of shape (n_train, emb_dim)
        y : ndarray of shape (n_train,)
        target : ndarray of shape (n_target, emb_dim)
            The cells the head will be asked to predict (their labels are never given).

        Raises
        ------
        InputDataError
            Without ``target``, or with a different number of columns than ``X``.
        """
        self._validate_params()
        X, y = self._check_fit_data(X, y)
        if target is None:
            msg = ("The dann head adapts to the cells it will predict: call fit(X, y, target=X_test). The evaluation "
                   "grid passes the held-out cells to heads with uses_target_domain=True.")
            raise InputDataError(msg)
        T = np.asarray(target)
        if T.ndim != 2 or T.shape[1] != X.shape[1] or T.shape[0] == 0:
            msg = f"target must be a non-empty (n_target, {X.shape[1]}) array; got shape {T.shape}."
            raise InputDataError(msg)
        T = self._validate_X(target, reset=False)  # finite, float, the same columns as X
        t0 = time.perf_counter()
        self._fit_adapted(X, y, T)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        msg = "The dann head needs the target-domain cells: call fit(X, y, target=X_test)."
        raise InputDataError(msg)

    def _fit_adapted(self, X: np.ndarray, y: np.ndarray, T: np.ndarray) -> None:
        from scdm.classify._transfer_model import TrainConfig, Validation, fit_transfer

        self.source_scaler_, self.target_scaler_ = MinMax.fit(X), MinMax.fit(T)
        Xs, Xt = self.source_scaler_.transform(X), self.target_scaler_.transform(T)
        train_idx, val_idx = split_source(y, self.validation_fraction, self.seed)
        val = Validation(Xs[val_idx], y[val_idx], "source") if val_idx.size else None
        self.clusters_ = cluster_cells(Xt, method=self.cluster_method, n_clusters=self.n_clusters, seed=self.seed)
        cfg = TrainConfig(alpha=float(self.alpha), beta=float(self.beta), rec_weight=float(self.rec_weight),
                          epochs=self.epochs, pretrain_epochs=self.pretrain_epochs, lr=float(self.lr),
                          batch_size=self.batch_size, hidden=tuple(self.hidden), latent_dim=self.latent_dim,
                          predictor_hidden=(16,), dropout=float(self.dropout), corruption=self.corruption,
                          mask_rate=float(self.mask_rate), noise_std=float(self.noise_std),
                          shared_encoder=self.shared_encoder, seed=self.seed)
        outcome = fit_transfer(Xs[train_idx], y[train_idx], Xt, self.clusters_.labels, cfg, validation=val)
        self.net_, self.history_, self.best_epoch_ = outcome.net, outcome.history, outcome.best_epoch
        logger.debug("dann: %d train, %d target cells, epoch %d kept", train_idx.size, Xt.shape[0], outcome.best_epoch)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scdm.classify._transfer_model import predict_target

        proba, _ = predict_target(self.net_, self.target_scaler_.transform(X))
        # Cells to predict come from the target domain: they are scaled with the target's scaler.
        return proba
