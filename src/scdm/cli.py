"""The ``scdm`` command line: a thin click layer over store, scdm.embedding and scdm.classify.

Each command parses its options, makes one library call and renders the result. Results go to
stdout, logs and progress bars to stderr. Heavy imports (torch, transformers) happen inside the
commands that need them, so ``scdm --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import click

if TYPE_CHECKING:
    from scdm.classify.results import FilterKey

logger = logging.getLogger("scdm")

FORMATS = ("table", "csv", "json")

# The option values the library functions accept (as their Literal parameter types); click.Choice
# has already validated the value when a command receives it.
Scenario = Literal["pooled", "cross", "custom"]
SplitScheme = Literal["auto", "cell", "sample"]
Executor = Literal["local", "ray"]
ResponseKind = Literal["auto", "binary", "ic50", "auc", "activity_area"]
Balance = Literal["none", "upsample", "downsample", "smote"]
ClusterMethod = Literal["auto", "leiden", "louvain", "kmeans"]
Correction = Literal["bh", "bonferroni"]
Corruption = Literal["mask", "gaussian"]
GeneProfile = Literal["default", "paper"]


# ---- shared plumbing -----------------------------------------------------------------------
CHECKPOINT_HELP = ("The model's checkpoint: a local folder in its official format (`scdm models --long` lists the files), or a "
                   "Hugging Face Hub id, org/name or org/name@revision (HF_HOME and HF_HUB_OFFLINE=1 are honoured; the "
                   "resolved commit is recorded). A local folder of that name wins.")
"""Help of every --checkpoint that takes a foundation-model checkpoint."""


class AliasOption(click.Option):
    """An option that also answers to old spellings, kept for one release and left out of --help.

    ``RENAMED`` lists them all (README and the release notes quote it).
    """

    def __init__(self, *args: Any, aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = aliases
        self.opts = [*self.opts, *aliases]

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


class LibraryDefaultOption(click.Option):
    """An option left None (the library picks) whose --help shows the library's default, read from its
    constant when help is drawn: a copy in the help text drifted, and importing the constant when this
    module loads would load its package for every command."""

    def __init__(self, *args: Any, library_default: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.library_default = library_default

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        # shown only: the value passed stays None, so the library's own default applies
        default, shown = self.default, self.show_default
        self.default, self.show_default = self.library_default(), True
        try:
            return super().get_help_record(ctx)
        finally:
            self.default, self.show_default = default, shown


def _ollama_num_ctx() -> int:
    from scdm.prompt.ollama import DEFAULT_NUM_CTX

    return DEFAULT_NUM_CTX


RENAMED: dict[str, str] = {
    "--heads": "--head", "--scheme": "--split-scheme", "--category-type": "--by", "--cancer-key": "--cancer-type-key",
}
"""Old option spelling -> the one every command uses now (the old ones still work, unlisted)."""


def renamed_option(*names: str, aliases: tuple[str, ...], **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``click.option`` with hidden old spellings (see :class:`AliasOption`)."""
    return click.option(*names, cls=AliasOption, aliases=aliases, **kwargs)


def split_commas(ctx: click.Context, param: click.Parameter, value: Any) -> tuple[str, ...]:
    """A list option given repeatedly, comma-separated, or both: ``--head a --head b,c`` -> (a, b, c)."""
    if value is None:
        return ()
    items = value if isinstance(value, (tuple, list)) else (value,)
    return tuple(dict.fromkeys(v.strip() for item in items for v in str(item).split(",") if v.strip()))


