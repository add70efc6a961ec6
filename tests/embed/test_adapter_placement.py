"""Putting a LoRA adapter folder in place when another run of the same fold is at it too."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scdm.embedding import finetune as ft
from scdm.embedding.finetune import finetune, read_lora_card
from scdm.embedding.lora_card import CARD_FORMAT, CARD_VERSION, save_adapter
from scdm.store import Store
from scdm.store.adapters import adapter_dir, adapter_row, training_lock
from scdm.store.leftovers import scan
from tests.embed.test_finetune import FAST, _checkpoint, _planted, _store

torch.set_num_threads(1)


class _FakePeft:
    """Writes peft's two files; ``during`` runs while they are being written (another process acting meanwhile)."""

    def __init__(self, weights: bytes, during=None) -> None:
        self.weights, self.during = weights, during

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/somewhere", "r": 4}))
        (Path(path) / "adapter_model.safetensors").write_bytes(self.weights)
        if self.during is not None:
            self.during()


def _trained(weights: bytes, during=None) -> SimpleNamespace:
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.fill_(0.5)
        head.bias.fill_(0.25)
    return SimpleNamespace(peft_model=_FakePeft(weights, during), head=head)


CARD = {"format": CARD_FORMAT, "version": CARD_VERSION, "adapter_id": "0a1b2c3d4e5f6a7b", "tuning_id": "t", "model": "geneformer",
        "checkpoint_hash": "c", "model_params": {}, "seed": 0, "split_id": "s", "fold": 0, "scenario": "pooled",
        "category_type": "all", "category": "all", "lora": {}, "train": {"head": {"hidden": 4}}, "lora_modules": [], "emb_dim": 2}


def _temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_identical_adapter_placed_meanwhile_is_kept_and_ours_dropped(tmp_path):
    reference = tmp_path / "reference" / "0a1b2c3d4e5f6a7b"
    expected = save_adapter(_trained(b"weights"), reference, CARD)
    folder = tmp_path / "adapters" / "0a1b2c3d4e5f6a7b"
    placed = {}

    def other_run_finishes_first() -> None:
        shutil.copytree(reference, folder)
        placed["inode"] = os.stat(folder).st_ino

    got = save_adapter(_trained(b"weights", during=other_run_finishes_first), folder, CARD)
    assert got == expected == read_lora_card(folder).adapter_hash
    assert os.stat(folder).st_ino == placed["inode"]  # the other run's folder (which it may be reading) was not replaced
    assert _temporaries(folder.parent) == []


def test_a_leftover_adapter_with_other_weights_is_replaced_atomically(tmp_path):
    folder = tmp_path / "adapters" / "0a1b2c3d4e5f6a7b"
    save_adapter(_trained(b"old weights of a run that died before its row"), folder, CARD)
    got = save_adapter(_trained(b"new weights"), folder, CARD)
    card = read_lora_card(folder)
    assert got == card.adapter_hash and card.damage() is None
    assert (folder / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert _temporaries(folder.parent) == []


def test_a_damaged_folder_in_the_way_is_replaced(tmp_path):
    folder = tmp_path / "adapters" / "0a1b2c3d4e5f6a7b"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"half")
    got = save_adapter(_trained(b"weights"), folder, CARD)
    assert read_lora_card(folder).adapter_hash == got and _temporaries(folder.parent) == []


def test_a_save_that_fails_leaves_no_temporary(tmp_path):
    folder = tmp_path / "adapters" / "0a1b2c3d4e5f6a7b"

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_adapter(_trained(b"weights", during=disk_full), folder, CARD)
    assert list(folder.parent.iterdir()) == []


def test_verify_repair_leaves_a_save_under_way_alone(tmp_path):
    st = Store(tmp_path / "store")
    folder = adapter_dir(st, "0a1b2c3d4e5f6a7b")
    seen = []

    def verify_repair_meanwhile() -> None:
        seen.extend(scan(st, remove=True))

    save_adapter(_trained(b"weights", during=verify_repair_meanwhile), folder, CARD)
    (item,) = seen
    assert "LoRA adapter save" in item.what and item.kept == f"pid {os.getpid()} that writes it is running" and not item.removed
    assert read_lora_card(folder).damage() is None


def test_a_second_trainer_of_the_same_adapter_waits_and_names_the_first(tmp_path, caplog):
    st = Store(tmp_path / "store")
    order = []
    with training_lock(st, "0a1b2c3d4e5f6a7b"):
        def second() -> None:
            with training_lock(Store(st.root), "0a1b2c3d4e5f6a7b", note_every_s=0.05):
                order.append("second")

        with caplog.at_level(logging.WARNING, logger="scdm.store.adapters"):
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(0.3)
            order.append("first done")
    thread.join(10)
    assert order == ["first done", "second"]
    assert f"adapter 0a1b2c3d4e5f6a7b is being trained by pid {os.getpid()}" in caplog.text
    with training_lock(st, "0a1b2c3d4e5f6a7b"), training_lock(st, "1111111111111111"):  # another id, another lock
        pass


def test_two_finetune_runs_of_one_fold_at_once_train_it_once(tmp_path, monkeypatch):
    small = _planted(36, 80, 12)
    st = _store(tmp_path, small, n_folds=2)
    ckpt = _checkpoint("geneformer", tmp_path / "gf", small.var_names.tolist())
    real, trainings = ft.train_lora, []

    def slow_training(*args, **kwargs):
        trainings.append(threading.get_ident())
        trained = real(*args, **kwargs)
        time.sleep(0.5)  # both runs would be training now
        return trained

    monkeypatch.setattr(ft, "train_lora", slow_training)
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            (results[name],) = finetune(Store(st.root), model="geneformer", checkpoint=ckpt, dataset="planted", fold=0, **FAST)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert len(trainings) == 1
    a, b = results["a"], results["b"]
    assert a.adapter_hash == b.adapter_hash and sorted([a.reused, b.reused]) == [False, True]
    card = read_lora_card(a.adapter_dir)
    assert card.damage() is None and adapter_row(st, a.adapter_id)["adapter_hash"] == card.adapter_hash
