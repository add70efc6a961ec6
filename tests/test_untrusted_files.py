"""Files a user can place in a checkpoint folder or a store never run code when scdm reads them.

The loaders with their own test files (scGPT, scFoundation, UCE, Geneformer's dictionaries, trained
heads) test a planted pickle there; this file covers the other loaders: scBERT, CellLM, CellPLM,
Hugging Face ``pytorch_model.bin`` files (tGPT stands for Geneformer and the LLM too), and the
artifacts of a transfer run.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.store.errors import CheckpointError
from tests.untrusted import RunsCode

torch.set_num_threads(1)


def _plant(path: Path, marker: Path) -> None:
    """Add a code-running object to a torch file's top-level dict."""
    blob = torch.load(path, weights_only=True)
    blob["extra"] = RunsCode(marker)
    torch.save(blob, path)


@pytest.mark.parametrize("family", ["scbert", "celllm", "cellplm"])
def test_a_planted_pickle_in_a_performer_or_cellplm_checkpoint_is_refused(tmp_path: Path, family: str) -> None:
    from scdm.embedding._adapter import get_adapter
    from scdm.store.genes import gene_table

    module = __import__(f"scdm.embedding.models.{family}", fromlist=["write_tiny_checkpoint"])
    genes = sorted(set(gene_table()["symbol"]) - {""})[:20]
    if family == "cellplm":
        genes = sorted(set(gene_table().loc[gene_table()["ensembl"] != "", "ensembl"]))[:20]
    folder = module.write_tiny_checkpoint(tmp_path / "ckpt", genes=genes)
    (weights,) = [p for p in folder.iterdir() if p.suffix in (".pth", ".ckpt")]
    marker = tmp_path / "pwned"
    _plant(weights, marker)
    with pytest.raises(CheckpointError, match="Cannot read .* safely"):
        get_adapter(family)(folder).load("cpu")
    assert not marker.exists()


def test_a_planted_pickle_in_a_hugging_face_bin_is_refused(tmp_path: Path) -> None:
    from scdm.embedding.models.tgpt import TGPTAdapter, write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "ckpt", legacy_bin=True)
    marker = tmp_path / "pwned"
    _plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported global"):
        TGPTAdapter(folder).load("cpu")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_planted_pickles_in_a_transfer_run_are_refused(tmp_path: Path) -> None:
    from scdm.classify.synth import synthesize
    from scdm.classify.transfer import critical_genes, transfer, transfer_latent
    from scdm.store import Store

    cells = synthesize(0.01, n_genes=60, seed=0)
    target = cells[cells.obs["study"] == cells.obs["study"].iloc[0]].copy()
    source = cells[cells.obs["study"] != cells.obs["study"].iloc[0]].copy()
    st = Store(tmp_path / "store")
    st.ingest(target, name="target", label_key="response")
    source.obs["drugX"] = source.obs["response"].astype(str)
    result = transfer(st, source=source, target="target", drug="drugX", epochs=2, pretrain_epochs=1, hidden=(8,),
                      latent_dim=4, batch_size=64, n_hvg=None, seed=0,
                      allow_empty_cells=True)  # synthetic 60-gene samples: 3 of 2891 express none of them
    folder = st.root / st.query("SELECT artifacts_path FROM transfer_runs WHERE run_id = ?", [result.run_id]).iloc[0, 0]
    marker = tmp_path / "pwned"
    with np.load(folder / "latent.npz") as data:
        members = {k: data[k] for k in data.files}
    members["target"] = np.array([RunsCode(marker)], dtype=object)
    np.savez(folder / "latent.npz", **members)
    with pytest.raises(ValueError, match="allow_pickle"):
        transfer_latent(st, result.run_id)
    # an older run's artifact (model.pt, read with weights_only=True) replaced by a crafted pickle
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": RunsCode(marker)}, folder / "model.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        critical_genes(st, result.run_id, max_cells=10, n_steps=4, plot=False)
    assert not marker.exists()


def _plant_own_code(folder: Path, marker: Path, file: str) -> None:
    """Make ``file`` (config.json or tokenizer_config.json) name a class of a Python file put into the folder."""
    (folder / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast\n"
        "class Config(LlamaConfig):\n    model_type = 'planted'\n"
        "class Model(LlamaModel):\n    config_class = Config\n"
        "class Tokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / file).read_text())
    if file == "config.json":  # a model type transformers does not know: only the folder's class could load it
        config.update(model_type="planted", auto_map={"AutoConfig": "planted.Config", "AutoModel": "planted.Model",
                                                      "AutoModelForCausalLM": "planted.Model"})
    else:
        config.update(tokenizer_class="PlantedTokenizer", auto_map={"AutoTokenizer": [None, "planted.Tokenizer"]})
    (folder / file).write_text(json.dumps(config))


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("loader", ["embed", "prompt"])
def test_a_hugging_face_folder_naming_its_own_code_is_refused_without_asking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                              file: str, loader: str) -> None:
    # Left to decide, transformers asks on the terminal whether to run the folder's code: a "y" ran it.
    from scdm.embedding.models.llm import LLMAdapter, write_tiny_checkpoint
    from scdm.prompt.local import HFBackend

    folder = write_tiny_checkpoint(tmp_path / "ckpt", genes=["TP53", "EGFR", "MYC"])
    marker = tmp_path / "pwned"
    _plant_own_code(folder, marker, file)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))
    try:
        if loader == "embed":
            LLMAdapter(folder).load("cpu")
        else:
            backend = HFBackend(folder, device="cpu")
            backend.tokenizer()
            backend._load()
    except Exception as err:  # noqa: BLE001 - checked below, once the marker is
        refusal: Exception | None = err
    else:
        refusal = None
    assert not marker.exists(), "the folder's own Python file ran"
    assert isinstance(refusal, CheckpointError)
    assert re.search(rf"asks to run Python code of its own .*{file}: Auto\w+ -> .*planted\..*never runs code from a model folder",
                     str(refusal))
