"""What a sweep leaves behind: the results table, the rank and learning-rate curves, the best job.

The rank curve answers "adapter rank lock-in": validation nDCG@10 against LoRA rank, its knee marked
at the smallest rank within `tune.knee_tolerance` of the best. Raising rank past the knee buys memory
and time, not quality; a curve still climbing at its largest rank says the space should go higher.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os

import yaml

from raykit import storage
from raykit.config import JobConfig
from raykit.errors import RaykitError
from raykit.train.driver import schedule_length
from raykit.tune.space import Space, apply

log = logging.getLogger(__name__)


def collect(grid, job: JobConfig, space: Space, num_rows: int) -> list[dict]:
    """One row per trial: its values, steps run of its budget, best validation metric, how it ended."""
    metric = space.settings.metric
    rows = []
    for result in grid:
        values = space.values(result.config, job)
        trial = apply(job, values, "trial")
        budget = schedule_length(num_rows, trial.scaling.num_workers, trial)[1]
        df = result.metrics_dataframe
        steps, best, best_step = 0, math.nan, 0
        if df is not None and "step" in df:
            steps = int(df["step"].max())
            scored = df.dropna(subset=[metric]) if metric in df else df.iloc[0:0]
            if len(scored):
                i = scored[metric].idxmax()
                best, best_step = float(scored.loc[i, metric]), int(scored.loc[i, "step"])
        status = "error" if result.error else ("stopped early" if steps < budget else "complete")
        rows.append({"trial": (result.metrics or {}).get("trial_id", os.path.basename(str(result.path))),
                     **values, "steps": steps, "budget": budget, metric: best, "best_step": best_step,
                     "status": status, "error": str(result.error).strip().splitlines()[-1] if result.error else ""})
    return sorted(rows, key=lambda r: -r[metric] if not math.isnan(r[metric]) else math.inf)


def rank_curve(rows: list[dict], metric: str, tolerance: float) -> tuple[dict[int, float], int | None]:
    """Best validation metric per LoRA rank, and the knee: the smallest rank within `tolerance` of the best."""
    per_rank: dict[int, float] = {}
    for r in rows:
        if "lora.rank" in r and not math.isnan(r[metric]):
            per_rank[r["lora.rank"]] = max(per_rank.get(r["lora.rank"], -math.inf), r[metric])
    if not per_rank:
        return {}, None
    top = max(per_rank.values())
    knee = min(rank for rank, v in per_rank.items() if v >= top - tolerance)
    return dict(sorted(per_rank.items())), knee


def write(grid, job: JobConfig, base: JobConfig, space: Space, num_rows: int, output_dir: str) -> dict:
    metric = space.settings.metric
    rows = collect(grid, base, space, num_rows)
    ok = [r for r in rows if not math.isnan(r[metric])]
    if not ok:
        errors = "; ".join(sorted({r["error"] for r in rows if r["error"]})) or "no trial reported a validation metric"
        raise RaykitError(f"no trial has a {metric} ({errors}); see the trial logs above")
    keys = [d.key for d in space.dimensions]
    curve, knee = rank_curve(rows, metric, space.settings.knee_tolerance)
    best = ok[0]
    steps_run, budget = sum(r["steps"] for r in rows), sum(r["budget"] for r in rows)
    summary = {"trials": rows, "best": best, "rank_curve": curve, "knee": knee, "steps_run": steps_run,
               "steps_budget": budget, "metric": metric, "output_dir": output_dir}

    columns = ["trial", *keys, "steps", "budget", metric, "best_step", "status", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.put_text(storage.join(output_dir, "results.csv"), buf.getvalue())
    md = markdown(summary, keys, space)
    storage.put_text(storage.join(output_dir, "results.md"), md + "\n")
    storage.put_text(storage.join(output_dir, "best_job.yaml"), best_job_yaml(job, best, keys, space, output_dir))
    summary["plots"] = write_plots(rows, curve, knee, metric, output_dir)
    storage.put_text(storage.join(output_dir, "sweep_result.json"), _json(summary))
    log.info("sweep results\n" + md)
    log.info(f"best job: {storage.join(output_dir, 'best_job.yaml')}  "
          f"(raykit train {storage.join(output_dir, 'best_job.yaml')})")
    return summary


def markdown(summary: dict, keys: list[str], space: Space) -> str:
    metric, rows = summary["metric"], summary["trials"]
    lines = [f"# Sweep: {len(rows)} trials of {space.path}", "",
             f"Ranked by {metric} (held-out training queries, never the test split). "
             f"Steps run: {summary['steps_run']} of {summary['steps_budget']} "
             f"({100 * summary['steps_run'] / max(1, summary['steps_budget']):.0f}%).", "",
             "| trial | " + " | ".join(keys) + f" | steps | {metric} | status |",
             "|---|" + "---:|" * (len(keys) + 2) + "---|"]
    for r in rows:
        cells = " | ".join(_fmt(r[k]) for k in keys)
        value = "" if math.isnan(r[metric]) else f"{r[metric]:.4f}"
        lines.append(f"| {r['trial']} | {cells} | {r['steps']}/{r['budget']} | {value} | {r['status']} |")
    best = summary["best"]
    lines += ["", f"Best: {', '.join(f'{k}={_fmt(best[k])}' for k in keys)} ({metric} {best[metric]:.4f} at step {best['best_step']})."]
    if summary["rank_curve"]:
        curve = ", ".join(f"{rank}: {v:.4f}" for rank, v in summary["rank_curve"].items())
        lines.append(f"Rank curve (best {metric} per rank): {curve}; knee at rank {summary['knee']} "
                     f"(within {space.settings.knee_tolerance} of the best).")
    return "\n".join(lines)


def best_job_yaml(job: JobConfig, best: dict, keys: list[str], space: Space, output_dir: str) -> str:
    """The job as given (its own budget and evaluation), with the best trial's values: runnable as is."""
    values = {k: best[k] for k in keys}
    final = apply(job, {**values, "output_dir": storage.join(output_dir, "best")}, "best job")
    header = (f"# Best of {space.num_trials} trials of {space.path} "
              f"({space.settings.metric} {best[space.settings.metric]:.4f}): "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
              + f"\n#   raykit train {storage.join(output_dir, 'best_job.yaml')}\n")
    return header + yaml.safe_dump(final.to_dict(), sort_keys=False)


