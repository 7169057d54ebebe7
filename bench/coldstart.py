"""Cold start on SciFact: jobs/scifact_coldstart.yaml as shipped, against the base model.

    python bench/coldstart.py            # make bench-coldstart

The job makes its pairs from SciFact's 5,183 abstracts alone (never its queries or qrels), keeps those
the base model retrieves in its top 3, trains LoRA on them, and scores SciFact test and Cranfield
(out of domain) before and after in the same run. Prints the pairs' count, the round trip's keep
rate and nDCG@10 at every dim; writes bench/results/coldstart.{json,md}.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, raykit_train, save  # noqa: E402

JOB = "jobs/scifact_coldstart.yaml"


def main() -> None:
    print(f"CPU: {cpu_name()}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="raykit-coldstart-")) / "run"
    summary = raykit_train(JOB, out, *sys.argv[1:])
    stats = json.loads((out / "synth" / "pairs.jsonl.stats.json").read_text())
    evaluation = summary["eval"]
    dims = sorted(evaluation["before"], key=int)
    rows = [("base model", {d: evaluation["before"][d]["ndcg@10"] for d in dims}, evaluation["ood_before"][dims[-1]]["ndcg@10"]),
            (f"{JOB} (model-free)", {d: evaluation["after"][d]["ndcg@10"] for d in dims}, evaluation["ood_after"][dims[-1]]["ndcg@10"])]
    lines = [f"| run | {' | '.join(f'SciFact @{d}' for d in dims)} | Cranfield @{dims[-1]} |",
             "|---|" + "---:|" * (len(dims) + 1)]
    lines += [f"| {name} | {' | '.join(f'{v[d]:.4f}' for d in dims)} | {ood:.4f} |" for name, v, ood in rows]
    change = rows[1][1][dims[-1]] - rows[0][1][dims[-1]]
    lines += ["", f"- pairs: {stats['kept']} from {stats['documents']} documents ({stats['made']} made, {stats['unique']} after "
              f"de-duplication; the round trip kept {100 * stats['keep_rate']:.0f}%)",
              f"- SciFact test nDCG@10 at {dims[-1]} dims: {change:+.4f} against the base model; Cranfield {rows[1][2] - rows[0][2]:+.4f}",
              f"- {summary['steps']} steps, {summary['seconds']:.0f} s on {cpu_name()}"]
    table = "\n".join(lines)
    print("\n" + table)
    save("coldstart", {"cpu": cpu_name(), "job": JOB, "overrides": sys.argv[1:], "synth": stats, "eval": evaluation,
                       "steps": summary["steps"], "seconds": summary["seconds"]}, table)


if __name__ == "__main__":
    main()
