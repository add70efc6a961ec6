"""The local backend on a tiny random LLaMA written in the official Hugging Face format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from scdm.embedding.models.llm import write_tiny_checkpoint
from scdm.prompt import prompt
from scdm.prompt.local import HFBackend
from scdm.prompt.templates import answer_format, load_template
from scdm.store.errors import CheckpointError

torch.set_num_threads(1)

FAST = {"by": ["all"], "scenarios": ["pooled"], "folds": 2, "silent": True}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory, symbols: list[str]) -> Path:
    # the vocabulary holds the gene symbols and the words of the prompt and of the JSON answer
    words = [load_template().text, answer_format(10), "sensitive resistant Answer: study tissue lung NSCLC Erlotinib"]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), genes=symbols, extra_text=words,
                                 initializer_range=0.5)


def reference_p(folder: Path, context: str) -> float:
    """P(sensitive) after ``context`` with plain transformers: one full forward, no cache."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    a = tok(context + "sensitive")["input_ids"]
    b = tok(context + "resistant")["input_ids"]
    c = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    with torch.no_grad():
        logits = model(torch.tensor([a[:c]])).logits[0, -1]
    return float(torch.softmax(logits[[a[c], b[c]]], dim=0)[0])


def test_local_model_end_to_end_records_p_sensitive(marker_store, tiny_llm) -> None:
    st = marker_store
    summary = prompt(st, ["marker"], backend="hf", checkpoint=tiny_llm, **FAST)
    assert summary.model == tiny_llm.name and summary.head == "prompt-zero-shot"
    assert (summary.n_requests, summary.n_sent, summary.n_cells, summary.n_unanswered) == (8, 8, 64, 0)
    stored = st.query("SELECT * FROM prompt_answers")
    assert len(stored) == 64 and stored["p_sensitive"].notna().all() and (stored["status"] == "ok").all()
    # the greedy label is the more likely of the two label words
    assert ((stored["p_sensitive"] >= 0.5).astype(int) == stored["label"].astype(int)).all()
    assert stored["p_sensitive"].nunique() > 32  # real scores, not two values
    requests = st.query("SELECT * FROM prompt_requests")
    assert set(requests["backend"]) == {"hf"} and requests["checkpoint_hash"].notna().all()
    assert (requests["prompt_tokens"] > 100).all() and (requests["attempts"] == 1).all()
    m = st.query("SELECT metric, value FROM eval_results")
    assert m[m["metric"].isin(["auroc", "ap"])]["value"].notna().all()
    assert st.query("SELECT flags FROM eval_tasks")["flags"].isna().all()  # scores: no no_scores flag
    # every test cell is predicted with its own stored score (each cell is asked once, zero-shot)
    # (as float64 since migration 15: the stored probability is the score itself)
    assert sorted(st.query("SELECT proba FROM eval_predictions")["proba"]) == sorted(stored["p_sensitive"].astype(np.float64))
    # the scores equal a plain-transformers forward pass without the key/value cache, also for later cells
    first = requests.iloc[0]
    messages = json.loads(first["messages"])
    text, _ = HFBackend(tiny_llm).prompt_text(messages)
    answer = first["answer_text"]
    got = stored[stored["request_id"] == first["request_id"]].sort_values("position")["p_sensitive"].to_numpy()
    for position in (1, 3, int(first["n_cells"])):
        label_at = answer.index(f'{{"cell": {position}, "response": "') + len(f'{{"cell": {position}, "response": "')
        assert got[position - 1] == pytest.approx(reference_p(tiny_llm, text + answer[:label_at]), abs=1e-5)
    # a rerun is answered from the catalog: free, and the weights are never loaded
    again = prompt(st, ["marker"], backend="hf", checkpoint=tiny_llm, **FAST)
    assert (again.n_cached, again.n_sent, again.n_reused) == (8, 0, 2)


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_llm, tmp_path) -> None:
    folder = Path(shutil.copytree(tiny_llm, tmp_path / "chat"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<assistant>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    backend = HFBackend(folder)
    text, special = backend.prompt_text([{"role": "user", "content": "Cell 1: A1BG"}])
    assert text == "<user> Cell 1: A1BG <assistant>" and special is False
    plain, special = HFBackend(tiny_llm).prompt_text([{"role": "user", "content": "Cell 1: A1BG"}])
    assert plain.endswith("Answer:\n") and special is True
    assert backend.checkpoint_hash != HFBackend(tiny_llm).checkpoint_hash
    reply = backend.send([{"role": "user", "content": "Cell 1: A1BG\nCell 2: A2M"}], 2)
    assert json.loads(reply.text)["cells"][1]["cell"] == 2 and set(reply.scores) == {1, 2}
    assert all(0 < p < 1 for p in reply.scores.values()) and np.isfinite(list(reply.scores.values())).all()


def test_not_a_model_folder_or_incomplete_weights(tmp_path, tiny_llm) -> None:
    from safetensors.torch import load_file, save_file

    with pytest.raises(CheckpointError, match="no config.json"):
        HFBackend(tmp_path)
    folder = Path(shutil.copytree(tiny_llm, tmp_path / "incomplete"))
    weights = load_file(folder / "model.safetensors")
    dropped = next(k for k in weights if "layers.1.mlp" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lack 1 tensors"):  # never answer with random stand-ins
        HFBackend(folder).send([{"role": "user", "content": "Cell 1: A1BG"}], 1)


def test_request_longer_than_the_model_context_is_refused(marker_store, symbols, tmp_path) -> None:
    # a rotary model answers past its trained positions (as if it had read the prompt): with a
    # 64-position model the 10-cell requests (about 400 tokens) were answered and scored
    from scdm.prompt.backends import PromptRequestError

    words = [load_template().text, answer_format(10), "sensitive resistant Answer: study tissue lung NSCLC Erlotinib"]
    short = write_tiny_checkpoint(tmp_path / "short", genes=symbols, extra_text=words, max_position_embeddings=64)
    with pytest.raises(PromptRequestError, match=r"more than the 64 positions of 'short'.*--cells-per-request"):
        prompt(marker_store, ["marker"], backend="hf", checkpoint=short, **FAST)
    assert marker_store.query("SELECT count(*) AS n FROM prompt_requests")["n"][0] == 0
    assert marker_store.query("SELECT count(*) AS n FROM eval_results")["n"][0] == 0
