"""scDEAL transfer learning: waterfall labels, losses and their gradients, the optimiser, integrated
gradients, and the whole run from a pseudo-bulk source to a shifted single-cell target."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scdm.classify import _transfer_model as tm
from scdm.classify._transfer_dann import DANNHead
from scdm.classify._transfer_data import (
    TransferWarning,
    balance_classes,
    binarize_response,
    cluster_cells,
    waterfall_cutoff,
)
from scdm.classify.synth import synthesize
from scdm.classify.transfer import attribution_table, critical_genes, transfer, transfer_latent
from scdm.store import Store
from scdm.store.errors import InputDataError
from scdm.store.transfer import transfer_predictions, transfer_run

torch.set_num_threads(1)
# Leiden needs leidenalg/igraph; without them every run warns that it fell back to KMeans
pytestmark = pytest.mark.filterwarnings("ignore::scdm.classify._transfer_data.TransferWarning")

TARGET_STUDY = "GSE131984"  # 272 cells at scale 0.02, 16 samples, both classes
SMALL = {"hidden": (64,), "latent_dim": 16, "batch_size": 64, "pretrain_epochs": 10, "n_hvg": None}


# --------------------------------------------------------------------------------------------
# synthetic data: pseudo-bulk source, single-cell target of another study
# --------------------------------------------------------------------------------------------
def pseudo_bulk(cells: ad.AnnData, *, cells_per_profile: int = 15, seed: int = 0) -> ad.AnnData:
    """Bulk-like profiles: sums of counts of random groups of cells of one sample ("cell line")."""
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(cells.X)
    rows, labels, names = [], [], []
    for sample, idx in cells.obs.groupby("sample", observed=True).indices.items():
        idx = rng.permutation(idx)
        for k in range(0, len(idx) - cells_per_profile + 1, cells_per_profile):
            rows.append(np.asarray(X[idx[k:k + cells_per_profile]].sum(axis=0)).ravel())
            labels.append(str(cells.obs["response"].iloc[idx[0]]))
            names.append(f"{sample}_{k}")
    obs = pd.DataFrame({"drugX": labels}, index=names)
    return ad.AnnData(X=np.vstack(rows).astype(np.float32), obs=obs, var=cells.var[[]].copy())


@pytest.fixture(scope="module")
def collection() -> ad.AnnData:
    # one response program shared by all studies (study_shift=0): what the source learns applies
    # to the target, up to the domain shift (bulk vs. sparse single cells, study batch effects)
    return synthesize(0.02, n_genes=200, seed=0, study_shift=0.0, response_strength=2.0)


@pytest.fixture(scope="module")
def bulk(collection: ad.AnnData) -> ad.AnnData:
    return pseudo_bulk(collection[collection.obs["study"] != TARGET_STUDY].copy())


@pytest.fixture(scope="module")
def target_cells(collection: ad.AnnData) -> ad.AnnData:
    return collection[collection.obs["study"] == TARGET_STUDY].copy()


@pytest.fixture(scope="module")
def st(tmp_path_factory: pytest.TempPathFactory, target_cells: ad.AnnData) -> Store:
    store = Store(tmp_path_factory.mktemp("transfer") / "store")
    store.ingest(target_cells, name="target", label_key="response", study=TARGET_STUDY)
    return store


@pytest.fixture(scope="module")
def runs(st: Store, bulk: ad.AnnData) -> dict[str, object]:
    """Adapted and plain runs with Gaussian input noise in the autoencoders."""
    kw = dict(source=bulk, target="target", drug="drugX", epochs=20, alpha=10.0, beta=0.1, seed=0, corruption="gaussian",
              **SMALL)
    return {"adapted": transfer(st, adapt=True, **kw), "plain": transfer(st, adapt=False, **kw)}


@pytest.fixture(scope="module")
def masked_runs(st: Store, bulk: ad.AnnData) -> dict[str, object]:
    """The same with scDEAL's binomial masking noise (the default corruption)."""
    kw = dict(source=bulk, target="target", drug="drugX", epochs=20, alpha=10.0, beta=0.1, seed=0, **SMALL)
    return {"adapted": transfer(st, adapt=True, **kw), "plain": transfer(st, adapt=False, **kw)}


# --------------------------------------------------------------------------------------------
# waterfall
# --------------------------------------------------------------------------------------------
def test_waterfall_linear_curve_cuts_at_the_median() -> None:
    values = np.random.default_rng(0).permutation(3.0 * np.arange(11) + 2.0)
    cut = waterfall_cutoff(values, sensitive="low")
    assert cut.method == "median" and cut.r == pytest.approx(1.0)
    assert cut.cutoff == 17.0 and cut.n_sensitive == 5 and cut.n_resistant == 6


def test_waterfall_bent_curve_cuts_at_the_point_farthest_from_the_chord() -> None:
    # steep for the first 5 samples, then flat: the corner (value 40) is farthest from the chord
    values = np.array([0, 10, 20, 30, 40, *range(41, 56)], dtype=float)
    cut = waterfall_cutoff(np.random.default_rng(1).permutation(values), sensitive="low")
    assert cut.method == "knee" and cut.r < 0.95
    assert cut.cutoff == 40.0
    assert (cut.n_sensitive, cut.n_resistant) == (4, 16)  # strictly below the knee; the knee is resistant
    high = waterfall_cutoff(values, sensitive="high")  # activity area: high = sensitive
    assert high.cutoff == 40.0 and high.n_sensitive == 15
    assert waterfall_cutoff(-values).cutoff == -40.0  # the farthest point does not depend on the direction


def test_waterfall_is_unit_free() -> None:
    values = np.exp(np.linspace(0, 4, 30))
    assert waterfall_cutoff(values).cutoff * 1000 == pytest.approx(waterfall_cutoff(values * 1000).cutoff)


def test_binarize_response_kinds() -> None:
    labels, cut = binarize_response(pd.Series(["sensitive", "resistant", None, "Sensitive"]))
    assert labels.tolist() == [1, 0, -1, 1] and cut is None
    with pytest.raises(InputDataError, match="ic50"):
        binarize_response([0.3, 2.5, 7.1, 0.2])
    labels, cut = binarize_response([0.1, 0.2, 0.3, 0.4, np.nan, 0.5], kind="ic50")
    assert cut is not None and cut.method == "median" and labels.tolist() == [1, 1, 0, 0, -1, 0]
    with pytest.raises(InputDataError, match="equal"):
        waterfall_cutoff([1.0, 1.0, 1.0])


def test_class_balancing() -> None:
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], np.int8)
    _, yu = balance_classes(X, y, "upsample", seed=0)
    assert np.bincount(yu).tolist() == [8, 8]
    _, yd = balance_classes(X, y, "downsample", seed=0)
    assert np.bincount(yd).tolist() == [2, 2]
    try:
        import imblearn  # noqa: F401
    except ImportError:
        with pytest.raises(InputDataError, match="imbalanced-learn"):
            balance_classes(X, y, "smote")


# --------------------------------------------------------------------------------------------
# losses, gradients, optimiser, learning rate
# --------------------------------------------------------------------------------------------
def _tiny(shared: bool = False) -> tuple[tm.TransferNet, tm.TrainConfig, tuple[torch.Tensor, ...]]:
    cfg = tm.TrainConfig(hidden=(8,), latent_dim=4, predictor_hidden=(4,), dropout=0.0, alpha=1.0, beta=1.0,
                         shared_encoder=shared)
    torch.manual_seed(0)
    net = tm.TransferNet(6, 6, cfg)
    gen = torch.Generator().manual_seed(0)
    xs, xt = torch.rand(12, 6, generator=gen), torch.rand(12, 6, generator=gen) * 0.5 + 0.3
    ys = torch.tensor([0, 1] * 6)
    ct = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    return net, cfg, (xs, ys, xt, ct)


def _grad_norms(net: torch.nn.Module, loss: torch.Tensor) -> dict[str, float]:
    net.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    out: dict[str, float] = {}
    for part in ("source_ae.encoder", "target_ae.encoder", "source_ae.decoder", "target_ae.decoder", "predictor"):
        module = net.get_submodule(part)
        out[part] = sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
    return out


def test_each_loss_term_trains_what_it_is_meant_to() -> None:
    net, cfg, (xs, ys, xt, ct) = _tiny()
    net.train()
    parts = tm.joint_loss(net, xs, ys, xt, ct, cfg, torch.Generator().manual_seed(1))
    ce = _grad_norms(net, parts.ce)
    assert ce["source_ae.encoder"] > 0 and ce["predictor"] > 0 and ce["target_ae.encoder"] == 0
    mmd = _grad_norms(net, parts.mmd)
    assert parts.mmd.item() > 0
    assert mmd["source_ae.encoder"] > 0 and mmd["target_ae.encoder"] > 0 and mmd["predictor"] == 0
    clu = _grad_norms(net, parts.cluster)
    assert clu["target_ae.encoder"] > 0 and clu["source_ae.encoder"] == 0 and clu["predictor"] == 0
    rec = _grad_norms(net, parts.rec_source + parts.rec_target)
    assert rec["source_ae.decoder"] > 0 and rec["target_ae.decoder"] > 0
    total = _grad_norms(net, parts.total)
    assert all(v > 0 for v in total.values())


def test_shared_encoder_gets_every_term() -> None:
    net, cfg, (xs, ys, xt, ct) = _tiny(shared=True)
    net.train()
    parts = tm.joint_loss(net, xs, ys, xt, ct, cfg)
    for term in (parts.ce, parts.mmd, parts.cluster):
        assert _grad_norms(net, term)["source_ae.encoder"] > 0


