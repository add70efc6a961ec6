"""An adapter folder: the peft LoRA weights, the MLP head and the card saying what they were trained from.

A folder ``<store>/artifacts/adapters/<adapter_id>/`` holds ``adapter_config.json`` and
``adapter_model.safetensors`` (peft ``save_pretrained``), ``head.safetensors`` (the head) and
``scdm_adapter.json`` (the card: model, checkpoint hash, parameters, (split, fold), LoRA and
training settings, and the content hash of the weight files). :func:`read_lora_card` reads the
card without loading weights; :meth:`LoraCard.apply` checks the files' hash and loads them onto a
model. Nothing here is unpickled: weights are safetensors, the card is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdm.embedding.lora_training import (
    TrainedLora,
    TrainSettings,
    build_head,
    lora_matrices,
    quiet_peft,
)
from scdm.store import canonical_json
from scdm.store.errors import CheckpointError
from scdm.store.hashing import digests_hash, file_blake2b
from scdm.store.leftovers import place_folder, temp_prefix

if TYPE_CHECKING:
    from scdm.embedding._adapter import Adapter

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_VERSION",
    "HEAD_FILE",
    "LoraCard",
    "canonical_json",
    "make_card",
    "read_lora_card",
    "save_adapter",
]

CARD_FILE = "scdm_adapter.json"
"""What the adapter was trained from and on (read before loading, to refuse mismatches)."""
HEAD_FILE = "head.safetensors"
"""The MLP head's weights."""
CARD_FORMAT = "scdm-lora"
CARD_VERSION = 1
"""Version of the adapter folder layout; part of every adapter's identity."""
_HASHED_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE)
_CARD_FIELDS = frozenset({"adapter_id", "tuning_id", "adapter_hash", "model", "checkpoint_hash", "model_params", "seed",
                          "split_id", "fold", "scenario", "category_type", "category", "lora", "train", "lora_modules",
                          "emb_dim"})


def _files_hash(folder: Path) -> str:
    """blake2b over the adapter's weight files (names and contents); a missing file is an error."""
    missing = [name for name in _HASHED_FILES if not (folder / name).is_file()]
    if missing:
        msg = f"Adapter folder {str(folder)!r} is missing {missing[0]!r}; it is not a complete scdm LoRA adapter."
        raise CheckpointError(msg)
    return digests_hash((name, file_blake2b(folder / name)) for name in _HASHED_FILES)


def _fixed_params_changed(adapter: Adapter, params: dict[str, Any], trained: dict[str, Any]) -> list[str]:
    """``'key: was X, now Y'`` for each differing parameter that no constructor argument sets (how the
    model reads cells, recorded by ``params()``), which the user cannot pass to match the adapter."""
    import inspect

    settable = set(inspect.signature(type(adapter).__init__).parameters) | {"seed"}
    return [f"{key}: {'unrecorded' if key not in trained else repr(trained[key])} then, {params.get(key)!r} now"
            for key in sorted(set(params) | set(trained))
            if key not in settable and canonical_json(params.get(key)) != canonical_json(trained.get(key))]


