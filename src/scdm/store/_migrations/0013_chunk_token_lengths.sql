-- scdm catalog: each chunk of an embedding keeps the token lengths of its cells.
--
-- The audit's tokens_per_cell_* described only the chunks the last run computed: after a resumed
-- run they covered the recomputed chunks alone, and a resume that computed none dropped them. A
-- chunk's row now keeps {length: cells} of its cells, so finalize sums them over the whole
-- embedding. Rows written before this (baselines, older stores) hold NULL. Safe to run twice.
ALTER TABLE embedding_chunks ADD COLUMN IF NOT EXISTS token_lengths JSON;
