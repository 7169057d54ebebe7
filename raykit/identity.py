"""A job's identity: the settings that change what it produces, recorded beside what it writes.

A rerun into the same place resumes or reuses the work there only when its identity matches the
recorded one. Otherwise it is refused in one line naming each differing key with both values: before
this, a rerun with another learning rate resumed the old run's checkpoints (and trained at the old
rate), and a finished run answered any new job with its old summary.
"""

from __future__ import annotations

import json
from typing import Any

from raykit import storage
from raykit.errors import RaykitError

SHOWN = 4  # differing keys named in the error line; the rest are counted


def of(config: dict, leave_out: tuple[str, ...]) -> dict[str, Any]:
    """The flattened config (`train.lr: 1e-5`), less the keys (or sections) that do not change the result."""
    flat = _flatten(json.loads(json.dumps(config)))  # tuples as lists, as a recorded identity reads back
    return {k: v for k, v in flat.items() if not any(k == x or k.startswith(x + ".") for x in leave_out)}


def differences(recorded: dict, identity: dict) -> list[str]:
    """`key: recorded there, asked here` for each key that differs."""
    missing = "(unset)"
    keys = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k, missing) != identity.get(k, missing))
    return [f"{k}: {recorded.get(k, missing)!r} there, {identity.get(k, missing)!r} here" for k in keys]


def refusal(where: str, what: str, diffs: list[str], fix: str) -> RaykitError:
    more = f" and {len(diffs) - SHOWN} more" if len(diffs) > SHOWN else ""
    return RaykitError(f"{where} holds {what} of another job ({'; '.join(diffs[:SHOWN])}{more}); {fix}")


def reusable(out: str, ours: dict, what: str, key: str) -> bool:
    """Whether `out` (mined or scored triplets) exists to be reused: made by this identity (recorded
    in `out`.job.json), or a file raykit did not make (given as data, used as it is). Made by other
    settings: refused."""
    if not storage.exists(out):
        return False
    recorded = read(out + ".job.json")
    diffs = differences(recorded, ours) if recorded is not None else []
    if diffs:
        raise refusal(out, what, diffs, f"delete it to make it again, or set {key} to another path")
    return True


def read(path: str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise RaykitError(f"{path}: not a raykit identity record ({type(e).__name__}); delete it, or use another output") from None


def record(path: str, identity: dict) -> None:
    storage.put_text(path, json.dumps({"identity": identity}, indent=2, sort_keys=True))


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat
