"""Ctrl-C: one line saying what was kept and how to resume (not click's bare 'Aborted!'), and the rerun finishes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store
from tests.jhu006 import jhu006_store

EVALUATE = ("evaluate", "--scenario", "pooled", "--by", "all", "--folds", "3", "--head", "ridge,majority", "-q")


def test_ctrl_c_in_evaluate_says_what_is_kept_and_the_rerun_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.store import evaluation

    root = jhu006_store(tmp_path / "store").root
    real_add, added = evaluation.ResultWriter.add, []

    def add(writer: evaluation.ResultWriter, out: evaluation.TaskOutcome) -> None:
        if len(added) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        real_add(writer, out)
        added.append(out)

    monkeypatch.setattr(evaluation.ResultWriter, "add", add)
    result = CliRunner().invoke(main, ["--store", str(root), *EVALUATE])
    assert result.exit_code == 130, result.output
    assert "interrupted: the tasks finished so far are stored" in result.stderr
    assert "Run the same command again" in result.stderr and "Aborted" not in result.output
    st = Store(root)
    assert st.query("SELECT status FROM eval_runs")["status"].tolist() == ["failed"]
    assert len(st.query("SELECT task_id FROM eval_tasks")) == 2

    monkeypatch.setattr(evaluation.ResultWriter, "add", real_add)
    again = CliRunner().invoke(main, ["--store", str(root), *EVALUATE])
    assert again.exit_code == 0, again.output
    runs = st.query("SELECT status, n_done, n_reused FROM eval_runs WHERE status = 'complete'")
    assert runs["n_reused"].tolist() == [2] and runs["n_done"].tolist() == [4]


def test_ctrl_c_in_a_command_that_stores_nothing_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("scdm.classify.report.write_report", interrupt)
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "report", "--out", str(tmp_path / "r")])
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted: the report folder is incomplete. Run the same command again to finish."