def test_cluster_term_is_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    clusters = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    assert torch.autograd.gradcheck(lambda v: tm.cluster_loss(v, clusters), (z,))
    # cells of one cluster pointing the same way cost nothing
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert tm.cluster_loss(same, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.0, abs=1e-6)
    assert tm.cluster_loss(same, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(1.0)


def test_mmd_is_zero_for_identical_samples_and_grows_with_a_shift() -> None:
    z = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert tm.mmd_rbf(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert tm.mmd_rbf(z, z + 2.0).item() > tm.mmd_rbf(z, z + 0.5).item() > 0


@pytest.mark.parametrize("corruption", ["mask", "gaussian"])
def test_denoising_reconstructs_the_clean_input(corruption: str) -> None:
    net, cfg, (xs, *_) = _tiny()
    cfg = tm.TrainConfig(**{**cfg.to_dict(), "hidden": (8,), "predictor_hidden": (4,), "corruption": corruption,
                            "noise_std": 0.3, "mask_rate": 0.3})
    net.eval()
    loss = tm.dae_loss(net.source_ae, xs, cfg, torch.Generator().manual_seed(5))
    noisy = tm.corrupt(xs, cfg, torch.Generator().manual_seed(5))
    recon = net.source_ae(noisy)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(recon, xs).item())
    assert loss.item() != pytest.approx(torch.nn.functional.mse_loss(recon, noisy).item())


def test_masking_noise_zeroes_a_binomial_share_of_the_inputs() -> None:
    """scDEAL's corruption: every value independently set to 0 (the scaled minimum) with probability 0.2."""
    x = torch.rand(400, 50, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros of its own
    cfg = tm.TrainConfig()
    assert cfg.corruption == "mask" and cfg.mask_rate == 0.2
    noisy = tm.corrupt(x, cfg, torch.Generator().manual_seed(1))
    masked = noisy == 0
    assert masked.float().mean().item() == pytest.approx(0.2, abs=0.01)  # 20,000 draws: sd 0.003
    torch.testing.assert_close(noisy[~masked], x[~masked])  # the rest is untouched
    gaussian = tm.corrupt(x, tm.TrainConfig(corruption="gaussian", noise_std=0.1), torch.Generator().manual_seed(1))
    assert (gaussian != 0).all() and (gaussian - x).std().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="corruption"):
        tm.corrupt(x, tm.TrainConfig(corruption="dropout"))


def test_optimizer_holds_every_trainable_module() -> None:
    for shared in (False, True):
        net, cfg, _ = _tiny(shared)
        opt = tm.make_optimizer(net, cfg)
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        assert held == {id(p) for p in net.parameters()}
        for part in (net.source_ae, net.target_ae, net.predictor):
            assert {id(p) for p in part.parameters()} <= held


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_learning_rate_is_honoured(lr: float) -> None:
    net, cfg, (xs, ys, xt, ct) = _tiny()
    cfg = tm.TrainConfig(**{**cfg.to_dict(), "hidden": (8,), "predictor_hidden": (4,), "lr": lr})
    opt = tm.make_optimizer(net, cfg)
    assert all(group["lr"] == lr for group in opt.param_groups)
    before = [p.detach().clone() for p in net.parameters()]
    net.train()
    tm.joint_loss(net, xs, ys, xt, ct, cfg).total.backward()
    opt.step()
    # Adam's first step moves every parameter with a gradient by ~lr (m / sqrt(v) = sign(g))
    steps = torch.cat([(p.detach() - b).abs().ravel() for p, b in zip(net.parameters(), before)])
    assert steps.max().item() == pytest.approx(lr, rel=1e-3)


def test_training_uses_the_given_learning_rate() -> None:
    rng = np.random.default_rng(0)
    Xs, Xt = rng.random((40, 6)).astype(np.float32), rng.random((30, 6)).astype(np.float32)
    ys = (Xs[:, 0] > 0.5).astype(np.int64)
    moved = {}
    for lr in (1e-9, 1e-2):
        cfg = tm.TrainConfig(hidden=(8,), latent_dim=4, predictor_hidden=(4,), epochs=2, pretrain_epochs=1, lr=lr,
                             batch_size=16, seed=3)
        out = tm.fit_transfer(Xs, ys, Xt, np.zeros(30, np.int64), cfg, validation=None)
        torch.manual_seed(cfg.seed)
        init = tm.TransferNet(6, 6, cfg)
        moved[lr] = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(out.net.predictor.parameters(), init.predictor.parameters()))
    assert moved[1e-9] < 1e-6
    assert moved[1e-2] > 1e-3


# --------------------------------------------------------------------------------------------
# integrated gradients
# --------------------------------------------------------------------------------------------
def test_integrated_gradients_of_a_linear_function_are_exact() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    X = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    attr, delta = tm.integrated_gradients(lambda x: x @ w, X, baseline=np.array([0.2, 0.1, 0.0]))
    np.testing.assert_allclose(attr, (X - [0.2, 0.1, 0.0]) * w.numpy(), atol=1e-12)
    np.testing.assert_allclose(delta, 0.0, atol=1e-12)


def test_integrated_gradients_completeness_on_the_transfer_network() -> None:
    cfg = tm.TrainConfig(hidden=(16, 8), latent_dim=4, predictor_hidden=(4,))
    torch.manual_seed(0)
    net = tm.TransferNet(5, 5, cfg).double().eval()
    for p in net.parameters():  # larger weights: a strongly non-linear path
        p.data.mul_(1.5)
    X = np.random.default_rng(0).random((20, 5))
    attr, delta = tm.integrated_gradients(net.target_proba, X, n_steps=16)
    with torch.no_grad():
        gap = net.target_proba(torch.from_numpy(X)).numpy() - net.target_proba(torch.zeros(1, 5, dtype=torch.float64)).numpy()
    assert np.abs(gap).max() > 0.05
    np.testing.assert_allclose(attr.sum(axis=1), gap, rtol=0, atol=1e-9)
    assert np.abs(delta).max() < 1e-9


def test_integrated_gradients_refine_a_relu_network_until_complete() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).double()
    X = np.random.default_rng(0).random((5, 5)) * 3
    f = lambda x: net(x).squeeze(1)
    attr, _ = tm.integrated_gradients(f, X, n_steps=8, rtol=1e-2, atol=1e-3, max_steps=512)
    with torch.no_grad():
        gap = f(torch.from_numpy(X)).numpy() - f(torch.zeros(1, 5, dtype=torch.float64)).numpy()
    assert (np.abs(attr.sum(axis=1) - gap) <= 1e-3 + 1e-2 * np.abs(gap)).all()


# --------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------
def test_transfer_beats_the_same_predictor_without_adaptation(runs: dict[str, object]) -> None:
    adapted, plain = runs["adapted"], runs["plain"]
    # Without adaptation the bulk-trained predictor is miscalibrated on sparse single cells (it
    # calls most cells sensitive); aligning the latent spaces fixes that. Margins hold for seeds 0-2.
    assert plain.label.mean() > 0.7 and abs(adapted.label.mean() - 0.5) < 0.15
    assert adapted.metrics["accuracy"] >= plain.metrics["accuracy"] + 0.04
    assert adapted.metrics["mcc"] > plain.metrics["mcc"]
    assert adapted.adapt and not plain.adapt
    assert adapted.selection == "source_val" and 0 <= adapted.selected_epoch < 20


def test_adaptation_also_helps_with_masking_noise(masked_runs: dict[str, object]) -> None:
    # Masked inputs teach the source autoencoder about zeros, so the plain predictor is less
    # miscalibrated on sparse cells than with Gaussian noise; adaptation still calibrates it and
    # is more accurate (seeds 0-2: +0.03, +0.05, +0.11 accuracy).
    adapted, plain = masked_runs["adapted"], masked_runs["plain"]
    assert abs(adapted.label.mean() - 0.5) < abs(plain.label.mean() - 0.5)
    assert adapted.metrics["accuracy"] >= plain.metrics["accuracy"] + 0.02


def test_run_is_recorded_in_the_catalog(st: Store, masked_runs: dict[str, object], target_cells: ad.AnnData) -> None:
    res = masked_runs["adapted"]
    row = st.query("SELECT * FROM transfer_runs WHERE run_id = ?", [res.run_id]).iloc[0]
    assert row["status"] == "complete" and row["drug"] == "drugX" and row["source_kind"] == "bulk-anndata"
    config = json.loads(row["config"])
    assert config["alpha"] == 10.0 and config["lr"] == 1e-3 and config["epochs"] == 20
    assert config["corruption"] == "mask" and config["mask_rate"] == 0.2
    record = transfer_run(st, res.run_id, complete=True)
    assert record.status == "complete" and record.selected_epoch == res.selected_epoch and record.n_features == 200
    preds = st.query("SELECT * FROM transfer_predictions WHERE run_id = ? ORDER BY row", [res.run_id])
    assert len(preds) == target_cells.n_obs
    np.testing.assert_allclose(preds["proba"], res.proba, atol=1e-6)
    metrics = st.query("SELECT metric, value FROM transfer_metrics WHERE run_id = ?", [res.run_id])
    assert dict(zip(metrics["metric"], metrics["value"]))["accuracy"] == pytest.approx(res.metrics["accuracy"])
    stages = set(st.query("SELECT DISTINCT stage FROM transfer_history WHERE run_id = ?", [res.run_id])["stage"])
    assert {"pretrain_source_ae", "pretrain_predictor", "joint"} <= stages
    joint = st.query("SELECT * FROM transfer_history WHERE run_id = ? AND stage = 'joint'", [res.run_id])
    assert (joint["mmd"] > 0).all() and joint["cluster"].notna().all() and joint["val_ce"].notna().all()
    assert len(st.query("SELECT * FROM transfer_features WHERE run_id = ?", [res.run_id])) == res.n_features
    latent = transfer_latent(st, res.run_id)
    assert latent["target"].shape == (target_cells.n_obs, 16) and latent["source"].shape[0] == res.n_source


def test_no_choice_reads_target_labels(st: Store, bulk: ad.AnnData, target_cells: ad.AnnData) -> None:
    shuffled = target_cells.copy()
    shuffled.obs_names = [f"{c}-copy" for c in shuffled.obs_names]  # a new dataset with the same matrix
    shuffled.obs["response"] = np.random.default_rng(0).permutation(shuffled.obs["response"].to_numpy())
    st.ingest(shuffled, name="target_shuffled", label_key="response", study=TARGET_STUDY)
    kw = dict(source=bulk, drug="drugX", epochs=3, alpha=1.0, beta=0.1, seed=4, **{**SMALL, "pretrain_epochs": 2})
    a = transfer(st, target="target", **kw)
    b = transfer(st, target="target_shuffled", **kw)
    np.testing.assert_array_equal(a.proba, b.proba)
    assert a.selected_epoch == b.selected_epoch and a.metrics != b.metrics


