-- scdm catalog: a trained head keeps the revision of its head that fitted it.
--
-- The revision (scdm.classify.heads: raised whenever a fix changes a head's numbers) was part of the
-- head id's hash only, so a head an older revision fitted was listed like a current one. Rows written
-- before this hold NULL (not recorded). Safe to run twice.
ALTER TABLE trained_heads ADD COLUMN IF NOT EXISTS revision INTEGER;
