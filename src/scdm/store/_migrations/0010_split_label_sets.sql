-- scdm catalog: a split names the label sets of its own cells.
--
-- Before schema 10 every split of an embedding space was named with the label sets of every
-- dataset in the space: a category holding A375's cells only, in a space of A375, JHU006 and
-- SCC47, was "Afatinib,Gefitinib,PLX-4720", and the same cells split in another space were named
-- otherwise. Splits are now named with the label sets of the datasets whose cells they hold
-- (store.splits.make_splits). So that stored splits and their results keep matching the splits
-- scdm makes now (their tasks are reused, not fitted again under a second name), every stored
-- name keeps the label sets that belong to the split's own datasets.
CREATE TEMP TABLE split_datasets AS SELECT DISTINCT split_id, dataset_id FROM split_assignments;
CREATE TEMP TABLE renamed AS
WITH named AS (
    SELECT split_id, label_set FROM splits WHERE label_set IS NOT NULL
    UNION SELECT split_id, label_set FROM eval_tasks WHERE label_set IS NOT NULL
    UNION SELECT split_id, label_set FROM skipped_tasks WHERE label_set IS NOT NULL
    UNION SELECT split_id, label_set FROM adapters WHERE label_set IS NOT NULL
)
SELECT n.split_id, n.label_set AS old, string_agg(DISTINCT l.name, ',' ORDER BY l.name) AS new
FROM named n
JOIN split_datasets d USING (split_id)
JOIN label_sets l ON l.dataset_id = d.dataset_id AND list_contains(string_split(n.label_set, ','), l.name)
GROUP BY n.split_id, n.label_set
HAVING string_agg(DISTINCT l.name, ',' ORDER BY l.name) <> n.label_set;
UPDATE splits SET label_set = r.new FROM renamed r WHERE splits.split_id = r.split_id AND splits.label_set = r.old;
UPDATE eval_tasks SET label_set = r.new FROM renamed r
WHERE eval_tasks.split_id = r.split_id AND eval_tasks.label_set = r.old;
UPDATE eval_results SET label_set = r.new FROM renamed r
WHERE eval_results.split_id = r.split_id AND eval_results.label_set = r.old;
UPDATE skipped_tasks SET label_set = r.new FROM renamed r
WHERE skipped_tasks.split_id = r.split_id AND skipped_tasks.label_set = r.old;
UPDATE adapters SET label_set = r.new FROM renamed r WHERE adapters.split_id = r.split_id AND adapters.label_set = r.old;
DROP TABLE renamed;
DROP TABLE split_datasets;
