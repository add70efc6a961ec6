"""Trained-head artifacts cannot run code: safe formats round-trip, pickles are refused or converted on trust."""

from __future__ import annotations

import json
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from scdm.classify.heads import get_head
from scdm.classify.trained_heads import (
    HeadArtifactError,
    LegacyHeadError,
    load_head,
    load_head_artifact,
    predict,
    save_head_artifact,
    train_head,
    trained_heads,
)
from scdm.store import Store
from scdm.store.hashing import file_blake2b
from scdm.store.heads import set_head_artifact, trained_head
from tests.untrusted import RunsCode

DATA = Path(__file__).resolve().parents[1] / "data"
LEGACY_HEAD = "0ea83793f804b3aa"  # the ridge head of the schema-5 store (head.joblib)
LEGACY_EMBEDDING = "fb493671e48a29a5"


def _data(n: int = 80, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32) * np.linspace(0.5, 20, dim, dtype=np.float32) + 3.0
    y = (X[:, 0] + rng.normal(scale=2.0, size=n) > 3.0).astype(np.int64)
    return X, y


HEADS = [
    ("logreg", {"C": 0.5}, "json-npz"),
    ("logreg", {"standardize": False}, "json-npz"),
    ("ridge", {"alpha": 2.0}, "json-npz"),
    ("ridge", {"standardize": False}, "json-npz"),
    ("majority", {}, "json-npz"),
    ("lightgbm", {"n_estimators": 15, "num_leaves": 4, "n_jobs": 1}, "lightgbm-text"),
    ("mlp", {"hidden": 8, "epochs": 5, "batch_size": 16, "min_steps": 10}, "safetensors"),
    ("mlp", {"hidden": 8, "epochs": 3, "batch_size": 16, "profile": "paper"}, "safetensors"),
    ("mlp", {"hidden": 8, "epochs": 3, "batch_size": 16, "standardize": False, "profile": "fast"}, "safetensors"),
]


@pytest.mark.parametrize(("name", "params", "expected_format"), HEADS, ids=[f"{h[0]}-{i}" for i, h in enumerate(HEADS)])
def test_saved_head_predicts_exactly_like_the_fitted_one(tmp_path: Path, name: str, params: dict, expected_format: str) -> None:
    X, y = _data()
    head = get_head(name, **params).fit(X, y)
    file_name, artifact_format = save_head_artifact(head, tmp_path)
    assert artifact_format == expected_format
    loaded = load_head_artifact(tmp_path / file_name, artifact_format, name)
    assert loaded is not head and type(loaded) is type(head) and loaded.get_params() == head.get_params()
    X_new, _ = _data(n=50, seed=1)
    np.testing.assert_allclose(loaded.proba_sensitive(X_new), head.proba_sensitive(X_new), rtol=1e-6, atol=1e-7)
    if artifact_format == "safetensors":
        from safetensors import safe_open

        with safe_open(str(tmp_path / file_name), framework="np") as fh:
            state = json.loads(fh.metadata()["scdm_state"])
        assert state["head"] == name and state["modules"]["model_"][0]["type"] == "Linear"
    else:
        with np.load(tmp_path / file_name, allow_pickle=False) as npz:  # every member is plain data
            assert all(npz[k].dtype != object for k in npz.files)
            assert json.loads(str(npz["scdm_state"]))["params"] == head.get_params()


def test_a_head_attribute_that_needs_pickling_is_refused_at_save(tmp_path: Path) -> None:
    X, y = _data()
    head = get_head("ridge").fit(X, y)
    head.extra_ = object()
    with pytest.raises(HeadArtifactError, match="extra_ is a object.*without pickling"):
        save_head_artifact(head, tmp_path)


def _rewrite_state(path: Path, change: dict) -> None:
    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    state = json.loads(str(members["scdm_state"]))
    state.update(change)
    members["scdm_state"] = np.array(json.dumps(state))
    with open(path, "wb") as fh:
        np.savez(fh, **members)


def test_an_artifact_cannot_set_private_attributes_or_build_foreign_layers(tmp_path: Path) -> None:
    X, y = _data()
    name, fmt = save_head_artifact(get_head("ridge").fit(X, y), tmp_path)
    _rewrite_state(tmp_path / name, {"values": {"__class__": 1, "intercept_": 0.0}})
    with pytest.raises(HeadArtifactError, match="'__class__', which is not a fitted attribute"):
        load_head_artifact(tmp_path / name, fmt, "ridge")
    _rewrite_state(tmp_path / name, {"values": {}, "modules": {"model_": [{"type": "Module", "args": {}}]}})
    with pytest.raises(HeadArtifactError, match="layer 'Module'"):
        load_head_artifact(tmp_path / name, fmt, "ridge")
    with pytest.raises(HeadArtifactError, match="not a version-1 artifact of a logreg head"):
        load_head_artifact(tmp_path / name, fmt, "logreg")


