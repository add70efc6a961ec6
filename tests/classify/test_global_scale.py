"""standardize="global": the shared scale is the root mean square of the centred training values,
to which dead (constant) dimensions add 0 -- in every head and in the grid's batched logreg.
Counted as scale 1 they inflated it (and the penalty) a hundredfold on an embedding in small units."""

from __future__ import annotations

import numpy as np
import pytest

from scdm.classify._logreg_batch import fit_logreg_folds
from scdm.classify.heads import get_head


def _padded(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ten informative columns of sd ~0.01 (an embedding in small units), the same with ten dead columns, labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = (rng.normal(size=(n, 10)) + y[:, None] * 0.8).astype(np.float32) * 0.01
    return X, np.hstack([X, np.zeros((n, 10), np.float32)]), y


def _rms_of_centred(X: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(X - X.mean(axis=0)))))


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_dead_columns_add_nothing_to_the_shared_scale(head):
    X, padded, y = _padded()
    fitted = get_head(head).fit(padded, y)
    assert fitted.scale_[0] == pytest.approx(_rms_of_centred(padded), rel=1e-4)
    plain = (get_head(head).fit(X, y).proba_sensitive(X) >= 0.5) == y
    dead = (fitted.proba_sensitive(padded) >= 0.5) == y
    assert dead.mean() > 0.9 and abs(dead.mean() - plain.mean()) < 0.05  # not the constant prediction of before


def test_the_grids_batched_logreg_scales_like_the_head():
    _, padded, y = _padded()
    fits = fit_logreg_folds(padded, y, np.ones((len(y), 1), bool))
    np.testing.assert_allclose(fits.scale[0], get_head("logreg").fit(padded, y).scale_, rtol=1e-6)


def test_a_shuffled_label_mlp_baseline_keys_the_precision_its_base_resolves(monkeypatch):
    import json

    from scdm.classify import heads

    keys = {}
    for native in (True, False):
        monkeypatch.setattr(heads, "bf16_supported", lambda native=native: native)
        keys[native] = json.loads(get_head("shuffled-label", base="mlp", base_params={"profile": "fast"}).params_key())
        assert get_head("shuffled-label", **keys[native]).params_key() == json.dumps(keys[native], sort_keys=True)
    assert keys[True]["base_params"]["precision"] == "bf16" and keys[False]["base_params"]["precision"] == "fp32"
    assert json.loads(get_head("shuffled-label").params_key()) == {"base": "ridge", "base_params": None, "seed": 0}
