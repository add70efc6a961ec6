-- scdm catalog, critical genes that keep their direction and say how large a difference is.
--
-- critical_genes compares integrated-gradient attributions of predicted sensitive and resistant
-- target cells (store/transfer.py). From this version:
--   mean_sensitive, mean_resistant  the *signed* mean attribution of each group (positive pushes a
--                                   cell towards "sensitive"); rows written before held the mean
--                                   of absolute attributions there (see params.use_abs)
--   mean_abs_sensitive/_resistant   mean absolute attribution of each group
--   log2fc                          log2((mean_abs_sensitive + c) / (mean_abs_resistant + c)) with a
--                                   pseudocount c recorded in params (pseudocount_value); older rows
--                                   used 1e-12, which gave |log2fc| near 30 when a group's mean was 0
--   effect_size                     rank-biserial correlation of the tested values, 2U/(n1 n2) - 1,
--                                   in [-1, 1], positive when they are larger in sensitive cells
--   cohens_d                        difference of the tested values' means over their pooled sd
--   detect_sensitive/_resistant     share of the group's cells that express the gene (above the
--                                   gene's minimum among the target cells)
ALTER TABLE critical_genes ADD COLUMN mean_abs_sensitive DOUBLE;
ALTER TABLE critical_genes ADD COLUMN mean_abs_resistant DOUBLE;
ALTER TABLE critical_genes ADD COLUMN effect_size DOUBLE;
ALTER TABLE critical_genes ADD COLUMN cohens_d DOUBLE;
ALTER TABLE critical_genes ADD COLUMN detect_sensitive DOUBLE;
ALTER TABLE critical_genes ADD COLUMN detect_resistant DOUBLE;

-- Older rows: with use_abs (the old default) the stored means were of absolute attributions; they
-- move to the mean_abs_* columns, and the signed means, never computed, are NULL.
UPDATE critical_genes
SET mean_abs_sensitive = mean_sensitive, mean_abs_resistant = mean_resistant,
    mean_sensitive = NULL, mean_resistant = NULL
WHERE COALESCE(TRY_CAST(json_extract_string(params, '$.use_abs') AS BOOLEAN), true);
