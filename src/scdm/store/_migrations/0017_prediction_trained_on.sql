-- scdm catalog: a trained head's predictions say which cells trained it.
--
-- scdm predict marked the cells a head was fitted on (or whose labels tuned the LoRA adapter of its
-- embedding, or that are such a cell under another dataset name) in the frame it returned, but the
-- predictions table kept only proba and label: the server and SQL served a head's predictions on its
-- own training cells as if they were held-out. Rows written before this hold NULL (not recorded:
-- predict again). Safe to run twice.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS trained_on BOOLEAN;