# ---- through the store -----------------------------------------------------------------------------
@pytest.fixture()
def legacy_store(tmp_path: Path) -> Store:
    """The schema-5 release's store: a ridge head saved as head.joblib, and its stored predictions."""
    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return Store(tmp_path / "store_v5")


def _old_predictions(st: Store) -> np.ndarray:
    frame = st.query('SELECT proba FROM predictions WHERE head_id = ? ORDER BY "row"', [LEGACY_HEAD])
    return frame["proba"].to_numpy(np.float64)


def test_a_pickled_head_of_an_older_scdm_is_refused_with_the_command_that_retrains_it(legacy_store: Store) -> None:
    st = legacy_store
    old = _old_predictions(st)
    with pytest.raises(LegacyHeadError, match="no longer loads pickled heads") as info:
        predict(st, LEGACY_HEAD, "a375")
    message = str(info.value)
    command = next(line.strip() for line in message.splitlines() if line.strip().startswith("scdm "))
    # the old head standardised per column, which is no longer ridge's default: the command says so
    assert command == f"scdm --store {st.root} train-head --embedding {LEGACY_EMBEDDING} --head ridge --param standardize=true"
    assert "--trust-pickle" in message
    from scdm.cli import main

    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    retrained = result.stdout.strip()  # a new id: the head's parameter identity gained keys since that release
    record = trained_head(st, retrained)
    assert record.artifact_format == "json-npz" and record.path.endswith("head.npz")
    frame = predict(st, retrained, "a375")
    np.testing.assert_allclose(frame["proba"].to_numpy(), old, rtol=1e-5, atol=1e-6)  # the same fit as before


def test_trust_pickle_converts_a_legacy_head_once(legacy_store: Store) -> None:
    st = legacy_store
    old = _old_predictions(st)
    from scdm.cli import main

    result = CliRunner().invoke(main, ["--store", str(st.root), "predict", "--head", LEGACY_HEAD, "--dataset", "a375",
                                       "--trust-pickle"])
    assert result.exit_code == 0, result.output
    record = trained_head(st, LEGACY_HEAD)
    assert record.artifact_format == "json-npz" and file_blake2b(st.root / record.path) == record.file_hash
    frame = predict(st, LEGACY_HEAD, "a375")  # no trust needed any more
    np.testing.assert_allclose(frame["proba"].to_numpy(), old, rtol=1e-5, atol=1e-6)
    assert "UNPICKLES" in CliRunner().invoke(main, ["predict", "--help"]).output


def test_a_planted_pickle_in_a_legacy_head_never_runs(legacy_store: Store, tmp_path: Path) -> None:
    st = legacy_store
    pwned = tmp_path / "pwned"
    path = st.root / trained_head(st, LEGACY_HEAD).path
    path.write_bytes(pickle.dumps(RunsCode(pwned)))
    # an attacker who can write the store can also write the catalog's hash
    st.catalog.execute("UPDATE trained_heads SET file_hash = ? WHERE head_id = ?", [file_blake2b(path), LEGACY_HEAD])
    with pytest.raises(LegacyHeadError):
        predict(st, LEGACY_HEAD, "a375")
    with pytest.raises(LegacyHeadError):
        load_head(st, LEGACY_HEAD)
    retrained = train_head(st, [LEGACY_EMBEDDING], head="ridge", standardize=True)  # retraining never reads it
    assert trained_head(st, retrained).artifact_format == "json-npz"
    assert not pwned.exists()


