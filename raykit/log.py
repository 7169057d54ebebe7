"""raykit's one logger: every progress line and notice is a record of the `raykit` logger.

Records print as `[raykit] message` lines (`[raykit] warning: ...` from WARNING up) on standard
output, one line per record, fit for a terminal and for `ray job logs`. The CLI's `--log-level`,
`-q` and `-v` set the level; training workers get the driver's level. Ray's own loggers stay at
WARNING unless the level is DEBUG (`-v`). Modules log through `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import logging
import math
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.util")


class _Console(logging.StreamHandler):
    """Writes to the sys.stdout of the moment (a redirected or captured stream), not the one at setup."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[raykit] {level}{record.getMessage()}"


def setup(level: str | int = "INFO") -> None:
    """Configure the `raykit` logger (idempotent) and keep Ray's loggers at WARNING unless DEBUG."""
    logger = logging.getLogger("raykit")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(level)
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if logger.level <= logging.DEBUG else logging.WARNING)


def level() -> int:
    """The level to hand to processes that log for this run (training workers)."""
    return logging.getLogger("raykit").getEffectiveLevel()


def format_duration(seconds: float) -> str:
    """A duration as progress lines show it: 3m07s, 2h05m ("?" when it cannot be known yet)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
