"""The MLP head's precision (issue 19 point 5): a parameter of the head, and bf16 scores like fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scdm.classify import heads
from scdm.classify.heads import MLPHead


def _task(n: int = 1000, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    score = X[:, :4].sum(axis=1) / 2 + 0.7 * np.sign(X[:, 4] * X[:, 5]) + rng.standard_normal(n)
    return X, (score > 0).astype(np.int8)


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to busy neighbours
    yield
    torch.set_num_threads(before)


def test_bf16_and_fp32_reach_the_same_auroc_within_fold_noise(one_thread):
    X, y = _task()
    folds = np.arange(len(y)) % 4
    auroc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for k in range(4):
        test = folds == k
        for precision in auroc:
            head = MLPHead("fast", precision=precision, hidden=64, batch_size=128, epochs=15, seed=k).fit(X[~test], y[~test])
            assert head.bf16_ == (precision == "bf16")
            auroc[precision].append(roc_auc_score(y[test], head.proba_sensitive(X[test])))
    fp32, bf16 = np.array(auroc["fp32"]), np.array(auroc["bf16"])
    assert fp32.mean() > 0.75  # both learn the task
    noise = fp32.std(ddof=1)  # the spread of AUROC over folds
    assert abs(bf16.mean() - fp32.mean()) <= max(noise, 0.01)
    assert np.abs(bf16 - fp32).max() <= 2 * max(noise, 0.01)


@pytest.mark.parametrize("profile", ["default", "paper", "fast"])
def test_the_precision_is_part_of_the_heads_identity(profile):
    keys = {p: json.loads(MLPHead(profile, precision=p).params_key()) for p in ("fp32", "bf16")}  # type: ignore[arg-type]
    assert keys["fp32"]["precision"] == "fp32" and keys["bf16"]["precision"] == "bf16"
    assert MLPHead(profile, precision="fp32").params_key() != MLPHead(profile, precision="bf16").params_key()


def test_paper_and_default_stay_fp32_and_auto_is_spelled_as_what_it_runs(monkeypatch):
    assert json.loads(MLPHead("paper").params_key())["precision"] == "fp32"
    assert json.loads(MLPHead("default").params_key())["precision"] == "fp32"
    for native, spelled in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(heads, "bf16_supported", lambda native=native: native)
        assert json.loads(MLPHead("fast").params_key())["precision"] == spelled  # fast's "auto" on this CPU
        assert MLPHead("fast").params_key() == MLPHead("fast", precision=spelled).params_key()  # type: ignore[arg-type]
