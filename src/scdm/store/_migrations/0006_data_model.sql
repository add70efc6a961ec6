-- scdm catalog, the data model made explicit: label sets, and the identity of every result.
--
-- A dataset is its expression content; its response labels are a named label set (column,
-- positive value, drug). One matrix may carry several label sets. cells.response keeps the
-- dataset's default label set (what older readers see); cell_labels holds every label set.
-- Splits, evaluation rows, trained heads and adapters record the label set and the datasets they
-- used, so that nothing averages across different labels, datasets or splits.

CREATE TABLE label_sets (
    label_set_id  VARCHAR PRIMARY KEY,    -- first 16 hex digits of md5(dataset_id || '/' || name)
    dataset_id    VARCHAR NOT NULL,
    name          VARCHAR NOT NULL,       -- unique within the dataset (default: the drug, else the label column)
    label_key     VARCHAR,                -- obs column the labels came from
    positive      VARCHAR,                -- label value meaning sensitive (NULL: sensitive/resistant-like words)
    unknown_values JSON,                  -- label values stored as unknown
    drug          VARCHAR,                -- the drug the labels are the response to
    is_default    BOOLEAN NOT NULL,       -- the label set a dataset is evaluated with unless told otherwise
    n_labelled    BIGINT NOT NULL,
    n_sensitive   BIGINT NOT NULL,
    labels_hash   VARCHAR NOT NULL,       -- hash of the labels (row order): equal hashes = equal labels
    created_at    TIMESTAMP NOT NULL,
    UNIQUE (dataset_id, name)
);

-- The response of every labelled cell under every label set (unlabelled cells have no row).
CREATE TABLE cell_labels (
    label_set_id  VARCHAR NOT NULL,
    dataset_id    VARCHAR NOT NULL,
    "row"         INTEGER NOT NULL,
    response      TINYINT NOT NULL,       -- 1 sensitive, 0 resistant
    PRIMARY KEY (label_set_id, "row")
);

-- Every labelled dataset of an older store gets its labels as its default label set.
INSERT INTO label_sets
SELECT substr(md5(d.dataset_id || '/' || n.name), 1, 16), d.dataset_id, n.name,
       json_extract_string(d.options, '$.label_key'), json_extract_string(d.options, '$.positive'),
       COALESCE(json_extract(d.options, '$.unknown_values'), '[]'::JSON), NULL, true,
       c.n_labelled, c.n_sensitive, c.labels_hash, d.created_at
FROM datasets d
JOIN (SELECT dataset_id, count(response) AS n_labelled, COALESCE(sum(response), 0) AS n_sensitive,
             md5(COALESCE(string_agg(CAST("row" AS VARCHAR) || ':' || CAST(response AS VARCHAR), ',' ORDER BY "row")
                          FILTER (WHERE response IS NOT NULL), '')) AS labels_hash
      FROM cells GROUP BY dataset_id) c USING (dataset_id)
JOIN (SELECT dataset_id, COALESCE(json_extract_string(options, '$.label_key'), 'response') AS name FROM datasets) n
     USING (dataset_id)
WHERE c.n_labelled > 0;

INSERT INTO cell_labels
SELECT l.label_set_id, c.dataset_id, c."row", c.response
FROM cells c JOIN label_sets l USING (dataset_id)
WHERE c.response IS NOT NULL;

-- A split stores the responses it partitions (they are part of its identity, cells_hash), so it
-- reads back the same whichever label set is the default later.
ALTER TABLE split_assignments ADD COLUMN response TINYINT;
UPDATE split_assignments SET response = c.response FROM cells c
WHERE c.dataset_id = split_assignments.dataset_id AND c."row" = split_assignments."row";

-- Splits record the label set(s) and the datasets they partition.
ALTER TABLE splits ADD COLUMN label_set VARCHAR;       -- label set name(s), comma-separated, sorted
ALTER TABLE splits ADD COLUMN datasets VARCHAR;        -- dataset names, comma-separated, sorted
UPDATE splits SET datasets = (
    SELECT string_agg(DISTINCT d.name, ',' ORDER BY d.name)
    FROM split_assignments a JOIN datasets d ON d.dataset_id = a.dataset_id
    WHERE a.split_id = splits.split_id);
UPDATE splits SET label_set = (
    SELECT string_agg(DISTINCT l.name, ',' ORDER BY l.name)
    FROM split_assignments a JOIN label_sets l ON l.dataset_id = a.dataset_id AND l.is_default
    WHERE a.split_id = splits.split_id);

-- Evaluation rows carry their full identity: datasets, label set, the split's k and seed, head params.
ALTER TABLE eval_tasks ADD COLUMN label_set VARCHAR;
ALTER TABLE eval_tasks ADD COLUMN datasets VARCHAR;
ALTER TABLE eval_tasks ADD COLUMN n_folds INTEGER;
ALTER TABLE eval_tasks ADD COLUMN seed INTEGER;
UPDATE eval_tasks SET label_set = s.label_set, datasets = s.datasets, n_folds = s.n_folds, seed = s.seed
FROM splits s WHERE s.split_id = eval_tasks.split_id;

ALTER TABLE eval_results ADD COLUMN label_set VARCHAR;
ALTER TABLE eval_results ADD COLUMN datasets VARCHAR;
ALTER TABLE eval_results ADD COLUMN n_folds INTEGER;
ALTER TABLE eval_results ADD COLUMN seed INTEGER;
ALTER TABLE eval_results ADD COLUMN head_params JSON;
UPDATE eval_results SET label_set = t.label_set, datasets = t.datasets, n_folds = t.n_folds, seed = t.seed,
       head_params = t.head_params
FROM eval_tasks t WHERE t.task_id = eval_results.task_id;

ALTER TABLE skipped_tasks ADD COLUMN label_set VARCHAR;
ALTER TABLE skipped_tasks ADD COLUMN datasets VARCHAR;

-- Trained heads and LoRA adapters record the label set they were trained with.
ALTER TABLE trained_heads ADD COLUMN label_set VARCHAR;
UPDATE trained_heads SET label_set = (
    SELECT string_agg(DISTINCT l.name, ',' ORDER BY l.name)
    FROM label_sets l, (SELECT unnest(json_extract_string(trained_heads.embedding_ids, '$[*]')) AS embedding_id) e
    JOIN embeddings m USING (embedding_id)
    WHERE l.dataset_id = m.dataset_id AND l.is_default);
ALTER TABLE adapters ADD COLUMN label_set VARCHAR;
UPDATE adapters SET label_set = s.label_set FROM splits s WHERE s.split_id = adapters.split_id;

-- Report and leaderboard reads go through this view: one row per (task, metric) with the whole
-- result identity spelled out. Group by result_key, never by model name alone.
CREATE VIEW results AS
SELECT r.task_id, r.run_id, r.space_id, r.model, r.variant, r.datasets, r.label_set, r.split_id,
       r.scenario, r.scheme, r.n_folds, r.seed, r.category_type, r.category, r.fold, r.head, r.head_params,
       r.metric, r.value, r.n_train, r.n_test, r.fit_seconds,
       md5(concat_ws('|', r.space_id, r.split_id, r.head, r.head_params)) AS result_key
FROM eval_results r;
