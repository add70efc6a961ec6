"""A truncated or damaged file in a checkpoint folder is a CheckpointError naming the file and the
fix (the CLI prints it as one line), never a traceback from the library that tried to read it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from scdm.embedding._safe_load import load_pickle, load_torch_file
from scdm.store.errors import CheckpointError


@pytest.mark.parametrize("damage", [
    b"\x80\x04\x96\xff\xff\xff\xff\xff\xff\xff\x7f",  # BYTEARRAY8 of 2**63 - 1 bytes: OverflowError
    b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",  # BINBYTES8 of 2**63 - 1 bytes
    b"",  # empty: EOFError
])
def test_a_damaged_pickle_is_a_checkpoint_error(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / "token_dictionary_gc104M.pkl"
    path.write_bytes(damage)
    with pytest.raises(CheckpointError, match=r"Cannot read .*token_dictionary_gc104M\.pkl.* Replace it"):
        load_pickle(path, what="a Geneformer gene dictionary", source="the model's repository")


def test_an_intact_pickle_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000121410": 3, "ENSG00000148584": 2.5}, protocol=4))
    assert load_pickle(path, what="a dictionary", source="anywhere") == {"ENSG00000121410": 3, "ENSG00000148584": 2.5}


@pytest.mark.parametrize(("family", "legacy_bin"), [("geneformer", False), ("geneformer", True), ("tgpt", False)])
def test_truncated_hugging_face_weights_are_a_checkpoint_error(tmp_path: Path, family: str, legacy_bin: bool) -> None:
    import importlib

    from scdm.embedding._adapter import get_adapter

    module = importlib.import_module(f"scdm.embedding.models.{family}")
    options = {"version": 2} if family == "geneformer" else {}
    folder = module.write_tiny_checkpoint(tmp_path / "ckpt", seed=1, legacy_bin=legacy_bin, **options)
    weights = folder / ("pytorch_model.bin" if legacy_bin else "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match=r"Cannot read the weights in .*ckpt.* download the model folder again"):
        get_adapter(family)(folder).load("cpu")


@pytest.mark.parametrize(("name", "text"), [
    ("vocab.json", '{"A2ML1": 0, "A4GA'),  # truncated
    ("vocab.json", '["A2ML1", "A4GALT"]'),  # a list, not gene -> id
    ("vocab.json", '{"A2ML1": "zero"}'),  # not a token id
    ("args.json", '{"embsize": 8,'),
    ("args.json", "[1, 2]"),
])
def test_a_damaged_scgpt_json_is_a_checkpoint_error_naming_the_file(tmp_path: Path, name: str, text: str) -> None:
    from scdm.embedding.models.scgpt import ScGPTAdapter, write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "ckpt", seed=1)
    (folder / name).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{name}.*re-download the model folder"):
        ScGPTAdapter(folder).vocab()


def _torch_zip_cut_short(path: Path) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"model_state_dict": {"w": torch.zeros(256)}}, buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(("content", "detail"), [
    (b"<!DOCTYPE html><html><body>Sign in to continue</body></html>", r"a web page \(HTML\)"),  # a gated download
    (b"garbage bytes", r"UnpicklingError: Unsupported operand"),
    (None, r"RuntimeError"),  # a torch.save zip cut off halfway
])
@pytest.mark.parametrize("loader", ["load_torch_file", "performer", "cellplm"])
def test_a_file_that_is_no_torch_file_is_damaged_not_unsafe(tmp_path: Path, content: bytes | None, detail: str,
                                                               loader: str) -> None:
    # before: bytes that are no pickle at all were "Refusing to load ...: it asks to unpickle Check the
    # documentation of torch.load" (load_torch_file) or came with the advice to re-save the file with
    # torch.load(weights_only=False) (performer, cellplm), neither of which can help
    path = tmp_path / "models.ckpt"
    if content is None:
        _torch_zip_cut_short(path)
    else:
        path.write_bytes(content)
    if loader == "load_torch_file":
        from scdm.embedding._safe_load import load_torch_file

        load = lambda: load_torch_file(path, what="the official models.ckpt")  # noqa: E731
    else:
        from scdm.embedding.models import _performer, cellplm

        load = lambda: (_performer if loader == "performer" else cellplm).load_state_dict_file(path)  # noqa: E731
    with pytest.raises(CheckpointError, match=rf"Cannot read .*models\.ckpt.* as a torch file.*{detail}.*Re-download") as err:
        load()
    assert "weights_only=False" not in str(err.value) and "asks to unpickle" not in str(err.value)


_CRAFT_AND_LOAD = """
import pickle, sys
import numpy as np
from scdm.embedding._safe_load import load_pickle, _numpy_multiarray
from scdm.store.errors import CheckpointError