def test_stored_labels_and_metrics_follow_the_stored_probabilities(st: Store, bulk: ad.AnnData, monkeypatch) -> None:
    """A float64 probability a hair under the threshold (0.5 - 1e-9) was stored as REAL 0.5 while the label and the
    metrics came from the float64 value; it is stored as it is now (DOUBLE), and label, probability and metrics agree."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    real = tm.predict_target

    def near_threshold(net, X, **kw):
        proba, latent = real(net, X, **kw)
        proba = proba.copy()
        proba[::3] = 0.5 - 1e-9  # below 0.5 in float64, exactly 0.5 in float32
        return proba, latent

    monkeypatch.setattr(tm, "predict_target", near_threshold)  # transfer imports it when it runs
    res = transfer(st, source=bulk, target="target", drug="drugX", epochs=2, alpha=1.0, beta=0.1, seed=4,
                   **{**SMALL, "pretrain_epochs": 1})
    preds = st.query('SELECT "row", proba, label FROM transfer_predictions WHERE run_id = ? ORDER BY "row"', [res.run_id])
    stored = preds["proba"].to_numpy(np.float64)
    assert (stored[::3] == 0.5 - 1e-9).all() and (preds["label"].to_numpy()[::3] == 0).all()  # REAL made it 0.5
    np.testing.assert_array_equal(preds["label"].to_numpy(), (stored >= 0.5).astype(np.int8))
    np.testing.assert_array_equal(res.label, preds["label"].to_numpy())
    rows, y, metrics = _target_truth_and_metrics(st, res.run_id)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, stored[rows] >= 0.5), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(y, stored[rows] >= 0.5), abs=1e-12)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(y, stored[rows]), abs=1e-12)


class _Overconfident(torch.nn.Module):
    """A fitted predictor made overconfident: logits (0, 26 + 9 tanh(d / 4)) for its own logit gap d, so every
    target cell's gap is in (17, 35): past float32's last probability below 1 (~16.6), within float64's (~36.7)."""

    def __init__(self, fitted: torch.nn.Module, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.fitted, self.seen = fitted, seen

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.fitted(z)
        gap = 26.0 + 9.0 * torch.tanh((d[:, 1] - d[:, 0]) / 4.0)
        logits = torch.stack([torch.zeros_like(gap), gap], dim=1)
        self.seen.append(logits.detach().clone())
        return logits


def test_an_overconfident_transfer_is_stored_and_scored_on_its_float64_probabilities(st: Store, bulk: ad.AnnData,
                                                                                     monkeypatch) -> None:
    """Target logit gaps past ~16.6 had a float32 softmax of exactly 1.0, stored as REAL: every cell tied, the
    stored target AUROC was 0.5 and every label sensitive at any threshold below 1."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    real, seen = tm.fit_transfer, []

    def overconfident(*args, **kw):
        outcome = real(*args, **kw)
        outcome.net.predictor = _Overconfident(outcome.net.predictor, seen)  # after the fit: only prediction sees it
        return outcome

    monkeypatch.setattr(tm, "fit_transfer", overconfident)  # transfer imports it when it runs
    threshold = 1.0 / (1.0 + np.exp(-26.0))  # gap 26: about half the cells on either side; 1.0 in float32
    res = transfer(st, source=bulk, target="target", drug="drugX", epochs=2, alpha=1.0, beta=0.1, seed=4,
                   threshold=threshold, **{**SMALL, "pretrain_epochs": 1})
    logits = torch.cat(seen).double()
    proba64 = torch.softmax(logits, dim=1)[:, 1].numpy()
    assert (proba64.astype(np.float32) == 1.0).all()  # what float32 made of every cell
    preds = st.query('SELECT "row", proba, label FROM transfer_predictions WHERE run_id = ? ORDER BY "row"', [res.run_id])
    stored = preds["proba"].to_numpy()
    assert preds["proba"].dtype == np.float64
    np.testing.assert_array_equal(stored, proba64)  # exactly: no rounding on the way
    np.testing.assert_array_equal(res.proba, stored)
    np.testing.assert_array_equal(transfer_predictions(st, res.run_id)["proba"].to_numpy(), stored)
    labels = preds["label"].to_numpy()
    np.testing.assert_array_equal(labels, (stored >= threshold).astype(np.int8))  # the stored rule, exactly
    assert 0 < labels.sum() < len(labels)
    rows, y, metrics = _target_truth_and_metrics(st, res.run_id)
    auroc = roc_auc_score(y, stored[rows])
    assert metrics["auroc"] == pytest.approx(auroc, abs=1e-12) and abs(auroc - 0.5) > 0.01  # REAL: 0.5 (all tied)
    # near 1, float64 keeps gaps ~2e-5 apart (float32 logits are ~2e-6 apart at 26): a few cells tie in the stored
    # probability where their gaps differ, which moves the AUROC by ~1e-4 (the machine's BLAS decides which)
    assert auroc == pytest.approx(roc_auc_score(y, (logits[:, 1] - logits[:, 0]).numpy()[rows]), abs=2e-3)
    assert metrics["ap"] == pytest.approx(average_precision_score(y, stored[rows]), abs=1e-12)


def test_hyper_parameter_grids_need_a_target_validation_set(st: Store, bulk: ad.AnnData) -> None:
    with pytest.raises(InputDataError, match="target-validation"):
        transfer(st, source=bulk, target="target", drug="drugX", alpha=[0.1, 1.0])
    with pytest.raises(InputDataError, match="other than the target"):
        transfer(st, source=bulk, target="target", drug="drugX", validation="target")


# --------------------------------------------------------------------------------------------
# label sets
# --------------------------------------------------------------------------------------------
FAST = {**SMALL, "epochs": 2, "pretrain_epochs": 1, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def two_drugs(tmp_path_factory: pytest.TempPathFactory, collection: ad.AnnData) -> Store:
    """Source and target datasets with two label sets each: drugA (the default) and drugB (other labels)."""
    store = Store(tmp_path_factory.mktemp("two_drugs") / "store")
    for name, study in (("src", "GSE164897"), ("tgt", TARGET_STUDY)):
        cells = collection[collection.obs["study"] == study].copy()
        cells.obs["drugB"] = np.random.default_rng(1).permutation(cells.obs["response"].astype(str).to_numpy())
        store.ingest(cells, name=name, label_key="response", drug="drugA", study=study, sample_key="sample")
        store.ingest(cells, label_key="drugB", drug="drugB")
    return store


def _target_truth_and_metrics(st: Store, run_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The labelled rows of dataset 'target', their labels, and the run's stored target metrics."""
    cells = st.cells("target")
    y = cells["response"].to_numpy(np.float64)
    metrics = dict(st.query("SELECT metric, value FROM transfer_metrics WHERE run_id = ?", [run_id])
                   .itertuples(index=False, name=None))
    return cells["row"].to_numpy()[~np.isnan(y)], y[~np.isnan(y)].astype(int), metrics


def _labelled(st: Store, name: str, label_set: str) -> tuple[np.ndarray, np.ndarray]:
    cells = st.cells(name, label_set=label_set)
    known = cells["response"].notna().to_numpy()
    return cells["row"].to_numpy(np.int64)[known], cells["response"].to_numpy(np.float64)[known].astype(np.int8)


def test_transfer_trains_and_scores_on_the_label_sets_of_its_drug(two_drugs: Store) -> None:
    from sklearn.metrics import roc_auc_score

    st = two_drugs
    res = transfer(st, source="src", target="tgt", drug="drugB", **FAST)
    assert (res.drug, res.source_label_set, res.target_label_set, res.validation_label_set) == ("drugB", "drugB", "drugB", None)
    rows_b, y_b = _labelled(st, "tgt", "drugB")
    rows_a, y_a = _labelled(st, "tgt", "drugA")
    assert res.metrics["auroc"] == pytest.approx(roc_auc_score(y_b, res.proba[rows_b]))
    assert res.metrics["auroc"] != pytest.approx(roc_auc_score(y_a, res.proba[rows_a]))  # not the default's
    _, source_b = _labelled(st, "src", "drugB")
    trained_on = transfer_latent(st, res.run_id)["source_y"]
    np.testing.assert_array_equal(trained_on, source_b)
    assert (trained_on != _labelled(st, "src", "drugA")[1]).any()
    run = transfer_run(st, res.run_id, complete=True)
    assert (run.drug, run.source_label_set, run.target_label_set, run.validation_label_set) == ("drugB", "drugB", "drugB", None)
    assert [ls["label_set"] for ls in run.source["label_sets"]] == ["drugB"]
    assert run.config["label_sets"]["target"]["chosen_by"] == "drug"
    row = st.query("SELECT source_label_set, target_label_set FROM transfer_runs WHERE run_id = ?", [res.run_id])
    assert row.iloc[0].tolist() == ["drugB", "drugB"]


def test_named_label_sets_are_read_and_give_the_run_its_drug(two_drugs: Store) -> None:
    res = transfer(two_drugs, source="src", target="tgt", source_label_set="drugB", target_label_set="drugB", **FAST)
    assert (res.drug, res.source_label_set, res.target_label_set) == ("drugB", "drugB", "drugB")
    run = transfer_run(two_drugs, res.run_id)
    assert run.drug == "drugB" and run.config["label_sets"]["source"][0]["chosen_by"] == "given"
    default = transfer(two_drugs, source="src", target="tgt", **FAST)  # no drug, no names: each default
    assert (default.drug, default.source_label_set, default.target_label_set) == ("drugA", "drugA", "drugA")


def test_a_bulk_response_csv_of_one_drug_gives_the_run_its_drug(two_drugs: Store, bulk: ad.AnnData,
                                                                 tmp_path: Path) -> None:
    """A response CSV whose one column is drugB, without drug=...: the run trained on drugB's responses but recorded no
    drug and scored its predictions against the target's default label set, drugA's: AUROC 0.606 stored, where
    drugB's labels of those cells give 0.503."""
    from sklearn.metrics import roc_auc_score

    expr, resp = tmp_path / "expr.csv", tmp_path / "responses.csv"
    pd.DataFrame(np.asarray(bulk.X), index=bulk.obs_names, columns=bulk.var_names).to_csv(expr)
    pd.DataFrame({"drugB": bulk.obs["drugX"]}, index=bulk.obs_names).to_csv(resp)
    res = transfer(two_drugs, source=(str(expr), str(resp)), target="tgt", **FAST)
    assert (res.drug, res.target_label_set) == ("drugB", "drugB")
    run = transfer_run(two_drugs, res.run_id, complete=True)
    assert (run.drug, run.target_label_set, run.source["drug"]) == ("drugB", "drugB", "drugB")
    rows_b, y_b = _labelled(two_drugs, "tgt", "drugB")
    assert res.metrics["auroc"] == pytest.approx(roc_auc_score(y_b, res.proba[rows_b]))


def test_a_bulk_source_of_no_named_drug_warns_which_drug_it_is_scored_against(two_drugs: Store,
                                                                            bulk: ad.AnnData) -> None:
    """A bulk AnnData with obs['response'] and no drug: the target's default label set (drugA's, of its two drugs) was
    scored against without a word, whichever drug the bulk responses were to."""
    unnamed = bulk.copy()
    unnamed.obs = unnamed.obs.rename(columns={"drugX": "response"})
    with pytest.warns(TransferWarning, match=r"bulk source names no drug .*target 'tgt': label set 'drugA', drug drugA "
                                             r"\(its default label set\), as if the bulk responses were to drugA"):
        res = transfer(two_drugs, source=unnamed, target="tgt", **FAST)
    assert res.target_label_set == "drugA"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The bulk source names no drug", TransferWarning)
        transfer(two_drugs, source=unnamed, target="tgt", target_label_set="drugB", **FAST)  # named: no warning


def test_label_sets_of_another_drug_are_refused(two_drugs: Store, bulk: ad.AnnData) -> None:
    st = two_drugs
    with pytest.raises(InputDataError, match=r"drug='drugC' contradicts.*source 'src'.*no label set of drugC"):
        transfer(st, source="src", target="tgt", drug="drugC", **FAST)
    with pytest.raises(InputDataError, match=r"drug='drugA' contradicts.*target 'tgt': label set 'drugB'.*\(named\)"):
        transfer(st, source="src", target="tgt", drug="drugA", target_label_set="drugB", **FAST)
    with pytest.raises(InputDataError, match="different drugs.*source 'src'.*drugB.*target 'tgt'.*drugA"):
        transfer(st, source="src", target="tgt", source_label_set="drugB", **FAST)
    with pytest.raises(InputDataError, match="no label set 'drugZ'.*--target-label-set"):
        transfer(st, source="src", target="tgt", target_label_set="drugZ", **FAST)
    with pytest.raises(InputDataError, match="bulk source has no label sets"):
        transfer(st, source=bulk, target="tgt", drug="drugA", source_label_set="drugA", **FAST)
    assert st.query("SELECT count(*) AS n FROM transfer_runs WHERE status <> 'complete'")["n"].iloc[0] == 0


def test_a_source_dataset_is_refused_as_validation(two_drugs: Store) -> None:
    with pytest.raises(InputDataError, match="validation='src' is one of the source datasets.*neither a source nor"):
        transfer(two_drugs, source="src", target="tgt", validation="src", alpha=[0.1, 10.0], **FAST)
    with pytest.raises(InputDataError, match="one of the source datasets"):
        transfer(two_drugs, source=["src"], target="tgt", validation="src", **FAST)


def test_scdm_transfer_takes_and_prints_the_label_sets(two_drugs: Store) -> None:
    from click.testing import CliRunner

    from scdm.cli import main

    base = ["--store", str(two_drugs.root), "transfer", "--source", "src", "--target", "tgt", "--epochs", "1",
            "--pretrain-epochs", "1", "--n-hvg", "0", "--batch-size", "64", "--param", "hidden=[16]", "--param", "latent_dim=4"]
    out = CliRunner().invoke(main, [*base, "--source-label-set", "drugB", "--target-label-set", "drugB"])
    assert out.exit_code == 0, out.output
    assert "drug drugB; source labels: drugB; target labels: drugB" in out.output
    # the target's metrics are transductive (its cells were the unlabelled target domain): said under them
    assert "note: transductive metrics: the scored target cells were training's unlabelled target domain" in out.output
    refused = CliRunner().invoke(main, [*base, "--validation", "src"])
    assert refused.exit_code != 0 and "one of the source datasets" in refused.output


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, ad.AnnData, object]:
    """Deeper cells (10,000 UMI) and a stronger program: the planted genes are expressed enough to matter."""
    cells = synthesize(0.02, n_genes=200, seed=0, study_shift=0.0, response_strength=3.0, sample_sd=0.3,
                       library_median=10000.0)
    target = cells[cells.obs["study"] == TARGET_STUDY].copy()
    store = Store(tmp_path_factory.mktemp("deep") / "store")
    store.ingest(target, name="target", label_key="response", study=TARGET_STUDY)
    res = transfer(store, source=pseudo_bulk(cells[cells.obs["study"] != TARGET_STUDY].copy()), target="target",
                   drug="drugX", epochs=20, alpha=10.0, beta=0.1, seed=0, **SMALL)
    return store, target, res


