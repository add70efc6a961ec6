-- scdm catalog: the results view's result_key names the label set too.
--
-- Two label sets with the same labels on the same cells (JHU006's Vorinostat and AR-42) share one
-- partition (one split id), and each keeps results of its own. The key was md5(space, split, head,
-- head parameters), so grouping by result_key alone put both label sets' folds in one group: n 6
-- for a 3-fold split. It now includes the label set, as the leaderboard groups.
CREATE OR REPLACE VIEW results AS
SELECT r.task_id, r.run_id, r.space_id, r.model, r.variant, r.datasets, r.label_set, r.split_id,
       r.scenario, r.scheme, r.n_folds, r.seed, r.category_type, r.category, r.fold, r.head, r.head_params,
       r.metric, r.value, r.n_train, r.n_test, r.fit_seconds,
       md5(concat_ws('|', r.space_id, r.split_id, r.label_set, r.head, r.head_params)) AS result_key
FROM eval_results r;
