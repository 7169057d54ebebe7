"""GPU check of raykit's per-worker code, without Ray (Ray's wheel does not travel to a lent GPU
machine): one short run that prints the issue's GPU figures and writes them to OUT/gpu_check.json.

    python bench/gpu_check.py --model DIR --data SCIFACT_DIR --out DIR

1. Training, bf16, as a Ray Train worker with 8 cores runs it (raykit.train.feed.Ahead reading ahead
   on 7 threads, feeding raykit.train.loop.training_step), after a warm-up run: LoRA, and full
   fine-tuning under DeepSpeed ZeRO-2 and ZeRO-3, at batch 32; LoRA and ZeRO-2 at batch 256 (more
   in-batch negatives), LoRA also with one read-ahead thread; ZeRO-2 at batch 512 with gradient
   caching (loss.mini_batch_size=128). Pairs/s, MFU (raykit/flops.py, as the progress line
   counts them), peak GPU memory, where a step's time goes (the loop waiting for its input, the
   host in training_step, the rest the GPU finishing what the host queued) and the host's waits on
   the GPU per step, with the lines that made them (syncs_counted) each; at batch 32 the exported
   model, reloaded, must embed like the trained one.
2. Embedding: the encoder actor of `raykit embed` (raykit.embed.stages.EncodeShards) on shards of
   already-tokenized SciFact documents, as its tokenizer actors hand them over: docs/s and MFU per GPU,
   fp32 and bf16, at a few batch sizes, and with the weights themselves in bf16. Beside it, on the
   same GPU: Encoder.encode (tokenizing in its own thread) and plain sentence-transformers encode
   with its defaults; and what one tokenizer core does, so the tokenizer actors a GPU needs.
3. (--scan-seconds N) a learning-rate x epochs scan on SciFact to choose the jobs' defaults.

--parts picks among train, embed (the default: both), feed (LoRA and ZeRO-2 at batch 256, read ahead
on 7 threads and on one, tokenizing through transformers' call and through the tokenizer's backend
alone, raykit/tokens.py), big (LoRA and ZeRO-2 at batch 512 and 1,024 without gradient caching),
compile (LoRA and ZeRO-2 at batch 256 and the encoder actor in bf16, eager and through torch.compile,
scaling.compile / embed.compile), sdpa (training and an encoder actor's first
pass with cuDNN's attention off and on, raykit/device.py) and profile (torch.profiler tables of a LoRA
and a ZeRO-2 step). bench/gpu_pack.sh packs what it needs for a lent machine (the model's weights in
fp16 to fit the carry limit, back to fp32 there; SciFact; the wheels the machine lacks) and says how
to run it there; bench/README.md has the figures.

Each part is timed after a warm-up and guarded: a failure is recorded and the next part runs.
Without a GPU it runs as a dry run on the CPU (small sizes: --dry-run), to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer actor = one core, as in the pipeline

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raykit import tokens
from raykit.config import DataConfig
from raykit.data import load_beir, load_training_set
from raykit.device import configure
from raykit.embed.stages import EncodeShards, packed
from raykit.encoder import Encoder
from raykit.evaluate import evaluate
from raykit.flops import ModelFlops, mfu, peak_flops
from raykit.jobfile import load_job
from raykit.strategies import build_trainee
from raykit.train.feed import Ahead, feed_threads
from raykit.train.loop import training_step

WARMUP_STEPS = 5  # left out of pairs/s and MFU: allocator and kernel warm-up
CORPUS_REPEATS = 8  # SciFact's 5,183 documents take a GPU a fraction of a second: embed them 8 times over
CPUS_PER_GPU = 8  # scaling.cpus_per_worker of the jobs here, as on a GPU node with 8 cores per GPU


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclasses.dataclass
class Trained:
    """What train() measured. MFU as raykit's progress line counts it (raykit/flops.py; None where the
    device's peak is unknown). Past the warm-up, each step's time splits into the loop's wait for its
    input (feed_wait_s), the host's time in training_step (host_s: launching the step's work, and
    waiting wherever it syncs) and the rest, the device finishing what the host queued."""

    trainee: object
    loss: float
    step_s: float
    pairs_per_s: float
    mfu: float | None
    warmup_s: float  # the first WARMUP_STEPS steps: with scaling.compile, the compiler's time
    sync_sites: dict[str, int]  # on a GPU, where two warm-up steps made the host wait ({file:line: count})
    feed_wait_s: float  # per timed step
    host_s: float  # per timed step


def train(job, table, device, bf16, threads=None, backend=True) -> Trained:
    """Train `job` in this process, reading ahead on `threads` (default: as a Ray Train worker with the
    job's scaling.cpus_per_worker does), tokenizing through the tokenizer's backend alone (raykit/tokens.py;
    `backend=False`: through transformers' tokenizer call, as before it)."""
    steps_per_epoch = table.num_rows // job.train.batch_size
    total = job.train.max_steps
    torch.manual_seed(job.train.seed)
    encoder = Encoder.load(job.model)
    model_flops = ModelFlops(encoder.model, encoder.model.config)
    trainee = build_trainee(encoder, job, total, device, bf16)
    rng = np.random.default_rng(job.train.seed)
    steps = [rows for _ in range(-(-total // steps_per_epoch)) for rows in
             rng.permutation(table.num_rows)[:steps_per_epoch * job.train.batch_size].reshape(steps_per_epoch, -1)][:total]
    step, started, timed_lengths = 0, time.perf_counter(), []
    warmup_s, waited, hosted = 0.0, 0.0, 0.0
    # as the training loop reads its input: taken, tokenized and pinned ahead on a thread (raykit/train/feed.py)
    threads = threads or feed_threads(job.scaling.cpus_per_worker, device)
    tokenizing = trainee.encoder.tokenizing()
    tokenizing = tokenizing if backend else dataclasses.replace(tokenizing, backend=None)
    sites: dict[str, int] = {}
    with Ahead(tokenizing, table, steps, job.loss.mini_batch_size, device, threads) as ahead:
        batches = iter(ahead)
        while True:
            asked = time.perf_counter()
            prepared = next(batches, None)
            if prepared is None:
                break
            got = time.perf_counter()
            with syncs_counted(sites, on=device.type == "cuda" and WARMUP_STEPS - 2 <= step < WARMUP_STEPS):
                loss, _, lengths = training_step(trainee, prepared, job, device)
            step += 1
            if step == WARMUP_STEPS:
                sync()
                warmup_s = time.perf_counter() - started
                started = time.perf_counter()
            elif step > WARMUP_STEPS:
                timed_lengths.append(lengths)  # counted after the clock stops: the bench's own work is not the step's
                waited, hosted = waited + got - asked, hosted + time.perf_counter() - got
    sync()
    seconds = time.perf_counter() - started
    timed = max(total - WARMUP_STEPS, 1)
    flops = sum(model_flops.training(lengths, frozen_base=job.train.strategy == "lora") for lengths in timed_lengths)
    used = mfu(flops, seconds, peak_flops(device, bf16, job.scaling.peak_tflops))
    return Trained(trainee, float(loss.detach()), seconds / timed, timed * job.train.batch_size / seconds, used, warmup_s, sites,
                   waited / timed, hosted / timed)


@contextlib.contextmanager
def syncs_counted(sites: dict[str, int], on: bool):
    """Count, into `sites` by the Python line that made them, the operations in this block that make
    the host wait for the GPU (torch.cuda.set_sync_debug_mode). A training step with none lets the
    host queue the next step's kernels while the GPU runs this one's; raykit's own code has none
    (raykit/train/loop.py training_step), DeepSpeed's and transformers' may."""
    if not on:
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{os.path.relpath(w.filename)}:{w.lineno}"
            sites[site] = sites.get(site, 0) + 1


def actor_shard(encoded: list[list[int]]) -> tuple[dict, np.ndarray]:
    """One shard of token ids as a tokenizer actor hands it to EncodeShards (raykit/embed/stages.py),
    and its texts' lengths."""
    shard = {"shard": ["{}"], "ids": ["[]"], "content": [""], **{k: [v] for k, v in packed(encoded).items()}}
    return shard, np.frombuffer(shard["lengths"][0], dtype=np.int64)


def guarded(report, section, name, fn):
    """Run one measurement; a failure is recorded under its name and the run goes on."""
    try:
        row = {"name": name, **fn()}
    except Exception as e:  # noqa: BLE001 - one broken part must not cost the others' device time
        row = {"name": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    report[section].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scan-seconds", type=float, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--dry-run", action="store_true", help="small sizes, to check the script on a CPU")
    p.add_argument("--parts", default="train,embed", help="which of train, embed, feed, big, compile, sdpa, profile to run")
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = configure(torch.device("cuda", 0) if cuda else torch.device("cpu"))  # as a training worker sets itself up
    peak_mib = (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else (lambda: 0.0)
    reset_peak = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    import transformers

    report = {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
              "peak_bf16_tflops": (peak_flops(device, True) or 0) / 1e12, "train": [], "embed": [], "scan": []}
    out_path = os.path.join(args.out, "gpu_check.json")

    def dump():
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)

    dump()
    dry = args.dry_run or not cuda
    big, cached, mini = (16, 32, 8) if dry else (256, 512, 128)
    base = [f"model.name={args.model}", f"data.train={args.data}", f"model.max_seq_length={args.max_len}",
            f"scaling.cpus_per_worker={CPUS_PER_GPU}"]
    table = load_training_set(DataConfig(train=args.data), seed=42)
    test = load_beir(args.data, "test")
    probe = list(test.corpus.values())[:64]
    precision = f"train.precision={'bf16' if cuda else 'fp32'}"

    # 1. training
    def run_train(extra, batch, steps, export, threads=None, backend=True):
        def fn():
            job = load_job(None, base + extra + [f"train.batch_size={batch}", f"train.max_steps={steps}", precision])
            reset_peak()
            run = train(job, table, device, bf16=cuda, threads=threads, backend=backend)
            trainee, loss = run.trainee, run.loss
            row = {"batch": batch, "feed_threads": threads or feed_threads(job.scaling.cpus_per_worker, device),
                   "tokenizer": "backend" if backend else "transformers", "loss": loss,
                   "ms_per_step": 1000 * run.step_s, "pairs_per_s": run.pairs_per_s, "mfu": run.mfu, "peak_mib": peak_mib(),
                   "feed_wait_ms_per_step": 1000 * run.feed_wait_s, "host_ms_per_step": 1000 * run.host_s,
                   "warmup_s": run.warmup_s, "host_syncs_per_step": sum(run.sync_sites.values()) / 2, "host_sync_sites": run.sync_sites}
            if export:
                trainee.encoder.eval()  # dropout off, as evaluation runs it
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    trained = trainee.encoder.encode(probe, 32, device, trainee.module, role="document")
                with tempfile.TemporaryDirectory() as tmp:
                    trainee.export(os.path.join(tmp, "model"), rank=0)
                    reloaded = Encoder.load(dataclasses.replace(job.model, name=os.path.join(tmp, "model"))).to(device)
                    again = reloaded.encode(probe, 32, device, role="document")
                    saved = safetensors.torch.load_file(os.path.join(tmp, "model", "model.safetensors"))
                row.update(export_min_cosine=F.cosine_similarity(trained, again).min().item(),
                           saved_dtype=str(next(iter(saved.values())).dtype))
            row["ok"] = bool(np.isfinite(loss) and row.get("export_min_cosine", 1.0) > 0.99)
            del trainee
            if cuda:
                torch.cuda.empty_cache()
            return row
        return fn

    lora, zero2, zero3 = (["train.strategy=lora", "train.lr=2e-4"], ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=3e-5"],
                          ["train.strategy=full", "deepspeed.zero_stage=3", "train.lr=3e-5"])
    # the first run in a process pays CUDA's lazy kernel loading and the allocator's growth: a warm-up run
    runs = [("warm-up (lora b32)", lora, 32, 10, False, None),
            ("lora b32", lora, 32, args.steps, True, None), ("zero2 b32", zero2, 32, args.steps, True, None),
            ("zero3 b32", zero3, 32, args.steps, True, None), (f"lora b{big}", lora, big, 15, False, None),
            (f"lora b{big}, one feed thread", lora, big, 15, False, 1), (f"zero2 b{big}", zero2, big, 15, False, None),
            (f"zero2 b{cached} gradcache {mini}", zero2 + [f"loss.mini_batch_size={mini}"], cached, 10, False, None)]
    for name, extra, batch, steps, export, threads in runs if "train" in args.parts else ():
        guarded(report, "train", name, run_train(extra, batch, 6 if dry else steps, export, threads))
        dump()
    if "big" in args.parts:
        # whole batches past 256, no gradient caching: per-step launch and host costs are fixed, so a
        # bigger batch spreads them over more pairs (run 5: 4.5% MFU at 256; the aim is 10%)
        larger = (8, 16) if dry else (512, 1024)
        warm = [("warm-up (lora b32)", lora, 32, 10)] if "train" not in args.parts else []
        for name, extra, batch, steps in warm + [(f"{n} b{b}", e, b, 12) for b in larger for n, e in (("lora", lora), ("zero2", zero2))]:
            guarded(report, "train", name, run_train(extra, batch, 6 if dry else steps, False))
            dump()

    if "feed" in args.parts:
        # the read-ahead threads tokenizing through transformers' call (holding the GIL the loop's thread
        # launches kernels with) against the tokenizer's backend alone, on 7 threads and on one
        warm = [("warm-up (lora b32)", lora, 32, 10)] if not ({"train", "big"} & set(args.parts.split(","))) else []
        for name, extra, batch, steps in warm:
            guarded(report, "train", name, run_train(extra, batch, 6 if dry else steps, False))
        for name, extra in (("lora", lora), ("zero2", zero2)):
            for threads in (None, 1):
                for backend in (False, True):
                    label = f"{name} b{big}{', one feed thread' if threads else ''}, {'backend' if backend else 'transformers call'}"
                    guarded(report, "train", label, run_train(extra, big, 6 if dry else 15, False, threads, backend))
                    dump()

    if "compile" in args.parts:
        # torch.compile (scaling.compile): eager and compiled in this run, at batch 256 and with gradient
        # caching at 512; each row's warmup_s holds the compiler's time
        on = ["scaling.compile=true"]
        warm = [("warm-up (lora b32)", lora, 32, 10)] if not ({"train", "big", "feed"} & set(args.parts.split(","))) else []
        for name, extra, batch, steps in warm + [
                (f"lora b{big}", lora, big, 15), (f"lora b{big} compiled", lora + on, big, 15),
                (f"zero2 b{big}", zero2, big, 15), (f"zero2 b{big} compiled", zero2 + on, big, 15),
                (f"zero2 b{cached} gradcache {mini} compiled", zero2 + on + [f"loss.mini_batch_size={mini}"], cached, 10)]:
            guarded(report, "train", name, run_train(extra, batch, 6 if dry else steps, False))
            dump()

    if "sdpa" in args.parts:  # cuDNN's attention builds a plan per new shape: training and embedding with and without it
        for cudnn in (False, True):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            for name, extra in (("lora", lora), ("zero2", zero2)):
                seed = 11 + 2 * cudnn + (name == "zero2")  # batches (so shapes) no earlier run had
                guarded(report, "train", f"{name} b32 cudnn_sdp={cudnn}",
                        run_train(extra + [f"train.seed={seed}"], 32, 30, False))
        dump()
    if "profile" in args.parts:  # where a LoRA and a ZeRO-2 step at batch 32 spend their time
        for name, extra in (("lora", lora), ("zero2", zero2)):
            job = load_job(None, base + extra + ["train.batch_size=32", "train.max_steps=16", precision])
            profile(job, table, device, cuda)
    if not {"embed", "sdpa", "compile"} & set(args.parts.split(",")):
        return finish(report, {}, args, base, table, test, device, dump)
    # 2. embedding: the model as `raykit embed` loads it (its driver and its encoder actors alike)
    encoder = Encoder.from_pretrained(args.model, args.max_len).eval()
    docs = list(test.corpus.values())[:100 if dry else None]
    tokenize = tokens.backend(encoder.tokenizer, encoder.max_seq_length, padding=False).ids

    def tokenizer_core():
        tokenize(docs[:256])
        t = time.perf_counter()
        encoded = tokenize(docs)
        return {"docs_per_s": len(docs) / (time.perf_counter() - t), "mean_tokens": float(np.mean([len(e) for e in encoded]))}

    tok = guarded(report, "embed", "tokenizer, one core (tokenizers backend, as TokenizeShards)", tokenizer_core)
    shard, lengths = actor_shard(tokenize(docs))
    fingerprint = encoder.fingerprint()
    repeats = 1 if dry else CORPUS_REPEATS

    def actor(precision, batch_size=256, batch_tokens=0, bf16_weights=False, compile=False):
        def fn():
            a = EncodeShards(model=args.model, max_seq_length=args.max_len, prompts={}, revision="", trust_remote_code=False,
                             fingerprint=fingerprint, dim=encoder.dim, dtype="float32", batch_size=batch_size,
                             batch_tokens=batch_tokens, precision=precision, threads=os.cpu_count() or 1, compile=compile)
            if bf16_weights:  # the weights themselves in bf16: no casts under autocast, half the activations' bytes
                a.encoder.to(torch.bfloat16)
            first = a(shard)  # warm-up: kernels, allocator, the compiler
            busy = flops = 0.0
            for _ in range(repeats):
                out = a(shard)
                busy, flops = busy + out["busy_s"][0], flops + out["flops"][0]
            got = np.frombuffer(out["embedding"][0], dtype=np.float32).reshape(len(lengths), -1)
            ref = encoder.to(device).encode(docs[:64], 64, device, role="document").numpy()
            encoder.to("cpu")
            return {"docs_per_s": repeats * len(lengths) / busy, "mfu": flops / busy / a.peak if a.peak else None,
                    "first_call_s": first["busy_s"][0], "ran_in": first["ran_in"][0], "batch_tokens": a.batch_tokens, "batch_size": batch_size,
                    "min_cosine_vs_fp32_encode": float((got[:64] * ref).sum(1).min())}
        return fn

    def cold(cudnn):
        def fn():
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            a = EncodeShards(model=args.model, max_seq_length=args.max_len, prompts={}, revision="", trust_remote_code=False,
                             fingerprint=fingerprint, dim=encoder.dim, dtype="float32", batch_size=256,
                             batch_tokens=0, precision="bf16", threads=1)
            first = a(shard)
            second = a(shard)
            return {"first_call_docs_per_s": len(lengths) / first["busy_s"][0], "docs_per_s": len(lengths) / second["busy_s"][0]}
        return fn

    if "sdpa" in args.parts:
        for cudnn in (False, True):
            guarded(report, "embed", f"encoder actor bf16 cudnn_sdp={cudnn}, first call", cold(cudnn))
        dump()
        return finish(report, {}, args, base, table, test, device, dump)
    actors = (("encoder actor fp32", actor("fp32")), ("encoder actor bf16", actor("bf16")),
              ("encoder actor bf16 b1024 t131072", actor("bf16", 1024, 131072)),
              ("encoder actor bf16 weights b1024 t131072", actor("bf16", 1024, 131072, bf16_weights=True)))
    compiled = (("encoder actor bf16", actor("bf16")), ("encoder actor bf16 compiled", actor("bf16", compile=True)),
                ("encoder actor bf16 compiled b1024 t131072", actor("bf16", 1024, 131072, compile=True)))
    for name, fn in (actors if "embed" in args.parts else ()) + (compiled if "compile" in args.parts else ()):
        guarded(report, "embed", name, fn)
        dump()
    if "embed" not in args.parts:
        return finish(report, tok, args, base, table, test, device, dump)

    def encoder_encode():
        model = encoder.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            model.encode(docs[:512], 256, device, role="document")
            sync()
            t = time.perf_counter()
            model.encode(docs, 256, device, role="document")
            sync()
        encoder.to("cpu")
        return {"docs_per_s": len(docs) / (time.perf_counter() - t)}

    guarded(report, "embed", "Encoder.encode bf16 (tokenizes in its own thread)", encoder_encode)

    def sentence_transformers(dtype, batch_size):
        def fn():
            from sentence_transformers import SentenceTransformer

            # its own defaults: the tokenizer on every core (this script turned that off for the rest)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            try:
                st = SentenceTransformer(args.model, device=str(device)).to(dtype)
                st.encode(docs[:512], batch_size=batch_size)
                sync()
                t = time.perf_counter()
                st.encode(docs, batch_size=batch_size)
                sync()
            finally:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            return {"docs_per_s": len(docs) / (time.perf_counter() - t)}
        return fn

    guarded(report, "embed", "sentence-transformers encode, defaults (fp32, batch 32)", sentence_transformers(torch.float32, 32))
    guarded(report, "embed", "sentence-transformers encode, bf16 batch 256", sentence_transformers(torch.bfloat16, 256))
    dump()

    finish(report, tok, args, base, table, test, device, dump)


def finish(report, tok, args, base, table, test, device, dump):
    # 3. lr x epochs scan (fp32, like the CPU jobs); base first
    if args.scan_seconds:
        scan(report, args, base, table, test, Encoder.from_pretrained(args.model, args.max_len).to(device), device, dump)
    print(summary(report, tok), flush=True)
    dist.destroy_process_group()


def profile(job, table, device, cuda):
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    encoder = Encoder.load(job.model)
    trainee = build_trainee(encoder, job, job.train.max_steps, device, cuda)
    rng = np.random.default_rng(0)
    steps = [rng.permutation(table.num_rows)[:32] for _ in range(job.train.max_steps)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with Ahead(trainee.encoder.tokenizing(), table, steps, 0, device, feed_threads(job.scaling.cpus_per_worker, device)) as ahead, \
            torch_profile(activities=activities, schedule=schedule(wait=6, warmup=2, active=6)) as prof:
        for prepared in ahead:
            training_step(trainee, prepared, job, device)
            prof.step()
    sync()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"== profile {job.train.strategy} b32, 6 steps, by self CPU time\n"
          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48), flush=True)
    try:
        by_device = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=48)
    except (AttributeError, KeyError, ValueError):  # the key's older name
        by_device = prof.key_averages().table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48)
    print(f"== profile {job.train.strategy} b32, by {sort}\n" + by_device, flush=True)
    del trainee


def summary(report, tok) -> str:
    lines = [f"== {report['device']} | torch {report['torch']} | transformers {report['transformers']} | {report['cpu_count']} CPUs"]
    for row in report["train"]:
        lines.append(f"train {row['name']:<48} " + (f"ERROR {row['error']}" if "error" in row else
                     f"{row['pairs_per_s']:8.0f} pairs/s  MFU {100 * (row['mfu'] or 0):5.1f}%  {row['ms_per_step']:7.1f} ms/step  "
                     f"peak {row['peak_mib']:7.0f} MiB  feed wait {row.get('feed_wait_ms_per_step', 0):6.1f} ms  "
                     f"host {row.get('host_ms_per_step', 0):6.1f} ms  host syncs/step {row.get('host_syncs_per_step', 0):4.1f}  "
                     f"{'ok' if row['ok'] else 'NOT OK'}"))
    for row in report["embed"]:
        mfu_s = f"  MFU {100 * row['mfu']:5.1f}%" if row.get("mfu") else ""
        mfu_s += f"  first call {row['first_call_docs_per_s']:.0f} docs/s" if "first_call_docs_per_s" in row else ""
        lines.append(f"embed {row['name']:<60} " + (f"ERROR {row['error']}" if "error" in row else f"{row['docs_per_s']:8.0f} docs/s{mfu_s}"))
    best = max((r["docs_per_s"] for r in report["embed"] if r["name"].startswith("encoder actor") and "docs_per_s" in r), default=0)
    if best and "docs_per_s" in tok:
        lines.append(f"tokenizer cores per GPU encoder at {best:.0f} docs/s: {best / tok['docs_per_s']:.1f}")
    return "\n".join(lines)


def scan(report, args, base, table, test, encoder, device, dump):
    full = encoder.dim
    dims = (64, full) if full > 64 else (full,)
    report["scan"].append({"config": "base", "ndcg@10": {d: m["ndcg@10"] for d, m in evaluate(encoder, test, dims, 256, device).items()}})
    print(report["scan"][-1], flush=True)
    started = time.time()
    grid = [("lora", lr, ep, []) for lr in (2e-4, 5e-4, 1e-3) for ep in (3, 6)]
    grid += [("full", lr, ep, ["deepspeed.zero_stage=2"]) for lr in (3e-5, 6e-5, 1e-4) for ep in (3, 6)]
    for strategy, lr, epochs, extra in grid:
        if time.time() - started > args.scan_seconds:
            break
        steps = table.num_rows // 32 * epochs
        job = load_job(None, base + [f"train.strategy={strategy}", f"train.lr={lr}", f"train.max_steps={steps}", "train.batch_size=32",
                                     "train.precision=fp32", "lora.target_modules=[query,key,value,dense]", *extra])
        run = train(job, table, device, bf16=False)
        trainee = run.trainee
        res = evaluate(trainee.encoder, test, dims, 256, device, trainee.module)
        report["scan"].append({"config": f"{strategy} lr={lr:g} epochs={epochs} {' '.join(extra)}".strip(),
                               "ndcg@10": {d: m["ndcg@10"] for d, m in res.items()}, "ms_per_step": 1000 * run.step_s})
        print(report["scan"][-1], flush=True)
        del trainee
        torch.cuda.empty_cache()
        dump()


if __name__ == "__main__":
    main()
