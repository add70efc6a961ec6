"""Request and response models of the API: the OpenAPI document and ``/docs`` are generated from them.

Filters are enums built from the tuples that own their values (``store.splits.SCENARIOS``,
``store.metrics.METRICS``, ``scdm.classify.heads.HEADS``, ...), so a misspelled value is a 422
that names the allowed ones instead of an empty answer. List filters take comma-separated values
(``metric=auroc,f1``) or the parameter repeated (``metric=auroc&metric=f1``), except ``dataset`` and
``label_set``: a comma there joins the names of one pooled result, as the result rows spell them
(``dataset=a,b`` is the result pooled over a and b; ``dataset=a&dataset=b`` the results on a and on b).

Row models declare the catalog columns the page and scripts rely on and allow the others
(``extra="allow"``): a column added to a catalog table by a later migration is passed through,
not dropped.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from scdm.classify.heads import HEADS
from scdm.store.metrics import METRICS
from scdm.store.splits import CATEGORY_TYPES, SCENARIOS

SPLIT_SCHEMES: tuple[str, ...] = ("cell", "sample", "study", "custom")
"""Split schemes a result can have: pooled ``cell``/``sample`` folds, leave-one-``study``-out, ``custom`` folds."""
EMBEDDING_STATUSES: tuple[str, ...] = ("pending", "complete")
"""``embeddings.status``: chunks still missing, or every chunk written and verified."""
MAX_OFFSET = 2**63 - 1
"""Largest ``offset`` a paged route takes: DuckDB's ``OFFSET`` is a signed 64-bit integer (a larger one is a 422, not a 500)."""


PROMPT_HEAD = re.compile(r"prompt-(zero|[1-9][0-9]*)-shot")
"""Heads of prompting results (``scdm.prompt.evaluate``): ``prompt-zero-shot`` and ``prompt-<k>-shot``."""


class _HeadChoices(str, Enum):
    """The heads of :data:`HEADS` as members; a prompting head (any k shots) is accepted as well."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        # prompt results are filtered like the others (`scdm results --head prompt-zero-shot`)
        if isinstance(value, str) and PROMPT_HEAD.fullmatch(value):
            member = str.__new__(cls, value)
            member._name_ = member._value_ = value
            return member
        return None


def _choices(name: str, values: tuple[str, ...] | list[str], doc: str) -> Any:
    """A string enum whose members are ``values`` (names as the values: ``shuffled-label`` stays as it is)."""
    enum = Enum(name, {v: v for v in values}, type=str)  # type: ignore[misc]
    enum.__doc__ = doc
    return enum


if TYPE_CHECKING:  # built at run time from the tuples that own the values; to a type checker they are strings
    Scenario = str
    CategoryType = str
    Metric = str
    HeadName = str
    SplitScheme = str
    EmbeddingStatus = str
else:
    Scenario = _choices("Scenario", SCENARIOS, "Evaluation scenario: pooled k-fold, cross-data (leave one study out), custom folds.")
    CategoryType = _choices("CategoryType", CATEGORY_TYPES, "Kind of category a result is computed within.")
    Metric = _choices("Metric", METRICS, "Metric name (see store.metrics).")
    HeadName = _HeadChoices("HeadName", {v: v for v in HEADS})  # type: ignore[call-overload]
    HeadName.__doc__ = "Classification head, or a prompting head: prompt-zero-shot, prompt-<k>-shot."
    SplitScheme = _choices("SplitScheme", SPLIT_SCHEMES, "How the folds were drawn.")
    EmbeddingStatus = _choices("EmbeddingStatus", EMBEDDING_STATUSES, "Whether every chunk of an embedding is written.")


def _comma_separated(value: Any) -> Any:
    """``["auroc,f1", "ap"]`` -> ``["auroc", "f1", "ap"]``; empty values are dropped (an empty field means 'any')."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return out or None


_CommaSeparated = BeforeValidator(_comma_separated)
Names = Annotated[list[str] | None, _CommaSeparated, Field(description="Comma-separated values (or the parameter repeated); any of them matches.")]
Heads = Annotated[list[HeadName] | None, _CommaSeparated, Field(description="Heads, comma-separated.")]
Scenarios = Annotated[list[Scenario] | None, _CommaSeparated, Field(description="Scenarios, comma-separated.")]
CategoryTypes = Annotated[list[CategoryType] | None, _CommaSeparated, Field(description="Category types, comma-separated.")]
Metrics = Annotated[list[Metric] | None, _CommaSeparated, Field(description="Metrics, comma-separated.")]
SplitSchemes = Annotated[list[SplitScheme] | None, _CommaSeparated, Field(description="Split schemes, comma-separated.")]