@dataclass(frozen=True)
class LoraCard:
    """What an adapter folder holds and what it was trained from (``scdm_adapter.json``)."""

    path: Path
    adapter_id: str
    tuning_id: str
    adapter_hash: str
    """blake2b of the adapter and head files."""
    model: str
    checkpoint_hash: str
    model_params: dict[str, Any]
    seed: int
    split_id: str
    fold: int
    scenario: str
    category_type: str
    category: str
    lora: dict[str, Any]
    train: dict[str, Any]
    lora_modules: tuple[str, ...]
    emb_dim: int

    @property
    def variant(self) -> str:
        """``lora:<adapter_id>``."""
        return f"lora:{self.adapter_id}"

    def embedding_params(self) -> dict[str, Any]:
        """What the tuned embeddings record in ``params["lora"]``: the (split, fold) they belong to."""
        return {"adapter_id": self.adapter_id, "tuning_id": self.tuning_id, "split_id": self.split_id, "fold": self.fold,
                "scenario": self.scenario, "category_type": self.category_type, "category": self.category}

    def check_base(self, adapter: Adapter, checkpoint_hash: str | None) -> None:
        """Refuse to put this adapter on another model, checkpoint or parameter set."""
        if adapter.name != self.model:
            msg = f"Adapter {self.adapter_id} ({self.path}) was trained on {self.model!r}, not {adapter.name!r}; use --model {self.model}."
            raise CheckpointError(msg)
        if checkpoint_hash != self.checkpoint_hash:
            msg = (f"Adapter {self.adapter_id} was trained on the {self.model} checkpoint with content hash {self.checkpoint_hash}, "
                   f"but {str(adapter.checkpoint)!r} has hash {checkpoint_hash}: LoRA weights only fit the exact checkpoint "
                   "they were trained on. Pass that checkpoint, or fine-tune again on this one.")
            raise CheckpointError(msg)
        params = {**adapter.params(), "seed": adapter.seed}
        if canonical_json(params) == canonical_json(self.model_params):
            return
        fixed = _fixed_params_changed(adapter, params, self.model_params)
        if fixed:  # no option sets them: an older scdm's model read cells otherwise (tie_break, gene_collapse)
            msg = (f"Adapter {self.adapter_id} was fine-tuned by an older scdm, whose {self.model} made its input "
                   f"otherwise ({'; '.join(fixed)}): its weights were tuned on other tokens, and no option brings that "
                   "input back. Fine-tune it again with this scdm (scdm finetune), or embed without --lora.")
            raise CheckpointError(msg)
        msg = (f"Adapter {self.adapter_id} was trained with {self.model} parameters {self.model_params}, but the model is "
               f"set up with {params}. Use the same parameters (they decide which layers exist and what is pooled).")
        raise CheckpointError(msg)

    def damage(self) -> str | None:
        """What is wrong with the folder's weight files (missing, or not the bytes the card hashed), or None."""
        try:
            found = _files_hash(self.path)
        except CheckpointError as err:
            return str(err)
        if found != self.adapter_hash:
            return f"the files of adapter {self.adapter_id} in {str(self.path)!r} do not match their recorded hash (changed or damaged)"
        return None

    def apply(self, adapter: Adapter) -> Any:
        """Load the LoRA weights into ``adapter.model`` (loaded, eval mode); returns the head (eval mode)."""
        from peft import PeftModel

        assert adapter.model is not None and adapter.device is not None
        if _files_hash(self.path) != self.adapter_hash:
            msg = f"The files of adapter {self.adapter_id} in {str(self.path)!r} do not match their recorded hash; they were changed or damaged. Fine-tune again."
            raise CheckpointError(msg)
        with quiet_peft():
            PeftModel.from_pretrained(adapter.model, str(self.path), is_trainable=False)  # injects in place
        adapter.model.to(adapter.device).eval()
        found = sorted(lora_matrices(adapter.model))
        if found != sorted(self.lora_modules):
            msg = (f"Adapter {self.adapter_id} has LoRA weights for {len(self.lora_modules)} modules, but they landed on "
                   f"{len(found)} modules of this {self.model} model: the checkpoint's architecture differs from the one it was trained on.")
            raise CheckpointError(msg)
        return self.load_head().to(adapter.device)

    def load_head(self) -> Any:
        """The trained MLP head (CPU, eval mode, no gradients)."""
        from safetensors.torch import load_file

        head = build_head(self.emb_dim, int(self.train["head"]["hidden"]))
        head.load_state_dict(load_file(str(self.path / HEAD_FILE)))
        return head.eval().requires_grad_(False)


def read_lora_card(lora_dir: str | os.PathLike[str]) -> LoraCard:
    """Read an adapter folder's card (no weights are loaded).

    Raises
    ------
    CheckpointError
        The folder is missing or is not an scdm LoRA adapter.
    """
    path = Path(lora_dir)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        msg = f"{str(path)!r} is not an scdm LoRA adapter folder (no {CARD_FILE}); fine-tune with `scdm finetune` to make one."
        raise CheckpointError(msg)
    try:
        raw = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"The card {str(card_path)!r} cannot be read ({type(err).__name__}: {err}); the adapter folder is damaged. Fine-tune again."
        raise CheckpointError(msg) from err
    if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT or int(raw.get("version", 0)) > CARD_VERSION:
        found = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (type(raw).__name__, None)
        msg = f"{str(card_path)!r} has format {found[0]!r} version {found[1]}; this scdm reads {CARD_FORMAT} up to version {CARD_VERSION}."
        raise CheckpointError(msg)
    missing = sorted(_CARD_FIELDS - set(raw))
    if missing:
        msg = f"The card {str(card_path)!r} lacks {', '.join(missing)}; the adapter folder is damaged. Fine-tune again."
        raise CheckpointError(msg)
    return LoraCard(path=path, adapter_id=raw["adapter_id"], tuning_id=raw["tuning_id"], adapter_hash=raw["adapter_hash"],
                    model=raw["model"], checkpoint_hash=raw["checkpoint_hash"], model_params=raw["model_params"],
                    seed=int(raw["seed"]), split_id=raw["split_id"], fold=int(raw["fold"]), scenario=raw["scenario"],
                    category_type=raw["category_type"], category=raw["category"], lora=raw["lora"], train=raw["train"],
                    lora_modules=tuple(raw["lora_modules"]), emb_dim=int(raw["emb_dim"]))


