"""Helpers the benchmarks share: run raykit as a user would, and score a model with sentence-transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
RESULTS = REPO / "bench" / "results"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def raykit_train(job: str, out: Path, *overrides: str, env: dict | None = None) -> dict:
    """`raykit train` in its own process (its own local Ray), as the README runs it; returns run.json."""
    cmd = [sys.executable, "-m", "raykit", "train", str(REPO / job), f"output_dir={out}", *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env or ENV, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"raykit train failed ({proc.returncode}); see {log}")
    return json.loads((out / "run.json").read_text())


def st_scores(model_dir: str, beir, dims=(384,), batch_size: int = 64) -> dict[int, dict[str, float]]:
    """Retrieval metrics of a model as sentence-transformers embeds it (independent of raykit's encoder)."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from raykit.evaluate import score_rankings

    st = SentenceTransformer(str(model_dir), device="cpu")
    started = time.time()
    docs = torch.tensor(st.encode(list(beir.corpus.values()), batch_size=batch_size))
    queries = torch.tensor(st.encode(list(beir.queries.values()), batch_size=batch_size))
    print(f"  encoded {len(docs)} docs in {time.time() - started:.0f}s", flush=True)
    ids = list(beir.corpus)
    out = {}
    for dim in dims:
        d, q = F.normalize(docs[:, :dim], dim=-1), F.normalize(queries[:, :dim], dim=-1)
        top = (q @ d.T).topk(100, dim=1).indices
        ranked = {qid: [ids[j] for j in top[i].tolist()] for i, qid in enumerate(beir.queries)}
        out[dim] = score_rankings(ranked, beir.qrels)
    return out


def cpu_name() -> str:
    """The processor, and whether it has AMX (where `precision=auto` means bf16): benchmarks print it,
    since machines of one kind differ."""
    import platform

    import torch

    from raykit.precision import bf16_is_fast

    model = platform.processor() or "unknown CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    amx = "with AMX: bf16 under precision=auto" if bf16_is_fast(torch.device("cpu")) else "no AMX: fp32 under precision=auto"
    return f"{model}, {os.cpu_count()} cores, {amx}"


def save(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(f"\nwrote bench/results/{name}.json and .md")