def test_a_grid_is_chosen_on_the_target_validation_set(st: Store, bulk: ad.AnnData, collection: ad.AnnData) -> None:
    other = collection[collection.obs["study"] == "GSE108397"].copy()
    st.ingest(other, name="validation_study", label_key="response", study="GSE108397")
    res = transfer(st, source=bulk, target="target", drug="drugX", validation="validation_study", alpha=[0.1, 5.0],
                   beta=[0.1], epochs=2, seed=0, **{**SMALL, "pretrain_epochs": 1})
    config = json.loads(st.query("SELECT config FROM transfer_runs WHERE run_id = ?", [res.run_id])["config"].iloc[0])
    scores = {g["alpha"]: g["val_ce"] for g in config["grid"]}
    assert set(scores) == {0.1, 5.0} and res.alpha == min(scores, key=scores.get)
    assert res.selection == "target_val" and res.val_score == pytest.approx(scores[res.alpha])


def test_critical_genes_recover_the_planted_program(deep: tuple[Store, ad.AnnData, object]) -> None:
    st, target_cells, res = deep
    table = critical_genes(st, res.run_id, max_cells=None, n_steps=32)
    assert table.attrs["max_completeness_gap"] < 1e-3
    assert Path(table.attrs["plot"]).exists()
    planted = set(target_cells.var_names[target_cells.var["response_program"] != 0])
    top = list(table["gene"].head(10))
    assert len(planted & set(top)) >= 3  # 10 planted of 200 genes: chance would put 0.5 in the top 10
    stored = st.query("SELECT * FROM critical_genes WHERE run_id = ? ORDER BY rank", [res.run_id])
    assert list(stored["gene"].head(10)) == top and stored["critical"].sum() == table["critical"].sum()


def test_critical_genes_profiles_store_signed_means_and_their_settings(deep: tuple[Store, ad.AnnData, object]) -> None:
    st, _, res = deep
    default = critical_genes(st, res.run_id, max_cells=120, n_steps=16, plot=False)
    params = default.attrs["params"]
    assert params["correction"] == "bh" and params["use_abs"] is False and params["pseudocount_value"] > 0
    # signed means keep the direction: some genes push cells towards "resistant" on average
    assert (default["mean_sensitive"] < 0).any() and (default["mean_sensitive"] > 0).any()
    np.testing.assert_array_less(np.abs(default["mean_sensitive"]) - 1e-12, default["mean_abs_sensitive"])
    assert default["log2fc"].abs().max() < 10  # the pseudocount bounds it (no log2(x / 1e-12) ~ 30)
    assert default["effect_size"].between(-1, 1).all()
    paper = critical_genes(st, res.run_id, profile="paper", max_cells=120, n_steps=16, plot=False)
    assert paper.attrs["params"]["correction"] == "bonferroni" and paper.attrs["params"]["use_abs"] is True
    np.testing.assert_allclose(paper["pvalue_adj"], np.minimum(paper["pvalue"] * len(paper), 1.0))
    stored = st.query("SELECT * FROM critical_genes WHERE run_id = ? ORDER BY rank", [res.run_id])
    assert len(stored) == len(paper) and json.loads(stored["params"].iloc[0])["profile"] == "paper"  # replaced
    for column in ("mean_abs_sensitive", "effect_size", "cohens_d", "detect_sensitive", "detect_resistant"):
        np.testing.assert_allclose(stored[column].to_numpy(float), paper[column].to_numpy(float), equal_nan=True)
    with pytest.raises(InputDataError, match="correction"):
        critical_genes(st, res.run_id, correction="holm", plot=False)
    with pytest.raises(InputDataError, match=r"fdr=5: pass a fraction in \(0, 1\]"):
        critical_genes(st, res.run_id, fdr=5, plot=False)  # 5 meant as 5 %: every gene with an effect critical
    with pytest.raises(InputDataError, match=r"min_pts=20: pass a share of cells"):
        critical_genes(st, res.run_id, min_pts=20, plot=False)


