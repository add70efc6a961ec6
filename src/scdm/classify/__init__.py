"""CPU stage: splits, heads, metrics and the evaluation grid, read straight from the store."""
