"""ASHA against training every configuration to the end, on SciFact; then the chosen one on the test split.

    python bench/sweep.py [--workdir DIR] [--rerun-defaults]

1. `raykit tune jobs/scifact_lora.yaml tune_spaces/lora_rank_alpha_lr.yaml` (12 trials, ASHA), and the
   same command with `tune.scheduler=none`: the same 12 configurations (same searcher seed), each
   trained to the end. Printed: the validation nDCG@10 the ASHA pick reaches when trained to the end,
   against the best of the 12, and the training steps ASHA spent as a share of the full runs'.
2. `raykit train best_job.yaml` (the job's own budget: 6 epochs, max length 256, all training queries)
   scored on SciFact test with sentence-transformers, against jobs/scifact_lora.yaml's own defaults
   (bench/results/scifact_quality.json, measured the same way; --rerun-defaults trains them again).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ENV, REPO, RESULTS, SCIFACT, raykit_train, save, st_scores

JOB, SPACE = "jobs/scifact_lora.yaml", "tune_spaces/lora_rank_alpha_lr.yaml"
METRIC = "val_ndcg@10"


def tune(out: Path, *extra: str) -> list[dict]:
    if not (out / "results.csv").exists():
        cmd = [sys.executable, "-m", "raykit", "tune", JOB, SPACE, f"output_dir={out}", *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        log = out.with_suffix(".log")
        started = time.time()
        with open(log, "w") as f:
            if subprocess.run(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"raykit tune failed; see {log}")
        print(f"  {time.time() - started:.0f}s", flush=True)
    rows = list(csv.DictReader((out / "results.csv").open()))
    return sorted(rows, key=lambda r: r["trial"].rsplit("_", 1)[-1])  # sampling order


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rerun-defaults", action="store_true", help="train jobs/scifact_lora.yaml again instead of reading its figure")
    parser.add_argument("--report", action="store_true", help="rewrite sweep.md from sweep.json; run nothing")
    args = parser.parse_args()
    if args.report:
        result = json.loads((RESULTS / "sweep.json").read_text())
        keys = [k for k in result["trials"][0] if not k.startswith(("asha_", "full_"))]
        save("sweep", result, report(result, keys))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raykit-sweep-"))

    asha = tune(work / "asha")
    full = tune(work / "full", "tune.scheduler=none")
    for plot in ("rank_curve.png", "lr_curve.png"):  # the curves with every trial trained to the end
        shutil.copy(work / "full" / plot, RESULTS / f"sweep_{plot}")
    keys = [k for k in asha[0] if k not in ("trial", "steps", "budget", METRIC, "best_step", "status", "error")]
    for a, f in zip(asha, full):
        assert [a[k] for k in keys] == [f[k] for k in keys], f"the two sweeps sampled different trials: {a} vs {f}"
    pick = max(range(len(asha)), key=lambda i: float(asha[i][METRIC]))
    best = max(range(len(full)), key=lambda i: float(full[i][METRIC]))
    steps_asha, steps_full = sum(int(r["steps"]) for r in asha), sum(int(r["steps"]) for r in full)
    result = {
        "trials": [{**{k: f[k] for k in keys}, "asha_steps": int(a["steps"]), "asha_" + METRIC: float(a[METRIC]),
                    "full_steps": int(f["steps"]), "full_" + METRIC: float(f[METRIC])} for a, f in zip(asha, full)],
        "pick": {k: asha[pick][k] for k in keys}, "pick_full_val": float(full[pick][METRIC]),
        "best": {k: full[best][k] for k in keys}, "best_full_val": float(full[best][METRIC]),
        "steps_asha": steps_asha, "steps_full": steps_full,
    }

    # The pick with the job's own budget, scored on the test split like every other SciFact figure.
    summary = raykit_train(str(work / "asha" / "best_job.yaml"), work / "best_model", "eval.data=")
    result["pick_test"] = st_scores(str(work / "best_model" / "model"), load_scifact(), (384,))[384]["ndcg@10"]
    result["pick_train_s"] = summary["seconds"]
    if args.rerun_defaults:
        raykit_train(JOB, work / "defaults", "eval.data=")
        result["defaults_test"] = st_scores(str(work / "defaults" / "model"), load_scifact(), (384,))[384]["ndcg@10"]
        result["defaults_source"] = "trained in this run"
    else:
        recorded = json.loads((RESULTS / "scifact_quality.json").read_text())["rows"]
        row = next(v for k, v in recorded.items() if "jobs/scifact_lora.yaml" in k)
        result["defaults_test"] = row["scores"]["384"]["ndcg@10"]
        result["defaults_source"] = "bench/results/scifact_quality.json"
    save("sweep", result, report(result, keys))
    print(report(result, keys))


def load_scifact():
    from raykit.data import load_beir

    return load_beir(str(SCIFACT), "test")


def fmt(value) -> str:
    from raykit.tune.report import _fmt

    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return _fmt(int(number) if number.is_integer() else number)


def report(r: dict, keys: list[str]) -> str:
    lines = ["# Sweep: ASHA vs every configuration trained to the end (SciFact, `python bench/sweep.py`)", "",
             f"`raykit tune {JOB} {SPACE}`: 12 trials, validation = 100 training queries held out, 2 CPU cores.", "",
             "| " + " | ".join(keys) + f" | ASHA steps | ASHA {METRIC} | full steps | full {METRIC} |",
             "|" + "---:|" * (len(keys) + 4)]
    for t in r["trials"]:
        lines.append("| " + " | ".join(fmt(t[k]) for k in keys)
                     + f" | {t['asha_steps']} | {t['asha_' + METRIC]:.4f} | {t['full_steps']} | {t['full_' + METRIC]:.4f} |")
    gap = r["best_full_val"] - r["pick_full_val"]
    lines += [
        "",
        f"- ASHA's pick ({', '.join(f'{k}={fmt(v)}' for k, v in r['pick'].items())}) reaches {METRIC} "
        f"**{r['pick_full_val']:.4f}** trained to the end; the best of the 12 is **{r['best_full_val']:.4f}** "
        f"({', '.join(f'{k}={fmt(v)}' for k, v in r['best'].items())}): {gap:.4f} apart.",
        f"- ASHA ran **{r['steps_asha']}** training steps, the 12 full runs **{r['steps_full']}**: "
        f"**{100 * r['steps_asha'] / r['steps_full']:.0f}%**.",
        f"- The pick, trained with {JOB}'s budget (best_job.yaml): SciFact test nDCG@10 **{r['pick_test']:.4f}** "
        f"vs the job's own defaults **{r['defaults_test']:.4f}** ({r['defaults_source']}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