def test_attribution_table_on_known_attributions() -> None:
    rng = np.random.default_rng(0)
    n = 60
    labels = np.r_[np.ones(n, np.int8), np.zeros(n, np.int8)]
    attr = np.zeros((2 * n, 4))
    attr[:n, 0] = rng.uniform(0.4, 0.6, n)                   # present in sensitive cells only
    attr[:n, 1], attr[n:, 1] = 0.5, -0.5                     # same size, opposite sign
    attr[:, 2] = rng.normal(0, 0.1, 2 * n)                   # noise
    attr[:n, 3], attr[n:, 3] = rng.uniform(0.1, 0.2, n), rng.uniform(0.3, 0.4, n)  # larger in resistant cells
    signed = attribution_table(attr, labels, ["only_s", "flip", "noise", "res"], pseudocount=0.1)
    by = signed.set_index("gene")
    c = 0.1 * np.abs(attr).mean()
    assert signed.attrs["pseudocount_value"] == pytest.approx(c)
    assert by.loc["only_s", "log2fc"] == pytest.approx(np.log2((attr[:n, 0].mean() + c) / c))
    assert by.loc["only_s", "direction"] == "sensitive" and by.loc["res", "direction"] == "resistant"
    assert by.loc["only_s", "effect_size"] == pytest.approx(1.0) and by.loc["res", "effect_size"] == pytest.approx(-1.0)
    assert by.loc["only_s", "pts_resistant"] == 0 and by.loc["only_s", "pts_sensitive"] == 1
    assert by.loc["flip", "mean_sensitive"] == 0.5 and by.loc["flip", "mean_resistant"] == -0.5
    assert by.loc["flip", "pvalue_adj"] < 1e-10 and by.loc["flip", "effect_size"] == pytest.approx(1.0)
    assert by.loc["noise", "pvalue_adj"] > 0.05
    # a pooled-sd difference: gene "res" differs by about 0.2 with sd about 0.029
    d = (attr[:n, 3].mean() - attr[n:, 3].mean()) / np.sqrt((attr[:n, 3].var(ddof=1) + attr[n:, 3].var(ddof=1)) / 2)
    assert by.loc["res", "cohens_d"] == pytest.approx(d)
    # on absolute values the sign flip is invisible: the gene that changes sign is not found
    absolute = attribution_table(attr, labels, ["only_s", "flip", "noise", "res"], use_abs=True, correction="bonferroni")
    assert absolute.set_index("gene").loc["flip", "pvalue"] == pytest.approx(1.0)
    np.testing.assert_allclose(absolute["pvalue_adj"], np.minimum(absolute["pvalue"] * 4, 1.0))
    from scipy.stats import false_discovery_control

    np.testing.assert_allclose(signed["pvalue_adj"], false_discovery_control(signed["pvalue"], method="bh"))


def test_bulk_csv_with_ic50_is_binarised_by_the_waterfall(st: Store, bulk: ad.AnnData, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sensitive = (bulk.obs["drugX"] == "sensitive").to_numpy()
    # two well separated modes: a step-shaped waterfall (r < 0.95), cut at its edge
    ic50 = np.where(sensitive, rng.normal(0.0, 0.2, sensitive.size), rng.normal(10.0, 0.2, sensitive.size))
    expr, resp = tmp_path / "expr.csv", tmp_path / "ic50.csv"
    pd.DataFrame(np.asarray(bulk.X), index=bulk.obs_names, columns=bulk.var_names).to_csv(expr)
    pd.DataFrame({"drugX": ic50, "other": 1.0}, index=bulk.obs_names).to_csv(resp)
    res = transfer(st, source=(str(expr), str(resp)), target="target", drug="drugX", response="ic50", epochs=2,
                   seed=0, **{**SMALL, "pretrain_epochs": 1})
    assert res.waterfall is not None and res.waterfall.method == "knee"
    # the knee falls at the edge of the step: the two IC50 modes are split up to a few tail points
    assert abs(res.waterfall.n_sensitive - int(sensitive.sum())) <= 0.03 * sensitive.size
    row = st.query("SELECT source_kind, waterfall FROM transfer_runs WHERE run_id = ?", [res.run_id]).iloc[0]
    assert row["source_kind"] == "bulk-csv" and json.loads(row["waterfall"])["method"] == "knee"


def test_a_bulk_source_is_recorded_by_the_hash_of_its_content_and_labels(st: Store, bulk: ad.AnnData,
                                                                        tmp_path: Path) -> None:
    """A bulk source was recorded by its path only (an in-memory AnnData: path None): runs on different expression or
    labels had the same source record, and a CSV changed since a run could not be told from the one it read."""
    changed = bulk.copy()
    x = np.asarray(changed.X).copy()
    x[0, 0] += 1
    changed.X = x
    relabelled = bulk.copy()
    relabelled.obs["drugX"] = np.roll(bulk.obs["drugX"].to_numpy(), 1)
    expr, resp = tmp_path / "expr.csv", tmp_path / "responses.csv"
    pd.DataFrame(np.asarray(bulk.X), index=bulk.obs_names, columns=bulk.var_names).to_csv(expr)
    pd.DataFrame({"drugX": bulk.obs["drugX"]}, index=bulk.obs_names).to_csv(resp)
    recorded = {}
    for name, source in (("bulk", bulk), ("changed", changed), ("relabelled", relabelled), ("csv", (str(expr), str(resp)))):
        run = transfer_run(st, transfer(st, source=source, target="target", drug="drugX", **FAST).run_id)
        recorded[name] = (run.source["content_hash"], run.source["labels_hash"])
    assert recorded["changed"][0] != recorded["bulk"][0] and recorded["changed"][1] == recorded["bulk"][1]
    assert recorded["relabelled"][0] == recorded["bulk"][0] and recorded["relabelled"][1] != recorded["bulk"][1]
    assert recorded["csv"] == recorded["bulk"]  # the same values, read from another format


def test_transfer_on_cached_embeddings(tmp_path: Path, collection: ad.AnnData) -> None:
    store = Store(tmp_path / "store")
    studies = ["GSE164897", TARGET_STUDY]
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(200, 12)).astype(np.float32)
    ids = {}
    for study in studies:
        cells = collection[collection.obs["study"] == study].copy()
        store.ingest(cells, name=study, label_key="response", study=study)
        X = np.log1p(np.asarray(sp.csr_matrix(cells.X).todense()))
        emb = store.create_embedding(study, model="toy", params={"projection": 0}, dim=12)
        values = (X @ projection).astype(np.float32)
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            emb.write_chunk(chunk, values[lo:hi])
        emb.finalize()
        ids[study] = emb.embedding_id
    res = transfer(store, source="GSE164897", target=TARGET_STUDY, features=ids[TARGET_STUDY], epochs=3, seed=0,
                   **{**SMALL, "pretrain_epochs": 2})
    assert res.n_features == 12 and res.proba.shape == (int((collection.obs["study"] == TARGET_STUDY).sum()),)
    row = store.query("SELECT features, source_features FROM transfer_runs WHERE run_id = ?", [res.run_id]).iloc[0]
    assert row["features"] == ids[TARGET_STUDY] and json.loads(row["source_features"]) == [ids["GSE164897"]]
    with pytest.raises(InputDataError, match="embedding features"):
        critical_genes(store, res.run_id)
    with pytest.raises(InputDataError, match="also a source"):
        transfer(store, source=TARGET_STUDY, target=TARGET_STUDY, epochs=1)


# --------------------------------------------------------------------------------------------
# the cross-data dann head and clusters
# --------------------------------------------------------------------------------------------
def test_dann_head_adapts_to_the_held_out_cells() -> None:
    rng = np.random.default_rng(0)
    y_s, y_t = rng.integers(0, 2, 300), rng.integers(0, 2, 200)
    signal = np.array([1.5, -1.5, 0, 0, 0, 0])
    X_s = rng.normal(size=(300, 6)) + y_s[:, None] * signal
    # the held-out study: rescaled, shifted and with an extra noise direction
    X_t = (rng.normal(size=(200, 6)) + y_t[:, None] * signal) * 0.5 + np.array([3, 1, 0, 0, -2, 0])
    head = DANNHead(epochs=15, pretrain_epochs=5, lr=3e-3, hidden=(16,), latent_dim=4, batch_size=64,
                    cluster_method="kmeans", n_clusters=3)
    with pytest.raises(InputDataError, match="target="):
        head.fit(X_s, y_s)
    proba = head.fit(X_s, y_s, target=X_t).proba_sensitive(X_t)
    assert proba.shape == (200,) and ((0 <= proba) & (proba <= 1)).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y_t, proba) > 0.7
    assert head.get_params()["alpha"] == 1.0 and head.best_epoch_ >= 0


def test_cluster_fallback_is_recorded() -> None:
    X = np.vstack([np.random.default_rng(0).normal(m, 0.1, size=(30, 5)) for m in (0.0, 3.0, 6.0)])
    clusters = cluster_cells(X, method="kmeans", seed=0)
    assert clusters.method == "kmeans" and clusters.n_clusters == 3 and "silhouette" in clusters.note
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        with pytest.warns(TransferWarning, match="leidenalg"):
            assert cluster_cells(X, method="auto", seed=0).method in ("kmeans", "louvain")
        with pytest.raises(InputDataError, match="not installed"):
            cluster_cells(X, method="leiden")
    else:
        assert cluster_cells(X, method="auto", seed=0).method == "leiden"


