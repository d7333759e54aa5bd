"""Features beside the table: embeddings, indexes, causal LMs, gradient features (issue 4)."""
