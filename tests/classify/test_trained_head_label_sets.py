"""A trained head learns the label set asked for, and its row names the datasets it learned from."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from scdm.classify.grid import evaluate
from scdm.classify.trained_heads import predict, retrain_command, train_head, trained_heads
from scdm.cli import main
from scdm.store import Store, example_data
from scdm.store.errors import InputDataError
from scdm.store.heads import trained_head

from .test_trained_heads import _scores, write_embedding

JHU006 = Path(__file__).resolve().parents[1] / "data" / "JHU006_HNSCC_Kinker2020.h5ad"


@pytest.fixture()
def jhu(tmp_path: Path) -> tuple[Store, ad.AnnData, str]:
    """JHU006 with Gefitinib (default), Vorinostat (the exact inverse) and 'partial' (Vorinostat, 20 cells unknown)."""
    adata = ad.read_h5ad(JHU006)
    partial = adata.obs["response_Vorinostat"].astype(str).to_numpy().copy()
    partial[:20] = "unknown"
    adata.obs["partial"] = partial
    st = Store(tmp_path / "store")
    st.ingest(adata, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020")
    st.ingest(adata, label_key="response_Vorinostat", drug="Vorinostat")
    st.ingest(adata, label_key="partial", label_set="partial", unknown_values=["unknown"])
    return st, adata, write_embedding(st, "jhu006", _scores(adata, 8))


def _sensitive(adata: ad.AnnData, column: str) -> np.ndarray:
    return adata.obs[column].astype(str).eq("sensitive").to_numpy()


def test_a_head_trains_on_the_label_set_asked_for(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, adata, emb = jhu
    gefitinib = train_head(st, [emb], head="ridge")
    vorinostat = train_head(st, [emb], head="ridge", label_set="Vorinostat")
    assert vorinostat != gefitinib  # the inverse labels were a silent no-op: the Gefitinib head came back
    assert train_head(st, [emb], head="ridge", label_set="Gefitinib") == gefitinib  # the default, named: the same head
    rows = trained_heads(st).set_index("head_id")
    assert rows.loc[vorinostat, "label_set"] == "Vorinostat" and rows.loc[gefitinib, "label_set"] == "Gefitinib"
    assert rows.loc[vorinostat, "n_train_pos"] == int(_sensitive(adata, "response_Vorinostat").sum())
    frame = predict(st, vorinostat, "jhu006")
    assert (frame["label_set"] == "Vorinostat").all()
    assert (frame["response"].to_numpy(np.int64) == _sensitive(adata, "response_Vorinostat")).all()
    # the head learned Vorinostat: its fitted values agree with the Vorinostat labels, not the Gefitinib ones
    assert (frame["label"].to_numpy() == _sensitive(adata, "response_Vorinostat")).mean() > 0.5
    # the command that trains it again (a missing or legacy artifact) keeps its label set
    assert "--label-set Vorinostat" in retrain_command(st, trained_head(st, vorinostat))
    assert "--label-set" not in retrain_command(st, trained_head(st, gefitinib))


def test_identical_labels_under_another_name_train_a_head_of_their_own(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, adata, emb = jhu
    st.ingest(adata, label_key="response_AR-42", drug="AR-42")  # the same labels as Vorinostat
    vorinostat = train_head(st, [emb], head="ridge", label_set="Vorinostat")
    ar42 = train_head(st, [emb], head="ridge", label_set="AR-42")
    assert ar42 != vorinostat and trained_head(st, ar42).label_set == "AR-42"


def test_predictions_mark_the_cells_labelled_in_the_heads_label_set(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, _, emb = jhu
    head_id = train_head(st, [emb], head="ridge", label_set="partial")
    assert trained_head(st, head_id).n_train == 46
    frame = predict(st, head_id, "jhu006")
    assert frame["trained_on"].sum() == 46 and not frame["trained_on"].iloc[:20].any()
    assert frame["response"].isna().sum() == 20


def test_train_metrics_come_from_results_of_the_heads_label_set(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, _, emb = jhu
    common = {"scenarios": ["pooled"], "by": ["all"], "heads": ["ridge"], "folds": 3, "silent": True}
    evaluate(st, [emb], **common)
    evaluate(st, [emb], label_set="Vorinostat", **common)
    head_id = train_head(st, [emb], head="ridge", label_set="Vorinostat")
    (auroc,) = [m for m in json.loads(trained_head(st, head_id).train_metrics or "[]") if m["metric"] == "auroc"]
    expected = st.query("SELECT avg(value) AS v FROM eval_results WHERE metric = 'auroc' AND label_set = 'Vorinostat'")
    assert st.query("SELECT label_set FROM splits WHERE split_id = ?", [auroc["split_id"]])["label_set"].iloc[0] == "Vorinostat"
    assert auroc["mean"] == pytest.approx(expected["v"].iloc[0])


def test_a_label_set_a_training_dataset_lacks_is_refused_naming_what_it_has(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, _, emb = jhu
    with pytest.raises(InputDataError, match=r"no label set 'Cisplatin'; its label sets: Gefitinib, Vorinostat, partial"):
        train_head(st, [emb], head="ridge", label_set="Cisplatin")


def test_cli_train_head_takes_a_label_set(jhu: tuple[Store, ad.AnnData, str]) -> None:
    st, _, emb = jhu
    out = CliRunner().invoke(main, ["--store", str(st.root), "train-head", "--embedding", emb, "--head", "ridge",
                                    "--label-set", "Vorinostat"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert trained_head(st, out.stdout.strip()).label_set == "Vorinostat"



class _Job:
    """The part of a server job handle an upload job uses: its result and stage updates."""

    def __init__(self) -> None:
        self.record = SimpleNamespace(result={})

    def update(self, **changes: object) -> None:
        self.record = SimpleNamespace(**{**vars(self.record), **changes})


def test_an_upload_retrains_a_label_set_head_on_that_label_set(tmp_path: Path) -> None:
    """The server trains the head again in the upload's joint space: on the labels it learned, not the default."""
    from scdm.embedding.runner import embed_baseline
    from scdm.server.routes import _upload_job

    st = Store(tmp_path / "store")
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020")
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    (space,) = embed_baseline(st, ["jhu006"], model="pca", n_comps=4, progress=False)
    head_id = train_head(st, [space.embedding_id], head="ridge", label_set="Vorinostat")
    upload = ad.read_h5ad(JHU006)[:20].copy()
    upload.obs_names = [f"new_{i}" for i in range(upload.n_obs)]
    upload.write_h5ad(tmp_path / "batch.h5ad")
    job = _Job()
    _upload_job(SimpleNamespace(store=st), job, tmp_path / "batch.h5ad", "newbatch", {}, head_id, "")  # type: ignore[arg-type]
    again = trained_head(st, job.record.result["head_id"])
    assert again.head_id != head_id and again.label_set == "Vorinostat"