def test_a_source_holding_the_target_cells_is_named(collection: ad.AnnData, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The target's cells ingested again under another name and used as source: trained on with labels, warned."""
    from scdm.classify.transfer import shared_cells

    st = Store(tmp_path / "store")
    cells = collection[collection.obs["study"] == TARGET_STUDY].copy()
    st.ingest(cells, name="tgt", label_key="response", study=TARGET_STUDY, sample_key="sample")
    st.ingest(cells[: cells.n_obs // 2].copy(), name="copy", label_key="response", study="copy", sample_key="sample")
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        transfer(st, source="copy", target="tgt", **FAST)
    assert f"{cells.n_obs // 2} of the {cells.n_obs} target cells have the features (or the cell id and expression values) of a labelled source" in caplog.text
    st.ingest(collection[collection.obs["study"] == "GSE164897"].copy(), name="other", label_key="response",
              study="GSE164897", sample_key="sample")
    caplog.clear()
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        transfer(st, source="other", target="tgt", validation="copy", **FAST)
    assert "(or the cell id and expression values) of a cell of the validation dataset" in caplog.text
    X = np.arange(12.0).reshape(4, 3)
    assert shared_cells(X[:2], X) == 2 and shared_cells(X[:2], X[2:]) == 0


def test_a_source_holding_the_target_cells_at_other_rows_is_named_on_a_row_seeded_embedding(
        collection: ad.AnnData, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On UCE embeddings (each cell's genes drawn with a seed of its row) half the target's cells ingested again in
    reverse order as the source had no identical vector, and the run trained on them without a word."""
    from scdm.embedding.models.uce import write_tiny_checkpoint
    from scdm.embedding.runner import embed

    st = Store(tmp_path / "store")
    cells = collection[collection.obs["study"] == TARGET_STUDY].copy()
    half = cells.n_obs // 2
    st.ingest(cells, name="tgt", label_key="response", study=TARGET_STUDY, sample_key="sample")
    st.ingest(cells[np.arange(half - 1, -1, -1)].copy(), name="copy", label_key="response", study="copy",
              sample_key="sample")
    checkpoint = write_tiny_checkpoint(tmp_path / "uce", genes=list(cells.var_names), seed=4)
    ids = {name: embed(st, name, "uce", checkpoint, device="cpu", progress=False, sample_size=16,
                       allow_empty_cells=True).embedding_id for name in ("tgt", "copy")}
    target, source = st.read_embedding(ids["tgt"]), st.read_embedding(ids["copy"])
    assert not (target[:half][::-1] == source).all(axis=1).any()  # no copy has its original's vector
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        transfer(st, source="copy", target="tgt", features=ids["tgt"], **FAST)
    assert (f"{half} of the {cells.n_obs} target cells have the features (or the cell id and expression values) of a "
            "labelled source cell") in caplog.text


def test_bulk_csvs_that_cannot_be_matched_by_sample_are_refused(tmp_path: Path) -> None:
    from scdm.classify._transfer_data import read_bulk

    rng = np.random.default_rng(0)
    lines = [f"CL{i}" for i in range(12)]
    expr, resp = tmp_path / "expr.csv", tmp_path / "auc.csv"
    pd.DataFrame({"drugX": rng.random(12)}, index=lines).to_csv(resp)
    table = pd.DataFrame(rng.random((12, 5)), index=lines, columns=list("ABCDE"))
    pd.concat([table, table.iloc[:2]]).to_csv(expr)  # two cell lines twice: was an IndexError
    with pytest.raises(InputDataError, match=r"expr\.csv lists 2 sample ids more than once \(e\.g\. \['CL0', 'CL1'\]\)"):
        read_bulk((str(expr), str(resp)), drug="drugX", response="auc")
    table.to_csv(expr)
    with pytest.raises(InputDataError, match=r"'expr\.csv' is an expression table: give the CSV of its responses"):
        read_bulk(str(expr), drug="drugX")  # the CSV without its labels: was h5py's 'file signature not found'


def test_bulk_responses_without_an_expression_row_are_warned_about_and_recorded(st: Store, bulk: ad.AnnData,
                                                                              tmp_path: Path) -> None:
    """Responses of cell lines the expression CSV spells otherwise ('Data3_S1_0' as 'data3-s1-0') or lacks were left
    out silently: here 5 of the 341 responses, and the run said n_samples 336 and nothing of the others."""
    expr, resp = tmp_path / "expr.csv", tmp_path / "responses.csv"
    spelled = [n.lower().replace("_", "-") if i < 3 else n for i, n in enumerate(bulk.obs_names)]
    pd.DataFrame(np.asarray(bulk.X), index=spelled, columns=bulk.var_names).iloc[:-2].to_csv(expr)
    pd.DataFrame({"drugX": bulk.obs["drugX"]}, index=bulk.obs_names).to_csv(resp)
    with pytest.warns(TransferWarning, match=r"5 of the 341 samples with a response to 'drugX' in responses.csv have no "
                                             r"row in expr.csv.*3 of them match an expression row but for case or "
                                             r"punctuation \(e.g. .*'Data3_S1_0' ~ 'data3-s1-0'"):
        res = transfer(st, source=(str(expr), str(resp)), target="target", drug="drugX", **FAST)
    source = transfer_run(st, res.run_id).source
    assert (source["n_samples"], source["n_response_without_expression"]) == (336, 5)


def test_a_one_class_store_source_is_refused(collection: ad.AnnData, tmp_path: Path) -> None:
    """Store sources whose labelled cells are all of one class: was trained on and scored as if it had learned."""
    st = Store(tmp_path / "store")
    st.ingest(collection[collection.obs["study"] == TARGET_STUDY].copy(), name="tgt", label_key="response",
              study=TARGET_STUDY)
    source = collection[collection.obs["study"] == "GSE164897"].copy()
    st.ingest(source[source.obs["response"] == "sensitive"].copy(), name="only_sensitive", label_key="response",
              study="GSE164897")
    with pytest.raises(InputDataError, match=r"All \d+ labelled source cells are sensitive \(source 'only_sensitive'"):
        transfer(st, source="only_sensitive", target="tgt", **FAST)
    assert st.query("SELECT count(*) AS n FROM transfer_runs")["n"].iloc[0] == 0  # refused before the run starts


def test_a_target_labelled_for_other_drugs_only_is_predicted_not_scored(two_drugs: Store, collection: ad.AnnData) -> None:
    """drug='drugC' on a target with label sets of drugA and drugB: was refused, so the target could not be predicted."""
    st = two_drugs
    st.ingest(collection[collection.obs["study"] == "GSE108397"].copy(), name="src_c", label_key="response", drug="drugC",
              study="GSE108397")
    with pytest.warns(TransferWarning, match=r"target 'tgt' has no label set of drug 'drugC'.*predicted but not scored"):
        res = transfer(st, source="src_c", target="tgt", drug="drugC", **FAST)
    assert res.metrics is None and res.target_label_set is None and res.drug == "drugC" and res.proba.size > 0
    assert transfer_run(st, res.run_id, complete=True).target_label_set is None
    with pytest.raises(InputDataError, match=r"drug='drugC' contradicts.*target 'tgt': label set 'drugB'.*\(named\)"):
        transfer(st, source="src_c", target="tgt", drug="drugC", target_label_set="drugB", **FAST)  # named: still refused


def test_a_small_gene_overlap_is_warned_about_and_recorded(st: Store, bulk: ad.AnnData) -> None:
    """12 of 200 bulk genes match the target (the others under ids that do not map): was accepted silently."""
    renamed = bulk.copy()
    renamed.var_names = [g if i < 12 else f"NOTAGENE{i}" for i, g in enumerate(bulk.var_names)]
    with pytest.warns(TransferWarning, match=r"share only 12 genes \(by HGNC symbol, of bulk source 200, target 'target' 200 genes\)"):
        # 5 of the 272 target cells express none of the 12 genes: refused without allow_empty_cells
        res = transfer(st, source=renamed, target="target", drug="drugX", allow_empty_cells=True, **FAST)
    assert res.n_features == 12 and transfer_run(st, res.run_id).source["n_shared_genes"] == 12
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", TransferWarning)
        from scdm.classify._transfer_data import shared_genes

        assert len(shared_genes([np.array([f"G{i}" for i in range(20)], object)] * 2)) == 20  # full overlap: silent


def test_critical_genes_refuse_cell_samples_without_both_groups(st: Store, bulk: ad.AnnData) -> None:
    """max_cells=1 stored a table of NaN and p = 1 over the earlier one; 0, -3 and n_steps=0 were numpy tracebacks."""
    run_id = transfer(st, source=bulk, target="target", drug="drugX", **FAST).run_id
    for kwargs in ({"max_cells": 1}, {"max_cells": 0}, {"max_cells": -3}, {"max_cells": 2.5}):
        with pytest.raises(InputDataError, match=r"max_cells=.*whole number of cells >= 2"):
            critical_genes(st, run_id, plot=False, **kwargs)
    with pytest.raises(InputDataError, match=r"n_steps=0: pass a whole number"):
        critical_genes(st, run_id, n_steps=0, plot=False)
    assert st.query("SELECT count(*) AS n FROM critical_genes WHERE run_id = ?", [run_id])["n"].iloc[0] == 0
    two = critical_genes(st, run_id, max_cells=2, n_steps=8, plot=False)
    assert two.attrs["n_cells"] == 2 and two["mean_sensitive"].notna().all() and two["mean_resistant"].notna().all()


def test_a_target_of_normalised_values_that_are_not_log_scale_is_log_transformed(st: Store, bulk: ad.AnnData,
                                                                                  target_cells: ad.AnnData) -> None:
    """A CP10k target (normalised, not log): the default n_hvg crashed in scanpy (expm1 overflow), and n_hvg=None
    trained on linear values against a log-scale source."""
    counts = sp.csr_matrix(target_cells.X, dtype=np.float64)
    cp10k = target_cells.copy()
    cp10k.X = sp.csr_matrix(sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts).astype(np.float32)
    st.ingest(cp10k, name="target_cp10k", label_key="response", study=TARGET_STUDY)
    assert st.dataset("target_cp10k").x_kind == "normalized"
    kw = {**FAST, "n_hvg": 50, "source": bulk, "drug": "drugX"}
    with pytest.warns(TransferWarning, match=r"'target_cp10k' holds normalised values up to .*not log-scale: transfer takes log1p"):
        res = transfer(st, target="target_cp10k", **kw)
    from_counts = transfer(st, target="target", **kw)  # the same cells as counts: normalize_total + log1p
    assert res.feature_names == from_counts.feature_names
    np.testing.assert_allclose(res.proba, from_counts.proba, atol=3e-3)  # float32 CP10k: rounding, not a scale change


@pytest.mark.parametrize(("setting", "value"), [("n_hvg", 0), ("n_hvg", -5), ("dropout", 1.5), ("rec_weight", -1.0),
                                                ("n_clusters", 0), ("resolution", -1.0), ("linear_r", 2.0)])
def test_transfer_settings_out_of_range_are_refused_before_the_run(st: Store, bulk: ad.AnnData, setting: str,
                                                                   value: float) -> None:
    """n_hvg=0 kept 108 of 200 genes and rec_weight=-1 rewarded bad reconstructions (both silent); dropout=1.5 and
    n_clusters=0 failed in torch/sklearn after the run had started."""
    before = st.query("SELECT count(*) AS n FROM transfer_runs")["n"].iloc[0]
    with pytest.raises(InputDataError, match=rf"Invalid transfer parameters: {setting}="):
        transfer(st, source=bulk, target="target", drug="drugX", **{**FAST, setting: value})
    assert st.query("SELECT count(*) AS n FROM transfer_runs")["n"].iloc[0] == before


def test_critical_genes_refuse_a_target_that_no_longer_gives_the_run_predictions(collection: ad.AnnData,
                                                                                  bulk: ad.AnnData, tmp_path: Path) -> None:
    """The target re-ingested as x_kind='normalized' after the run: its counts were read as-is and explained under
    the run's stored groups, with nothing said."""
    st = Store(tmp_path / "store")
    cells = collection[collection.obs["study"] == TARGET_STUDY].copy()
    st.ingest(cells, name="target", label_key="response", study=TARGET_STUDY)
    run_id = transfer(st, source=bulk, target="target", drug="drugX", **FAST).run_id
    assert len(critical_genes(st, run_id, max_cells=40, n_steps=8, plot=False)) == 200  # unchanged: explained
    st.ingest(cells, name="target", label_key="response", study=TARGET_STUDY, x_kind="normalized", update=True)
    with pytest.raises(InputDataError, match=r"'target' as read now does not give the run's stored predictions"):
        critical_genes(st, run_id, max_cells=40, n_steps=8, plot=False)


def test_symbols_are_matched_whatever_their_case(collection: ad.AnnData, bulk: ad.AnnData, tmp_path: Path) -> None:
    """A mouse-style target ('Actb') against a human bulk source ('ACTB'): 'share only 0 genes', though the gene
    table maps both to one gene and the models match symbols case-insensitively."""
    st = Store(tmp_path / "store")
    cells = collection[collection.obs["study"] == TARGET_STUDY].copy()
    cells.var_names = [g[0] + g[1:].lower() for g in cells.var_names]
    st.ingest(cells, name="mouse_style", label_key="response", study=TARGET_STUDY)
    res = transfer(st, source=bulk, target="mouse_style", drug="drugX", **FAST)
    assert res.n_features == 200 and res.feature_names == tuple(cells.var_names)  # the target's spelling
    genes = critical_genes(st, res.run_id, max_cells=40, n_steps=8, plot=False)
    assert set(genes["gene"]) == set(cells.var_names)


def test_a_gene_id_the_table_cannot_map_is_still_shared_by_id(tmp_path):
    # JHU006 and SCC47 share 972 Entrez ids; 84953 has no symbol in the shipped table and was dropped
    # from the transfer features (971 shared) while the pca/hvg baselines keep it
    from scdm.classify._transfer_data import shared_genes, store_symbols

    data = Path(__file__).resolve().parents[1] / "data"
    st = Store(tmp_path / "store")
    st.ingest(data / "JHU006_HNSCC_Kinker2020.h5ad", name="jhu006")
    st.ingest(data / "SCC47_HNSCC_Kinker2020.h5ad", name="scc47")
    genes = shared_genes([store_symbols(st, "jhu006"), store_symbols(st, "scc47")])
    assert len(genes) == 972 and "84953" in genes


def test_a_source_dataset_listed_twice_is_refused(two_drugs: Store) -> None:
    """source=['src', 'src']: its 832 cells were stacked twice (n_source 1664) and 277 of the 333 source-validation
    cells that chose the kept epoch were copies of training cells."""
    src_id = two_drugs.dataset("src").dataset_id
    for twice in (["src", "src"], ["src", src_id]):
        with pytest.raises(InputDataError, match=r"names the dataset\(s\) 'src' more than once"):
            transfer(two_drugs, source=twice, target="tgt", **FAST)


def test_the_order_sources_are_listed_in_does_not_change_the_run(tmp_path: Path, collection: ad.AnnData) -> None:
    """[A, B] and [B, A] with one seed held out other validation cells: probabilities up to 0.30 apart (AUROC
    0.639 vs 0.634) for one experiment; with embeddings, source_features follow their datasets."""
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(200, 12)).astype(np.float32)
    studies = ["GSE164897", "GSE108397", TARGET_STUDY]
    ids = {}
    for study in studies:
        cells = collection[collection.obs["study"] == study].copy()
        store.ingest(cells, name=study, label_key="response", study=study, sample_key="sample")
        emb = store.create_embedding(study, model="toy", params={"projection": 0}, dim=12)
        emb.write_chunk(0, (np.log1p(sp.csr_matrix(cells.X).toarray()) @ projection).astype(np.float32))
        emb.finalize()
        ids[study] = emb.embedding_id
    a, b = studies[:2]
    quick = {**FAST, "cluster_method": "kmeans", "n_clusters": 3}
    one = transfer(store, source=[a, b], target=TARGET_STUDY, **quick)
    other = transfer(store, source=[b, a], target=TARGET_STUDY, **quick)
    np.testing.assert_array_equal(one.proba, other.proba)
    assert one.metrics == other.metrics and one.n_source == other.n_source
    kw = dict(target=TARGET_STUDY, features=ids[TARGET_STUDY], **quick)
    one = transfer(store, source=[a, b], source_features=[ids[a], ids[b]], **kw)
    other = transfer(store, source=[b, a], source_features=[ids[b], ids[a]], **kw)
    np.testing.assert_array_equal(one.proba, other.proba)
    assert transfer_run(store, one.run_id).source_features == transfer_run(store, other.run_id).source_features


def test_a_validation_dataset_holding_source_cells_is_named(two_drugs: Store, collection: ad.AnnData,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """An eighth of the source's cells ingested again as the validation dataset: the kept epoch was chosen on cells the
    run trained on, without a word (target copies in the source or the validation set were already warned about)."""
    cells = collection[collection.obs["study"] == "GSE164897"].copy()  # the cells of 'src'
    two_drugs.ingest(cells[::8].copy(), name="src_part", label_key="response", drug="drugA", study="copy",
                     sample_key="sample")
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        transfer(two_drugs, source="src", target="tgt", validation="src_part", drug="drugA", **FAST)
    assert "104 of the 104 validation cells have the features (or the cell id and expression values) of a labelled source cell" in caplog.text


def test_the_help_grid_example_names_a_validation_dataset() -> None:
    """`scdm transfer --help` showed `--alpha 0.5,1,2` without --validation, which transfer refuses (a grid is
    chosen on a target-validation dataset only)."""
    from click.testing import CliRunner

    from scdm.cli import main

    text = CliRunner().invoke(main, ["transfer", "--help"]).output
    examples = [line.strip() for line in text.splitlines() if line.strip().startswith("scdm transfer")]
    grids = [e for e in examples if any(f"{opt} " in e and "," in e.split(f"{opt} ")[1].split()[0]
                                        for opt in ("--alpha", "--beta"))]
    assert grids and all("--validation " in e for e in grids)


def test_a_gene_with_several_columns_is_read_from_its_first_and_a_warning_says_how_many() -> None:
    """Two gene ids of one symbol: the first column was taken and the other left out without a word."""
    from scdm.classify._transfer_data import column_index

    symbols = np.asarray(["TP53", "EGFR", "tp53", "MYC", "TP53"], dtype=object)
    with pytest.warns(TransferWarning, match=r"dataset 'x': 1 of the 2 genes used have several columns .*'TP53' "
                      r"\(3 columns\).*2 columns are left out"):
        cols = column_index(symbols, ["TP53", "MYC"], name="dataset 'x'")
    assert cols.tolist() == [0, 3]


def test_a_gene_repeated_in_a_bulk_csv_header_is_warned_about_as_in_an_anndata(st: Store, bulk: ad.AnnData,
                                                                             tmp_path: Path) -> None:
    """pandas read a second 'TP53'-style header as '<gene>.1', a gene no dataset has: it left the features without the
    warning the same bulk given as an AnnData gets."""
    genes = list(bulk.var_names)
    expr, resp = tmp_path / "expr.csv", tmp_path / "responses.csv"
    frame = pd.DataFrame(np.asarray(bulk.X), index=bulk.obs_names, columns=genes)
    frame.insert(5, genes[0], frame[genes[1]].to_numpy(), allow_duplicates=True)  # gene 0 again, other values
    frame.to_csv(expr)
    pd.DataFrame({"drugX": bulk.obs["drugX"]}, index=bulk.obs_names).to_csv(resp)
    with pytest.warns(TransferWarning, match=rf"bulk source: 1 of the 200 genes used have several columns .*"
                                             rf"'{genes[0].upper()}' \(2 columns\)"):
        res = transfer(st, source=(str(expr), str(resp)), target="target", drug="drugX", **FAST)
    assert res.n_features == 200


def test_a_store_source_records_its_cells_without_a_label(tmp_path: Path, collection: ad.AnnData) -> None:
    """A bulk source recorded n_missing_response; a store source left its unlabelled cells out without a count."""
    store = Store(tmp_path / "store")
    for name, study in (("src", "GSE164897"), ("tgt", TARGET_STUDY)):
        cells = collection[collection.obs["study"] == study].copy()
        if name == "src":
            response = cells.obs["response"].astype(str).to_numpy().copy()
            response[:7] = "unknown"
            cells.obs["response"] = response
        store.ingest(cells, name=name, label_key="response", study=study)
    n_src = store.dataset("src").n_cells
    res = transfer(store, source="src", target="tgt", **{**FAST, "hidden": (16,), "latent_dim": 4})
    run = transfer_run(store, res.run_id, complete=True)
    assert run.source["n_missing_response"] == 7 and run.source["n_missing_response_per_dataset"] == [7]
    assert run.source["n_cells"] == n_src - 7


def test_features_of_a_z_scored_target_are_its_most_variable_genes(tmp_path: Path) -> None:
    # z-scored values: scanpy's seurat flavour takes expm1 of them as log data, and a gene of negative
    # mean gets a NaN dispersion and is never kept, however variable (SCC47: kept genes of mean variance
    # 1.07, left out those of 1.36)
    rng = np.random.default_rng(0)
    n, genes = 60, [f"G{i}" for i in range(40)]
    x = rng.normal(0.0, 0.5, size=(n, 40))
    x[:, :10] = rng.normal(-3.0, 1.5, size=(n, 10))  # the 10 most variable genes, all of negative mean
    y = np.array(["sensitive", "resistant"] * (n // 2))
    st = Store(tmp_path / "store")
    for name in ("src", "tgt"):
        st.ingest(ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"response": y}, index=[f"{name}{i}" for i in range(n)]),
                             var=pd.DataFrame(index=genes)), name=name, label_key="response", study=name)
    assert st.dataset("tgt").x_kind == "scaled"
    res = transfer(st, source="src", target="tgt", **{**FAST, "n_hvg": 10})
    kept = st.query("SELECT feature FROM transfer_features WHERE run_id = ? ORDER BY idx", [res.run_id])["feature"]
    assert sorted(kept, key=lambda g: int(g[1:])) == genes[:10]


def test_a_target_z_scored_on_its_own_cells_keeps_every_gene(tmp_path: Path) -> None:
    # z-scored on these very cells, every gene has variance 1: no 10 are more variable than the rest
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40))
    x = (x - x.mean(0)) / x.std(0)
    y = np.array(["sensitive", "resistant"] * 30)
    st = Store(tmp_path / "store")
    for name in ("src", "tgt"):
        st.ingest(ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"response": y}, index=[f"{name}{i}" for i in range(60)]),
                             var=pd.DataFrame(index=[f"G{i}" for i in range(40)])), name=name, label_key="response", study=name)
    with pytest.warns(TransferWarning, match="40 of the 40 shared genes of the target have one variance"):
        res = transfer(st, source="src", target="tgt", **{**FAST, "n_hvg": 10})
    assert res.n_features == 40


