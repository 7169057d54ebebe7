"""Search spaces (tune_spaces/*.yaml): which job fields a sweep varies, and how.

    space:                                  # job fields by key path
      lora.rank: {choice: [4, 8, 16, 32]}   # sampled; {grid: [...]}: every value, num_samples times each
      lora.alpha: {per_rank: [1, 2, 4]}     # alpha = rank x one of these (LoRA's scale is alpha/rank)
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      lora.dropout: {uniform: [0.0, 0.1]}
    fixed:                                  # set in every trial, not in the best job it writes
      data.val_queries: 100
    tune:                                   # raykit.config.SweepConfig
      num_samples: 12

Every value a space can produce is checked against the job's schema when the space loads, so an
unknown key or a wrong type fails before the first trial starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykit.config import JobConfig, SweepConfig
from raykit.errors import ConfigError
from raykit.jobfile import build, parse_override, read_yaml, set_path

KINDS = ("choice", "grid", "per_rank", "uniform", "loguniform")
# Read once on the driver for the whole sweep, or not part of a trial at all.
NOT_PER_TRIAL = ("data.", "mine.", "teacher.", "eval.", "output_dir")


@dataclass(frozen=True)
class Dimension:
    key: str  # job key path, e.g. "lora.rank"
    kind: str  # one of KINDS
    values: tuple  # choice/per_rank: the options; uniform/loguniform: (low, high)

    @property
    def param(self) -> str:
        """The name Tune samples: per_rank samples the multiple, not alpha itself."""
        return f"{self.key}_per_rank" if self.kind == "per_rank" else self.key

    def domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind in ("choice", "per_rank"):
            return tune.choice(list(self.values))
        low, high = self.values
        return tune.loguniform(low, high) if self.kind == "loguniform" else tune.uniform(low, high)


@dataclass(frozen=True)
class Space:
    path: str
    dimensions: tuple[Dimension, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    settings: SweepConfig = field(default_factory=SweepConfig)

    @property
    def num_trials(self) -> int:
        """num_samples, times every grid's size (Tune repeats the grid num_samples times)."""
        n = self.settings.num_samples
        for d in self.dimensions:
            if d.kind == "grid":
                n *= len(d.values)
        return n

    def param_space(self) -> dict:
        return {d.param: d.domain() for d in self.dimensions}

    def values(self, params: dict, job: JobConfig) -> dict[str, Any]:
        """A trial's job fields from Tune's sampled params: {"lora.rank": 8, "lora.alpha": 16.0, ...}."""
        out = {d.key: params[d.param] for d in self.dimensions if d.kind != "per_rank"}
        for d in self.dimensions:
            if d.kind == "per_rank":
                out[d.key] = float(params[d.param] * out.get("lora.rank", job.lora.rank))
        return out

    def as_dict(self) -> dict:
        return {"path": self.path, "space": {d.key: {d.kind: list(d.values)} for d in self.dimensions}, "fixed": self.fixed,
                "tune": {k: getattr(self.settings, k) for k in self.settings.__dataclass_fields__}}


def apply(job: JobConfig, values: dict[str, Any], where: str) -> JobConfig:
    """`job` with fields set by key path (what `key=value` overrides do), validated."""
    raw = job.to_dict()
    for key, value in values.items():
        set_path(raw, key.split("."), copy.deepcopy(value))
    return build(JobConfig, raw, where)


def load_space(path: str, job: JobConfig, overrides: list[str] = ()) -> Space:
    """Read and check a space file; `overrides` are `tune.KEY=VALUE` items for its tune: section."""
    p = Path(path)
    only = "the top level holds space:, fixed: and tune: only"
    raw = read_yaml(p, "no such search space file; pass one from tune_spaces/, e.g. tune_spaces/lora_rank_alpha_lr.yaml", only)
    if set(raw) - {"space", "fixed", "tune"}:
        raise ConfigError(f"{p}: {only} (found {sorted(set(raw) - {'space', 'fixed', 'tune'})})")
    settings_raw = dict(raw.get("tune") or {})
    for item in overrides:  # tune.KEY=VALUE
        keys, value = parse_override(item)
        settings_raw[".".join(keys[1:])] = value
    settings = build(SweepConfig, settings_raw, str(p), "tune.")

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{p}: fixed: must map key paths to values, e.g. data.val_queries: 100")
    trial = apply(job, fixed, f"{p}: fixed")

    entries = raw.get("space") or {}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{p}: space: is empty; give at least one key path, e.g. lora.rank: {{choice: [8, 16, 32]}}")
    dims = tuple(_dimension(str(p), key, spec) for key, spec in entries.items())
    space = Space(path=str(p), dimensions=dims, fixed=dict(fixed), settings=settings)
    if settings.searcher == "optuna" and any(d.kind == "grid" for d in dims):
        raise ConfigError(f"{p}: grid: needs tune.searcher=random (Optuna samples; it does not walk a grid); use choice:")
    _check_values(space, trial)
    return space


def _dimension(where: str, key: str, spec: Any) -> Dimension:
    here = f"{where}: space.{key}"
    if key.startswith(NOT_PER_TRIAL):
        raise ConfigError(f"{here}: {key.split('.')[0]} is read once for the whole sweep, not per trial; "
                          "set it in fixed: or on the command line")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{here}: expected one of {', '.join(f'{{{k}: ...}}' for k in KINDS)}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{here}: {kind} needs a non-empty list, e.g. {{{kind}: {'[1.0e-4, 1.0e-3]' if 'uniform' in kind else '[8, 16, 32]'}}}")
    if kind == "per_rank" and key != "lora.alpha":
        raise ConfigError(f"{here}: per_rank applies to lora.alpha only (alpha = rank x multiple)")
    if kind in ("uniform", "loguniform"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{here}: {kind} needs [low, high] numbers, got {values!r}")
        low, high = values
        if low > high:
            raise ConfigError(f"{here}: low {low} is above high {high}; write [{high}, {low}]")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{here}: loguniform needs low > 0 (got {low}); use uniform for ranges that reach 0")
        values = [float(low), float(high)]
    return Dimension(key=key, kind=kind, values=tuple(values))


def _check_values(space: Space, job: JobConfig) -> None:
    """Build a job from every option (and both ends of every range): a type or range error shows now."""
    ranks = next((d.values for d in space.dimensions if d.key == "lora.rank" and d.kind in ("choice", "grid")), (job.lora.rank,))
    for d in space.dimensions:
        where = f"{space.path}: space.{d.key}"
        if d.kind == "per_rank":
            for multiple in d.values:
                if not isinstance(multiple, (int, float)) or isinstance(multiple, bool):
                    raise ConfigError(f"{where}: per_rank multiples must be numbers, got {multiple!r}")
                for rank in ranks:
                    apply(job, {"lora.alpha": float(multiple * rank)}, where)
        else:
            for value in d.values:
                apply(job, {d.key: value}, where)
