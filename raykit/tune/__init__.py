"""Sweeps (`raykit tune`): search spaces (space.py), Ray Tune over Ray Train trials (sweep.py),
and the results table, rank and learning-rate curves, best job (report.py)."""