def test_column_variances_are_computed_a_block_at_a_time_and_equal_numpys() -> None:
    """The z-scored target's gene variances came from a whole float64 dense copy of the target (16 GB at
    100,000 cells x 20,000 genes); a block of columns at a time gives numpy's numbers (to summation order)."""
    from scdm.classify._transfer_data import column_variances

    rng = np.random.default_rng(0)
    dense = rng.normal(size=(50, 37)).astype(np.float32)
    dense[:, 5] = 0.0
    expected = dense.astype(np.float64).var(axis=0)
    for X in (dense, sp.csr_matrix(dense)):
        np.testing.assert_allclose(column_variances(X, block_bytes=8 * 50 * 4), expected, rtol=1e-12)  # 4 columns a block
        np.testing.assert_allclose(column_variances(X), expected, rtol=1e-12)


def test_target_cells_that_express_none_of_the_genes_are_refused_unless_allowed(tmp_path, bulk, target_cells):
    # two target cells with no expression got one and the same prediction (P(sensitive) 0.792, label 1), stored and
    # scored in the run's AUROC and accuracy, where scdm embed refuses cells that express no gene the model knows
    cells = target_cells.copy()
    x = sp.csr_matrix(cells.X).toarray()
    x[[3, 7]] = 0
    cells.X = sp.csr_matrix(x)
    store = Store(tmp_path / "store")
    with pytest.warns(UserWarning, match="no expression at all"):
        store.ingest(cells, name="target", label_key="response", study=TARGET_STUDY)
    with pytest.raises(InputDataError, match=r"target cells at rows 3, 7 \(2 in all\) of dataset 'target' express none of "
                                             r"the 200 genes.*--allow-empty-cells"):
        transfer(store, source=bulk, target="target", drug="drugX", epochs=2, progress=False, **SMALL)
    assert store.query("SELECT * FROM transfer_runs").empty
    result = transfer(store, source=bulk, target="target", drug="drugX", epochs=2, progress=False, allow_empty_cells=True,
                      **SMALL)
    assert len(result.proba) == cells.n_obs


