"""Re-embedding (`raykit embed`, `raykit search`): the corpus planned into shards (corpus.py), the
Ray Data pipeline (pipeline.py), the output's commit protocol (manifest.py), and search over it (search.py)."""
