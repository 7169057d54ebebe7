"""The run report: before/after tables, the guards' flags, and the plots beside them.

Two failure modes show only when you look for them, so every run looks:
- the truncation cliff: a served dim whose nDCG@10 falls more than `eval.cliff` (a fraction) below
  the next larger dim's, i.e. the early dimensions are not an embedding on their own;
- forgetting: out-of-domain nDCG@10 (e.g. Cranfield next to SciFact) falling more than
  `eval.max_ood_drop` below the base model's, while the in-domain figure climbs.
"""

from __future__ import annotations

import os

from raykit import storage
from raykit.config import EvalConfig
from raykit.evaluate import format_table

METRIC = "ndcg@10"


def by_dim(results: dict | None) -> dict[int, dict[str, float]]:
    """eval.json's results keyed by int dims (JSON keys are strings)."""
    return {int(k): v for k, v in (results or {}).items()}


def flags(evaluation: dict, cfg: EvalConfig) -> list[str]:
    """One line per problem found; [] when the run looks healthy."""
    found = []
    after = by_dim(evaluation.get("after"))
    dims = sorted(after)
    for small, large in zip(dims, dims[1:]):
        a, b = after[small][METRIC], after[large][METRIC]
        if b > 0 and a < (1 - cfg.cliff) * b:
            found.append(
                f"truncation cliff: nDCG@10 at {small} dims is {a:.4f}, {100 * (1 - a / b):.0f}% below {large} dims "
                f"({b:.4f}; eval.cliff {cfg.cliff:.0%}); train with loss.matryoshka_dims including {small}"
            )
    ood_before, ood_after = by_dim(evaluation.get("ood_before")), by_dim(evaluation.get("ood_after"))
    if ood_before and ood_after:
        full = max(ood_after)
        drop = ood_before[full][METRIC] - ood_after[full][METRIC]
        if drop > cfg.max_ood_drop:
            found.append(
                f"forgetting: out-of-domain nDCG@10 fell {drop:.4f} ({ood_before[full][METRIC]:.4f} -> "
                f"{ood_after[full][METRIC]:.4f}; eval.max_ood_drop {cfg.max_ood_drop}); lower train.lr, "
                "use LoRA, or set train.l2sp"
            )
    return found


def text(evaluation: dict, cfg: EvalConfig) -> list[str]:
    """The run's report, one block per log record: the before/after tables, then the guards' flags."""
    parts = []
    if evaluation.get("after"):
        parts.append(f"{cfg.data} ({cfg.split})\n"
                     + format_table(by_dim(evaluation.get("before")), by_dim(evaluation["after"])))
    if evaluation.get("ood_after"):
        parts.append(f"out of domain: {cfg.ood_data} ({cfg.ood_split})\n"
                     + format_table(by_dim(evaluation.get("ood_before")), by_dim(evaluation["ood_after"])))
    for line in evaluation.get("flags", []):
        parts.append(f"FLAG {line}")
    return parts


def write_plots(evaluation: dict, cfg: EvalConfig, output_dir: str) -> list[str]:
    """ndcg_by_dim.png (every served dim) and, with an out-of-domain set, forgetting.png."""
    if not evaluation.get("after"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("before", "in domain, before", "--"), ("after", "in domain, after", "-"),
                              ("ood_before", "out of domain, before", "--"), ("ood_after", "out of domain, after", "-")):
        results = by_dim(evaluation.get(key))
        if results:
            dims = sorted(results)
            ax.plot(dims, [results[d][METRIC] for d in dims], style, marker="o", label=label,
                    color="tab:blue" if not key.startswith("ood") else "tab:orange")
    ax.set_xscale("log", base=2)
    dims = sorted(by_dim(evaluation["after"]))
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("embedding dims (Matryoshka prefix)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("nDCG@10 at every served dim")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(storage.save_png(fig, storage.join(output_dir, "ndcg_by_dim.png")))

    if evaluation.get("ood_after"):
        full = max(by_dim(evaluation["after"]))
        groups = [(f"in domain\n{os.path.basename(str(cfg.data).rstrip('/'))}", "before", "after"),
                  (f"out of domain\n{os.path.basename(str(cfg.ood_data).rstrip('/'))}", "ood_before", "ood_after")]
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, b, a) in enumerate(groups):
            for j, (key, name) in enumerate(((b, "before"), (a, "after"))):
                results = by_dim(evaluation.get(key))
                if results:
                    value = results[max(results)][METRIC]
                    ax.bar(i + (j - 0.5) * 0.38, value, width=0.36, color=("tab:gray", "tab:green")[j],
                           label=name if i == 0 else None)
                    ax.text(i + (j - 0.5) * 0.38, value, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(groups)), [g[0] for g in groups])
        ax.set_ylabel(f"nDCG@10 at {full} dims")
        ax.set_title("forgetting check: before vs after fine-tuning")
        ax.legend()
        fig.tight_layout()
        written.append(storage.save_png(fig, storage.join(output_dir, "forgetting.png")))
    return written


def write_loss_curve(history: list[dict], output_dir: str) -> str | None:
    """loss_curve.png: the training loss at every report, the learning rate beside it, and the
    validation nDCG@10 where the run measured one."""
    points = [m for m in history if "loss" in m]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in points]
    ax.plot(steps, [m["loss"] for m in points], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [m["lr"] for m in points], color="tab:gray", linestyle=":", label="learning rate")
    lr.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    val = [m for m in history if "val_ndcg@10" in m]
    if val:
        score = ax.twinx()
        score.spines["right"].set_position(("axes", 1.15))
        score.plot([m["step"] for m in val], [m["val_ndcg@10"] for m in val], "o-", color="tab:green", label="val nDCG@10")
        score.set_ylabel("validation nDCG@10")
        handles += score.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right")
    ax.set_title("training loss")
    fig.tight_layout()
    return storage.save_png(fig, storage.join(output_dir, "loss_curve.png"))
