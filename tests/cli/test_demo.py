from __future__ import annotations

from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store


def test_demo_runs_end_to_end_at_reduced_size_and_reuses_the_cache(tmp_path):
    runner = CliRunner()
    args = ["--store", str(tmp_path / "store"), "demo", "--cells", "500", "--folds", "3", "--heads", "logreg,ridge,mlp",
            "--report-dir", str(tmp_path / "report"), "-q"]
    first = runner.invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    out = first.stdout
    for text in ("pca", "hvg", "geneformer", "logreg", "ridge", "mlp", "pooled", "cross", "RANDOM weights", "scdm embed"):
        assert text in out, text
    assert "note: pca and hvg are fitted without labels" in first.stderr  # the leaderboard's caveats, as scdm results
    st = Store(tmp_path / "store")
    emb = st.embeddings()
    assert set(emb["model"]) == {"pca", "hvg", "geneformer"} and (emb["status"] == "complete").all()
    assert set(emb["dataset_name"]) == {"demo-synthetic-collection", "A375-GSE108383"}
    tasks = st.query("SELECT head, scenario, count(*) AS n FROM eval_tasks GROUP BY ALL")
    assert set(tasks["head"]) == {"logreg", "ridge", "mlp"} and set(tasks["scenario"]) == {"pooled", "cross"}
    assert (tmp_path / "report" / "index.html").exists()
    n_tasks = st.query("SELECT count(*) AS n FROM eval_tasks")["n"].item()

    again = runner.invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"].item() == n_tasks  # nothing refitted
    assert len(st.embeddings()) == len(emb)