def _whole_values(value: Any) -> Any:
    """``["a,b", "c"]`` as given: a comma here joins the names of one pooled result; empty values are dropped."""
    if value is None:
        return None
    out = [str(item) for item in (value if isinstance(value, list) else [value]) if str(item).strip()]
    return out or None


Datasets = Annotated[list[str] | None, BeforeValidator(_whole_values), Field(
    description="Results on exactly these datasets: 'a' is a result on a alone, 'a,b' (any order) the result pooled "
                "over a and b, as the datasets column spells it; 'a' never matches a pooled result. Repeat the "
                "parameter for several (dataset=a&dataset=a,b).")]
LabelSets = Annotated[list[str] | None, BeforeValidator(_whole_values), Field(
    description="Results of exactly these label sets: a pooled result's label sets as 'x,y' (any order), as the "
                "label_set column spells them. Repeat the parameter for several.")]


# --------------------------------------------------------------------------------------------
# query parameters
# --------------------------------------------------------------------------------------------
class _Query(BaseModel):
    """Unknown parameters are refused (a misspelled name must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class ResultFilters(_Query):
    """Filters of the leaderboard and the per-fold results."""

    model: Names = None
    head: Heads = None
    scenario: Scenarios = None
    category_type: CategoryTypes = None
    category: Names = None
    metric: Metrics = None
    scheme: SplitSchemes = None
    dataset: Datasets = None
    label_set: LabelSets = None


class PagedResultFilters(ResultFilters):
    limit: int | None = Field(default=None, ge=1, description="Rows at most (the server caps it at its page size).")
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET, description="Rows to skip (the next page: offset + limit).")


class EmbeddingFilters(_Query):
    status: EmbeddingStatus | None = None
    model: str | None = None
    dataset: str | None = Field(default=None, description="Dataset name or id.")


class Limit(_Query):
    limit: int | None = Field(default=None, ge=1, description="Rows at most (the server caps it at its page size).")


class PredictionFilters(_Query):
    head_id: str | None = None
    dataset: str | None = Field(default=None, description="Dataset name or id.")
    limit: int | None = Field(default=None, ge=1, description="Rows at most (the server caps it at its page size).")
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET, description="Rows to skip (the next page: offset + limit).")


class PredictionCsvQuery(_Query):
    head_id: str
    dataset: str = Field(description="Dataset name or id.")


class UploadQuery(_Query):
    """Where an uploaded ``.h5ad`` goes and how it is ingested (the body is the file itself).

    The fields are the options of ``scdm ingest`` (:data:`UPLOAD_FIELDS` maps each to the store's
    option), except ``--update``: an upload never rewrites a stored dataset or replaces its labels.
    """

    filename: str = Field(description="Plain file name ending in .h5ad (letters, digits, '.', '_', '-').")
    name: str | None = Field(default=None, description="Dataset name (default: the file name without .h5ad).")
    label_key: str | None = Field(default=None, description="obs column of the response labels.")
    positive: str | None = Field(default=None, description="The label value meaning sensitive (others become resistant), "
                                 "for labels that are not sensitive/resistant, responder/non-responder, 0/1, true/false.")
    unknown_value: Annotated[list[str] | None, BeforeValidator(_whole_values)] = Field(
        default=None, description="A label value to store as unknown; repeat the parameter for several.")
    drug: str | None = Field(default=None, description="The drug the labels are the response to.")
    label_set: str | None = Field(default=None, description="Name of the label set (default: drug, else label_key).")
    study_key: str | None = Field(default=None, description="obs column of the study (or one study for all: study).")
    study: str | None = None
    sample_key: str | None = Field(default=None, description="obs column of the sample or patient (or sample).")
    sample: str | None = None
    tissue_key: str | None = None
    tissue: str | None = None
    cancer_type_key: str | None = None
    cancer_type: str | None = None
    drug_type_key: str | None = None
    drug_type: str | None = None
    regimen_key: str | None = None
    regimen: str | None = None
    gene_key: str | None = Field(default=None, description="var column of the gene ids (default: var_names).")
    gene_id_kind: Literal["symbol", "ensembl", "entrez"] | None = Field(default=None, description="Default: detected.")
    x_kind: Literal["counts", "normalized", "scaled"] | None = Field(default=None, description="Default: detected.")
    head_id: str | None = Field(default=None, description="Predict the upload with this trained head (pca/hvg heads: here; "
                                                   "other models: the job says which `scdm embed` to run).")


UPLOAD_FIELDS: dict[str, str] = {
    "name": "name", "unknown_values": "unknown_value", "cancer_key": "cancer_type_key",
    **{f: f for f in ("label_key", "positive", "drug", "label_set", "study_key", "study", "sample_key", "sample",
                      "tissue_key", "tissue", "cancer_type", "drug_type_key", "drug_type", "regimen_key", "regimen",
                      "gene_key", "gene_id_kind", "x_kind")},
}
"""Ingest option (``Store.ingest`` keyword) -> the upload's query parameter that sets it; messages of
an upload name the parameter (``positive=VALUE``), never a command-line flag."""


# --------------------------------------------------------------------------------------------
# request bodies
# --------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SqlRequest(_Body):
    query: str = Field(min_length=1, description="One read-only statement (SELECT, WITH, ...).",
                       examples=["SELECT name, n_cells FROM datasets"])
    max_rows: int | None = Field(default=None, ge=1, description="Rows returned at most (capped by the server).")


class PredictRequest(_Body):
    head_id: str = Field(min_length=1, description="A trained head (GET /api/heads).")
    dataset: str = Field(min_length=1, description="A stored dataset embedded in the head's space.")


class ReportRequest(_Body):
    projection: Literal["auto", "umap", "pca", "none"] = Field(
        default="auto", description="2-D projection of each embedding space (auto: UMAP if installed, else PCA).")


class LoginForm(_Body):
    token: str = ""


# --------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error: a message that says what is wrong and what to do, and the HTTP status."""

    error: str
    status: int
    detail: list[dict[str, Any]] | None = Field(default=None, description="Validation errors one by one (422).")