def test_a_category_heads_row_lists_only_the_datasets_it_was_fitted_on(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    a375 = ad.read_h5ad(example_data("A375"))
    st.ingest(a375, name="a375", label_key="response_PLX4720", drug="PLX-4720", study="GSE108383", cancer_type="Melanoma")
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020",
              cancer_type="HNSCC")
    embeddings = [write_embedding(st, "a375", _scores(a375, 8)), write_embedding(st, "jhu006", _scores(ad.read_h5ad(JHU006), 8))]
    melanoma = trained_head(st, train_head(st, embeddings, "cancer_type", "Melanoma", head="ridge"))
    assert melanoma.datasets == ("a375",) and melanoma.label_set == "PLX-4720"
    both = trained_head(st, train_head(st, embeddings, head="ridge"))
    assert sorted(both.datasets) == ["a375", "jhu006"] and both.label_set == "Gefitinib,PLX-4720"


def test_a_refusals_train_head_advice_keeps_the_heads_label_set(tmp_path: Path) -> None:
    """A pca head of JHU006's Vorinostat labels refused a new dataset with a joint fit and `scdm train-head
    --embedding ID,... --head logreg` (and --by, --category, --param, --threshold), but no --label-set: the head
    that advice trains learns the default Gefitinib labels, the exact inverse (AUROC 0.0 on the new cells for the
    Vorinostat head's 1.0). The advised command names the label set, and following it trains the Vorinostat head."""
    import re
    import shlex

    from scdm.embedding.runner import embed_baseline
    from scdm.store.errors import EmbeddingNotFoundError
    from scdm.store.genes import gene_table_version

    adata = ad.read_h5ad(JHU006)
    st = Store(tmp_path / "store")
    st.ingest(adata[:50].copy(), name="jhu", label_key="response_Gefitinib", drug="Gefitinib", study="a")
    st.ingest(adata[:50].copy(), name="jhu", label_key="response_Vorinostat", drug="Vorinostat")
    st.ingest(adata[50:].copy(), name="new", study="b")
    (space,) = embed_baseline(st, ["jhu"], model="pca", n_comps=4, progress=False)
    head_id = train_head(st, [space.embedding_id], head="logreg", label_set="Vorinostat")
    with pytest.raises(EmbeddingNotFoundError) as refused:
        predict(st, head_id, "new")
    advised = re.search(r"\(`scdm train-head (.*?)`", str(refused.value))
    assert advised is not None and advised.group(1) == "--embedding ID,... --head logreg --label-set Vorinostat"
    embed = re.search(r"\(`scdm embed (.*?)`\)", str(refused.value))
    assert embed is not None
    joint = embed_baseline(st, shlex.split(embed.group(1))[:2], model="pca", n_comps=4, progress=False)
    again = train_head(st, [joint[0].embedding_id], head="logreg", label_set="Vorinostat")
    frame = predict(st, again, "new")
    vorinostat = _sensitive(adata[50:], "response_Vorinostat")
    assert (frame["label"].to_numpy() == vorinostat).mean() > 0.5  # the Gefitinib head's labels were the inverse
    # the older-gene-table refusal gives the same train-head command
    write_embedding(st, "jhu", _scores(adata[:50], 4), model="gf-test", params={"gene_table": "0ld0ld0ld0ld"})
    old = train_head(st, dataset="jhu", model="gf-test", head="logreg", label_set="Vorinostat")
    write_embedding(st, "new", _scores(adata[50:], 4), model="gf-test", params={"gene_table": gene_table_version()})
    with pytest.raises(InputDataError, match=re.escape("--head logreg --label-set Vorinostat`")):
        predict(st, old, "new")
    gefitinib = train_head(st, [space.embedding_id], head="logreg")  # the default label set needs no option
    with pytest.raises(InputDataError, match=re.escape("--head logreg`")):
        predict(st, gefitinib, "new")