def make_card(trained: TrainedLora, settings: TrainSettings, *, adapter_id: str, tuning_id: str, checkpoint_hash: str,
              split_id: str, fold: int, scenario: str, category_type: str, category: str) -> dict[str, Any]:
    """The card of a trained adapter (``scdm_adapter.json``, less the files' hash)."""
    adapter = trained.adapter
    return {"format": CARD_FORMAT, "version": CARD_VERSION, "adapter_id": adapter_id, "tuning_id": tuning_id,
            "model": adapter.name, "checkpoint_hash": checkpoint_hash, "model_params": {**adapter.params(), "seed": adapter.seed},
            "seed": settings.seed, "split_id": split_id, "fold": fold, "scenario": scenario, "category_type": category_type,
            "category": category, "lora": settings.lora_json(), "train": settings.train_json(),
            "lora_modules": trained.lora_modules, "emb_dim": adapter.emb_dim, "train_curve": trained.curve}


def _forget_base_path(config_path: Path) -> None:
    """Blank the base model's folder that peft writes into ``adapter_config.json``.

    The card names the checkpoint by its content hash; the local path would make the adapter's
    hash, and with it its embedding space, differ between two folders holding the same checkpoint.
    """
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_adapter(trained: TrainedLora, folder: Path, card: dict[str, Any]) -> str:
    """Write adapter, head and card to a temporary folder, then put it in place; returns the hash of the adapter in place.

    The temporary folder's name carries this process's pid, so that ``scdm verify --repair`` can
    tell the leftover of a killed save from a save under way (:mod:`store.leftovers`). How the
    folder is put in place: see :func:`_place`.
    """
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{temp_prefix(folder.name)}{uuid.uuid4().hex[:8]}"
    try:
        trained.peft_model.save_pretrained(str(tmp))
        _forget_base_path(tmp / "adapter_config.json")
        save_file({k: v.detach().contiguous().cpu() for k, v in trained.head.state_dict().items()}, str(tmp / HEAD_FILE))
        adapter_hash = _files_hash(tmp)
        (tmp / CARD_FILE).write_text(json.dumps({**card, "adapter_hash": adapter_hash}, indent=1, sort_keys=True, default=str))
        return _place(tmp, folder, adapter_hash)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place


def _place(tmp: Path, folder: Path, adapter_hash: str) -> str:
    """Rename the finished ``tmp`` to ``folder`` (:func:`store.leftovers.place_folder`); the hash of the
    adapter that ends up there.

    An adapter already there with the same hash (another run of the same fold placed it first) is
    kept; anything else (left by a run that died before its catalog row, or damaged) is replaced.
    ``scdm finetune`` trains and places one adapter at a time per id (:func:`store.adapters.training_lock`),
    so this is never another live run's adapter.

    Raises
    ------
    CheckpointError
        Other processes kept putting other adapters at ``folder`` meanwhile.
    """
    place_folder(tmp, folder, same=lambda there: _intact_hash(there) == adapter_hash, what=f"adapter {folder.name}",
                 remedy="(Several `scdm finetune` runs of the same fold, started outside scdm's lock?) Run the command "
                        "again once they are done: it reuses the adapter they leave.", error=CheckpointError)
    return adapter_hash


def _intact_hash(folder: Path) -> str | None:
    """The adapter hash of a complete, undamaged adapter folder (its card's, checked against its files), or None."""
    try:
        card = read_lora_card(folder)
    except CheckpointError:
        return None
    return card.adapter_hash if card.damage() is None else None