class Health(BaseModel):
    status: Literal["ok"]
    store: str
    auth: bool = Field(description="Whether a bearer token is required.")
    read_only: bool
    version: str
    max_jobs: int


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow")


JsonText = dict[str, Any] | list[Any] | str | None
"""A JSON column of the catalog, parsed (its text when it does not parse)."""


class LabelSetCounts(BaseModel):
    name: str
    drug: str | None = None
    is_default: bool
    n_labelled: int
    n_sensitive: int


class DatasetRow(_Row):
    dataset_id: str
    name: str
    n_cells: int
    n_genes: int | None = None
    n_labelled: int | None = Field(default=None, description="Labelled cells of the label set named in label_set.")
    n_sensitive: int | None = Field(default=None, description="Sensitive cells of the label set named in label_set.")
    label_set: str | None = Field(default=None, description="The dataset's default label set, which n_labelled and "
                                  "n_sensitive count (null: unlabelled).")
    label_sets: list[LabelSetCounts] = Field(default_factory=list, description="Every label set of the dataset with "
                                             "its counts, the default first.")
    source_path: str | None = None
    created_at: str | None = None


class EmbeddingRow(_Row):
    embedding_id: str
    dataset_id: str
    dataset_name: str | None = None
    space_id: str | None = None
    model: str
    variant: str
    dim: int | None = None
    n_cells: int | None = None
    status: str
    chunks_done: int | None = None
    n_chunks: int | None = None
    params: JsonText = None
    checkpoint_source: str | None = Field(default=None, description="Where the checkpoint of the run that completed it "
                                          "came from (org/name@commit or the local folder, as `scdm ls` prints it); null "
                                          "for baselines and embeddings made before scdm recorded it.")
    telemetry: JsonText = None
    note: str = Field(default="", description="'older gene table (<its>; this scdm: <current>)' where it was made with "
                      "another gene table than this scdm's (as `scdm ls` marks it), else empty.")


class LeaderboardRow(_Row):
    """One result (mean over its folds) of one metric."""

    model: str
    variant: str
    space_id: str
    datasets: str | None = Field(default=None, description="Comma-separated dataset names the result was fitted on.")
    label_set: str | None = None
    split_id: str | None = None
    folds_from: str | None = Field(default=None, description="The label set whose pooled folds this split reuses "
                                   "(evaluate --pair-folds-with; `scdm results` prints '(folds of <it>)'); null otherwise.")
    scenario: str
    scheme: str | None = None
    k: int | None = None
    seed: int | None = None
    category_type: str
    category: str
    head: str
    head_params: JsonText = None
    metric: str
    mean: float | None = None
    sd: float | None = None
    n_folds: int = Field(description="Folds where the metric has a value: the n of the mean.")
    n_null: int | None = None
    folds_done: int | None = None
    folds_expected: int | None = None
    complete: bool | None = None
    note: str = Field(default="", description="'older gene table (<its>; this scdm: <current>)' where the space's "
                      "embeddings were made with another gene table than this scdm's (as `scdm ls` marks them), else "
                      "empty: such a result stays valid, but embedding again makes a new space beside it; "
                      "'N of M test cells unanswered' where a prompting model gave no readable answer for N test cells, "
                      "which its metrics leave out (joined by '; ').")


