-- scdm catalog, trained heads (owned by scdm_classify.trained_heads): a head fitted on every
-- labelled cell of one category (no held-out fold) for later use, and the per-cell predictions it
-- made. The fitted head lives in <store>/artifacts/heads/<head_id>/ (head.joblib for the
-- scikit-learn style heads, head.pt with the torch state for mlp, and the card head.json); its
-- blake2b hash is file_hash and is checked every time it is loaded.
CREATE TABLE trained_heads (
    head_id          VARCHAR PRIMARY KEY,  -- hash of space, embeddings, category, head and params
    head             VARCHAR NOT NULL,     -- logreg | ridge | lightgbm | mlp | majority
    head_params      JSON NOT NULL,        -- canonical JSON of the constructor arguments (eval_tasks.head_params)
    space_id         VARCHAR NOT NULL,     -- the embedding space a dataset must be embedded in to be predicted
    model            VARCHAR NOT NULL,
    variant          VARCHAR NOT NULL,
    checkpoint_hash  VARCHAR,
    adapter_hash     VARCHAR,
    embedding_params JSON NOT NULL,        -- params of the embeddings it was trained on
    dim              INTEGER NOT NULL,
    embedding_ids    JSON NOT NULL,        -- training embeddings (one per dataset)
    datasets         JSON NOT NULL,        -- their dataset names
    category_type    VARCHAR NOT NULL,
    category         VARCHAR NOT NULL,
    n_train          BIGINT NOT NULL,      -- labelled training cells
    n_train_pos      BIGINT NOT NULL,      -- of which sensitive
    threshold        DOUBLE NOT NULL,      -- label = 1 where proba >= threshold
    train_metrics    JSON,                 -- mean/sd over folds of eval_results of the same configuration (NULL: none)
    fit_seconds      DOUBLE,
    artifact_format  VARCHAR NOT NULL,     -- joblib | torch
    path             VARCHAR NOT NULL,     -- artifact file, relative to the store root
    file_hash        VARCHAR NOT NULL,     -- blake2b of the artifact file
    scdm_version     VARCHAR,
    created_at       TIMESTAMP NOT NULL
);

-- Per-cell predictions of a trained head on a dataset (a new predict replaces the old rows;
-- proba: DOUBLE since migration 16).
CREATE TABLE predictions (
    head_id       VARCHAR NOT NULL,
    dataset_id    VARCHAR NOT NULL,
    "row"         INTEGER NOT NULL,
    embedding_id  VARCHAR NOT NULL,        -- the embedding the head read
    proba         REAL NOT NULL,           -- probability of sensitive
    label         TINYINT NOT NULL,        -- 1 sensitive, 0 resistant
    created_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (head_id, dataset_id, "row")
);
