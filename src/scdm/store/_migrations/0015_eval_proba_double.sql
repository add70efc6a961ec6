-- scdm catalog: evaluation predictions keep their probabilities in float64.
--
-- eval_predictions.proba was REAL, and the grid scored the float32-rounded values so that stored and
-- recomputed metrics agreed. float32 holds no probability between 1 - 6e-8 and 1: every cell past a
-- logit of ~16.6 read exactly 1.0, so an overconfident head's most sensitive cells tied and AUROC/AP
-- moved away from the head's own ranking (a pooled melanoma fold: 0.696691 for 0.698529). Rows written
-- before this keep their values exactly (every float32 is a double). Safe to run twice.
ALTER TABLE eval_predictions ALTER COLUMN proba SET DATA TYPE DOUBLE;
