"""The sections of the Ray Data stages: embedding, and the data-making ones a train job may run first
(synth: cold-start pairs; mine: hard negatives; teacher: scores for distillation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from raykit.config.checks import choice, not_negative, positive
from raykit.errors import ConfigError


@dataclass(frozen=True)
class EmbedConfig:
    dim: int = 0  # 0 = the model's full size; else keep the first `dim` (Matryoshka) and re-normalize
    dtype: str = "float32"  # float32 | float16 (half the storage; cosine scores differ by ~1e-3)
    batch_size: int = 256  # most documents per forward pass (batches are grouped by length)
    batch_tokens: int = 0  # most padded tokens per forward pass; 0 = 2048 on CPU (cache-sized), 65536 on GPU
    shard_mb: float = 2.0  # input bytes per output shard: the unit of parallelism, retry and resume
    concurrency: int = 0  # encoder actors; 0 = one per GPU (num_gpus > 0) or one per CPU core
    num_gpus: float = 0.0  # per encoder actor; 0 = encode on CPU
    cpus_per_actor: float = 1.0  # per encoder actor; also its torch threads on CPU
    # auto = bf16 where it is fast (GPUs with bf16, CPUs with AMX; raykit/precision.py), else fp32 |
    # bf16 | fp32. bf16 embeddings match fp32 to cosine > 0.9999; the manifest records what ran.
    precision: str = "auto"
    peak_tflops: float = 0.0  # one encoder actor's accelerator peak for MFU, as scaling.peak_tflops
    compile: bool = False  # encoder actors run the model through torch.compile, as scaling.compile

    def __post_init__(self):
        choice("embed.dtype", self.dtype, ("float32", "float16"))
        choice("embed.precision", self.precision, ("auto", "bf16", "fp32"))
        positive("embed.batch_size", self.batch_size)
        positive("embed.shard_mb", self.shard_mb)
        positive("embed.cpus_per_actor", self.cpus_per_actor)
        not_negative("embed", self, ("dim", "concurrency", "num_gpus", "batch_tokens", "peak_tflops"))


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
        positive("mine.top_k", self.top_k)
        positive("mine.num_negatives", self.num_negatives)
        choice("mine.sampling", self.sampling, ("random", "top"))
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
            positive(f"synth.{name}", getattr(self, name))
        not_negative("synth", self, ("max_docs", "temperature", "concurrency", "num_gpus", "filter_top_k"))
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
        choice("teacher.kind", self.kind, ("cross_encoder", "bi_encoder"))
        positive("teacher.max_seq_length", self.max_seq_length)
        positive("teacher.batch_size", self.batch_size)
        if self.output and not self.output.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"teacher.output: {self.output} must end in .jsonl or .parquet")