def write_plots(rows: list[dict], curve: dict, knee, metric: str, output_dir: str) -> list[str]:
    """rank_curve.png (when lora.rank was swept) and lr_curve.png (when train.lr was)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if not math.isnan(r[metric])]
    written = []
    for key, name, title in (("lora.rank", "rank_curve.png", f"{metric} against LoRA rank"),
                             ("train.lr", "lr_curve.png", f"{metric} against learning rate")):
        if not any(key in r for r in scored):
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        colored = None
        for done, label in ((True, "trained to the end"), (False, "stopped early")):
            pts = [r for r in scored if (r["status"] == "complete") == done]
            if pts:
                style = ({"c": [r["lora.rank"] for r in pts], "cmap": "viridis"}
                         if key == "train.lr" and all("lora.rank" in r for r in pts) else {"color": "tab:blue"})
                handle = ax.scatter([r[key] for r in pts], [r[metric] for r in pts], marker="o" if done else "x",
                                    label=label, zorder=3, **style)
                colored = handle if "c" in style else colored
        if colored is not None:
            fig.colorbar(colored, ax=ax, label="lora.rank")
        if key == "lora.rank" and curve:
            ax.plot(list(curve), list(curve.values()), "-", color="tab:gray", label="best per rank", zorder=2)
            ax.axvline(knee, color="tab:red", ls="--", label=f"knee: rank {knee}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(curve), [str(r) for r in curve])
        else:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (validation)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(storage.save_png(fig, storage.join(output_dir, name)))
    return written


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _json(obj) -> str:
    return json.dumps(obj, indent=2, default=str, allow_nan=True)
