-- scdm catalog, transfer runs record the label sets they used.
--
-- A store dataset can carry several label sets (store/labels.py). A transfer run trains on the
-- labels of its source dataset(s), chooses its epoch on those of its validation dataset and scores
-- its predictions against those of its target; each of these names the label set(s) it read
-- (label set names, comma-separated, sorted; NULL: no label set -- a bulk source, no validation
-- dataset, or a target without labels). The source JSON holds the label set of every source
-- dataset, in source order.
ALTER TABLE transfer_runs ADD COLUMN source_label_set VARCHAR;
ALTER TABLE transfer_runs ADD COLUMN target_label_set VARCHAR;
ALTER TABLE transfer_runs ADD COLUMN validation_label_set VARCHAR;

-- Runs written before read each dataset's default label set (a dataset's first label set, which
-- stays its default). A target was scored only when it had labels: only runs with metrics get one.
UPDATE transfer_runs SET source_label_set = (
    SELECT string_agg(DISTINCT l.name, ',' ORDER BY l.name)
    FROM label_sets l, (SELECT unnest(json_extract_string(transfer_runs.source, '$.datasets[*]')) AS dataset_id) s
    WHERE l.dataset_id = s.dataset_id AND l.is_default)
WHERE source_kind = 'store';
UPDATE transfer_runs SET target_label_set = l.name
FROM label_sets l
WHERE l.dataset_id = transfer_runs.target_dataset_id AND l.is_default
  AND EXISTS (SELECT 1 FROM transfer_metrics m WHERE m.run_id = transfer_runs.run_id);
UPDATE transfer_runs SET validation_label_set = l.name
FROM label_sets l JOIN datasets d USING (dataset_id)
WHERE l.is_default AND d.name = json_extract_string(transfer_runs.config, '$.validation');
