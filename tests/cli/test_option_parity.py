"""The command line and the Python API read the same options alike, and an option nothing reads says so.

A `scdm evaluate --seed 3 --scenario cross --head logreg` run fitted nothing new and printed the numbers of
seed 0 as those of seed 3 (cross-data folds are the studies, logreg takes no seed): a seed sweep then shows
an sd of 0 over seeds. `--folds` and `--split-scheme` without a pooled scenario were dropped as silently.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.classify.grid import UnreadOptionWarning
from scdm.classify.grid import evaluate as grid_evaluate
from scdm.classify.results import leaderboard
from scdm.cli import main
from scdm.embedding.runner import embed_baseline
from scdm.store import Store, example_data


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A375's cells as two studies (every other cell), one pca space: a cross-data split of two folds."""
    import anndata as ad

    root = tmp_path_factory.mktemp("parity")
    adata = ad.read_h5ad(example_data("A375"))
    adata.obs["study"] = ["s1" if i % 2 else "s2" for i in range(adata.n_obs)]
    st = Store(root / "st")
    st.ingest(adata, name="a375", label_key="response_PLX4720", study_key="study")
    embed_baseline(st, ["a375"], model="pca", n_comps=5, n_hvg=300, progress=False)  # a small eigh: seconds
    return st.root


def _auroc(st: Store, seed: int) -> list[float]:
    board = leaderboard(st, metrics=["auroc"], scenarios=["cross"], heads=["logreg"])
    return board[board["seed"].isna() | (board["seed"] == seed)]["mean"].round(12).tolist()


def test_a_seed_nothing_reads_is_named_not_passed_off_as_another_seed(two_studies: Path) -> None:
    st = Store(two_studies)
    cross = {"scenarios": ["cross"], "by": ["all"], "heads": ["logreg"], "silent": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadOptionWarning)  # seed 0 is no option given
        grid_evaluate(st, **cross)
    first = _auroc(st, 0)
    assert len(first) == 1
    with pytest.warns(UnreadOptionWarning, match=r"--seed 3 changes nothing: no pooled split is asked for .*logreg takes "
                                                 r"no seed, so these are the tasks and numbers of seed 0") as caught:
        summary = grid_evaluate(st, **cross, seed=3)
    assert summary.n_done == 0 and _auroc(st, 3) == first  # what the warning says: the same tasks, the same numbers
    assert len(caught) == 1
    for reads_it in ({"heads": ["shuffled-label"]}, {"scenarios": ["pooled"]}):  # a head or the folds take the seed
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnreadOptionWarning)
            grid_evaluate(st, **{**cross, **reads_it, "folds": 2}, seed=3)


def test_a_head_with_its_own_seed_does_not_read_the_runs() -> None:
    from scdm.classify.grid import unread_options

    assert unread_options(["cross"], ["mlp"], {"mlp": {"seed": 1}}, seed=3)  # the run's seed reaches no head
    assert not unread_options(["cross"], ["mlp"], None, seed=3)
    assert not unread_options(["pooled", "cross"], ["logreg"], None, seed=3, split_scheme="sample", folds=3)


def test_evaluate_names_folds_and_split_scheme_given_without_a_pooled_split(two_studies: Path) -> None:
    base = ["--store", str(two_studies), "evaluate", "-q", "--head", "majority", "--by", "all"]
    given = CliRunner().invoke(main, [*base, "--scenario", "cross", "--folds", "3", "--split-scheme", "sample"])
    assert given.exit_code == 0, given.output
    assert "warning: --folds 3 is ignored: no pooled split is asked for (scenario cross" in given.stderr
    assert "warning: --split-scheme sample is ignored" in given.stderr
    for args in (["--scenario", "cross"], ["--scenario", "pooled", "--folds", "3", "--split-scheme", "cell"]):
        quiet = CliRunner().invoke(main, [*base, *args])
        assert quiet.exit_code == 0 and "ignored" not in quiet.stderr, (args, quiet.stderr)


def test_scdm_results_names_a_filter_value_no_result_has_as_the_command_does(two_studies: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import scdm

    st = Store(two_studies)
    grid_evaluate(st, scenarios=["cross"], by=["all"], heads=["majority"], silent=True)
    capsys.readouterr()
    assert scdm.results(st, models=["PCA"], heads="majority").empty  # was an empty frame and nothing else
    assert "warning: models 'PCA' matches no result (names are exact and case-sensitive; results have: 'pca')" \
        in capsys.readouterr().err
    assert len(scdm.results(st, models="pca", heads="majority", scenarios="cross")) == 1
    assert "warning" not in capsys.readouterr().err
    out = CliRunner().invoke(main, ["--store", str(two_studies), "results", "--model", "PCA"])
    assert "warning: --model 'PCA' matches no result (names are exact and case-sensitive; results have: 'pca')" in out.stderr
