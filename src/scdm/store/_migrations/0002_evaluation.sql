-- scdm catalog, evaluation tables (owned by scdm_classify): splits and their cell assignments,
-- evaluation runs, finished tasks, long-format results, per-cell test predictions, skipped tasks.

-- One partition of a set of cells into folds, reused by every model and head.
-- split_id = hash of the definition (scenario, category, scheme, folds, seed, ...) and of the
-- cells it covers (dataset_id, row, response), so identical cells give identical partitions.
CREATE TABLE splits (
    split_id       VARCHAR PRIMARY KEY,
    scenario       VARCHAR NOT NULL,     -- pooled | cross | custom
    category_type  VARCHAR NOT NULL,     -- all | tissue | cancer_type | drug_type | regimen
    category       VARCHAR NOT NULL,     -- the category value ('all' for category_type all)
    scheme         VARCHAR NOT NULL,     -- cell | sample (pooled), study (cross), custom
    n_folds        INTEGER NOT NULL,
    seed           INTEGER,
    n_cells        BIGINT NOT NULL,
    n_studies      INTEGER,
    cells_hash     VARCHAR NOT NULL,
    status         VARCHAR NOT NULL,     -- ok | skipped (reason says why: one study, one class, ...)
    reason         VARCHAR,
    definition     JSON NOT NULL,
    created_at     TIMESTAMP NOT NULL
);

-- Test fold of every cell of a split (NULL: a training cell in every fold, custom splits only).
CREATE TABLE split_assignments (
    split_id    VARCHAR NOT NULL,
    dataset_id  VARCHAR NOT NULL,
    "row"       INTEGER NOT NULL,
    fold        INTEGER,
    PRIMARY KEY (split_id, dataset_id, "row")
);

-- One row per fold: sizes, the held-out study (cross), and why a fold is skipped.
CREATE TABLE split_folds (
    split_id    VARCHAR NOT NULL,
    fold        INTEGER NOT NULL,
    label       VARCHAR,                 -- cross: the held-out study; custom: the user's value
    n_train     BIGINT NOT NULL,
    n_test      BIGINT NOT NULL,
    n_test_pos  BIGINT NOT NULL,
    status      VARCHAR NOT NULL,        -- ok | skipped
    reason      VARCHAR,
    PRIMARY KEY (split_id, fold)
);

-- One call of scdm_classify.evaluate(): its configuration and what it did.
CREATE TABLE eval_runs (
    run_id        VARCHAR PRIMARY KEY,
    created_at    TIMESTAMP NOT NULL,
    finished_at   TIMESTAMP,
    status        VARCHAR NOT NULL,      -- running | complete | failed
    config        JSON NOT NULL,
    scdm_version  VARCHAR,
    n_tasks       INTEGER,
    n_done        INTEGER,
    n_reused      INTEGER,
    n_skipped     INTEGER,
    seconds       DOUBLE
);

-- A finished (embedding space, split, fold, head) task. task_id = hash of the embeddings,
-- split, fold, head and head parameters: a rerun skips task_ids already here.
CREATE TABLE eval_tasks (
    task_id          VARCHAR PRIMARY KEY,
    run_id           VARCHAR NOT NULL,
    space_id         VARCHAR NOT NULL,
    embedding_ids    JSON NOT NULL,      -- the embeddings pooled for this task (one per dataset)
    model            VARCHAR NOT NULL,
    variant          VARCHAR NOT NULL,
    split_id         VARCHAR NOT NULL,
    scenario         VARCHAR NOT NULL,
    category_type    VARCHAR NOT NULL,
    category         VARCHAR NOT NULL,
    scheme           VARCHAR NOT NULL,
    fold             INTEGER NOT NULL,
    head             VARCHAR NOT NULL,
    head_params      JSON NOT NULL,
    n_train          BIGINT NOT NULL,
    n_test           BIGINT NOT NULL,
    n_test_pos       BIGINT NOT NULL,
    fit_seconds      DOUBLE,
    predict_seconds  DOUBLE,
    flags            VARCHAR,            -- comma-separated metric flags (single_class_test, ...)
    created_at       TIMESTAMP NOT NULL
);

-- Long-format metrics: one row per (task, metric). value is NULL where the metric is undefined
-- on the fold (never 0.0); eval_tasks.flags says why.
CREATE TABLE eval_results (
    task_id        VARCHAR NOT NULL,
    run_id         VARCHAR NOT NULL,
    space_id       VARCHAR NOT NULL,
    model          VARCHAR NOT NULL,
    variant        VARCHAR NOT NULL,
    split_id       VARCHAR NOT NULL,
    scenario       VARCHAR NOT NULL,
    category_type  VARCHAR NOT NULL,
    category       VARCHAR NOT NULL,
    scheme         VARCHAR NOT NULL,
    fold           INTEGER NOT NULL,
    head           VARCHAR NOT NULL,
    metric         VARCHAR NOT NULL,
    value          DOUBLE,
    n_train        BIGINT NOT NULL,
    n_test         BIGINT NOT NULL,
    fit_seconds    DOUBLE,
    PRIMARY KEY (task_id, metric)
);

-- Per-cell test predictions of every task (proba: DOUBLE since migration 15).
CREATE TABLE eval_predictions (
    task_id     VARCHAR NOT NULL,
    dataset_id  VARCHAR NOT NULL,
    "row"       INTEGER NOT NULL,
    y_true      TINYINT NOT NULL,
    proba       REAL NOT NULL
);

-- Tasks a run did not fit, and why (split or fold skipped, one training class, head error).
CREATE TABLE skipped_tasks (
    run_id         VARCHAR NOT NULL,
    space_id       VARCHAR NOT NULL,
    split_id       VARCHAR NOT NULL,
    scenario       VARCHAR NOT NULL,
    category_type  VARCHAR NOT NULL,
    category       VARCHAR NOT NULL,
    fold           INTEGER,              -- NULL: the whole split is skipped
    head           VARCHAR NOT NULL,
    reason         VARCHAR NOT NULL,
    created_at     TIMESTAMP NOT NULL
);
