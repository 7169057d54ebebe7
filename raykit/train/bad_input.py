"""A worker's bad-input error ends the run at once, not after run.max_failures restarts.

Ray Train restarts a failed worker group up to run.max_failures times, each from the latest
checkpoint: right for a lost node or a transient fault, wasted on a raykit error (bad input: what a
node lacks, such as the compiler scaling.compile needs, or a setting the workers check), which every
attempt meets again after starting its workers and loading the model. Ray Train retries worker
errors only: an error its controller raises ends the run (its failure policy). So the controller
raises the workers' raykit error itself, as soon as a poll finds it; the driver prints its line
(driver._stopped).
"""

from __future__ import annotations

import ray.train

from raykit.cluster import raised_by_raykit
from raykit.errors import RaykitError


class EndOnBadInput(ray.train.UserCallback):
    """On Ray Train's controller, after a poll of the workers finds errors."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for error in worker_exceptions.values():  # each a worker's exception with its traceback's text
            if isinstance(ours := raised_by_raykit(error), RaykitError):
                raise ours
