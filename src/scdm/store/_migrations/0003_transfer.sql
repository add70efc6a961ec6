-- scdm catalog, transfer-learning tables (owned by scdm_classify.transfer): scDEAL runs from a
-- labelled source (bulk cell lines or labelled studies) to an unlabelled target dataset, their
-- per-cell predictions, metrics, training history, input features and critical genes.
-- Model weights, scalers and the latent space (for UMAP) live in <store>/artifacts/transfer/<run_id>/.

-- One call of scdm_classify.transfer.transfer().
CREATE TABLE transfer_runs (
    run_id             VARCHAR PRIMARY KEY,
    created_at         TIMESTAMP NOT NULL,
    finished_at        TIMESTAMP,
    status             VARCHAR NOT NULL,     -- running | complete | failed
    drug               VARCHAR,
    source_kind        VARCHAR NOT NULL,     -- bulk-csv | bulk-anndata | store
    source             JSON NOT NULL,        -- paths or dataset ids, response kind, sample counts
    target_dataset_id  VARCHAR NOT NULL,
    features           VARCHAR NOT NULL,     -- 'expr' or the target's embedding_id
    source_features    JSON,                 -- embedding ids of the source datasets (embedding features)
    adapt              BOOLEAN NOT NULL,     -- false: the same predictor without domain adaptation
    selection          VARCHAR NOT NULL,     -- source_val | target_val | last: what chose the kept epoch
    selected_epoch     INTEGER,
    val_score          DOUBLE,               -- validation cross-entropy of the kept epoch
    cluster_method     VARCHAR,              -- leiden | louvain | kmeans (fallback) | none
    n_clusters         INTEGER,
    waterfall          JSON,                 -- cutoff, method (median|knee), r, counts; NULL for binary labels
    n_source           BIGINT,               -- labelled source samples/cells used (train + validation)
    n_target           BIGINT,
    n_features         INTEGER,
    config             JSON NOT NULL,        -- every hyper-parameter (alpha, beta, lr, epochs, ...)
    metric_flags       VARCHAR,              -- flags of the target metrics (single_class_test, ...)
    artifacts_path     VARCHAR,              -- relative to the store root
    seconds            DOUBLE,
    scdm_version       VARCHAR,
    error              VARCHAR
);

-- Per-cell sensitivity of every target cell (labels, when the target has them, are in cells;
-- proba: DOUBLE since migration 16).
CREATE TABLE transfer_predictions (
    run_id      VARCHAR NOT NULL,
    dataset_id  VARCHAR NOT NULL,
    "row"       INTEGER NOT NULL,
    proba       REAL NOT NULL,               -- probability of sensitive
    label       TINYINT NOT NULL,            -- 1 sensitive (proba >= threshold), 0 resistant
    cluster     INTEGER,                     -- target cluster used by the cluster regulariser
    PRIMARY KEY (run_id, dataset_id, "row")
);

-- Metrics on the target cells that carry a label (NULL where undefined, never 0.0).
CREATE TABLE transfer_metrics (
    run_id  VARCHAR NOT NULL,
    metric  VARCHAR NOT NULL,
    value   DOUBLE,
    n       BIGINT,
    n_pos   BIGINT,
    PRIMARY KEY (run_id, metric)
);

-- Mean losses per epoch of every training stage (loss curves for the report).
CREATE TABLE transfer_history (
    run_id      VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,            -- pretrain_source_ae | pretrain_target_ae | pretrain_predictor | joint | source_only
    epoch       INTEGER NOT NULL,
    ce          DOUBLE,
    mmd         DOUBLE,
    cluster     DOUBLE,
    rec_source  DOUBLE,
    rec_target  DOUBLE,
    rec         DOUBLE,
    total       DOUBLE,
    val_ce      DOUBLE,
    PRIMARY KEY (run_id, stage, epoch)
);

-- The model's input features, in column order (gene symbols, or embedding dimensions).
CREATE TABLE transfer_features (
    run_id   VARCHAR NOT NULL,
    idx      INTEGER NOT NULL,
    feature  VARCHAR NOT NULL,
    PRIMARY KEY (run_id, idx)
);

-- Critical genes: integrated-gradient attributions compared between predicted sensitive and
-- resistant target cells (Wilcoxon rank-sum, multiple-testing correction).
CREATE TABLE critical_genes (
    run_id           VARCHAR NOT NULL,
    gene             VARCHAR NOT NULL,
    rank             INTEGER NOT NULL,
    direction        VARCHAR NOT NULL,       -- sensitive | resistant: the group with the higher attribution
    critical         BOOLEAN NOT NULL,       -- passes p_adj, |log2fc| and pts thresholds
    mean_sensitive   DOUBLE,
    mean_resistant   DOUBLE,
    log2fc           DOUBLE,
    pts_sensitive    DOUBLE,                 -- share of predicted-sensitive cells with a non-zero attribution
    pts_resistant    DOUBLE,
    statistic        DOUBLE,                 -- Mann-Whitney U of the sensitive group
    pvalue           DOUBLE,
    pvalue_adj       DOUBLE,
    params           JSON NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, gene)
);
