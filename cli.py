"""The ``scdm`` command line: a thin click layer over store, scdm_embed and scdm_classify.

Each command parses its options, makes one library call and renders the result. Results go to
stdout, logs and progress bars to stderr. Heavy imports (torch, transformers) happen inside the
commands that need them, so ``scdm --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

logger = logging.getLogger("scdm")

FORMATS = ("table", "csv", "json")


# ---- shared plumbing -----------------------------------------------------------------------
class Ctx:
    """What the group options put on ``ctx.obj``."""

    def __init__(self, store_path: str | None) -> None:
        self.store_path = store_path
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from store import Store

            self._store = Store(self.store_path)
        return self._store


pass_ctx = click.make_pass_decorator(Ctx)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn scdm's own errors into one clean message (no traceback) and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from store.errors import ScdmError

        try:
            return fn(*args, **kwargs)
        except ScdmError as err:
            raise click.ClickException(str(err)) from err
        except (KeyError, FileNotFoundError, ValueError, PermissionError) as err:
            if logger.isEnabledFor(logging.DEBUG):
                raise
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(f"{type(err).__name__}: {text}") from err

    return wrapper


def output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--format table|csv|json`` for commands that print a table."""
    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="How to print the result: aligned table, CSV or JSON records.",
    )(fn)


def echo_frame(frame: Any, fmt: str = "table", *, max_width: int = 60) -> None:
    """Print a DataFrame to stdout as a table, CSV or JSON records."""
    if fmt == "csv":
        click.echo(frame.to_csv(index=False), nl=False)
    elif fmt == "json":
        click.echo(frame.to_json(orient="records", date_format="iso", default_handler=str))
    elif frame.empty:
        click.echo("(no rows)")
    else:
        shown = frame.copy()
        for col in shown.columns:
            if shown[col].dtype == object:
                shown[col] = shown[col].map(lambda v: v if not isinstance(v, str) or len(v) <= max_width else v[: max_width - 3] + "...")
        click.echo(shown.to_string(index=False))


def dataset_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options mapping AnnData columns to the catalog (shared by ingest and embed)."""
    options = [
        click.option("--name", help="Dataset name in the store (default: the file name without .h5ad)."),
        click.option("--label-key", help="obs column with the drug response (sensitive/resistant, responder/non-responder, 0/1, booleans)."),
        click.option("--positive", help="Label value that means sensitive when labels are not sensitive/resistant-like; other values become resistant."),
        click.option("--unknown-value", "unknown_values", multiple=True, help="Label value to store as unknown (repeatable), e.g. --unknown-value not_in_set."),
        click.option("--study-key", help="obs column naming the study of each cell."),
        click.option("--study", help="One study id for every cell (default: the dataset name), e.g. --study GSE108383."),
        click.option("--sample-key", help="obs column naming the sample/patient (used by grouped folds)."),
        click.option("--sample", help="One sample id for every cell."),
        click.option("--tissue-key", help="obs column with the tissue."),
        click.option("--tissue", help="One tissue for every cell."),
        click.option("--cancer-key", help="obs column with the cancer type."),
        click.option("--cancer-type", help="One cancer type for every cell."),
        click.option("--drug-type-key", help="obs column with the drug type."),
        click.option("--drug-type", help="One drug type for every cell, e.g. targeted, chemotherapy, immunotherapy."),
        click.option("--regimen-key", help="obs column with the regimen."),
        click.option("--regimen", help="One regimen for every cell, e.g. mono or combination."),
        click.option("--gene-key", help="var column holding gene ids (default: var_names)."),
        click.option("--gene-id-kind", type=click.Choice(["symbol", "ensembl", "entrez"]), help="Override the detected gene id kind."),
        click.option("--x-kind", type=click.Choice(["counts", "normalized", "scaled"]), help="Override the detected value kind of X."),
        click.option("--no-copy", is_flag=True, help="Refer to the file in place instead of keeping a copy in the store (the file must then stay put)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _ingest_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ["label_key", "positive", "unknown_values", "study_key", "study", "sample_key", "sample", "tissue_key",
            "tissue", "cancer_key", "cancer_type", "drug_type_key", "drug_type", "regimen_key", "regimen",
            "gene_key", "gene_id_kind", "x_kind"]
    out = {k: kw.pop(k) for k in keys if k in kw}
    out["unknown_values"] = tuple(out.get("unknown_values") or ())
    return out


# ---- the group -----------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "store_path", envvar="SCDM_STORE", type=click.Path(file_okay=False),
              help="Store directory (default: $SCDM_STORE, else ./scdm-store). Created if missing.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug with tracebacks).")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Also write the log to this file.")
@click.version_option(package_name="scdm", message="scdm %(version)s")
@click.pass_context
def main(ctx: click.Context, store_path: str | None, verbose: int, log_file: str | None) -> None:
    """scdm: embed single cells once with foundation models, evaluate drug-response heads many times.

    \b
    Typical session:
      scdm ingest a375.h5ad --label-key response_PLX4720 --study GSE108383
      scdm embed a375 --model pca
      scdm evaluate --scenario pooled,cross --heads logreg,mlp
      scdm results
      scdm sql "SELECT model, avg(value) FROM results GROUP BY ALL"

    Everything lives in one store directory (--store / $SCDM_STORE): a DuckDB catalog you can query
    with any DuckDB client, and Zarr v3 arrays you can open with any Zarr client.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    if verbose == 0:
        logging.getLogger("store").setLevel(logging.INFO)
        logging.getLogger("scdm_embed").setLevel(logging.INFO)
        logging.getLogger("scdm_classify").setLevel(logging.INFO)
        for h in handlers:
            h.setFormatter(logging.Formatter("%(message)s"))
    ctx.obj = Ctx(store_path)