class ResultRow(_Row):
    """One metric of one fitted task (fold)."""

    task_id: str
    run_id: str | None = None
    model: str
    variant: str
    datasets: str | None = None
    label_set: str | None = None
    scenario: str
    scheme: str | None = None
    category_type: str
    category: str
    fold: int | None = None
    head: str
    head_params: JsonText = None
    metric: str
    value: float | None = None
    n_train: int | None = None
    n_test: int | None = None
    note: str = Field(default="", description="As the leaderboard's note: 'older gene table (...)', 'N of M test cells "
                      "unanswered' (this task), or empty.")


class RunRow(_Row):
    """One run: an evaluation run (``scdm evaluate``, ``scdm prompt``, a LoRA tuning) as the report's runs
    table lists it, or a transfer run (``scdm transfer``)."""

    run_id: str
    kind: Literal["evaluate", "prompt", "finetune", "transfer"] = Field(
        description="What recorded it: scdm evaluate, scdm prompt, scdm finetune (a LoRA tuning) or scdm transfer.")
    created_at: str | None = Field(default=None, description="When it started.")
    finished_at: str | None = Field(default=None, description="When it ended (null while running or when stopped).")
    status: str = Field(description="As the report shows it: 'stopped (...)' for a run whose process is gone (killed: "
                        "it could not record failing), 'partial (...)' for a prompting run cut short by its request "
                        "budget; run the same command again to finish either.")
    state: Literal["running", "stopped", "partial", "complete", "failed"] = Field(description="The status's first word.")
    split_scheme: str | None = Field(default=None, description="The pooled scheme as used ('auto → sample').")
    folds: str | None = None
    seed: str | None = None
    label_set: str | None = None
    heads: JsonText = None
    scenarios: JsonText = None
    n_tasks: int | None = None
    n_done: int | None = None
    n_reused: int | None = None
    n_skipped: int | None = None
    seconds: float | None = None
    drug: str | None = Field(default=None, description="Transfer runs: the drug.")
    target: str | None = Field(default=None, description="Transfer runs: the target dataset's name.")
    source_label_set: str | None = Field(default=None, description="Transfer runs: the source datasets' label set(s); "
                                         "null for a bulk source. A transfer run's label_set is its target's (null: unscored).")
    n_source: int | None = Field(default=None, description="Transfer runs: labelled source samples or cells used.")
    n_target: int | None = Field(default=None, description="Transfer runs: target cells predicted.")


class SkippedRow(_Row):
    scenario: str | None = None
    category_type: str | None = None
    category: str | None = None
    fold: int | None = None
    head: str | None = None
    reason: str


class TrainedHeadRow(_Row):
    head_id: str
    head: str
    model: str
    variant: str
    category_type: str
    category: str
    datasets: JsonText = None
    label_set: str | None = None
    n_train: int | None = None
    threshold: float | None = None
    train_metrics: JsonText = Field(default=None, description=(
        "Cross-validated scores of this head's configuration: one entry per split of exactly its training cells "
        "and labels and per metric (split_id, scenario, scheme, k folds, seed, metric, mean, sd, n_folds = folds "
        "with a value); different splits are never averaged together. For a head whose threshold is not the "
        "evaluation's 0.5, the threshold-dependent scores are recomputed at its threshold from the stored fold "
        "predictions and carry recomputed_at_threshold (absent where the evaluation kept no predictions). "
        "Null: no such evaluation in the store."))
    revision: int | None = Field(default=None, description="The revision of its head that fitted it (null: trained "
                                 "before scdm recorded it).")
    revision_note: str = Field(default="", description="Empty for a head fitted by this scdm's revision of it; else "
                               "why a head trained now may differ (an older revision fitted it, or its revision "
                               "was not recorded and the head has been revised since).")
    note: str = Field(default="", description="'older gene table (<its>; this scdm: <current>)' where the head was "
                      "trained on embeddings made with another gene table than this scdm's: it predicts only on "
                      "embeddings of that table, and no dataset this scdm embeds is one; train it again. Else empty.")
    created_at: str | None = None