def _with_empty_rows(cells: ad.AnnData, rows: list[int]) -> ad.AnnData:
    out = cells.copy()
    x = sp.csr_matrix(out.X).toarray()
    x[rows] = 0
    out.X = sp.csr_matrix(x) if sp.issparse(cells.X) else x
    return out


def test_bulk_samples_that_express_none_of_the_genes_are_refused_unless_allowed(st: Store, bulk: ad.AnnData,
                                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Two all-zero bulk samples (of 341, both sensitive) were trained on with their labels, silently, where an
    all-zero target cell was refused: the predictor learned to call 'no expression' sensitive."""
    zeroed = _with_empty_rows(bulk, [2, 5])
    names = list(bulk.obs_names[[2, 5]])
    runs_before = len(st.query("SELECT run_id FROM transfer_runs"))
    with pytest.raises(InputDataError, match=rf"The bulk source samples {names[0]}, {names[1]} \(2 of {bulk.n_obs}\) "
                                             r"express none of the 200 genes.*source: the predictor is trained.*"
                                             r"--allow-empty-cells"):
        transfer(st, source=zeroed, target="target", drug="drugX", **FAST)
    assert len(st.query("SELECT run_id FROM transfer_runs")) == runs_before  # refused before the run starts
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        res = transfer(st, source=zeroed, target="target", drug="drugX", allow_empty_cells=True, **FAST)
    assert f"kept the bulk source samples {names[0]}, {names[1]} (2 of {bulk.n_obs})" in caplog.text
    assert res.n_source == bulk.n_obs


def test_source_and_validation_cells_that_express_none_of_the_genes_are_refused_unless_allowed(
        tmp_path: Path, collection: ad.AnnData, caplog: pytest.LogCaptureFixture) -> None:
    """All-zero cells of a store source trained the predictor, and all-zero cells of the validation dataset counted in
    the loss that chose the kept epoch, silently; one message now names both, with their datasets and rows."""
    store = Store(tmp_path / "store")
    for name, study, empty in (("src", "GSE164897", [1, 4]), ("val", "GSE108397", [0, 2, 9]), ("tgt", TARGET_STUDY, [])):
        cells = _with_empty_rows(collection[collection.obs["study"] == study].copy(), empty)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*no expression at all")
            store.ingest(cells, name=name, label_key="response", study=study)
    with pytest.raises(InputDataError, match=r"The source cells at rows 1, 4 \(2 in all\) of dataset 'src' and the "
                                             r"validation cells at rows 0, 2, 9 \(3 in all\) of dataset 'val' express "
                                             r"none of the 200 genes.*validation: they count in the validation loss"):
        transfer(store, source="src", target="tgt", validation="val", **FAST)
    assert store.query("SELECT * FROM transfer_runs").empty
    with caplog.at_level("WARNING", logger="scdm.classify.transfer"):
        transfer(store, source="src", target="tgt", validation="val", allow_empty_cells=True, **FAST)
    assert "kept the source cells at rows 1, 4 (2 in all) of dataset 'src'" in caplog.text
    assert "kept the validation cells at rows 0, 2, 9 (3 in all) of dataset 'val'" in caplog.text


def _previous_symbols(symbols: list[str], n: int) -> dict[str, str]:
    """``n`` of ``symbols`` -> a previous symbol or alias of that gene that names it only (shipped alias table)."""
    import gzip
    import io
    from importlib import resources

    from scdm.store.genes import map_genes

    raw = resources.files("scdm.store").joinpath("_data").joinpath("human_gene_aliases.tsv.gz").read_bytes()
    aliases = pd.read_csv(io.BytesIO(gzip.decompress(raw)), sep="\t", dtype=str, keep_default_na=False)
    alias_of = dict(zip(aliases["entrez"], aliases["alias"]))  # one alias per gene is enough
    entrez = map_genes(symbols, src="symbol", dst="entrez")
    out = {s: alias_of[e] for s, e in zip(symbols, entrez) if e in alias_of and alias_of[e].upper() not in symbols}
    return dict(list(out.items())[:n])


def test_outdated_symbols_and_ensembl_ids_are_matched_by_their_gene(collection: ad.AnnData, bulk: ad.AnnData,
                                                                    tmp_path: Path) -> None:
    """A source naming genes by their previous symbols (as PC9 does for 1,274 genes), or a target indexed by Ensembl
    ids: the genes table maps both to the same genes, but transfer matched the stored symbols as spelled, so those
    genes dropped out of the features without a word (here 195 of 200 genes kept)."""
    from scdm.store.genes import map_genes

    renamed = _previous_symbols(list(bulk.var_names), 5)
    assert len(renamed) == 5
    old_bulk = bulk.copy()
    old_bulk.var_names = [renamed.get(g, g) for g in bulk.var_names]
    st = Store(tmp_path / "store")
    cells = collection[collection.obs["study"] == TARGET_STUDY].copy()
    st.ingest(cells, name="target", label_key="response", study=TARGET_STUDY)
    res = transfer(st, source=old_bulk, target="target", drug="drugX", **FAST)
    assert res.n_features == 200 and res.feature_names == tuple(cells.var_names)  # the target's spelling
    assert transfer_run(st, res.run_id).source["gene_match"] == "gene"

    source = collection[collection.obs["study"] == "GSE108397"].copy()
    source.var_names = [renamed.get(g, g) for g in source.var_names]
    st.ingest(source, name="src", label_key="response", study="GSE108397")
    ensembl = map_genes(list(cells.var_names), src="symbol", dst="ensembl")
    by_id = cells[:, [e is not None for e in ensembl]].copy()
    by_id.var_names = [e for e in ensembl if e is not None]
    st.ingest(by_id, name="target_ens", label_key="response", study=TARGET_STUDY)
    res = transfer(st, source="src", target="target_ens", **FAST)
    assert res.n_features == by_id.n_vars == 200 and res.feature_names == tuple(cells.var_names)  # symbols, as before
    assert transfer_run(st, res.run_id).source["n_shared_genes"] == by_id.n_vars