# ---- store commands --------------------------------------------------------------------------
@main.command()
@click.argument("h5ad", type=click.Path(dir_okay=False))
@dataset_options
@pass_ctx
@user_errors
def ingest(obj: Ctx, h5ad: str, name: str | None, no_copy: bool, **options: Any) -> None:
    """Add an .h5ad file to the store (a no-op if the same content is already there).

    The dataset's identity is a hash of its expression matrix, gene ids and cell ids. Cell
    metadata (study, sample, tissue, cancer type, drug type, regimen, response) is mapped from obs
    columns (--*-key) or given as constants. Responses become 1 = sensitive, 0 = resistant,
    NULL = unknown.

    \b
    Examples:
      scdm ingest a375.h5ad --label-key response_PLX4720 --study GSE108383 \\
           --tissue skin --cancer-type melanoma --drug-type targeted --regimen mono
      scdm ingest pc9.h5ad --label-key scDEAL_label --unknown-value not_in_scDEAL_set
    """
    info = obj.store.ingest(h5ad, name=name, copy=not no_copy, **_ingest_kwargs(options))
    verb = "ingested" if info.created else "already in the store:"
    click.echo(
        f"{verb} {info.name} ({info.dataset_id}): {info.n_cells} cells x {info.n_genes} genes, "
        f"{info.gene_id_kind} gene ids, values: {info.x_kind}"
    )


@main.command("ls")
@click.option("--what", type=click.Choice(["all", "datasets", "embeddings"]), default="all", show_default=True)
@output_options
@pass_ctx
@user_errors
def ls_command(obj: Ctx, what: str, fmt: str) -> None:
    """List datasets and embeddings (with status and chunk progress)."""
    st = obj.store
    if what in ("all", "datasets"):
        frame = st.datasets()[["name", "dataset_id", "n_cells", "n_genes", "gene_id_kind", "x_kind", "n_labelled", "n_sensitive"]]
        if fmt == "table":
            click.echo("Datasets")
        echo_frame(frame, fmt)
    if what in ("all", "embeddings"):
        emb = st.embeddings()
        if not emb.empty:
            emb["progress"] = emb["chunks_done"].astype(str) + "/" + emb["n_chunks"].astype(str)
            emb = emb[["embedding_id", "dataset_name", "model", "variant", "dim", "status", "progress", "space_id"]]
        if fmt == "table":
            click.echo("\nEmbeddings")
        echo_frame(emb, fmt)


@main.command()
@click.argument("query")
@output_options
@click.option("--max-rows", type=int, default=None, help="Print at most this many rows.")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Stop the query after this many seconds.")
@pass_ctx
@user_errors
def sql(obj: Ctx, query: str, fmt: str, max_rows: int | None, timeout_s: float | None) -> None:
    """Run a read-only SQL query on the catalog (DuckDB dialect).

    Writes, COPY, ATTACH and file access are refused. Tables: datasets, genes, cells,
    embeddings, embedding_chunks, and the evaluation tables (splits, runs, results, predictions).

    \b
    Examples:
      scdm sql "SELECT name, n_cells FROM datasets"
      scdm sql "SELECT model, status, dim FROM embeddings" --format csv
    """
    echo_frame(obj.store.sql(query, max_rows=max_rows, timeout_s=timeout_s), fmt, max_width=10_000)


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
    """Write an embedding out, rows in dataset order (.npy, or .h5ad with it in obsm)."""
    emb = _select_embedding(obj.store, embedding_id, dataset, model, variant)
    path = obj.store.export_embedding(emb.embedding_id, out)
    click.echo(f"wrote {emb.n_cells} x {emb.dim} {emb.model} embedding to {path}")


@main.command()
@click.option("--embedding", "embedding_id", help="Embedding id to delete.")
@click.option("--dataset", help="With --model: the embedding of this dataset; alone: delete the whole dataset and its embeddings.")
@click.option("--model", help="Model of the embedding to delete.")
@click.option("--variant", default="frozen", show_default=True)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@pass_ctx
@user_errors
def rm(obj: Ctx, embedding_id: str | None, dataset: str | None, model: str | None, variant: str, dry_run: bool) -> None:
    """Delete an embedding (catalog rows and array together), or a dataset with --dataset alone."""
    st = obj.store
    if dataset and not model and not embedding_id:
        ds = st.dataset(dataset)
        if dry_run:
            n = len(st.query("SELECT 1 FROM embeddings WHERE dataset_id = ?", [ds.dataset_id]))
            click.echo(f"would delete dataset {ds.name} ({ds.n_cells} cells) and its {n} embedding(s)")
            return
        removed = st.remove_dataset(ds.name)
        click.echo(f"deleted dataset {ds.name} and {len(removed)} embedding(s)")
        return
    emb = _select_embedding(st, embedding_id, dataset, model, variant, status=None)
    if dry_run:
        click.echo(f"would delete embedding {emb.embedding_id} ({emb.model}, {emb.variant}, {emb.n_cells} x {emb.dim})")
        return
    st.remove_embedding(emb.embedding_id)
    click.echo(f"deleted embedding {emb.embedding_id} ({emb.model}, {emb.variant})")


if __name__ == "__main__":
    main()