def list_option(*names: str, default: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (),
                **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A repeatable option that also takes comma-separated values (the one list syntax of every command)."""
    if default is not None:
        kwargs.update(default=list(default), show_default=",".join(default))
    return click.option(*names, cls=AliasOption, aliases=aliases, multiple=True, callback=split_commas, **kwargs)


WRITING_COMMANDS = frozenset({"ingest", "embed", "rm", "finetune", "evaluate", "transfer", "genes", "train-head",
                              "predict", "demo"})
"""Commands that change the store: refused up front (before any work) on a read-only store."""


class Ctx:
    """What the group options put on ``ctx.obj``."""

    def __init__(self, store_path: str | None, read_only: bool | None = None, command: str | None = None) -> None:
        self.store_path = store_path
        self.read_only = read_only
        self.command = command
        self._store: Any = None

    @property
    def store(self) -> Any:
        """The store, opened on first use (read-only when asked for or not writable)."""
        if self._store is None:
            from scdm.store import Store

            store = Store(self.store_path, read_only=self.read_only)
            if self.command in WRITING_COMMANDS:
                store.check_writable(f"run `scdm {self.command}`, which writes to the store")
            self._store = store
        return self._store


pass_ctx = click.make_pass_decorator(Ctx)


_KEPT_ON_INTERRUPT = {
    "ingest": "nothing of the interrupted file is stored (an ingest is stored whole or not at all)",
    "embed": "the chunks written whole are kept",
    "finetune": "finished adapters, embeddings and results are kept",
    "evaluate": "the tasks finished so far are stored (the run is marked failed); a rerun fits only the rest",
    "prompt_command": "the answers received so far are stored; a rerun does not send their requests again",
    "report": "the report folder is incomplete",
}
"""What an interrupted command leaves in the store (commands not named here store nothing partial)."""


def _interrupted(command: str) -> click.exceptions.Exit:
    """Ctrl-C: one line on what was kept and how to resume, exit status 130 (not click's bare 'Aborted!')."""
    kept = _KEPT_ON_INTERRUPT.get(command, "nothing partial is stored")
    click.echo(f"\ninterrupted: {kept}. Run the same command again to finish.", err=True)
    return click.exceptions.Exit(130)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn scdm's own errors into one clean message (no traceback) and exit code 1; Ctrl-C into one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from scdm.store.errors import ScdmError

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise _interrupted(fn.__name__) from None
        except ScdmError as err:
            raise click.ClickException(str(err)) from err
        except (KeyError, FileNotFoundError, ValueError, PermissionError) as err:
            if logger.isEnabledFor(logging.DEBUG):
                raise
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(f"{type(err).__name__}: {text}") from err
        except Exception as err:
            # the disk or the file system refused a write (full disk, a path through a file): the
            # user's to fix, so a message; anything else is a bug and keeps its traceback
            text = _system_error_text(err, fn.__name__)
            if text is None or logger.isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(text) from err

    return wrapper


_DISK_FULL = ("No space left on device", "Disk quota exceeded")
"""How the OS (and DuckDB, which reports it in its own exception types) says a write found no room."""


_WRITES_OUTSIDE_THE_STORE = {"export": "--out", "report": "--out", "synth": "--out", "predict": "--out"}
"""Commands whose output may go to a path of the user's rather than into the store, and its option."""


def _system_error_text(err: BaseException, command: str = "") -> str | None:
    """The message for an error of the disk or file system (None for any other error)."""
    full = next((s for s in _DISK_FULL if s in str(err)), None)
    if full is not None or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
        path = getattr(err, "filename", None)
        where = f" (writing {str(path)!r})" if path else ""
        elsewhere = _WRITES_OUTSIDE_THE_STORE.get(command)
        other = f"another --store, or another {elsewhere} path" if elsewhere else "another --store"
        resumes = ", and an interrupted embedding resumes" if command == "embed" else ""
        return (f"{full or 'No space left on device'}{where}: {err}. Free some space there (or choose {other}), "
                f"then run the command again: what was complete before is kept{resumes}.")
    if isinstance(err, OSError):
        return f"{type(err).__name__}: {err}"
    return None


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--format table|csv|json`` for commands that print a table."""
    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="How to print the result: aligned table, CSV or JSON records.",
    )(fn)


def echo_frame(frame: Any, fmt: str = "table", *, max_width: int = 60) -> None:
    """Print a DataFrame to stdout as a table, CSV or JSON records."""
    if fmt == "csv":
        from scdm.classify.results import csv_ready

        click.echo(csv_ready(frame).to_csv(index=False), nl=False)
    elif fmt == "json":
        from scdm.classify.results import json_records

        click.echo(json.dumps(json_records(frame), allow_nan=False))
    elif frame.empty:
        click.echo("(no rows)")
    else:
        shown = frame.copy()
        for col in shown.columns:
            if shown[col].dtype == object:
                shown[col] = shown[col].map(lambda v: v if not isinstance(v, str) or len(v) <= max_width else v[: max_width - 3] + "...")
        click.echo(shown.to_string(index=False))


def echo_frames(parts: Iterable[Any], fmt: str) -> None:
    """Print DataFrames of one answer (same columns) as one CSV or JSON document, each part as it comes.

    The output equals :func:`echo_frame` of the parts joined, without holding them all.
    """
    if fmt == "csv":
        from scdm.classify.results import csv_ready

        for i, part in enumerate(parts):
            click.echo(csv_ready(part).to_csv(index=False, header=i == 0), nl=False)
    elif fmt == "json":
        from scdm.classify.results import json_records

        sep = "["
        for part in parts:
            for record in json_records(part):
                click.echo(sep + json.dumps(record, allow_nan=False), nl=False)
                sep = ", "
        click.echo("[]" if sep == "[" else "]")
    else:
        msg = f"echo_frames writes csv or json, not {fmt!r}: a table's columns are as wide as all its rows"
        raise ValueError(msg)


def dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options mapping AnnData columns to the catalog (shared by ingest and embed)."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--name", help="Dataset name in the store (default: the file name without .h5ad)."),
        click.option("--label-key", help="obs column with the drug response (sensitive/resistant, responder/non-responder, 0/1, booleans)."),
        click.option("--positive", help="Label value that means sensitive when labels are not sensitive/resistant-like; other values become resistant."),
        click.option("--unknown-value", "unknown_values", multiple=True, help="Label value to store as unknown (repeatable), e.g. --unknown-value not_in_set."),
        click.option("--drug", help="The drug the labels are the response to (recorded with the label set), e.g. --drug Vorinostat."),
        click.option("--label-set", help="Name of the label set the labels become (default: --drug, else --label-key). A stored matrix ingested again with other labels gains a label set."),
        click.option("--study-key", help="obs column naming the study of each cell."),
        click.option("--study", help="One study id for every cell (default: the dataset name), e.g. --study GSE108383."),
        click.option("--sample-key", help="obs column naming the sample/patient (used by grouped folds)."),
        click.option("--sample", help="One sample id for every cell."),
        click.option("--tissue-key", help="obs column with the tissue."),
        click.option("--tissue", help="One tissue for every cell, in scDrugMap's vocabulary: Cell line, Tumor tissue, Bone marrow aspirate, Peripheral blood mononuclear cells."),
        renamed_option("--cancer-type-key", "cancer_key", aliases=("--cancer-key",), help="obs column with the cancer type."),
        click.option("--cancer-type", help="One cancer type for every cell, e.g. Melanoma, Lung cancer, Multiple myeloma (scDrugMap's Cancer_type_level1)."),
        click.option("--drug-type-key", help="obs column with the drug type."),
        click.option("--drug-type", help="One drug type for every cell: Targeted therapy, Chemotherapy or Immunotherapy (scDrugMap's Drug_type)."),
        click.option("--regimen-key", help="obs column with the regimen."),
        click.option("--regimen", help="The treatment every cell received, as scDrugMap's Regimen column names it: PLX-4720, erlotinib, vemurafenib + trametinib, CAR-T (not mono/combination)."),
        click.option("--gene-key", help="var column holding gene ids (default: var_names)."),
        click.option("--gene-id-kind", type=click.Choice(["symbol", "ensembl", "entrez"]), help="Override the detected gene id kind."),
        click.option("--x-kind", type=click.Choice(["counts", "normalized", "scaled"]), help="Override the detected value kind of X (counts: whole numbers, normalized, scaled: z-scores); refused where the values contradict it (counts with a negative value, or more than 1% not whole numbers all below 50 as log values are or with one total per cell as normalised values have; normalized with more than 1% negative)."),
        click.option("--no-copy", is_flag=True, help="Refer to the file in place instead of keeping a copy in the store (the file must then stay put)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _ingest_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ["label_key", "positive", "unknown_values", "drug", "label_set", "study_key", "study", "sample_key", "sample", "tissue_key",
            "tissue", "cancer_key", "cancer_type", "drug_type_key", "drug_type", "regimen_key", "regimen",
            "gene_key", "gene_id_kind", "x_kind"]
    out = {k: kw.pop(k) for k in keys if k in kw}
    out["unknown_values"] = tuple(out.get("unknown_values") or ())
    return out


# ---- the group -----------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "store_path", envvar="SCDM_STORE", type=click.Path(file_okay=False),
              help="Store directory (default: $SCDM_STORE, else ./scdm-store). Created if missing.")
@click.option("--read-only", "read_only", is_flag=True, default=None,
              help="Open the store read-only (also $SCDM_READ_ONLY=1; automatic when you may not write it): "
                   "ls, sql, results, export, report, verify and serve work, writing commands refuse.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug with tracebacks).")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Also write the log to this file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (every command also takes -q).")
@click.version_option(package_name="scdm", message="scdm %(version)s")
@click.pass_context
def main(ctx: click.Context, store_path: str | None, read_only: bool | None, verbose: int, log_file: str | None,
         quiet: bool) -> None:
    """scdm: embed single cells once with foundation models, evaluate drug-response heads many times.

    \b
    Typical session:
      scdm ingest a375.h5ad --label-key response_PLX4720 --study GSE108383
      scdm embed a375 --model pca
      scdm evaluate --scenario pooled,cross --head logreg,mlp
      scdm results
      scdm sql "SELECT model, label_set, scenario, category, head, avg(value) AS auroc, count(value) AS n, result_key FROM results WHERE metric = 'auroc' GROUP BY ALL ORDER BY ALL"

    Everything lives in one store directory (--store / $SCDM_STORE): a DuckDB catalog you can query
    with any DuckDB client, and Zarr v3 arrays you can open with any Zarr client. --store, --read-only
    and -q go before or after the command name.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    if verbose == 0:
        logging.getLogger("scdm.store").setLevel(logging.INFO)
        logging.getLogger("scdm.embedding").setLevel(logging.INFO)
        logging.getLogger("scdm.classify").setLevel(logging.INFO)
        for h in handlers:
            h.setFormatter(logging.Formatter("%(message)s"))
    if verbose < 2:
        # transformers prints load reports (unused head weights, ...) that are expected here
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    ctx.obj = Ctx(store_path, read_only=read_only or None, command=ctx.invoked_subcommand)
    from scdm.store.progress import no_progress, plain_warnings

    ctx.with_resource(plain_warnings())  # "warning: ..." once per message, not Python's format
    if quiet:
        ctx.with_resource(no_progress())


# ---- store commands --------------------------------------------------------------------------
@main.command()
@click.argument("h5ad", type=click.Path(dir_okay=False))
@dataset_options
@click.option("--update", is_flag=True, help="Rewrite the cell metadata, the --gene-id-kind or --x-kind, or replace the labels "
              "of a relabelled column, of an already stored dataset; the splits and results made from the old ones are "
              "removed (a kind is not rewritten while embeddings made with it exist).")
@pass_ctx
@user_errors
def ingest(obj: Ctx, h5ad: str, name: str | None, no_copy: bool, update: bool, **options: Any) -> None:
    """Add an .h5ad file to the store, or a label set to a stored one.

    The dataset's identity is a hash of its expression matrix, gene ids and cell ids. Cell
    metadata (study, sample, tissue, cancer type, drug type, regimen) is mapped from obs columns
    (--*-key) or given as constants. Response labels (--label-key) become a named label set:
    1 = sensitive, 0 = resistant, NULL = unknown. Ingesting a stored matrix again with another
    label column adds a label set (one matrix, several drugs); the same labels again are a no-op;
    other labels in the same column (a relabelled file), or other cell metadata, are an error
    unless --update, which rewrites them and removes the splits and evaluation results made from
    the old ones (a warning says how many).

    \b
    Examples:
      scdm ingest a375.h5ad --label-key response_PLX4720 --drug PLX-4720 --study GSE108383 \\
           --tissue "Cell line" --cancer-type Melanoma --drug-type "Targeted therapy" --regimen PLX-4720
      scdm ingest jhu006.h5ad --label-key response_Gefitinib --drug Gefitinib --study Kinker2020
      scdm ingest jhu006.h5ad --label-key response_Vorinostat --drug Vorinostat   # a second label set
      scdm ingest pc9.h5ad --label-key scDEAL_label --unknown-value not_in_scDEAL_set
    """
    info = obj.store.ingest(h5ad, name=name, copy=not no_copy, update=update, **_ingest_kwargs(options))
    verb = "ingested" if info.created else "already in the store:"
    click.echo(
        f"{verb} {info.name} ({info.dataset_id}): {info.n_cells} cells x {info.n_genes} genes, "
        f"{info.gene_id_kind} gene ids, values: {info.x_kind}"
    )
    if info.label_set is not None:
        what = "added label set" if info.label_set_created else "label set"
        click.echo(f"{what} {info.label_set!r} of {info.name}: {_label_counts(obj.store, info)}")


def _label_counts(st: Any, info: Any) -> str:
    """How many cells of a label set are sensitive, resistant and unknown: the unknown ones (missing or
    --unknown-value labels) are kept without a label and left out of every evaluation, so say how many."""
    sets = st.label_sets(info.dataset_id)
    row = sets[sets["name"] == info.label_set].iloc[0]
    labelled, sensitive = int(row["n_labelled"]), int(row["n_sensitive"])
    return (f"{labelled} of {info.n_cells} cells labelled ({sensitive} sensitive, {labelled - sensitive} resistant), "
            f"{info.n_cells - labelled} unknown")


@main.command("ls")
@click.option("--what", type=click.Choice(["all", "datasets", "labels", "embeddings"]), default="all", show_default=True)
@output_options
@pass_ctx
@user_errors
def ls_command(obj: Ctx, what: str, fmt: str) -> None:
    """List datasets, their label sets and embeddings (with status and chunk progress).

    --format csv prints one table: pick it with --what datasets, labels or embeddings
    (--format json prints all three as one document).

    \b
    Examples:
      scdm ls
      scdm ls --what labels
      scdm ls --what embeddings --format csv > embeddings.csv
    """
    if fmt == "csv" and what == "all":  # three tables with different headers would read as one wrong table
        raise click.UsageError("--format csv prints one table: add --what datasets, --what labels or --what embeddings "
                               "(or use --format json for all three).")
    st = obj.store
    sections: dict[str, Any] = {}
    if what in ("all", "datasets"):
        sections["Datasets"] = st.datasets()[["name", "dataset_id", "n_cells", "n_genes", "gene_id_kind", "x_kind",
                                              "n_labelled", "n_sensitive", "label_set"]]  # the counts' label set
    if what in ("all", "labels"):
        sections["Label sets"] = st.label_sets()[["dataset", "name", "is_default", "label_key", "positive", "drug",
                                                  "n_labelled", "n_sensitive"]]
    if what in ("all", "embeddings"):
        emb = st.embeddings()
        if not emb.empty:
            emb["progress"] = emb["chunks_done"].astype(str) + "/" + emb["n_chunks"].astype(str)
            emb["checkpoint"] = emb["checkpoint_source"].fillna("")  # org/name@commit or the folder; none for baselines
            emb = emb[["embedding_id", "dataset_name", "model", "variant", "dim", "status", "progress", "space_id", "checkpoint",
                       "note"]]
        sections["Embeddings"] = emb
    _echo_sections(sections, fmt)


def _echo_sections(sections: dict[str, Any], fmt: str) -> None:
    """Print titled tables, or one JSON document ({title: rows}) for --format json (CSV: one section only)."""
    if fmt == "csv" and len(sections) > 1:
        raise click.UsageError(f"--format csv prints one table, not {len(sections)}; choose one of them.")
    if fmt == "json":
        from scdm.classify.results import json_records

        doc = {title.lower().replace(" ", "_"): json_records(frame) for title, frame in sections.items()}
        click.echo(json.dumps(doc if len(doc) > 1 else next(iter(doc.values())), indent=2, allow_nan=False))
        return
    for i, (title, frame) in enumerate(sections.items()):
        if fmt == "table":
            click.echo(("\n" if i else "") + title)
        echo_frame(frame, fmt)


SQL_MAX_ROWS = 10_000
"""Rows `scdm sql` prints unless told otherwise: a `SELECT * FROM cells` of a large store held every row in memory."""


@main.command()
@click.argument("query")
@output_options
@click.option("--max-rows", type=click.IntRange(min=0), default=SQL_MAX_ROWS, show_default=True,
              help="Print at most this many rows (a note on stderr says when the answer has more); 0 prints every row, as --all.")
@click.option("--all", "all_rows", is_flag=True,
              help="Print every row. With --format csv or json the rows are written as they are read, in batches, so "
                   "an export to a file does not hold the whole answer in memory; a table holds it all.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop the query after this many seconds (with --all: the whole export).")
@pass_ctx
@user_errors
def sql(obj: Ctx, query: str, fmt: str, max_rows: int, all_rows: bool, timeout_s: float | None) -> None:
    """Run a read-only SQL query on the catalog (DuckDB dialect).

    Writes, COPY, ATTACH, file access and functions that change state (setseed) are refused. Main
    tables: datasets, cells, genes, label_sets, embeddings, embedding_chunks, splits, split_folds,
    eval_runs, eval_results (one row per task x metric) and the view results (the same with the whole
    result identity), skipped_tasks, eval_predictions, trained_heads, transfer_runs. `SHOW TABLES`
    lists them all. At most 10,000 rows are printed unless --max-rows or --all says otherwise.

    \b
    Examples:
      scdm sql "SELECT name, n_cells FROM datasets"
      scdm sql "SELECT model, status, dim FROM embeddings" --format csv
      scdm sql "SELECT * FROM cells" --all --format csv > cells.csv    # every row, written in batches
    """
    st = obj.store
    given = click.get_current_context().get_parameter_source("max_rows") is not click.core.ParameterSource.DEFAULT
    if all_rows and given and max_rows:
        raise click.UsageError(f"--all prints every row and --max-rows {max_rows} at most {max_rows}; give one of them.")
    limit = None if all_rows or max_rows == 0 else max_rows
    if limit is None and fmt in ("csv", "json"):
        with contextlib.closing(st.sql_batches(query, timeout_s=timeout_s)) as parts:
            echo_frames(parts, fmt)
        return
    # one row more than printed tells whether the answer was cut
    frame = st.sql(query, max_rows=None if limit is None else limit + 1, timeout_s=timeout_s)
    echo_frame(frame.head(limit) if limit is not None else frame, fmt, max_width=10_000)
    if limit is not None and len(frame) > limit:
        click.echo(f"note: printed the first {limit:,} rows; the answer has more. --max-rows N prints up to N, --all "
                   "every row (--all --format csv > answer.csv writes them to a file in batches).", err=True)


def _select_embedding(st: Any, embedding_id: str | None, dataset: str | None, model: str | None, variant: str, *, status: str | None = "complete") -> Any:
    if embedding_id:
        return st.embedding(embedding_id)
    if not (dataset and model):
        raise click.UsageError("Name the embedding: give --embedding ID, or --dataset NAME and --model MODEL.")
    return st.find_embedding(dataset, model, variant, status=status)


@main.command()
@click.option("--embedding", "embedding_id", help="Embedding id (see scdm ls); or use --dataset and --model.")
@click.option("--dataset", help="Dataset name or id.")
@click.option("--model", help="Model name (pca, hvg, geneformer, scgpt, ...).")
@click.option("--variant", default="frozen", show_default=True, help="frozen, or lora:<adapter id>.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output path ending in .npy, or .h5ad (a copy of the dataset with the embedding in obsm['X_<model>']).")
@pass_ctx
@user_errors
def export(obj: Ctx, embedding_id: str | None, dataset: str | None, model: str | None, variant: str, out: str) -> None:
    """Write an embedding out, rows in dataset order (.npy, or .h5ad with it in obsm).

    \b
    Examples:
      scdm export --dataset a375 --model pca --out a375_pca.npy
      scdm export --embedding 3f2a9c0d1e7b --out a375_pca.h5ad    # ids: scdm ls --what embeddings
    """
    emb = _select_embedding(obj.store, embedding_id, dataset, model, variant)
    path = obj.store.export_embedding(emb.embedding_id, out)
    click.echo(f"wrote {emb.n_cells} x {emb.dim} {emb.model} embedding to {path}")
    if Path(path).suffix == ".npy":  # a bare matrix: say where its row names are
        click.echo(f"  rows in dataset order, without cell ids; they are: scdm sql \"SELECT cell_id FROM cells WHERE "
                   f"dataset_id = '{emb.dataset_id}' ORDER BY row\" --all --format csv (an .h5ad export carries them)")


@main.command()
@click.option("--embedding", "embedding_id", help="Embedding id to delete.")
@click.option("--dataset", help="With --model: the embedding of this dataset; alone: delete the whole dataset and its embeddings.")
@click.option("--model", help="Model of the embedding to delete.")
@click.option("--variant", default="frozen", show_default=True)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Seconds to wait for jobs that are writing the embedding to end (default: refuse at once, naming them).")
@pass_ctx
@user_errors
def rm(obj: Ctx, embedding_id: str | None, dataset: str | None, model: str | None, variant: str, dry_run: bool, wait_s: float) -> None:
    """Delete an embedding (catalog rows and array together), or a dataset with --dataset alone.

    Deleting a dataset also deletes the splits made on its cells and every evaluation result on
    them, so no result is left that cannot be traced back to stored data.

    An embedding that a running job (`scdm embed`, `scdm finetune`) is writing is not deleted: the
    command refuses and names the job (pid, host, since when). Stop the job first, or --wait.

    \b
    Examples:
      scdm rm --dataset a375 --model pca --dry-run     # the pca embedding of a375
      scdm rm --dataset new_cells --dry-run            # the dataset, its embeddings, splits and results
    """
    st = obj.store
    if dataset and not model and not embedding_id:
        ds = st.dataset(dataset)
        if dry_run:
            n = len(st.query("SELECT 1 FROM embeddings WHERE dataset_id = ?", [ds.dataset_id]))
            click.echo(f"would delete dataset {ds.name} ({ds.n_cells} cells), its {n} embedding(s), and the splits "
                       "and evaluation results made on its cells")
            return
        removed = st.remove_dataset(ds.name, wait_s=wait_s)
        click.echo(f"deleted dataset {ds.name} and {len(removed)} embedding(s)")
        return
    emb = _select_embedding(st, embedding_id, dataset, model, variant, status=None)
    if dry_run:
        click.echo(f"would delete embedding {emb.embedding_id} ({emb.model}, {emb.variant}, {emb.n_cells} x {emb.dim})")
        return
    st.remove_embedding(emb.embedding_id, wait_s=wait_s)
    click.echo(f"deleted embedding {emb.embedding_id} ({emb.model}, {emb.variant})")


@main.command()
@list_option("--embedding", "embedding_ids", help="Embedding ids to check (repeatable or comma-separated). Default: every embedding.")
@click.option("--repair", is_flag=True, help="Put bad chunks back to pending and recompute them: pca/hvg here; for models "
              "that need a checkpoint, print the `scdm embed ... --checkpoint DIR` command to run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar while repairing.")
@pass_ctx
@user_errors
def verify(obj: Ctx, embedding_ids: tuple[str, ...], repair: bool, quiet: bool) -> None:
    """Check every committed chunk of the store's embeddings against its stored checksum.

    Prints one line per bad chunk (embedding, model, dataset, chunk, rows, why, file) and a
    summary; exits with status 1 when anything is bad. With --repair the bad chunks go back to
    pending and are recomputed: baselines (pca, hvg) at once, from their recorded parameters;
    for other models the exact `scdm embed` command is printed (it needs the checkpoint
    folder). After --repair the exit status is 0 only if every bad chunk was recomputed.

    Checking the whole store also lists, as LEFTOVER lines (not damage), what killed or half-undone
    work left: files and folders no catalog row names (dataset copies, arrays, adapter, head and
    transfer-run folders), temporaries of interrupted ingests and saves, lock folders (claims/) that
    no running job holds and write probes of killed processes. --repair deletes those whose writer
    is gone; a temporary of a running process, or anything changed within the last hour whose
    writer cannot be asked, is left alone. It also reports, with the `scdm ingest ... --update`
    command that fixes each, datasets stored with an --x-kind that their values contradict (given
    before ingest refused that); those make the exit status 1, --repair or not.

    \b
    Examples:
      scdm verify
      scdm verify --embedding 3f2a9c0d1e7b --repair
    """
    st = obj.store
    if repair:
        st.check_writable("repair embeddings (verify --repair)")
    report = st.verify(list(embedding_ids) or None, repair=repair)
    for line in report.problems():  # damaged array metadata and bad chunks
        click.echo(f"BAD {line}")
    for wrong in report.datasets:  # a value kind given at ingest that the values contradict (stored before ingest refused it)
        click.echo(f"BAD {wrong.line()}")
    for item in report.leftovers:  # not damage: files nothing reads, deleted by --repair once their writer is gone
        click.echo(f"LEFTOVER {item.line()}")
    click.echo(report.summary())
    if report.ok:
        return
    for wrong in report.datasets:  # the source file is needed: never rewritten here
        click.echo(f"fix dataset {wrong.dataset} (values show {wrong.detected!r}): {wrong.fix}")
    if not repair:
        for check in report.damaged:
            click.echo(f"repair {check.embedding_id} ({check.model}, {check.dataset}): {check.repair}")
        raise click.exceptions.Exit(1)
    if not _repair_damaged(st, report, progress=not quiet) or report.datasets:
        raise click.exceptions.Exit(1)


def _repair_damaged(st: Any, report: Any, *, progress: bool) -> bool:
    """Recompute the pending chunks of each damaged embedding; False if any is left to the user."""
    from scdm.embedding.runner import embed_command
    from scdm.embedding.runner import repair as repair_embedding
    from scdm.store.verify import BASELINE_MODELS

    all_done = True
    for check in report.damaged:
        what = f"{check.embedding_id} ({check.model}, {check.dataset})"
        if not check.bad_chunks:  # only its zarr.json was damaged, and verify rewrote it: every chunk matched
            click.echo(f"repaired {what}: rewrote its array metadata from the catalog; every chunk matches its checksum")
            continue
        if check.model in BASELINE_MODELS and check.variant == "frozen":
            repair_embedding(st, check.embedding_id, progress=progress)
            left = st.verify_embedding(check.embedding_id)
            if left:
                all_done = False
                click.echo(f"still bad after recomputing {what}: chunk(s) {', '.join(map(str, left))}")
            else:
                click.echo(f"repaired {what}: recomputed chunk(s) {', '.join(map(str, check.bad_chunks))}")
            continue
        all_done = False
        try:
            command = embed_command(st, check.embedding_id)
        except Exception as err:  # noqa: BLE001 - an unregistered model still gets a useful line
            command = f"{check.repair} ({type(err).__name__}: {err})"
        click.echo(f"marked chunk(s) {', '.join(map(str, check.bad_chunks))} of {what} pending; recompute them with:\n  {command}")
    return all_done


# ---- embedding commands ----------------------------------------------------------------------
@main.command()
@click.option("--long", "long_format", is_flag=True, help="Every detail of every model: checkpoint files, LoRA targets, the whole description.")
@output_options
@user_errors
def models(long_format: bool, fmt: str) -> None:
    """List the models scdm can embed with (--long: the checkpoint files each expects, LoRA targets).

    \b
    Examples:
      scdm models
      scdm models --long
      scdm models --format json
    """
    import pandas as pd

    from scdm.embedding import available_models
    from scdm.embedding.baselines import BASELINES

    rows = [{"model": name, "gene ids": "any", "counts": "no", "checkpoint files": "(none: computed from the data)",
             "lora targets": "", "description": text} for name, text in BASELINES.items()]
    for name, cls in available_models().items():
        rows.append({
            "model": name, "gene ids": cls.gene_id_kind, "counts": "yes" if cls.requires_counts else "no",
            "checkpoint files": ", ".join(cls.checkpoint_files), "lora targets": ", ".join(cls.lora_target_modules),
            "description": cls.description,
        })
    frame = pd.DataFrame(rows)
    if fmt != "table":
        echo_frame(frame, fmt)
    elif long_format:
        for i, row in enumerate(frame.to_dict("records")):
            click.echo(("\n" if i else "") + row.pop("model"))
            for key, value in row.items():
                click.echo(f"  {key + ':':18}{value}")
    else:
        short = frame[["model", "gene ids", "counts", "description"]]
        fixed = max(map(len, short["model"])) + len("gene ids") + len("counts") + 6
        echo_frame(short, fmt, max_width=MODELS_WIDTH - fixed)


MODELS_WIDTH = 100
"""Columns `scdm models` fits in without --long."""


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _refuse_params_set_by_options(extra: dict[str, Any], settings: dict[str, Any], *, spelled: dict[str, str]) -> None:
    """Refuse a --param KEY that the command already passes from an option of its own (a second keyword
    argument was a Python TypeError traceback), naming that option. ``spelled``: options that are not
    ``--`` + the key with dashes."""
    taken = sorted(k for k in extra if k in settings)
    if taken:
        uses = "; ".join(f"--param {k}=... is set with {spelled.get(k, '--' + k.replace('_', '-'))}" for k in taken)
        raise click.BadParameter(f"{uses}: use that option instead.", param_hint="--param")


_EMBED_OPTION_KEYWORDS = ("checkpoint", "batch_size", "device", "precision", "torch_compile", "seed", "chunk_rows",
                          "workers", "min_gene_fraction", "n_hvg", "n_comps", "normalized", "executor", "ray_address",
                          "num_gpus_per_actor", "actors", "max_retries", "lora_dir", "allow_non_counts",
                          "allow_empty_cells", "progress")
"""Keyword arguments that `scdm embed` always passes from an option of its own: --param cannot set them."""

_EMBED_SPELLED = {"torch_compile": "--compile", "lora_dir": "--lora", "progress": "--quiet",
                  "normalized": "--normalized/--counts", "reference_quirks": "--reference-quirks"}
"""Options whose spelling is not ``--`` + the keyword with dashes (embed and finetune)."""

_FINETUNE_OPTION_KEYWORDS = ("model", "checkpoint", "dataset", "scenario", "by", "category", "fold", "all_folds",
                             "split_id", "scheme", "label_set", "rank", "alpha", "dropout", "target_modules", "epochs",
                             "lr", "batch_size", "precision", "gradient_checkpointing", "seed", "device", "progress",
                             "min_gene_fraction", "allow_non_counts", "allow_empty_cells")
"""Keyword arguments that `scdm finetune` always passes from an option of its own."""


def _resolve_datasets(st: Any, data: tuple[str, ...], name: str | None, no_copy: bool, options: dict[str, Any]) -> list[str]:
    """Dataset names for DATA arguments: .h5ad paths are ingested first."""
    names = []
    for item in data:
        if item.endswith(".h5ad") or Path(item).is_file():
            if name and len(data) > 1:
                raise click.UsageError("--name applies to a single file; ingest files one by one to name them.")
            info = st.ingest(item, name=name, copy=not no_copy, **_ingest_kwargs(dict(options)))
            names.append(info.name)
        else:
            names.append(st.dataset(item).name)
    return names


@main.command()
@click.argument("data", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help="Model name (see `scdm models`): pca, hvg, geneformer, tgpt, llm, scgpt, ...")
@click.option("--checkpoint", "-c", metavar="DIR|ORG/NAME[@REV]", help=CHECKPOINT_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), help="Cells per forward pass (default: the model's; halved automatically on CUDA out-of-memory).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--compile", "torch_compile", is_flag=True, help="Compile the model with torch.compile (fuses norms, activations and casts; "
              "worth it on CUDA for long jobs: the first batches wait tens of seconds). Same embedding: recorded in the telemetry only.")
@click.option("--layer", type=int, help="Hidden layer to pool (model default if omitted; e.g. Geneformer's penultimate, -2).")
@click.option("--pooling", type=click.Choice(["mean", "cls", "max"]), help="Pooling over tokens (model default if omitted).")
@click.option("--max-genes", type=click.IntRange(min=1), help="Maximum genes per cell, for models with a max_genes parameter; the shipped models take --param max_length=N (tokens per cell) instead.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of any gene sampling (part of the embedding's identity).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Other model parameter (repeatable), e.g. --param version=V2.")
@click.option("--reference-quirks", is_flag=True, help="Reproduce the reference implementation exactly where scdm differs (global RNG streams, UCE's float padding mask, batch-wide FAVOR+ key max, CellPLM's Gumbel draw); part of the embedding's identity. See docs/reference-differences.md.")
@click.option("--chunk-rows", type=click.IntRange(min=1), help="Cells per stored chunk (default: the power of two nearest 32 MiB per chunk, 256 to 65,536 rows; at most 4,096 for a foundation model, whose chunk is the unit of resume).")
@click.option("--workers", type=click.IntRange(min=0), help="Processes that tokenise the next chunks while the model runs (0: in this process). Default: 2 on CUDA (fewer with fewer spare CPUs), 0 on the CPU, where the model uses every core. The embedding is the same for any number.")
@click.option("--min-gene-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Refuse when fewer of the dataset's genes are in the model vocabulary.")
@click.option("--joint", is_flag=True, help="Baselines: fit one pca/hvg on all DATA together (shared genes) so their cells share one space.")
@click.option("--n-hvg", type=click.IntRange(min=1), default=2000, show_default=True, help="Baselines: highly variable genes (a foundation model ignores it, with a warning).")
@click.option("--n-comps", type=click.IntRange(min=1), default=50, show_default=True, help="pca: principal components (a foundation model ignores it, with a warning).")
@click.option("--normalized/--counts", "normalized", default=None, help="Baselines: treat X as already normalised (or as raw counts); detected when omitted.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="local: this process; ray: Ray actors (one model load each) write chunks, this process writes the catalog.")
@click.option("--ray-address", help="Ray cluster: auto (the running cluster), ray://HOST:10001 (Ray client); omitted: start a local cluster.")
@click.option("--num-gpus-per-actor", type=click.FloatRange(min=0), help="GPUs each Ray actor reserves (default: 1 if the cluster has GPUs, else 0; fractions share a GPU).")
@click.option("--actors", type=click.IntRange(min=1), help="Ray actors (model copies); default: cluster GPUs / --num-gpus-per-actor, or its CPUs, at most one per chunk.")
@click.option("--max-retries", type=click.IntRange(min=0), default=3, show_default=True, help="Ray: resubmissions of a failed chunk (a dead actor is replaced).")
@click.option("--arrays-url", envvar="SCDM_ARRAYS_URL", help="Put new embedding arrays under this fsspec URL (file:///shared/dir, s3://bucket/prefix) so Ray workers on other machines reach them; the catalog stays in --store.")
@click.option("--lora", "lora", metavar="ADAPTER", help="Embed through a LoRA adapter made by scdm finetune: its id (as finetune "
              "prints it, or the variant name lora:<id>) or its folder. The embedding is the tuned variant lora:<id>, the space "
              "a head trained on that variant predicts in; -c must be the checkpoint the adapter was tuned from.")
@click.option("--allow-non-counts", is_flag=True, help="Embed normalised (non-integer) values with a model that expects raw counts (refused otherwise).")
@click.option("--allow-empty-cells", is_flag=True, help="Keep what the model returns for cells with no expressed gene it knows (all zeros for some models; refused otherwise).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@dataset_options
@pass_ctx
@user_errors
def embed(obj: Ctx, data: tuple[str, ...], model: str, checkpoint: str | None, batch_size: int | None, device: str,
          precision: str, torch_compile: bool, layer: int | None, pooling: str | None, max_genes: int | None, seed: int,
          params: tuple[str, ...], reference_quirks: bool, chunk_rows: int | None, workers: int | None, min_gene_fraction: float, joint: bool, n_hvg: int, n_comps: int,
          normalized: bool | None, executor: str, ray_address: str | None, num_gpus_per_actor: float | None, actors: int | None,
          max_retries: int, arrays_url: str | None, lora: str | None, allow_non_counts: bool, allow_empty_cells: bool, quiet: bool,
          name: str | None,
          no_copy: bool, **options: Any) -> None:
    """Embed the cells of DATA (an .h5ad file, ingested first, or a dataset in the store).

    Finished embeddings are returned at once; an interrupted run resumes from the first missing
    chunk when the same command is run again. Several runs of the same command at once (one per
    GPU, or per machine sharing the store) share the chunks: each is computed once, and every run
    ends when the embedding is complete.

    \b
    Examples:
      scdm embed a375 --model pca
      scdm embed study1 study2 study3 --model pca --joint     # one shared space
      scdm embed pc9.h5ad --model geneformer --checkpoint ~/ckpt/Geneformer-V2-104M \\
           --label-key response --study GSE149383 --batch-size 64
      scdm embed pc9 --model scgpt --checkpoint ~/ckpt/scGPT_human --device cuda
      scdm embed new_cells --model scgpt -c ~/ckpt/scGPT_human --lora 3f2a9c1e0b7d4a65   # a tuned space
      scdm embed pc9 --model geneformer -c /shared/ckpt/gf --executor ray --ray-address auto \\
           --arrays-url file:///shared/scdm-arrays            # one actor per GPU of the cluster
    """
    from scdm.embedding.baselines import BASELINES
    from scdm.embedding.runner import check_embed_options, embed_baseline
    from scdm.embedding.runner import embed as run_embed
    from scdm.store import Store

    # --layer/--pooling/--max-genes/--reference-quirks may come as --param too (scdm verify prints them so), not both
    extra: dict[str, Any] = {k: v for k, v in {"layer": layer, "pooling": pooling, "max_genes": max_genes,
                                               "reference_quirks": reference_quirks or None}.items() if v is not None}
    from_params = _parse_params(params)
    _refuse_params_set_by_options(from_params, {**dict.fromkeys(_EMBED_OPTION_KEYWORDS), **extra}, spelled=_EMBED_SPELLED)
    extra.update(from_params)
    # sizes given as --param, too, are refused before DATA is ingested
    check_embed_options(batch_size=batch_size, chunk_rows=chunk_rows, seed=seed, workers=workers, min_gene_fraction=min_gene_fraction,
                        actors=actors, max_retries=max_retries, num_gpus_per_actor=num_gpus_per_actor, n_hvg=n_hvg, n_comps=n_comps,
                        **extra)
    if model not in BASELINES:
        from scdm.embedding import get_adapter

        get_adapter(model)  # an unknown model is refused before DATA is ingested
        _warn_baseline_options(model)
    else:
        _refuse_model_options(model)
    st = obj.store if arrays_url is None else Store(obj.store.root, arrays_url=arrays_url)
    names = _resolve_datasets(st, data, name, no_copy, options)
    if model in BASELINES:
        groups = [names] if joint else [[n] for n in names]
        results = [r for g in groups for r in embed_baseline(st, g, model=model, n_hvg=n_hvg, n_comps=n_comps, normalized=normalized, chunk_rows=chunk_rows, progress=not quiet)]
    else:
        if joint:
            raise click.UsageError("--joint applies to the baselines (pca, hvg) only; foundation-model embeddings already share one space.")
        results = []
        for n in names:
            try:
                results.append(run_embed(st, n, model, checkpoint, batch_size=batch_size, device=device, precision=precision,
                                         chunk_rows=chunk_rows, seed=seed, workers=workers, min_gene_fraction=min_gene_fraction,
                                         progress=not quiet, executor=executor, ray_address=ray_address,
                                         num_gpus_per_actor=num_gpus_per_actor, actors=actors, max_retries=max_retries,
                                         allow_non_counts=allow_non_counts, allow_empty_cells=allow_empty_cells,
                                         torch_compile=torch_compile, lora_dir=lora, **extra))
            except TypeError as err:
                if "unexpected keyword" not in str(err):
                    raise
                hint = (" Its tokens per cell are set with --param max_length=N where the model takes it (geneformer, "
                        "scgpt, tgpt, celllm, llm)." if "max_genes" in str(err) else "")
                raise click.UsageError(f"{model} does not take that option ({err}).{hint} See `scdm models` and the "
                                       "model's docs.") from err
    for r in results:
        speed = r.telemetry.get("cells_per_s")
        how = f"computed {r.computed_chunks} chunk(s)" + (f" at {speed:.0f} cells/s" if speed else "") if r.computed_chunks else "already in the store"
        click.echo(f"{r.model} embedding of {r.dataset}: {r.n_cells} x {r.dim}, id {r.embedding_id} ({how})")


@main.command()
@click.option("--model", "-m", required=True, help="Foundation model (see `scdm models`).")
@click.option("--checkpoint", "-c", required=True, metavar="DIR|ORG/NAME[@REV]", help=CHECKPOINT_HELP)
@click.option("--dataset", "datasets", multiple=True, required=True, help="Dataset(s) the split covers (repeatable).")
@click.option("--scenario", type=click.Choice(["pooled", "cross", "custom"]), default="pooled", show_default=True)
@click.option("--by", type=click.Choice(["all", "tissue", "cancer_type", "drug_type", "regimen"]), default="all", show_default=True, help="Category type of the split.")
@click.option("--category", help="Category value (default: every category of --by).")
@click.option("--fold", type=click.IntRange(min=0), help="Tune on this fold's training cells (or --all-folds).")
@click.option("--all-folds", is_flag=True, help="Tune one adapter per fold.")
@click.option("--split-id", help="The split to use when several match.")
@renamed_option("--split-scheme", "scheme", aliases=("--scheme",), type=click.Choice(["cell", "sample", "study", "custom"]),
                help="Split scheme to pick where several stored splits match (pooled: cell or sample).")
@click.option("--label-set", help="Tune on the stored split of this label set (default: each dataset's default label set).")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA rank r (the paper: 8).")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=8, show_default=True, help="LoRA alpha (the paper: 8).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True, help="LoRA dropout (the paper: 0.05).")
@click.option("--target-modules", multiple=True, help="Override the model's LoRA targets (names, or one regex).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), help="Cells per step (default: the model's).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory (Hugging Face models).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Model parameter as in `scdm embed` (repeatable).")
@click.option("--min-gene-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Refuse when fewer of the dataset's genes are in the model vocabulary (as scdm embed).")
@click.option("--allow-non-counts", is_flag=True, help="Tune on normalised (non-integer) values with a model that expects raw counts (refused otherwise, as scdm embed).")
@click.option("--allow-empty-cells", is_flag=True, help="Tune on cells with no expressed gene the model knows and keep their embeddings (refused otherwise, as scdm embed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@pass_ctx
@user_errors
def finetune(obj: Ctx, model: str, checkpoint: str, datasets: tuple[str, ...], scenario: Scenario, by: str, category: str | None,
             fold: int | None, all_folds: bool, split_id: str | None, scheme: str | None, label_set: str | None, rank: int,
             alpha: float, dropout: float,
             target_modules: tuple[str, ...], epochs: int, lr: float, batch_size: int | None, precision: str,
             gradient_checkpointing: bool, device: str, seed: int, params: tuple[str, ...], min_gene_fraction: float,
             allow_non_counts: bool, allow_empty_cells: bool, quiet: bool) -> None:
    """LoRA-fine-tune a foundation model on one split's training cells, then embed with it.

    Trains LoRA + the scDrugMap MLP head on the training cells of (split, fold) only (the split must
    exist: run `scdm evaluate` first), checks that every LoRA matrix receives a gradient, saves the
    adapter in the store, embeds the cells as variant lora:<adapter id> and stores the tuned head's
    test predictions under head lora-mlp. The variant is only ever evaluated on its own fold.

    \b
    Examples:
      scdm evaluate --dataset pc9 --model pca --scenario pooled --by all      # creates the splits
      scdm finetune -m geneformer -c ~/ckpt/Geneformer --dataset pc9 --all-folds
      scdm evaluate --model geneformer && scdm results --by all          # frozen vs LoRA side by side
    """
    from scdm.embedding.finetune import finetune as run_finetune
    from scdm.embedding.runner import check_embed_options

    if (fold is None) == (not all_folds):
        raise click.UsageError("Give exactly one of --fold K and --all-folds.")
    model_params = _parse_params(params)
    _refuse_params_set_by_options(model_params, dict.fromkeys(_FINETUNE_OPTION_KEYWORDS),
                                  spelled={**_EMBED_SPELLED, "dataset": "--dataset", "scheme": "--split-scheme"})
    check_embed_options(batch_size=batch_size, seed=seed, **model_params)  # sizes given as --param, before any work
    results = run_finetune(obj.store, model=model, checkpoint=checkpoint, dataset=list(datasets), scenario=scenario, by=by,
                           category=category, fold=fold, all_folds=all_folds, split_id=split_id, scheme=scheme,
                           label_set=label_set, rank=rank,
                           alpha=alpha, dropout=dropout, target_modules=list(target_modules) or None, epochs=epochs, lr=lr,
                           batch_size=batch_size, precision=precision, gradient_checkpointing=gradient_checkpointing,
                           seed=seed, device=device, progress=not quiet, min_gene_fraction=min_gene_fraction,
                           allow_non_counts=allow_non_counts, allow_empty_cells=allow_empty_cells, **model_params)
    for r in results:
        auroc = r.metrics.get("auroc")
        click.echo(f"{r.variant} ({r.category_type}={r.category}, fold {r.fold}): {r.n_train} train / {r.n_test} test cells, "
                   f"lora-mlp AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}" + (" (reused)" if r.reused else ""))


# ---- evaluation commands ---------------------------------------------------------------------
def _csv_list(value: str | tuple[str, ...] | list[str]) -> list[str]:
    return list(split_commas(click.get_current_context(), click.Argument(["value"]), value))


_LEADERBOARD_METRICS = ("auroc", "ap", "f1", "accuracy")
"""The metrics `scdm evaluate` prints and `scdm results` shows unless --metric is given."""


@main.command()
@list_option("--embedding", "embedding_ids", help="Embedding ids to evaluate (repeatable or comma-separated). Default: every complete embedding.")
@click.option("--dataset", "datasets", multiple=True, help="Evaluate the embeddings of this dataset (repeatable; with --model).")
@list_option("--model", "models", help="Evaluate only embeddings of these models.")
@list_option("--scenario", "scenario", default=("pooled", "cross"), help="pooled (k-fold within a category), cross (leave one study out); custom takes per-cell folds, from Python only (scdm.classify.grid.evaluate(custom=...)).")
@list_option("--by", default=("all", "tissue", "cancer_type", "drug_type", "regimen"), help="Category types; every category of each is a task.")
@list_option("--head", "heads", aliases=("--heads",), default=("mlp", "logreg"), help="Heads: mlp, logreg, lightgbm, ridge, majority, shuffled-label, dann (scDEAL domain adaptation: the "
                   "test fold's cells, unlabelled, are its target; meant for --scenario cross).")
@click.option("--folds", type=click.IntRange(min=2), default=10, show_default=True, help="Folds of the pooled scenario (the paper: 10); "
              "cross-data folds are the studies (a warning says when no pooled split reads --folds).")
@click.option("--split-scheme", type=click.Choice(["auto", "sample", "cell"]), default="auto", show_default=True,
              help="Pooled folds grouped by sample (no patient on both sides of a fold) or at cell level (the paper's, "
                   "which can leak sample identity). auto: sample when every cell has a sample id and there are at "
                   "least --folds samples, else cell. Every result row names the scheme it used.")
@click.option("--mlp-profile", type=click.Choice(["default", "paper", "fast"]), default="default", show_default=True,
              help="default: trains to convergence at every fold size (at least 500 optimiser steps, early stopping on "
                   "training cells); paper: scDrugMap's code (batch 128, 10 epochs, AdamW 1e-4, no scaling), which "
                   "under-trains small folds (10 steps on ~100 cells); fast: large batches, bf16 where available. "
                   "Read by --head mlp only (a warning says when no mlp head is asked for).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the pooled folds and of every head that takes one (mlp, lightgbm, shuffled-label and its "
                   "base, dann); recorded in each head's parameters. A seed that neither reads (--scenario cross with "
                   "logreg, ridge, majority) gives seed 0's results, and a warning says so.")
@click.option("--label-set", help="Evaluate this label set of every dataset (default: each dataset's default; see `scdm ls --what labels`).")
@click.option("--pair-folds-with", help="Pooled folds stratified by this other label set, so two drugs of the same cells share one partition (paired comparison); pooled splits only (a warning says when none is asked for).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Head fits in parallel, one thread each. Default: per embedding space, one per CPU for a small "
                   "matrix (under 4M values; its fits run on one thread either way, so the results equal --jobs 1's), "
                   "one fit on every core for a larger one.")
@click.option("--no-predictions", is_flag=True, help="Do not store per-cell test probabilities (a later run without this flag fits such tasks again to store them).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: head fits run as Ray tasks on a cluster (pip install 'scdm[ray]'); this process writes the catalog.")
@click.option("--ray-address", default=None,
              help="With --executor ray: 'auto' (running cluster), 'ray://host:10001', or unset to start a local one.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@output_options
@pass_ctx
@user_errors
def evaluate(obj: Ctx, embedding_ids: tuple[str, ...], datasets: tuple[str, ...], models: tuple[str, ...],
             scenario: tuple[str, ...], by: tuple[str, ...], heads: tuple[str, ...], folds: int, split_scheme: SplitScheme, mlp_profile: str, seed: int, label_set: str | None,
             pair_folds_with: str | None, jobs: int | None,
             no_predictions: bool,
             executor: Executor, ray_address: str | None, quiet: bool, fmt: str) -> None:
    """Train and score heads on every (embedding space, split, fold, head) task.

    Embeddings of one space (same model, checkpoint and parameters) are pooled across datasets;
    spaces are never mixed. Splits are stored once and reused by every model and head, so models
    are compared on identical cells. Finished tasks are skipped when the command is run again.
    Prints the results of the tasks asked for (fitted now or reused); `scdm results` lists all.

    \b
    Examples:
      scdm evaluate --head ridge,logreg,mlp --folds 10
      scdm evaluate --model geneformer --scenario cross --by cancer_type,drug_type
      scdm evaluate --split-scheme cell --head logreg     # the paper's cell-level folds
      scdm evaluate --executor ray --ray-address auto        # fits on a running Ray cluster
    """
    from scdm.classify.grid import evaluate as run_evaluate
    from scdm.classify.results import asked_results, format_leaderboard, leaderboard, leaderboard_notes, wide_leaderboard

    st = obj.store
    ids = list(embedding_ids) or _embedding_selection(st, datasets, models)
    head_list = _csv_list(heads)
    # --scenario is a free comma-separated list: the split builder rejects an unknown scenario.
    scenarios = cast("list[Scenario]", _csv_list(scenario))
    if "custom" in scenarios:  # its per-cell folds have no option here; the split builder's message names a Python argument
        raise click.UsageError("--scenario custom needs a test fold for every cell, which only the Python API takes: "
                               "scdm.classify.grid.evaluate(store, scenarios=['custom'], custom=<DataFrame of dataset_id, "
                               "row (or cell_id), fold>); from the command line, evaluate --scenario pooled or cross.")
    import warnings

    from scdm.classify.grid import UnreadOptionWarning, unread_options

    if _given("folds"):  # the library cannot tell a --folds typed from its default; the seed and scheme it checks itself
        for unread in unread_options(scenarios, head_list, None, folds=folds):
            warnings.warn(f"{unread}.", UnreadOptionWarning, stacklevel=1)
    if _given("mlp_profile") and "mlp" not in head_list:  # it reaches the mlp head only (head_params below)
        warnings.warn(f"--mlp-profile {mlp_profile} is ignored: no mlp head is asked for (--head {','.join(head_list)}).",
                      UnreadOptionWarning, stacklevel=1)
    summary = run_evaluate(st, ids, scenarios=scenarios, by=_csv_list(by), heads=head_list, folds=folds,
                           split_scheme=split_scheme, seed=seed, label_set=label_set, pair_folds_with=pair_folds_with, jobs=jobs,
                           head_params={"mlp": {"profile": mlp_profile}} if "mlp" in head_list else None,
                           save_predictions=not no_predictions, silent=quiet, executor=executor,
                           ray_address=ray_address)
    # what this command asked for (fitted now or reused), not every result in the store
    board = asked_results(leaderboard(st, run_id=None), summary.results, st)
    shown = _LEADERBOARD_METRICS
    echo_frame(format_leaderboard(board, metrics=shown) if fmt == "table" else wide_leaderboard(board, metrics=shown), fmt)
    # the caveats `scdm results` prints under the same rows (a pca/hvg baseline fitted on the test cells too, ...)
    for note in leaderboard_notes(board, shown):
        click.echo(f"note: {note}", err=True)


_MODEL_ONLY_OPTIONS = ("checkpoint", "batch_size", "device", "precision", "torch_compile", "layer", "pooling", "max_genes",
                       "seed", "params", "reference_quirks", "workers", "min_gene_fraction", "executor", "ray_address",
                       "num_gpus_per_actor", "actors", "max_retries", "allow_non_counts", "allow_empty_cells", "lora")
"""`scdm embed` options that only a foundation model reads: given to a baseline, they would be ignored."""


def _given(name: str) -> bool:
    """Whether the running command's option ``name`` was set (command line or environment), not left at its default."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (click.core.ParameterSource.DEFAULT, None)


def _refuse_model_options(model: str) -> None:
    """A baseline given a checkpoint is refused; other foundation-model options get one warning line
    (a loop over models may pass them to every model), never silence."""
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in _MODEL_ONLY_OPTIONS
             and ctx.get_parameter_source(p.name) not in (click.core.ParameterSource.DEFAULT, None)]
    own = "its own options: --n-comps, --n-hvg, --normalized/--counts, --joint, --chunk-rows"
    if any(p.name == "checkpoint" for p in given):
        raise click.UsageError(f"{model} is fitted from the data and takes no --checkpoint; drop it ({own}).")
    if any(p.name == "torch_compile" for p in given):
        raise click.UsageError(f"--compile applies to foundation models; {model} runs no neural network.")
    if any(p.name == "lora" for p in given):
        raise click.UsageError(f"--lora applies to foundation models tuned by scdm finetune; {model} has no adapter.")
    if given:
        flags = ", ".join(p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0] for p in given)
        logger.warning("%s is fitted from the data on the CPU and ignores %s (foundation-model options; %s)", model, flags, own)


_BASELINE_ONLY_OPTIONS = ("n_hvg", "n_comps", "normalized")
"""`scdm embed` options that only the baselines read (--joint is refused for the others on its own)."""


def _warn_baseline_options(model: str) -> None:
    """A foundation model given --n-comps, --n-hvg or --normalized/--counts: one warning line, as the baselines
    get for the foundation-model options. They have defaults, so they were dropped without a word, while the
    Python call (``embed(..., n_comps=20)``) refuses them: the embedding keeps the model's own width."""
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in _BASELINE_ONLY_OPTIONS and _given(str(p.name))]
    if given:
        flags = ", ".join("/".join(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")) for p in given)
        logger.warning("%s ignores %s: options of the pca/hvg baselines; its embedding has the model's own width and "
                       "genes (see `scdm models`)", model, flags)


def _check_choices(option: str, given: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """A usage error naming the allowed values when a list option holds another (a typo must not read as 'no rows')."""
    bad = [v for v in given if v not in allowed]
    if bad:
        raise click.BadParameter(f"{', '.join(map(repr, bad))} {'is' if len(bad) == 1 else 'are'} not one of "
                                 f"{', '.join(map(repr, allowed))}.", param_hint=f"'{option}'")


def _check_result_filters(st: Any, filters: dict[str, tuple[FilterKey, tuple[str, ...]]]) -> None:
    """Warn about filter values that no stored result has (see :func:`scdm.classify.results.unmatched_filters`)."""
    from scdm.classify.results import unmatched_filters

    for line in unmatched_filters(st, filters):
        click.echo(f"warning: {line}", err=True)


def _embedding_selection(st: Any, datasets: tuple[str, ...], models: tuple[str, ...]) -> list[str] | None:
    if not datasets and not models:
        return None
    frame = st.embeddings(status="complete")
    if datasets:
        ids = {st.dataset(d).dataset_id for d in datasets}
        frame = frame[frame["dataset_id"].isin(ids)]
    if models:
        frame = frame[frame["model"].isin(models)]
    if frame.empty:
        raise click.UsageError("No complete embedding matches --dataset/--model; see `scdm ls`.")
    return frame["embedding_id"].tolist()


@main.command()
@list_option("--metric", "metrics", default=_LEADERBOARD_METRICS, help="Metrics to show (columns).")
@list_option("--model", "models", help="Only these models.")
@list_option("--head", "heads", aliases=("--heads",), help="Only these heads.")
@list_option("--scenario", "scenarios", help="Only these scenarios: pooled, cross, custom.")
@list_option("--by", "category_types", help="Only these category types: all, tissue, cancer_type, drug_type, regimen.")
@renamed_option("--split-scheme", "scheme", aliases=("--scheme",), type=click.Choice(["cell", "sample", "study", "custom"]),
                help="Only this split scheme (pooled: cell or sample; cross: study).")
@click.option("--dataset", "datasets", multiple=True, help="Only results on exactly these datasets (repeatable): a result "
              "pooled over several is 'a,b' (any order); 'a' alone does not match it.")
@click.option("--label-set", "label_sets", multiple=True, help="Only results of exactly this label set (repeatable; a pooled "
              "result's label sets as 'x,y').")
@click.option("--long", "long_format", is_flag=True, help="One row per metric with mean, sd and fold counts (for further analysis).")
@output_options
@pass_ctx
@user_errors
def results(obj: Ctx, metrics: tuple[str, ...], models: tuple[str, ...], heads: tuple[str, ...], scenarios: tuple[str, ...],
            category_types: tuple[str, ...], scheme: str | None, datasets: tuple[str, ...], label_sets: tuple[str, ...],
            long_format: bool, fmt: str) -> None:
    """Print the leaderboard: mean +- sd over the folds of each result (cross-data: over held-out studies).

    One row per result identity: embedding space (model), datasets, label set, split (scenario,
    scheme, k folds, seed, category) and head with its parameters. Nothing is averaged across
    those. A metric undefined on some folds shows its own n; rows with missing folds say
    'incomplete' (run `scdm evaluate` again to finish them), or 'skipped' where the run recorded
    why it could not fit them (a head that failed or diverged: the note under the table names the
    reason and the skipped_tasks query; a rerun fails again). --format csv/json give numeric
    columns: <metric>, <metric>_sd, <metric>_n.

    \b
    Examples:
      scdm results --by all
      scdm results --label-set Vorinostat --dataset jhu006
      scdm results --scenario cross --by cancer_type --format csv > cross.csv
      scdm results --long --format json
    """
    from scdm.classify.results import (
        format_leaderboard,
        leaderboard,
        leaderboard_notes,
        wide_leaderboard,
        with_signed_partner,
    )
    from scdm.store.splits import CATEGORY_TYPES, SCENARIOS

    _check_choices("--scenario", scenarios, SCENARIOS)
    _check_choices("--by", category_types, CATEGORY_TYPES)
    shown = with_signed_partner(_csv_list(metrics))
    # every metric: the notes tell a one-class test fold (every metric NULL) from other NULLs
    board = leaderboard(obj.store, metrics=None, models=models or None, heads=heads or None,
                        scenarios=scenarios or None, category_types=category_types or None, scheme=scheme,
                        datasets=datasets or None, label_sets=label_sets or None)
    _check_result_filters(obj.store, {"--model": ("models", models), "--head": ("heads", heads),
                                      "--dataset": ("datasets", datasets), "--label-set": ("label_sets", label_sets)})
    if long_format:
        echo_frame(board[board["metric"].isin(shown)].reset_index(drop=True), fmt)
    elif fmt == "table":
        echo_frame(format_leaderboard(board, metrics=shown), fmt)
    else:
        echo_frame(wide_leaderboard(board, metrics=shown), fmt)
    for note in leaderboard_notes(board, shown):
        click.echo(f"note: {note}", err=True)


@main.command("prompt")
@click.option("--dataset", "datasets", multiple=True, required=True, help="Dataset to prompt about (repeatable; several are pooled like one embedding space).")
@click.option("--backend", type=click.Choice(["openai", "ollama", "hf"]), default="openai", show_default=True,
              help="openai: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp); ollama: an Ollama server's own API "
                   "(prompts longer than --num-ctx are refused, not cut); hf: a local model folder.")
@click.option("--base-url", help="Endpoint, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434 (--backend ollama). "
                   "Default: OpenAI's; with --backend ollama, http://localhost:11434.")
@click.option("--num-ctx", type=click.IntRange(min=2), cls=LibraryDefaultOption, library_default=_ollama_num_ctx,
              help="--backend ollama: context length to run the model with.")
@click.option("--model", "-m", help="Model name the endpoint serves (gpt-4o-mini, llama3.1:8b, ...); with --backend hf, the name shown in results.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True, help="Environment variable holding the API key (local endpoints need none).")
@click.option("--checkpoint", "-c", type=click.Path(exists=True, file_okay=False), help="--backend hf: a local Hugging Face causal-LM folder.")
@click.option("--device", default="auto", show_default=True, help="--backend hf: auto, cpu, cuda, cuda:1, ...")
@click.option("--shots", type=click.IntRange(min=0), default=0, show_default=True, help="Labelled training cells of the fold shown as examples in each request (0 = zero-shot).")
@click.option("--genes", "top_k", type=click.IntRange(min=1), default=10, show_default=True, help="Most expressed genes listed per cell (the paper: 10).")
@click.option("--cells-per-request", type=click.IntRange(min=1), default=10, show_default=True, help="Cells per request (the paper: 10).")
@click.option("--template", type=click.Path(exists=True, dir_okay=False), help="Prompt template file replacing the default (placeholders: {cells}, {source}, {examples}, {answer_format}, {n_cells}, {top_k}, {drug}).")
@list_option("--scenario", "scenario", default=("pooled", "cross"), help="Splits as in `scdm evaluate` (same options give the same split ids).")
@list_option("--by", default=("all", "tissue", "cancer_type", "drug_type", "regimen"), help="Category types (zero-shot: more cost nothing, each cell is asked once).")
@click.option("--category", help="Only this category value of --by (with --split-id: refused unless every given split is of it).")
@click.option("--folds", type=click.IntRange(min=2), default=10, show_default=True, help="Folds of the pooled scenario.")
@click.option("--split-scheme", type=click.Choice(["auto", "sample", "cell"]), default="auto", show_default=True,
              help="Pooled folds as in `scdm evaluate --split-scheme`.")
@click.option("--split-id", "split_ids", multiple=True, help="Use this stored split (repeatable) instead of building splits: --scenario, --by, --folds and --split-scheme are then not read.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the folds, of the cells' order into requests and of the examples.")
@click.option("--label-set", help="Label set to score against (default: each dataset's default).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Sampling temperature of an endpoint. --backend hf decodes greedily: it refuses a temperature above 0 "
                   "and warns of --max-tokens, --response-format, --logprobs/--no-logprobs and --top-logprobs, which it does not read.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Longest answer.")
@click.option("--response-format", type=click.Choice(["json_object", "json_schema", "text"]), default="json_object", show_default=True,
              help="JSON mode, structured output (JSON schema), or free text read line by line.")
@click.option("--logprobs/--no-logprobs", default=True, show_default=True, help="Ask for token log-probabilities: P(sensitive), hence AUROC/AP (NULL without).")
@click.option("--top-logprobs", type=click.IntRange(0, 20), default=5, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True, help="Seconds per attempt (an endpoint's; --backend hf ignores it).")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Requests in flight (an endpoint's; --backend hf answers one at a time).")
@click.option("--rpm", type=click.FloatRange(min=0, min_open=True), help="At most this many request starts per minute.")
@click.option("--retries", type=click.IntRange(min=0), default=6, show_default=True, help="Retries per request on HTTP 429/5xx and timeouts (exponential back-off).")
@click.option("--max-requests", type=click.IntRange(min=0), help="Send at most this many new requests now (answered ones are free); run again to continue.")
@click.option("--dry-run", is_flag=True, help="Print the first prompt(s) and the number of requests and tokens; send and write nothing.")
@click.option("--show-prompts", type=click.IntRange(min=0), default=1, show_default=True, help="Prompts printed by --dry-run.")
@click.option("--price-input", type=click.FloatRange(min=0), help="USD per million prompt tokens, for the dry run's cost estimate.")
@click.option("--price-output", type=click.FloatRange(min=0), help="USD per million answer tokens, for the dry run's cost estimate.")
@click.option("--allow-empty-cells", is_flag=True, help="Prompt labelled cells that list no gene (none expressed with a symbol) with an empty gene list (refused otherwise, as scdm embed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@output_options
@pass_ctx
@user_errors
def prompt_command(obj: Ctx, datasets: tuple[str, ...], backend: str, base_url: str | None, num_ctx: int | None,
                   model: str | None, api_key_env: str, checkpoint: str | None, device: str, shots: int, top_k: int, cells_per_request: int, template: str | None,
                   scenario: tuple[str, ...], by: tuple[str, ...], category: str | None, folds: int, split_scheme: str, split_ids: tuple[str, ...],
                   seed: int, label_set: str | None, temperature: float, max_tokens: int, response_format: str,
                   logprobs: bool, top_logprobs: int, timeout_s: float, concurrency: int, rpm: float | None, retries: int,
                   max_requests: int | None, dry_run: bool, show_prompts: int, price_input: float | None,
                   price_output: float | None, allow_empty_cells: bool, quiet: bool, fmt: str) -> None:
    """Predict drug response by prompting a language model, scored like an embedding head.

    Each cell becomes its 10 most highly expressed genes (symbols); 10 cells of one data source
    go into one request (template modules: how to reason, the source, the genes, the answer
    format) and the model answers sensitive/resistant per cell, in JSON. The answers are scored
    on the test cells of the same splits as `scdm evaluate` and show up in `scdm results` as head
    prompt-zero-shot / prompt-<k>-shot with the language model as the model. Every request is
    stored with its raw answer: a rerun is free and an interrupted run continues where it
    stopped. AUROC/AP need token log-probabilities; without them they are NULL, never computed
    from hard labels. Start with --dry-run: it prints a prompt and the requests and tokens.

    \b
    Examples, against a local Ollama server (no API key needed):
      ollama pull llama3.1:8b                       # Ollama serves http://localhost:11434
      scdm prompt --dataset a375 --backend ollama -m llama3.1:8b --by all --folds 5 --dry-run
      scdm prompt --dataset a375 --backend ollama -m llama3.1:8b --by all --folds 5
      scdm prompt --dataset a375 --backend ollama -m llama3.1:8b --by all --folds 5 --shots 4 --num-ctx 16384
      scdm results --head prompt-zero-shot
    \b
    vLLM (`vllm serve meta-llama/Meta-Llama-3-8B-Instruct`), OpenAI, a local model folder:
      scdm prompt --dataset a375 --base-url http://localhost:8000/v1 -m meta-llama/Meta-Llama-3-8B-Instruct
      scdm prompt --dataset a375 -m gpt-4o-mini --max-requests 100 --price-input 0.15 --price-output 0.6
      scdm prompt --dataset a375 --backend hf --checkpoint ./Meta-Llama-3-8B-Instruct
    """
    from scdm.prompt import prompt as run_prompt

    if backend == "hf":
        _check_local_decoding(temperature)
    st = obj.store
    summary = run_prompt(
        st, list(datasets), backend=backend, model=model, base_url=base_url, api_key_env=api_key_env, checkpoint=checkpoint,
        device=device, shots=shots, top_k=top_k, cells_per_request=cells_per_request, template=template,
        scenarios=_csv_list(scenario), by=_csv_list(by), category=category, folds=folds, split_scheme=split_scheme,
        seed=seed, label_set=label_set, split_ids=list(split_ids), temperature=temperature, max_tokens=max_tokens,
        response_format=response_format, logprobs=logprobs, top_logprobs=top_logprobs, timeout_s=timeout_s, num_ctx=num_ctx,
        concurrency=concurrency, rpm=rpm, retries=retries, max_requests=max_requests, dry_run=dry_run,
        show_prompts=show_prompts, silent=quiet, allow_empty_cells=allow_empty_cells)
    if dry_run:
        for i, text in enumerate(summary.prompts, 1):
            click.echo(f"--- prompt {i} of {summary.n_requests - summary.n_cached} to send ---")
            click.echo(text)
        to_send = summary.n_requests - summary.n_cached
        click.echo(f"dry run: {summary.n_requests} requests for {summary.n_cells} cells ({summary.model}, {summary.head}); "
                   f"{summary.n_cached} already answered, {to_send} to send"
                   + (f", {summary.n_pending} of them beyond --max-requests" if max_requests is not None else "") + ".")
        click.echo(f"estimated tokens to send: {summary.prompt_tokens:,} prompt + {summary.completion_tokens:,} answer.")
        if price_input is not None or price_output is not None:
            cost = (summary.prompt_tokens * (price_input or 0) + summary.completion_tokens * (price_output or 0)) / 1e6
            click.echo(f"estimated cost: {cost:.4f} USD")
        return
    from scdm.classify.results import asked_results, format_leaderboard, leaderboard, wide_leaderboard

    click.echo(f"prompt run {summary.run_id}: {summary.n_sent} requests sent, {summary.n_cached} answered before, "
               f"{summary.n_pending} not sent; {summary.n_tasks} folds scored, {summary.n_reused} reused, "
               f"{summary.n_skipped} skipped; {summary.n_unanswered} of {summary.n_asks} cell answers unreadable ({summary.n_cells} distinct cells); "
               f"{summary.prompt_tokens:,} + {summary.completion_tokens:,} tokens.", err=True)
    if summary.n_pending:
        click.echo("note: the request budget ran out; run the same command again to continue.", err=True)
    # every result this run asked for (any --by), not only category "all"
    board = asked_results(leaderboard(st, models=[summary.model], heads=[summary.head]), summary.results, st)
    echo_frame(format_leaderboard(board) if fmt == "table" else wide_leaderboard(board), fmt)


_ENDPOINT_DECODING = ("max_tokens", "response_format", "logprobs", "top_logprobs")
"""`scdm prompt` options an endpoint reads and --backend hf does not: it writes the JSON answer itself and
scores each label from the two label words' next-token probabilities (--temperature: above 0 is refused, 0 is
what it does)."""


_ENDPOINT_TRANSPORT = ("base_url", "api_key_env", "timeout_s", "concurrency")
"""`scdm prompt` options of a served endpoint that --backend hf does not read: it runs the model in this
process, one request at a time, with no connection to time out (--rpm and --retries still apply)."""


def _check_local_decoding(temperature: float) -> None:
    """--backend hf: a temperature above 0 is refused (its answers would be greedy ones under a sampling
    setting); the other endpoint decoding options given get one warning line naming them."""
    if temperature > 0:
        raise click.UsageError(f"--backend hf decodes greedily (the more likely label word per cell) and cannot "
                               f"sample at --temperature {temperature:g}; drop --temperature, or sample from a served "
                               "model with --backend openai or ollama.")
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name in _ENDPOINT_DECODING and _given(str(p.name))]
    if given:
        import warnings

        from scdm.classify.grid import UnreadOptionWarning

        flags = ", ".join((p.secondary_opts[0] if p.secondary_opts and ctx.params[str(p.name)] is False else p.opts[-1])
                          for p in given)
        warnings.warn(f"--backend hf ignores {flags}: it writes the JSON answer itself and scores P(sensitive) from the "
                      "two label words' next-token probabilities, so AUROC/AP always have scores (these options are "
                      "for --backend openai or ollama).", UnreadOptionWarning, stacklevel=1)
    served = [p for p in ctx.command.params if p.name in _ENDPOINT_TRANSPORT and _given(str(p.name))]
    if served:
        import warnings

        from scdm.classify.grid import UnreadOptionWarning

        warnings.warn(f"--backend hf ignores {', '.join(p.opts[-1] for p in served)}: it runs the model in this "
                      "process, one request at a time, with no endpoint to reach or time out (these options are for "
                      "--backend openai or ollama).", UnreadOptionWarning, stacklevel=1)


# ---- the built-in default, synthetic data and the report ------------------------------------
@main.command()
@click.option("--cells", "n_cells", type=click.IntRange(min=1), default=6000, show_default=True, help="Cells in the synthetic collection.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Pooled folds.")
@list_option("--head", "heads", aliases=("--heads",), default=("logreg", "ridge", "mlp"), help="Heads to evaluate.")
@click.option("--report-dir", default="scdm-demo-report", show_default=True, type=click.Path(file_okay=False), help="Where the HTML report goes.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@output_options
@pass_ctx
@user_errors
def demo(obj: Ctx, n_cells: int, folds: int, heads: tuple[str, ...], report_dir: str, seed: int, quiet: bool, fmt: str) -> None:
    """Run the whole pipeline on built-in data: no downloads, no checkpoints (about 2 minutes on 2 cores).

    Generates a scDrugMap-shaped synthetic collection, ingests it with the bundled real A375 dataset,
    embeds with the pca/hvg baselines and a tiny random-weight Geneformer written on the fly,
    evaluates pooled and cross-data with logreg, ridge and mlp, prints the leaderboard and writes
    the report. A second run reuses everything from the store.
    """
    from scdm.demo import NEXT_STEPS, run_demo

    summary = run_demo(obj.store, n_cells=n_cells, report_dir=report_dir, folds=folds, heads=_csv_list(heads), seed=seed,
                       progress=not quiet, echo=lambda text: click.echo(text, err=True))
    echo_frame(summary.leaderboard, fmt)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    if fmt == "table":
        click.echo(f"\nStore: {summary.store}   Report: {summary.report}   ({summary.n_cells} cells, {summary.seconds:.0f} s)")
        click.echo("Note: geneformer here has RANDOM weights (pipeline demo); its scores say nothing about Geneformer.")
        click.echo(NEXT_STEPS)


@main.command()
@click.option("--scale", type=float, default=0.01, show_default=True, help="Fraction of the 326,751-cell scDrugMap primary collection.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .h5ad (written in blocks; memory stays bounded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--genes", "n_genes", type=int, default=2000, show_default=True, help="Genes in the panel (real symbols and Ensembl ids).")
@click.option("--response-strength", type=float, default=2.0, show_default=True, help="Log fold change of the response program.")
@click.option("--study-shift", type=float, default=0.7, show_default=True, help="How much the response program differs between studies (makes cross-data harder).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@user_errors
def synth(scale: float, out: str, seed: int, n_genes: int, response_strength: float, study_shift: float, overwrite: bool) -> None:
    """Write a synthetic collection shaped like the scDrugMap primary collection.

    36 datasets from 23 studies with their tissue, cancer type, drug type and regimen, cell counts
    and sensitive/resistant balance per category (scaled), raw negative-binomial counts, samples
    inside studies, study batch effects and a response program.

    \b
    Example:
      scdm synth --scale 0.01 --out collection.h5ad
      scdm ingest collection.h5ad --label-key response --study-key study --sample-key sample \\
           --tissue-key tissue --cancer-type-key cancer_type --drug-type-key drug_type --regimen-key regimen
    """
    from scdm.classify.synth import synthesize

    path = synthesize(scale, seed=seed, n_genes=n_genes, response_strength=response_strength, study_shift=study_shift,
                      out=out, overwrite=overwrite, silent=False)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for index.html and the figures.")
@list_option("--model", "models", help="Only these models (their results and embeddings).")
@list_option("--head", "heads", aliases=("--heads",), help="Only these heads.")
@click.option("--run", "run_id", help="Only the results fitted by this evaluation run (eval_runs.run_id).")
@pass_ctx
@user_errors
def report(obj: Ctx, out_dir: str, models: tuple[str, ...], heads: tuple[str, ...], run_id: str | None) -> None:
    """Write an HTML report with figures from the catalog alone (nothing is recomputed).

    Radar plots of F1/AUROC per model across categories, bars with sd over folds, per-fold
    distributions, UMAPs of each embedding, a scalability table, the leaderboards with the SQL
    that reproduces them, the split scheme and skipped tasks. A report of some models, heads or
    one run reads out of date (scdm serve's Figures tab) only when their results change.

    \b
    Examples:
      scdm report --out report/          # then open report/index.html; tables/ holds each table as CSV and SQL
      scdm report --out report-gf/ --model geneformer --head logreg,mlp
    """
    from scdm.classify.report import write_report
    from scdm.store.progress import progress_enabled

    _check_result_filters(obj.store, {"--model": ("models", models), "--head": ("heads", heads)})
    path = write_report(obj.store, out_dir, run_id=run_id, models=models or None, heads=heads or None,
                        progress=progress_enabled())  # off under -q and SCDM_PROGRESS=0
    click.echo(f"wrote {path}")


# ---- scDEAL transfer learning ---------------------------------------------------------------
def _floats(value: str) -> list[float]:
    return [float(v) for v in _csv_list(value)]


@main.command()
@click.option("--source", "sources", multiple=True, required=True,
              help="Labelled source (repeatable): a dataset in the store, an .h5ad of bulk profiles, or an expression CSV (cell lines x genes).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="CSV of bulk responses (cell lines x drugs) for a CSV --source.")
@click.option("--target", required=True, help="Unlabelled single-cell dataset in the store (its labels, if any, are used only for metrics).")
@click.option("--drug", help="Drug column of a bulk source (AUC/IC50 binarised with the waterfall method); with store datasets, "
                              "picks each one's label set of this drug and refuses label sets of another drug.")
@click.option("--source-label-set", help="Label set of the store source dataset(s) to train on (default: the one of --drug, "
                                         "else each dataset's default; see `scdm ls --what labels`).")
@click.option("--target-label-set", help="Label set of the target the metrics are computed against (default: the one of --drug, "
                                         "else the target's default).")
@click.option("--validation-label-set", help="Label set of the --validation dataset (default: the one of --drug, else its default).")
@click.option("--features", default="expr", show_default=True, help="expr (log-normalised shared HVGs, MinMax-scaled) or an embedding id of the target.")
@click.option("--source-features", multiple=True, help="Embedding ids of the source datasets when --features is an embedding.")
@click.option("--response", type=click.Choice(["auto", "binary", "ic50", "auc", "activity_area"]), default="auto", show_default=True)
@click.option("--balance", type=click.Choice(["none", "upsample", "downsample", "smote"]), default="none", show_default=True)
@click.option("--validation", help="Labelled validation dataset for model selection (neither the target nor a source).")
@click.option("--alpha", default="1.0", show_default=True, help="MMD weight; several comma-separated values make a grid chosen on validation data.")
@click.option("--beta", default="0.1", show_default=True, help="Cluster-regulariser weight; comma-separated values make a grid.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--pretrain-epochs", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--n-hvg", type=click.IntRange(min=0), default=2000, show_default=True, help="Shared highly variable genes (0 = all shared genes).")
@click.option("--cluster-method", type=click.Choice(["auto", "leiden", "louvain", "kmeans"]), default="auto", show_default=True)
@click.option("--corruption", type=click.Choice(["mask", "gaussian"]), default="mask", show_default=True,
              help="Denoising-autoencoder input corruption: scDEAL's binomial masking (each value zeroed with "
                   "probability --mask-rate) or Gaussian noise (--param noise_std=0.1).")
@click.option("--mask-rate", type=float, default=0.2, show_default=True, help="Masking probability (scDEAL: 0.2).")
@click.option("--no-adapt", is_flag=True, help="Train the same predictor without domain adaptation (the baseline to compare with).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--allow-empty-cells", is_flag=True, help="Use source samples, validation and target cells that express none of the run's genes "
                   "(refused otherwise, as scdm embed).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Any other transfer() argument, e.g. --param latent_dim=64 (one that an option above sets is refused: use the option).")
@pass_ctx
@user_errors
def transfer(obj: Ctx, sources: tuple[str, ...], labels: str | None, target: str, drug: str | None,
             source_label_set: str | None, target_label_set: str | None, validation_label_set: str | None, features: str,
             source_features: tuple[str, ...], response: ResponseKind, balance: Balance, validation: str | None, alpha: str,
             beta: str, epochs: int, pretrain_epochs: int, lr: float, batch_size: int, n_hvg: int, cluster_method: ClusterMethod,
             corruption: Corruption, mask_rate: float, no_adapt: bool, seed: int, allow_empty_cells: bool,
             params: tuple[str, ...]) -> None:
    """Transfer drug response from a labelled source to single cells (scDEAL, built correctly).

    Denoising autoencoders for source and target, a predictor on the source latent, trained with
    cross-entropy + alpha * MMD + beta * a differentiable cluster regulariser; epochs and weights
    are chosen on source validation cells, never on the target. Predictions go to the catalog
    (transfer_predictions); run `scdm genes --run RUN` for critical genes.

    \b
    Examples:
      scdm transfer --source gdsc_expr.csv --labels gdsc_auc.csv --drug Erlotinib --target pc9
      scdm transfer --source study1 --source study2 --target study3 --validation study4 --alpha 0.5,1,2
      scdm transfer --source study1 --target study3 --source-label-set response_v2 --target-label-set Vorinostat
    """
    from scdm.classify.transfer import transfer as run_transfer

    if labels:
        if len(sources) != 1:
            raise click.UsageError("--labels pairs with exactly one CSV --source.")
        source: Any = (sources[0], labels)
    else:
        source = sources[0] if len(sources) == 1 else list(sources)
    alphas, betas = _floats(alpha), _floats(beta)
    settings: dict[str, Any] = dict(
        source=source, target=target, drug=drug, source_label_set=source_label_set, target_label_set=target_label_set,
        validation_label_set=validation_label_set, features=features, source_features=list(source_features) or None,
        response=response, balance=balance, validation=validation, alpha=alphas[0] if len(alphas) == 1 else alphas,
        beta=betas[0] if len(betas) == 1 else betas, epochs=epochs, pretrain_epochs=pretrain_epochs, lr=lr,
        batch_size=batch_size, n_hvg=n_hvg or None, cluster_method=cluster_method, adapt=not no_adapt,
        corruption=corruption, mask_rate=mask_rate, seed=seed, allow_empty_cells=allow_empty_cells)
    extra = _parse_params(params)
    _refuse_params_set_by_options(extra, settings, spelled={"adapt": "--no-adapt", "source": "--source (and --labels)"})
    result = run_transfer(obj.store, **settings, **extra)
    click.echo(f"transfer run {result.run_id}: {len(result.proba)} target cells, {int(result.label.sum())} predicted sensitive "
               f"(epoch {result.selected_epoch} chosen on {result.selection}; alpha={result.alpha}, beta={result.beta})")
    click.echo("  " + _transfer_labels(result))
    if result.metrics:
        click.echo("  " + "  ".join(f"{k}={v:.3f}" for k, v in result.metrics.items() if v is not None))
        click.echo("  note: " + _TRANSDUCTIVE_TARGET[bool(result.adapt)], err=True)


_TRANSDUCTIVE_TARGET = {
    True: ("transductive metrics: the scored target cells were training's unlabelled target domain (as in scDEAL); "
           "their labels were read only for these metrics."),
    False: ("transductive metrics: the scored target cells set the target's feature scaling (their labels were read "
            "only for these metrics)."),
}
"""Why a transfer run's target metrics are not those of unseen cells: printed under them."""


def _transfer_labels(result: Any) -> str:
    """The drug and label sets a transfer run read, for its summary line."""
    parts = [f"drug {result.drug}" if result.drug else "drug: not recorded",
             f"source labels: {result.source_label_set or 'bulk response column'}",
             f"target labels: {result.target_label_set or 'none (unlabelled)'}"]
    if result.validation_label_set:
        parts.append(f"validation labels: {result.validation_label_set}")
    return "; ".join(parts)


@main.command()
@click.option("--run", "run_id", required=True, help="Transfer run id (printed by scdm transfer; see the transfer_runs table).")
@click.option("--max-cells", type=click.IntRange(min=0), default=5000, show_default=True, help="Target cells attributed (0 = all).")
@click.option("--n-steps", type=click.IntRange(min=1), default=64, show_default=True, help="Integrated-gradient steps.")
@click.option("--profile", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="default: signed attributions, Benjamini-Hochberg; paper: scDEAL's absolute attributions, Bonferroni.")
@click.option("--values", type=click.Choice(["signed", "abs"]), default=None,
              help="Test signed or absolute attributions  [default: the profile's]")
@click.option("--correction", type=click.Choice(["bh", "bonferroni"]), default=None,
              help="Multiple-testing correction  [default: the profile's]")
@click.option("--fdr", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Corrected p-value threshold of a critical gene (a fraction: 0.05, not 5).")
@click.option("--pseudocount", type=float, default=0.1, show_default=True,
              help="Of the log2 fold change, in units of the mean absolute attribution.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, help="Genes to print and plot per direction.")
@click.option("--no-plot", is_flag=True, help="Do not draw critical_genes.png (in the run's artifacts folder).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the --max-cells subsample.")
@output_options
@pass_ctx
@user_errors
def genes(obj: Ctx, run_id: str, max_cells: int, n_steps: int, profile: GeneProfile, values: str | None,
          correction: Correction | None, fdr: float, pseudocount: float, top: int, no_plot: bool, seed: int,
          fmt: str) -> None:
    """Critical genes of a transfer run: integrated gradients, then Wilcoxon between predicted groups.

    Per gene: the signed and absolute mean attribution of cells predicted sensitive and resistant,
    the log2 fold change of absolute attributions (with a pseudocount), the rank-biserial effect
    size and Cohen's d, the shares of cells with an attribution and expressing the gene, and the
    Wilcoxon p-value with a multiple-testing correction. Stored in the critical_genes table and
    plotted. --profile paper reproduces scDEAL's analysis (absolute attributions, Bonferroni).
    """
    from scdm.classify.transfer import critical_genes

    frame = critical_genes(obj.store, run_id, profile=profile, max_cells=max_cells or None, n_steps=n_steps,
                           use_abs=None if values is None else values == "abs", correction=correction, fdr=fdr,
                           pseudocount=pseudocount, top=top, plot=not no_plot, seed=seed)
    echo_frame(frame.head(2 * top) if fmt == "table" else frame, fmt)
    if frame.attrs.get("plot"):
        click.echo(f"plot: {frame.attrs['plot']}", err=True)


# ---- trained heads, predictions and the server ----------------------------------------------
@main.command("train-head")
@list_option("--embedding", "embedding_ids", help="Training embedding ids (repeatable or comma-separated; all in one space). Or use --dataset and --model.")
@click.option("--dataset", "datasets", multiple=True, help="Train on this dataset's --model embedding (repeatable).")
@click.option("--model", help="Embedding model (with --dataset): pca, hvg, geneformer, ...")
@click.option("--variant", default="frozen", show_default=True, help="frozen, or lora:<adapter id>.")
@renamed_option("--by", "category_type", aliases=("--category-type",), type=click.Choice(["all", "tissue", "cancer_type", "drug_type", "regimen"]),
                default="all", show_default=True, help="Category type of the cells to train on.")
@click.option("--category", default="all", show_default=True, help="Category value, e.g. --by tissue --category skin.")
@click.option("--head", type=click.Choice(["logreg", "ridge", "lightgbm", "mlp", "majority"]), default="logreg", show_default=True)
@click.option("--param", "params", multiple=True, help="Head parameter KEY=VALUE (repeatable), e.g. --param C=0.5 or --param profile=fast.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Label sensitive where the probability is at least this.")
@click.option("--label-set", help="Train on this label set of every training dataset (default: each dataset's default; see `scdm ls --what labels`).")
@pass_ctx
@user_errors
def train_head_command(obj: Ctx, embedding_ids: tuple[str, ...], datasets: tuple[str, ...], model: str | None, variant: str,
                       category_type: str, category: str, head: str, params: tuple[str, ...], threshold: float,
                       label_set: str | None) -> None:
    """Fit a head on every labelled cell of a category and save it in the store for `scdm predict`.

    The head reads embeddings of one space (model, checkpoint, variant and params); the catalog row
    (SELECT * FROM trained_heads) records it, the category, the file hash and the evaluation
    metrics of the same configuration, if `scdm evaluate` ran it. The head is saved in a format that
    cannot run code (NPZ/JSON, safetensors, LightGBM text). Training a configuration again reuses
    the stored head, or replaces it when its file is missing, damaged or an old pickle.

    \b
    Examples:
      scdm train-head --dataset a375 --model pca --head logreg
      scdm train-head --embedding 3f2a9c0d1e7b --by tissue --category "Cell line" --head mlp --param profile=fast
      scdm train-head --dataset jhu006 --model pca --label-set Vorinostat
    """
    from scdm.classify.trained_heads import train_head

    if not embedding_ids and not (datasets and model):
        raise click.UsageError("Name the training embeddings: --embedding ID, or --dataset NAME with --model MODEL.")
    head_id = train_head(obj.store, list(embedding_ids) or None, category_type, category, head, dataset=list(datasets) or None,
                         model=model, variant=variant, threshold=threshold, label_set=label_set, **_parse_params(params))
    click.echo(head_id)


@main.command()
@click.option("--head", "head_id", required=True, help="Trained head id (see SELECT * FROM trained_heads).")
@click.option("--dataset", required=True, help="Dataset embedded with the head's model/variant/space.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the predictions to a .csv, or an .h5ad copy with obs scdm_proba/scdm_label/scdm_trained_on.")
@click.option("--trust-pickle", is_flag=True,
              help="Convert a head that an older scdm saved as a pickle (head.joblib / head.pt) to the safe format, "
                   "then predict. This UNPICKLES the file, which runs any code stored in it: use it only for a store "
                   "nobody else can write to. Without it such heads are refused with the command that retrains them.")
@output_options
@pass_ctx
@user_errors
def predict(obj: Ctx, head_id: str, dataset: str, out: str | None, trust_pickle: bool, fmt: str) -> None:
    """Predict the drug response of every cell of a dataset with a trained head.

    Probabilities, labels and trained_on (the cell trained the head: a fitted value, not a held-out
    prediction) go to the catalog (SELECT * FROM predictions). A dataset embedded with
    another model, variant or space is refused with the command that embeds it correctly. Heads are
    read from files that cannot run code (NPZ/JSON, safetensors, LightGBM text).

    \b
    Examples:
      scdm predict --head <head id> --dataset new_cells --out predictions.csv   # head ids: scdm train-head prints one
      scdm sql "SELECT head_id, model, head, category_type, category FROM trained_heads"
    """
    from scdm.classify.trained_heads import predict as run_predict

    frame = run_predict(obj.store, head_id, dataset, out=out, trust_pickle=trust_pickle)
    if fmt == "table":
        click.echo(f"{len(frame)} cells, {int(frame['label'].sum())} predicted sensitive" + (f"; wrote {out}" if out else ""))
    else:
        echo_frame(frame, fmt)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; any other than loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one, with one worker).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="uvicorn worker processes.")
@click.option("--root-path", default="", help="Path prefix when a reverse proxy serves this under a sub-path, e.g. /scdm.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="Host name to answer to besides loopback and --host (repeatable; *.example.org for subdomains). "
                   "Requests naming any other Host are refused (DNS rebinding).")
@click.option("--token", envvar="SCDM_TOKEN",
              help="Require 'Authorization: Bearer TOKEN' (or the login cookie) on every route; at least 16 characters "
                   "(also $SCDM_TOKEN).")
@click.option("--max-jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prediction, upload and report jobs running at once; the others queue.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=512, show_default=True, help="Largest .h5ad upload accepted.")
@click.option("--sql-max-rows", type=click.IntRange(min=1), default=1000, show_default=True, help="Rows one SQL query returns at most.")
@click.option("--sql-timeout", envvar="SCDM_SQL_TIMEOUT", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds before a SQL query (POST /api/sql, the SQL tab) is stopped (also $SCDM_SQL_TIMEOUT).")
@click.option("--access-log", is_flag=True, help="Log every request (to stderr).")
@pass_ctx
@user_errors
def serve(obj: Ctx, host: str, port: int, workers: int, root_path: str, allowed_hosts: tuple[str, ...], token: str | None,
          max_jobs: int, max_upload_mb: float, sql_max_rows: int, sql_timeout: float, access_log: bool) -> None:
    """Serve the results explorer and prediction API over the store (FastAPI on uvicorn).

    The JSON API is described at /openapi.json and /docs; the web page is at /. It answers only
    to loopback host names, --host and --allowed-host; state-changing requests must be JSON from
    the page's own origin.

    \b
    Examples:
      scdm serve                                  # http://127.0.0.1:8000/, API at /docs
      scdm serve --host 0.0.0.0 --allowed-host scdm.lab.example.org --workers 2 \\
                 --token "$(python -c 'import secrets; print(secrets.token_urlsafe())')"
    """
    from scdm.server import serve as run_server

    run_server(obj.store, host=host, port=port, workers=workers, root_path=root_path, allowed_hosts=allowed_hosts,
               token=token, max_jobs=max_jobs, max_upload_bytes=round(max_upload_mb * 1024 * 1024),
               sql_max_rows=sql_max_rows, sql_timeout_s=sql_timeout, access_log=access_log,
               ready=lambda url: click.echo(f"scdm serve: listening on {url} (Ctrl-C stops)", err=True))


# ---- options every command takes after its name too -----------------------------------------
def _set_store(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Ctx).store_path = value  # type: ignore[union-attr]


def _set_read_only(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Ctx).read_only = True  # type: ignore[union-attr]


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        from scdm.store.progress import no_progress

        ctx.with_resource(no_progress())


def _add_common_options(group: click.Group) -> None:
    """``scdm ls --store X`` works like ``scdm --store X ls`` (and so do --read-only and -q)."""
    for command in group.commands.values():
        taken = {o for p in command.params for o in getattr(p, "opts", [])}
        if "--store" not in taken:
            command.params.append(click.Option(["--store"], type=click.Path(file_okay=False), expose_value=False,
                                               callback=_set_store, help="Store directory (as `scdm --store`)."))
        if "--read-only" not in taken:
            command.params.append(click.Option(["--read-only"], is_flag=True, expose_value=False, callback=_set_read_only,
                                               help="Open the store read-only (as `scdm --read-only`)."))
        if "--quiet" not in taken:
            command.params.append(click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_set_quiet,
                                               help="No progress bars."))


_add_common_options(main)


if __name__ == "__main__":  # last: `python -m scdm.cli` must see the options added above
    main()
