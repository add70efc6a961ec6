-- scdm catalog: the results view names the revision of the head that fitted each row.
--
-- A head's revision (raised by fixes that change its numbers) is part of a task's id, so an older
-- scdm's tasks and this one's are different rows; but the view's result_key left it out. Until a run
-- of the new revision finishes (and deletes the folds it replaced), both revisions' folds are stored:
-- a 3-fold logreg result interrupted after one fold of the new revision grouped by result_key as 4
-- folds (n 4 of a 3-fold split), averaging the two revisions. `revision` is the run's
-- config.head_revisions (1 for runs that recorded none) and is in result_key where it is above 1, so
-- keys of revision 1 stay as they were. Safe to run twice.
CREATE OR REPLACE VIEW results AS
SELECT r.task_id, r.run_id, r.space_id, r.model, r.variant, r.datasets, r.label_set, r.split_id,
       r.scenario, r.scheme, r.n_folds, r.seed, r.category_type, r.category, r.fold, r.head, r.head_params,
       r.revision, r.metric, r.value, r.n_train, r.n_test, r.fit_seconds,
       md5(concat_ws('|', r.space_id, r.split_id, r.label_set, r.head, r.head_params, nullif(r.revision, 1))) AS result_key
FROM (SELECT x.*, coalesce(v.revision, 1) AS revision
      FROM eval_results x LEFT JOIN (
          -- per run and head: runs are few and their rows many, so each run's config is parsed once, not per row
          SELECT DISTINCT run_id, head, TRY_CAST(json_extract_string(given, '/' || head) AS INTEGER) AS revision
          FROM (SELECT run_id, json_extract(config, '$.head_revisions') AS given FROM eval_runs), unnest(json_keys(given)) AS h(head)
      ) v ON v.run_id = x.run_id AND v.head = x.head) r;
