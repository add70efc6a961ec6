"""The MLP head's written-out training step (issue 19 point 5) computes autograd's gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scdm.classify._mlp_step import MLPStep
from scdm.classify.heads import MLPHead


def _head(profile: str, X: torch.Tensor, standardize: bool | str | None) -> MLPHead:
    """A head with its fit-time state set by hand, as ``_fit`` sets it before training."""
    head = MLPHead(profile, hidden=32, standardize=standardize)  # type: ignore[arg-type]
    head.output_ = head.resolved()["loss"]
    head.mean_, head.scale_ = None, None
    if head.resolved()["standardize"]:
        head.mean_ = X.mean(0).numpy()
        head.scale_ = np.float32(X.std().item()) * np.ones(X.shape[1], np.float32)
    return head


def _autograd_gradients(head: MLPHead, model: torch.nn.Module, X: torch.Tensor, yt: torch.Tensor,
                        rows: torch.Tensor, bf16: bool) -> tuple[float, list[torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = head._loss(model(head._batch(X, rows)), yt.index_select(0, rows))
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("profile", "standardize"), [("fast", None), ("paper", None), ("default", True)],
                         ids=["logit-global", "onehot-raw", "logit-per-column"])
def test_the_step_computes_autograds_gradients(profile, standardize, bf16):
    rng = np.random.default_rng(0)
    X = torch.from_numpy((rng.standard_normal((300, 24)) * 3 + 1).astype(np.float32))
    y = (rng.random(300) > 0.4).astype(np.int8)
    head = _head(profile, X, standardize)
    yt = head._targets(y)
    torch.manual_seed(1)
    model = head.build_network(X.shape[1])
    step = MLPStep(model, 128, bf16=bf16, affine=head._affine_tensors(), loss=head._loss)
    order = torch.from_numpy(rng.permutation(300))
    # a full batch, then a short last one: the buffers are sliced, never stale rows of a longer batch
    for rows in (order[:128], order[128:128 + 57]):
        loss = float(step(X, yt, rows))
        mine = [p.grad.clone() for p in model.parameters()]
        ref_loss, ref = _autograd_gradients(head, model, X, yt, rows, bf16)
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
        for name, got, want in zip([n for n, _ in model.named_parameters()], mine, ref, strict=True):
            assert got.dtype == torch.float32 and got.shape == want.shape, name
            scale = float(want.abs().max()) or 1.0
            # fp32: the same matmuls; bf16: the same roundings, allowing one bf16 ulp where kernels differ
            tol = 1e-5 if not bf16 else 1e-2
            assert float((got - want).abs().max()) <= tol * scale, name


class _AutogradStep:
    """The step as autograd and autocast compute it (what MLPHead ran before the step was written out)."""

    def __init__(self, model, batch_size, *, bf16, affine, loss):
        self.model, self.bf16, self.affine, self.loss = model, bf16, affine, loss

    def __call__(self, X, targets, rows):
        x = X.index_select(0, rows)
        if self.affine is not None:
            torch.addcmul(self.affine[1], x, self.affine[0], out=x)
        for p in self.model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(self.model(x), targets.index_select(0, rows))
        loss.backward()
        return loss.detach()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fit_equals_the_fit_trained_by_autograd(precision, one_thread_torch, monkeypatch):
    from scdm.classify import _mlp_step

    rng = np.random.default_rng(3)
    X = (rng.standard_normal((700, 12)) * 2 + 5).astype(np.float32)
    y = (X[:, 0] + 0.5 * np.sign(X[:, 1] - 5) + rng.standard_normal(700) > 5).astype(np.int8)
    # several epochs of a short last batch, early stopping on the held-out cells
    params = {"hidden": 32, "batch_size": 100, "epochs": 6, "precision": precision, "patience": 6}
    fitted = MLPHead("fast", **params).fit(X, y)
    monkeypatch.setattr(_mlp_step, "MLPStep", _AutogradStep)
    reference = MLPHead("fast", **params).fit(X, y)
    assert [r["train_loss"] for r in fitted.history_] == pytest.approx(
        [r["train_loss"] for r in reference.history_], rel=1e-5 if precision == "fp32" else 1e-2)
    assert fitted.best_epoch_ == reference.best_epoch_
    np.testing.assert_allclose(fitted.proba_sensitive(X), reference.proba_sensitive(X),
                               atol=1e-5 if precision == "fp32" else 2e-2)
    assert fitted.history_[-1]["train_loss"] < fitted.history_[0]["train_loss"]


def test_the_step_refuses_a_network_it_does_not_know():
    with pytest.raises(TypeError, match="Linear"):
        MLPStep(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)), 8, bf16=False,
                affine=None, loss=lambda z, t: z.sum())


@pytest.fixture()
def one_thread_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
