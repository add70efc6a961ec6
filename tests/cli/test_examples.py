"""Every `scdm ...` example in a --help text or in README, and every SQL block of README, runs.

The examples are extracted, not copied: a new example is tested as soon as it is written. They
run in an *example world*: a folder holding the files the examples name (a375.h5ad, pc9.h5ad,
jhu006.h5ad, ...: the bundled real data; pc9's labels and patients are made up for the example),
tiny random-weight checkpoints where they point (~/models/Geneformer, ~/ckpt/scGPT_human, ...; HOME
is the world) and a store where earlier examples left their results. The few examples that need
what a test cannot have (a GPU, a Ray cluster, an LLM endpoint, GDSC files, a server that runs
until stopped) or train for minutes (finetune, transfer) are listed in NOT_RUN with the reason; those
are still parsed, so a renamed option or a bad value fails here too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import click
import numpy as np
import pytest
from click.testing import CliRunner

from scdm.cli import Ctx, main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

NOT_RUN: dict[str, str] = {
    "--executor ray": "needs a Ray cluster (tests/embed/test_ray_embed.py and tests/classify/test_ray_grid.py run the Ray paths)",
    "--device cuda": "needs a CUDA GPU",
    "scdm serve": "runs until stopped (tests/server/ start the same server on a free port)",
    "scdm prompt": "needs an LLM endpoint or an 8B model (tests/prompt/ run the same commands against a loopback server)",
    "scdm finetune": "LoRA training for minutes (tests/embed/test_finetune.py runs finetune() on tiny checkpoints)",
    "scdm transfer": "trains for minutes (tests/classify/test_transfer.py runs transfer() on bulk CSVs and studies)",
    "scdm genes": "needs the run id of a transfer (tests/classify/test_transfer.py runs critical_genes())",
    "--lora": "needs an adapter that scdm finetune trained (tests/embed/test_finetune.py embeds through one with --lora)",
    "--compile": "builds C++ kernels for tens of seconds on a CPU (tests/embed/test_compile.py runs --compile with a "
                 "recording backend, and with Inductor when --run-slow)",
}
"""Examples (by a piece of their text) that are parsed but not run here, and why."""
RUN_ANYWAY = ("scdm prompt --dataset a375 --backend ollama -m llama3.1:8b --by all --folds 5 --dry-run",)
"""Matches of NOT_RUN that do run (a dry run sends nothing)."""


# ---- extraction --------------------------------------------------------------------------
def _joined(lines: list[str]) -> Iterator[str]:
    """Lines with trailing-backslash continuations joined."""
    buffer = ""
    for raw in lines:
        line = raw.strip()
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        yield buffer + line
        buffer = ""


def help_examples() -> list[str]:
    out: list[str] = []

    def walk(command: click.Command) -> None:
        text = command.help or ""
        if "Examples:" in text or "Example:" in text or "Typical session:" in text:  # synth says "Example:"
            out.extend(line for line in _joined(text.splitlines()) if line.startswith("scdm "))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(main)
    return out


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_examples() -> list[str]:
    return [line for block in readme_blocks("bash") for line in _joined(block.splitlines()) if line.startswith("scdm ")]


def readme_sql() -> list[str]:
    return [s.strip() for block in readme_blocks("sql") for s in block.split(";") if s.strip().strip("-").strip()
            and any(not line.strip().startswith("--") for line in s.strip().splitlines())]


def commands_of(example: str) -> list[list[str]]:
    """The scdm invocations of one example line (`a && b` is two; `> file` and comments dropped)."""
    # <head id>, <transfer run id>: one word each, replaced by World.values where the world has one
    tokens = shlex.split(re.sub(r"<([^>]+)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", example), comments=True)
    out: list[list[str]] = []
    current: list[str] = []
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if token == ">":
            skip_next = True
            continue
        if token == "&&":
            out.append(current)
            current = []
            continue
        current.append(token)
    out.append(current)
    return [[os.path.expanduser(a) if a.startswith("~/") else a for a in c[1:]] for c in out if c and c[0] == "scdm"]


EXAMPLES = sorted(set(help_examples()) | set(readme_examples()))


def test_examples_are_found() -> None:
    assert len(help_examples()) >= 30 and len(readme_examples()) >= 30 and len(readme_sql()) >= 6
    assert any("scdm models" in e for e in EXAMPLES)


# ---- the example world -------------------------------------------------------------------
def _pc9_for_examples(path: Path) -> None:
    pc9 = ad.read_h5ad(DATA / "PC9_erlotinib_subsample300.h5ad")
    rng = np.random.default_rng(0)
    pc9.obs["scDEAL_label"] = rng.choice(["sensitive", "resistant", "not_in_scDEAL_set"], size=pc9.n_obs, p=[0.45, 0.45, 0.1])
    pc9.obs["response"] = pc9.obs["scDEAL_label"].replace({"not_in_scDEAL_set": "resistant"})
    pc9.obs["patient"] = [f"p{i % 6}" for i in range(pc9.n_obs)]
    pc9.write_h5ad(path)


def _checkpoints(home: Path, genes_symbol: list[str], genes_ensembl: list[str]) -> None:
    from scdm.embedding.models import geneformer, scgpt

    for folder in ("models/Geneformer", "ckpt/Geneformer", "ckpt/Geneformer-V2-104M"):
        geneformer.write_tiny_checkpoint(home / folder, genes=genes_ensembl)
    for folder in ("models/scGPT_human", "ckpt/scGPT_human"):
        scgpt.write_tiny_checkpoint(home / folder, genes=genes_symbol)


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "scdm-store"
        self.runner = CliRunner()
        self.values: dict[str, str] = {}

    def scdm(self, *args: str) -> str:
        result = self.runner.invoke(main, ["--store", str(self.store), *args], catch_exceptions=False)
        assert result.exit_code == 0, f"scdm {shlex.join(args)}\n{result.output}"
        return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("HOME", str(root))
    mp.delenv("SCDM_STORE", raising=False)
    try:
        from scdm.store import example_data

        shutil.copy(example_data("A375"), root / "a375.h5ad")
        shutil.copy(DATA / "JHU006_HNSCC_Kinker2020.h5ad", root / "jhu006.h5ad")
        _pc9_for_examples(root / "pc9.h5ad")
        w = World(root)
        w.scdm("ingest", "pc9.h5ad", "--label-key", "scDEAL_label", "--unknown-value", "not_in_scDEAL_set",
               "--sample-key", "patient", "--study", "GSE149383")
        for i, part in enumerate(np.array_split(np.arange(300), 3), start=1):  # study1..3 and new_cells: parts of pc9
            sub = ad.read_h5ad(root / "pc9.h5ad")[part].copy()
            sub.write_h5ad(root / f"study{i}.h5ad")
            w.scdm("ingest", f"study{i}.h5ad", "--label-key", "scDEAL_label", "--unknown-value", "not_in_scDEAL_set",
                   "--sample-key", "patient")
        ad.read_h5ad(root / "pc9.h5ad")[:60].copy().write_h5ad(root / "unlabelled.h5ad")
        w.scdm("ingest", "unlabelled.h5ad", "--name", "new_cells")
        from scdm.store import Store

        genes = Store(w.store).genes("pc9")
        _checkpoints(root, genes["symbol"].tolist(), genes["ensembl"].dropna().tolist())
        w.scdm("ingest", "a375.h5ad", "--label-key", "response_PLX4720", "--drug", "PLX-4720", "--study", "GSE108383",
               "--tissue", "Cell line", "--cancer-type", "Melanoma", "--drug-type", "Targeted therapy", "--regimen", "PLX-4720")
        w.scdm("embed", "a375", "pc9", "--model", "pca")
        w.values["3f2a9c0d1e7b"] = Store(w.store).find_embedding("a375", "pca").embedding_id
        yield w
    finally:
        mp.undo()


def _resolved(args: list[str], world: World) -> list[str]:
    return [world.values.get(a, a) for a in args]


def _reason_not_run(example: str) -> str | None:
    if example in RUN_ANYWAY:
        return None
    command = " ".join(shlex.join(["scdm", *args]) for args in commands_of(example))  # not its comment
    return next((why for piece, why in NOT_RUN.items() if why and piece in command), None)


def test_a_comment_does_not_keep_an_example_from_running() -> None:
    assert _reason_not_run("scdm results --label-set Vorinostat   # --label-set also on `scdm finetune`") is None
    assert _reason_not_run("scdm finetune -m geneformer -c ~/ckpt/Geneformer --dataset pc9 --all-folds") is not None
    assert _reason_not_run('scdm serve --host 0.0.0.0 --token "$SCDM_TOKEN"  # other addresses need a token') is not None


def _parse_only(args: list[str]) -> None:
    """Parse the command line as `scdm` would, without running it."""
    group = main.make_context("scdm", ["--store", "unused", args[0]], resilient_parsing=True)
    group.obj = Ctx(None)
    command = main.get_command(group, args[0])
    assert command is not None, f"no command {args[0]!r}"
    with command.make_context(args[0], args[1:], parent=group):
        pass


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_parses(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    commands = commands_of(example)
    assert commands, example
    for args in commands:
        for arg in args:  # input files the command checks for: stand-ins (parsing reads none of them)
            if arg.startswith("./"):
                (tmp_path / arg).mkdir(parents=True, exist_ok=True)
            elif re.fullmatch(r"[\w.-]+\.(csv|txt)", arg) and args[args.index(arg) - 1] != "--out":
                (tmp_path / arg).touch()
        _parse_only(args)


# examples depend on what earlier ones made (a synthetic collection, a head id, an evaluation): run them in one test, in order
ORDER = ("scdm synth", "scdm ingest", "scdm embed", "scdm models", "scdm ls", "scdm sql", "scdm export", "scdm evaluate",
         "scdm results", "scdm train-head", "scdm predict", "scdm report", "scdm verify", "scdm prompt", "scdm rm")


def _rank(example: str) -> int:
    return next((i for i, prefix in enumerate(ORDER) if example.startswith(prefix)), len(ORDER))


def _run_examples(world: World, examples: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    ran, not_run = [], []
    for example in sorted(examples, key=lambda e: (_rank(e), e)):
        why = _reason_not_run(example)
        if why:
            not_run.append((example, why))
            continue
        for args in commands_of(example):
            started = time.perf_counter()
            output = world.scdm(*_resolved(args, world))
            if os.environ.get("SCDM_EXAMPLE_TIMES"):
                print(f"{time.perf_counter() - started:6.1f} s  scdm {shlex.join(args)}")
            if args[0] == "train-head" and "prints a head id" in example:  # README's train-then-predict lines
                world.values["<head_id>"] = re.search(r"\b[0-9a-f]{16}\b", output).group(0)  # type: ignore[union-attr]
        ran.append(example)
    return ran, not_run


def test_every_example_runs(world: World) -> None:
    ran, not_run = _run_examples(world, EXAMPLES)
    assert len(ran) >= 60, ran
    assert len(not_run) <= 28, not_run  # 2 of them the transfer label-set examples (test_transfer.py runs transfers)


def test_every_readme_sql_block_runs(world: World) -> None:
    world.scdm("evaluate", "--head", "logreg", "--by", "all", "--folds", "3")  # results for the queries to read
    for query in readme_sql():  # `--` ends the options: the cookbook's queries begin with a `-- comment`
        world.scdm("sql", "--max-rows", "5", "--", query)
