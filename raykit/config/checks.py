"""The checks every config section shares: one line naming the key, its value and the fix."""

from __future__ import annotations

from raykit.errors import ConfigError


def plain(obj):
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: {value} must be above 0")


def not_negative(section: str, config, names: tuple[str, ...], zero: str = "0") -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{section}.{name}: {getattr(config, name)} is negative; use {zero} or more")


def duration(text: str) -> float | None:
    """'30s', '10m', '1.5h' in seconds; None when `text` is not a duration (no unit, negative, not finite)."""
    text = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    try:
        value = float(text[:-1]) if unit else -1.0
    except ValueError:
        return None
    return value * unit if 0 <= value < float("inf") else None
