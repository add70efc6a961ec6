-- scdm catalog: one stored fit per space, split, fold, head, head parameters and label set.
--
-- A task id names every embedding of the space selected for its run, but the fit reads only the
-- cells of its split. Before schema 11 the same split evaluated with more or fewer of its space's
-- datasets selected was fitted again under a second task id, and the leaderboard averaged both
-- copies as folds of one result (n_folds 6 for a 3-fold split). The copies are the same fit: the
-- first one stored stays, the later ones go with their metrics and predictions. Runs now reuse the
-- stored fit (store.evaluation.same_fits).
CREATE TEMP TABLE later_copies AS
SELECT task_id FROM (
    SELECT task_id, row_number() OVER (
        PARTITION BY space_id, split_id, fold, head, CAST(head_params AS VARCHAR), coalesce(label_set, '')
        ORDER BY created_at, task_id) AS copy
    FROM eval_tasks)
WHERE copy > 1;
DELETE FROM eval_predictions WHERE task_id IN (SELECT task_id FROM later_copies);
DELETE FROM eval_results WHERE task_id IN (SELECT task_id FROM later_copies);
DELETE FROM eval_tasks WHERE task_id IN (SELECT task_id FROM later_copies);
DROP TABLE later_copies;
