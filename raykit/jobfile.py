"""Job files: YAML and `key=value` overrides in, typed config (raykit/config/) out.

A mistake names its key path and the nearest valid key (`unknown key 'train.lrr' (did you mean
'train.lr'?)`), so a bad job fails on the laptop, not twenty minutes into a cluster run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from raykit.config import JobConfig
from raykit.errors import ConfigError


def load_job(path: str | Path | None, overrides: list[str] = (), cls=None):
    """Load a job YAML (or only defaults when `path` is None) and apply `key=value` overrides.

    `cls` is the job type: `JobConfig` (train, the default) or `EmbedJob`.
    """
    cls = cls or JobConfig
    where = str(path) if path else "defaults"
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml(path, "no such job file; pass the path to a YAML job, e.g. jobs/quickstart.yaml",
                        "the top level must be a mapping of sections (model:, train:, ...)")
    for item in overrides:
        set_path(raw, *parse_override(item))
    return build(cls, raw, where)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001): the key path and the typed value."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    return key.strip().split("."), parse_value(text)


class _DuplicateKey(Exception):
    pass


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML would
    keep the last one silently, and a job would run with a setting its author thought was changed."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"{line}: key '{key}' is given twice (also at line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, missing: str, not_mapping: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; `missing` and `not_mapping` finish the error lines."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {missing}")
    data = p.read_bytes()
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_UniqueKeys) or {}
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{p}:{e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: {not_mapping}")
    return raw


def build(cls, raw: Any, where: str, prefix: str = ""):
    """Turn nested dicts into `cls`, naming the key path of any unknown key or wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(prefix, str(key), cls)}")
        kwargs[key] = _coerce(hints[key], value, where, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp, value, where: str, keypath: str):
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where, keypath + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `lora.target_modules=query` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{keypath}' must be a list of {item_tp.__name__}, got {value!r}")
        return tuple(_coerce(item_tp, v, where, keypath) for v in value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where, keypath)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a split named 1 or a numeric path
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{keypath}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # YAML's .nan and .inf are floats, and no setting wants one
        raise ConfigError(f"{where}: '{keypath}' must be a finite number, got {value!r}")
    return value


def _suggest(prefix: str, key: str, cls) -> str:
    hints = typing.get_type_hints(cls)
    # a key in the wrong section: `lr` at the top level means `train.lr`
    for name, sub in hints.items():
        if dataclasses.is_dataclass(sub) and key in typing.get_type_hints(sub):
            return f" (did you mean '{prefix}{name}.{key}'?)"
    close = difflib.get_close_matches(key, list(hints), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid keys here: {', '.join(prefix + n for n in hints)}"


def set_path(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = node[k] = {}
        node = nxt
    node[keys[-1]] = value


def parse_value(text: str) -> Any:
    # YAML scalars so that `train.lr=1e-4`, `eval.dims=[64,128]` and `use_gpu=true` get their types.
    # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the float a user means.
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in "e.") and value.strip() else value
        except ValueError:
            return value
    return value
