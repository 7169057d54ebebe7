"""Typed job configuration: frozen dataclasses, their defaults and their checks.

Every default lives in this package and nowhere else (raykit/jobfile.py turns YAML and overrides into
these): the jobs here (`JobConfig` for train, mine, score, synth and tune; `EmbedJob`; a sweep's
`SweepConfig`), their sections in sections.py (what is trained and how) and stages.py (the Ray Data
stages), the shared checks in checks.py. The loaded `JobConfig` is one picklable object that the
driver hands to every Ray Train worker. Validation happens at load time so a bad job fails on the
laptop, not twenty minutes into a cluster run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raykit.config.checks import choice, duration, not_negative, plain, positive
from raykit.config.sections import (
    Columns,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    Prompts,
    RunConfig,
    ScalingConfig,
    TrainConfig,
)
from raykit.config.stages import EmbedConfig, MineConfig, SynthConfig, TeacherConfig
from raykit.errors import ConfigError

__all__ = ["JobConfig", "EmbedJob", "SweepConfig", "duration", "Prompts", "ModelConfig", "Columns", "DataConfig", "LossConfig",
           "LoraConfig", "DeepSpeedConfig", "TrainConfig", "EvalConfig", "ScalingConfig", "RunConfig", "EmbedConfig",
           "MineConfig", "SynthConfig", "TeacherConfig"]


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
        if self.scaling.compile and self.train.strategy == "full" and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "scaling.compile: ZeRO-3 gathers each layer's weights in hooks that break torch.compile's graph "
                "at every layer (it gives up and runs eager); use deepspeed.zero_stage=2 (or 0-1) with compile, "
                "or scaling.compile=false"
            )
        if self.synth.enabled and self.mine.enabled:
            raise ConfigError("synth.enabled with mine.enabled: mining reads labelled qrels, which a cold start has none of; "
                              "train on the synthetic pairs first (in-batch negatives), or set mine.enabled=false")
        if self.loss.distill and not (self.teacher.model or self.data.train):
            raise ConfigError(f"loss.name={self.loss.name}: needs teacher scores; set teacher.model or give data with scores")

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))


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
        return plain(dataclasses.asdict(self))


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
        positive("tune.num_samples", self.num_samples)
        choice("tune.searcher", self.searcher, ("random", "optuna"))
        choice("tune.scheduler", self.scheduler, ("asha", "none"))
        if self.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor: {self.reduction_factor} must be above 1 (e.g. 3)")
        not_negative("tune", self, ("max_concurrent_trials", "grace_period"), "0 (auto)")