@pytest.mark.parametrize("payload", ["pickle", "npz-object-member", "safetensors-name"])
def test_a_planted_pickle_in_a_safe_artifact_is_refused_without_running(legacy_store: Store, tmp_path: Path,
                                                                         payload: str) -> None:
    st = legacy_store
    head_id = train_head(st, [LEGACY_EMBEDDING], head="ridge", alpha=3.0)
    record = trained_head(st, head_id)
    path = st.root / record.path
    pwned = tmp_path / "pwned"
    fmt = record.artifact_format
    if payload == "pickle":
        path.write_bytes(pickle.dumps(RunsCode(pwned)))
    elif payload == "npz-object-member":
        with np.load(path, allow_pickle=False) as npz:
            members = {k: npz[k] for k in npz.files}
        members["coef_"] = np.array([RunsCode(pwned)], dtype=object)
        with open(path, "wb") as fh:
            np.savez(fh, **members)  # the .npy member is a pickle now
    else:
        path.write_bytes(pickle.dumps(RunsCode(pwned)))
        fmt = "safetensors"
    set_head_artifact(st, head_id, artifact_format=fmt, path=record.path, file_hash=file_blake2b(path), scdm_version="x")
    with pytest.raises(HeadArtifactError, match="cannot be read as a"):
        predict(st, head_id, "a375")
    assert not pwned.exists()


def test_training_again_repairs_a_missing_artifact(legacy_store: Store) -> None:
    st = legacy_store
    head_id = train_head(st, [LEGACY_EMBEDDING], head="mlp", hidden=8, epochs=2, min_steps=5)
    path = st.root / trained_head(st, head_id).path
    path.unlink()
    with pytest.raises(HeadArtifactError, match=f"(?s)missing.*train-head --embedding {LEGACY_EMBEDDING} --head mlp --param epochs=2 --param hidden=8 --param min_steps=5$"):
        load_head(st, head_id)
    assert train_head(st, [LEGACY_EMBEDDING], head="mlp", hidden=8, epochs=2, min_steps=5) == head_id
    assert path.is_file() and len(trained_heads(st)) == 2
    load_head(st, head_id)


def test_trust_pickle_converts_an_old_torch_mlp_head(legacy_store: Store) -> None:
    """head.pt as scdm wrote it before the safe formats: state_dict, params, standardiser (softmax over 2 outputs)."""
    import torch

    st = legacy_store
    head_id = train_head(st, [LEGACY_EMBEDDING], head="mlp", hidden=8, epochs=2, min_steps=5)
    record = trained_head(st, head_id)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2))
    mean, scale = np.linspace(-1, 1, 8).astype(np.float32), np.linspace(0.5, 2, 8).astype(np.float32)
    params = {"batch_size": None, "early_stopping": None, "epochs": None, "hidden": 8, "lr": None, "patience": 2,
              "precision": None, "profile": "fast", "seed": 0, "standardize": True, "validation_fraction": 0.1,
              "weight_decay": 0.01}
    path = st.root / record.path
    old = path.with_name("head.pt")
    torch.save({"state_dict": net.state_dict(), "params": json.dumps(params, sort_keys=True), "n_features_in": 8,
                "mean": torch.from_numpy(mean), "scale": torch.from_numpy(scale), "bf16": False, "fit_seconds": 0.1}, old)
    path.unlink()
    relative = str(old.relative_to(st.root))
    st.catalog.execute("UPDATE trained_heads SET artifact_format = 'torch', path = ?, file_hash = ? WHERE head_id = ?",
                       [relative, file_blake2b(old), head_id])
    with pytest.raises(LegacyHeadError, match="torch pickle"):
        load_head(st, head_id)
    loaded = load_head(st, head_id, trust_pickle=True)
    X = st.read_embedding(LEGACY_EMBEDDING)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy((X - mean) / scale)), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(loaded.head.proba_sensitive(X), expected, rtol=1e-5, atol=1e-6)
    assert trained_head(st, head_id).artifact_format == "safetensors" and not old.exists()
    np.testing.assert_allclose(load_head(st, head_id).head.proba_sensitive(X), expected, rtol=1e-5, atol=1e-6)


def test_writing_an_artifact_keeps_an_identical_one_and_replaces_a_damaged_one(tmp_path: Path) -> None:
    # two train-head runs of one head: the later one rmtree'd the folder the first had placed (and
    # might be reading); the same bytes are now kept, a damaged artifact replaced
    from scdm.classify.heads import get_head
    from scdm.classify.trained_heads import _write_artifact

    st = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    head = get_head("ridge").fit(rng.normal(size=(40, 4)), np.arange(40) % 2)
    path, fmt = _write_artifact(st, "h1", head)
    folder = (st.root / path).parent
    inode = folder.stat().st_ino
    assert _write_artifact(st, "h1", head) == (path, fmt) and folder.stat().st_ino == inode  # kept, not replaced
    (st.root / path).write_bytes(b"damaged")
    assert _write_artifact(st, "h1", head) == (path, fmt)
    assert json.loads((folder / "head.json").read_text())["file_hash"] == file_blake2b(st.root / path)