class PredictionRow(_Row):
    head_id: str
    dataset: str
    cell_id: str
    row: int
    proba: float
    label: int
    response: int | None = Field(default=None, description="The stored label (1 sensitive, 0 resistant), if any, of "
                                 "label_set.")
    label_set: str | None = Field(default=None, description="The dataset's label set of the drug the head was trained "
                                  "on (else its default label set); None for an unlabelled dataset.")
    trained_on: bool | None = Field(default=None, description="True for a cell that trained the head (it was fitted "
                                    "on it, its label tuned the LoRA adapter of the embedding, or it is such a cell "
                                    "under another dataset name): its prediction is a fitted value, not a held-out "
                                    "one, and a score on it is a training score (as `scdm predict` marks it). Null: "
                                    "predicted by an scdm that did not record it; predict again.")


class ModelSummary(BaseModel):
    model: str
    n_embeddings: int = Field(description="Complete embeddings (as `scdm ls` lists them).")
    n_unfinished: int = Field(description="Embeddings still being written, stopped or failed (their status: `scdm ls --what embeddings`).")
    n_datasets: int = Field(description="Datasets with a complete embedding.")
    variants: list[str]
    evaluated: bool = Field(description="Whether the model has results a leaderboard shows (results an older scdm "
                            "fitted are left out: see GET /api/leaderboard/notes).")


class LeaderboardNotes(BaseModel):
    """What `scdm results` prints on stderr under the same leaderboard, in its words."""

    notes: list[str] = Field(description="The caveats that apply to these rows (each printed 'note: ...' by scdm results).")
    left_out: list[str] = Field(description="Results known to be wrong now and left out of every leaderboard (printed "
                                "'results: ...' by scdm results).")


class ModelDetail(BaseModel):
    model: str
    embeddings: list[EmbeddingRow]
    leaderboard: list[LeaderboardRow] = Field(description="Results on category type all.")
    notes: list[str] = Field(default_factory=list, description="The caveats `scdm results --model MODEL --by all` "
                             "prints under these rows (every metric shown), in its words.")
    left_out: list[str] = Field(default_factory=list, description="Results known to be wrong now and left out of "
                                "these rows, as in GET /api/leaderboard/notes.")
    trained_heads: list[TrainedHeadRow]


class SqlAnswer(BaseModel):
    columns: list[str]
    rows: list[dict[str, Any]]
    n_rows: int
    truncated: bool = Field(description="More rows matched than max_rows.")
    max_rows: int
    seconds: float


class JobStatus(BaseModel):
    job_id: str
    kind: Literal["predict", "upload", "report"]
    state: Literal["queued", "running", "done", "failed", "needs_embedding"]
    stage: str
    progress: float = Field(ge=0.0, le=1.0)
    position: int | None = Field(default=None, description="Place in the queue while queued (1: next to start).")
    message: str
    result: dict[str, Any] = Field(description="What the job made. A prediction (or an upload with head_id) adds "
                                   "n_cells, n_sensitive, mean_proba, n_trained_on (cells that trained the head: "
                                   "their predictions are fitted values, not held-out ones), notes (the warnings "
                                   "`scdm predict` prints about these predictions, in its words) and csv_url.")
    warnings: list[str] = Field(default_factory=list, description=(
        "What the job warned of so far, each line as the `scdm` command doing the same work prints it on stderr "
        "(`warning: ...` lines and logged warnings: an upload's ingest, embedding and training warnings, a "
        "prediction's notes). Only this job's: jobs running beside it keep their own."))
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    status_url: str


class ReportFigures(BaseModel):
    generated: bool = Field(description="Whether the report (index.html) exists in the store's report folder.")
    index: str | None = Field(default=None, description="URL of the report page when it exists.")
    folder: str = Field(description="Where the server looks for the report.")
    figures: list[str] = Field(description="URLs of its figure files (PNG, SVG, PDF).")
    current: bool | None = Field(default=None, description=(
        "Whether the report shows the store's results as they are now: false once a result it reads was added, "
        "fitted again or removed (a re-ingest with other labels removes results) or an embedding it reads completed "
        "after it was written (POST /api/report writes it again). A report written for some models, heads or one run "
        "(write_report(models=..., heads=..., run_id=...)) reads only theirs: other models' results leave it current. "
        "Null where it cannot be told (no report, or one written by an older scdm)."))
