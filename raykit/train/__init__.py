"""The training pipeline: the driver (driver.py), the per-worker loop (loop.py), what runs before
training (mine.py: hard negatives; score.py: teacher scores) and the run's report (report.py)."""