OBJECT = np.dtype("O")


class ObjectFieldsWithoutTheirFlag:  # a V16 dtype whose state gives it two object fields and flags 0
    def __reduce__(self):
        return np.dtype, ("V16", False, True), (3, "|", None, ("a", "b"), {"a": (OBJECT, 0), "b": (OBJECT, 8)}, 16, 1, 0)


class PointersFromTheFile:  # the file's 16 bytes copied in as the two fields' object pointers
    def __reduce__(self):
        return _numpy_multiarray().scalar, (ObjectFieldsWithoutTheirFlag(), b"AAAAAAAABBBBBBBB")


class Followed:  # str() of the scalar follows the pointers
    def __reduce__(self):
        return str, (PointersFromTheFile(),)


with open(sys.argv[1], "wb") as handle:
    pickle.dump({"ENSG00000141510": Followed()}, handle, protocol=int(sys.argv[2]))
try:
    load_pickle(sys.argv[1], what="a Geneformer gene dictionary", source="the model's repository")
except CheckpointError as err:
    print(err)
"""


@pytest.mark.parametrize("protocol", [3, 5])  # (protocol 2 names str __builtin__.str, refused anyway)
def test_a_numpy_scalar_of_object_fields_is_refused_not_followed(tmp_path: Path, protocol: int) -> None:
    # Before: numpy took the crafted dtype state, the scalar held 0x4141414141414141 as an object
    # pointer and str() of it crashed the process (SIGSEGV): a separate process, so the crash is a failure here.
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _CRAFT_AND_LOAD, str(tmp_path / "d.pkl"), str(protocol)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, f"the load died with {done.returncode}: {done.stderr[-500:]}"
    assert "Refusing to load" in done.stdout and "a numpy scalar of dtype" in done.stdout


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_numpy_scalars_still_load(tmp_path: Path, protocol: int) -> None:
    import numpy as np

    values = {"a": np.int16(-2), "b": np.uint64(2**63), "c": np.float32(1.5), "d": np.float64(-0.25), "e": np.bool_(True),
              "f": np.complex128(1 - 2j), "g": np.str_("TP53"), "h": np.bytes_(b"x"), "i": np.dtype(">i8").type(7)}
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(values, protocol=protocol))
    loaded = load_pickle(path, what="a dictionary", source="anywhere")
    assert {k: (type(v), v) for k, v in loaded.items()} == {k: (type(v), v) for k, v in values.items()}


def test_a_checkpoint_holding_a_numpy_object_array_is_refused_as_unsafe_not_called_damaged(tmp_path: Path) -> None:
    # before: "it is truncated, damaged or not a torch.save file ... Re-download", for a whole file
    # that torch refused because of the type it asks for (an object array), which no re-download mends
    import numpy as np
    import torch

    path = tmp_path / "best_model.pt"
    torch.save({"w": torch.zeros(2), "genes": np.array(["TP53", None], dtype=object)}, path)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*numpy\.dtypes\.ObjectDType.*save only its tensors") as err:
        load_torch_file(path, what="scGPT's best_model.pt")
    assert "damaged" not in str(err.value)
