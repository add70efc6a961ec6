-- scdm catalog: transfer and trained-head predictions keep their probabilities in float64.
--
-- transfer_predictions.proba and predictions.proba were REAL, and transfer and predict labelled and
-- scored the float32-rounded values so that stored label, probability and metrics agreed. float32
-- holds no probability between 1 - 6e-8 and 1: every cell past a logit (gap) of ~16.6 read exactly
-- 1.0, so an overconfident model's most sensitive cells tied and the target AUROC/AP moved away from
-- the model's own ranking (as eval_predictions before migration 15). Rows written before this keep
-- their values exactly (every float32 is a double), and with them their labels and metrics. Safe to
-- run twice.
ALTER TABLE transfer_predictions ALTER COLUMN proba SET DATA TYPE DOUBLE;
ALTER TABLE predictions ALTER COLUMN proba SET DATA TYPE DOUBLE;
