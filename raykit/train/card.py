"""The model card: README.md in the saved model folder, as sentence-transformers writes one.

Hub-style metadata up top (library, pipeline, base model, tags), then what a reader of the folder
needs: how to load it, what it was trained from and how, the before/after table at every served dim
in and out of domain, the guards' flags, and the versions that made it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from raykit import __version__
from raykit.config import JobConfig
from raykit.train.report import METRIC, by_dim

FRAMEWORKS = ("torch", "transformers", "peft", "deepspeed", "ray")


def model_card(job: JobConfig, evaluation: dict, summary: dict) -> str:
    name = summary["output_dir"].rstrip("/").rsplit("/", 1)[-1]
    sections = [_front_matter(job), f"# {name}\n\n{_intro(job)}", _usage(job, summary["model"]),
                _training(job, summary), _evaluation(job, evaluation), _versions()]
    return "\n\n".join(s for s in sections if s) + "\n"


def _front_matter(job: JobConfig) -> str:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "raykit",
            "lora" if job.train.strategy == "lora" else "deepspeed"]
    if job.loss.matryoshka_dims:
        tags.append("matryoshka")
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:"]
    lines += [f"- {t}" for t in tags]
    if _is_hub_id(job.model.name):
        lines.append(f"base_model: {job.model.name}")
    return "\n".join(lines + ["---"])


def _intro(job: JobConfig) -> str:
    how = (f"LoRA adapters (rank {job.lora.rank}, alpha {job.lora.alpha:g}) merged into the weights"
           if job.train.strategy == "lora" else f"full fine-tuning under DeepSpeed ZeRO-{job.deepspeed.zero_stage}")
    return (f"A text embedding model for retrieval, fine-tuned from `{job.model.name}` with "
            f"[raykit](https://pypi.org/project/raykit-embed/) {__version__}: {how}. It maps text to a "
            f"{'normalized ' if job.model.normalize else ''}vector; compare vectors by "
            f"{'cosine (dot product)' if job.model.normalize else 'dot product'}.")


def _usage(job: JobConfig, model_path: str) -> str:
    dims = job.loss.matryoshka_dims
    lines = ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f'model = SentenceTransformer("{model_path}")',
             "# queries and documents each get the prompt the model was trained with (config_sentence_transformers.json)",
             'queries = model.encode_query(["a query"])',
             'documents = model.encode_document(["a document"])']
    if dims:
        lines += ["", f"# trained for these prefixes too (Matryoshka): {', '.join(map(str, dims))}",
                  f'small = SentenceTransformer("{model_path}", truncate_dim={dims[0]})']
    lines += ["```", "", "Re-embed a corpus with it: `raykit embed jobs/reembed_scifact.yaml "
              f"model={model_path} corpus=... output=s3://bucket/embeddings`."]
    return "\n".join(lines)


def _training(job: JobConfig, summary: dict) -> str:
    t, loss = job.train, job.loss
    objective = {"mnr": f"multiple-negatives ranking (in-batch negatives{', gathered across workers' if loss.gather else ''})",
                 "margin_mse": "MarginMSE distillation", "kl": "KL distillation"}[loss.name]
    if loss.matryoshka_dims:
        objective += f", summed over Matryoshka prefixes {list(loss.matryoshka_dims)}"
    rows = [
        ("data", f"`{job.data.train}` ({summary['train_pairs']:,} pairs)"),
        ("hard negatives", f"mined with `{job.mine.model or job.model.name}` (top {job.mine.top_k}, "
                           f"skip {job.mine.range_min}, keep {job.mine.num_negatives})" if job.mine.enabled else "none mined"),
        ("teacher", f"`{job.teacher.model}` ({job.teacher.kind})" if loss.distill and job.teacher.model else ""),
        ("loss", f"{objective}, scale {loss.scale:g}"),
        ("strategy", f"LoRA rank {job.lora.rank}, alpha {job.lora.alpha:g}, on {', '.join(job.lora.target_modules)}"
                     if t.strategy == "lora" else f"full, DeepSpeed ZeRO-{job.deepspeed.zero_stage}"),
        ("schedule", f"{summary['steps']} steps, batch {t.batch_size} x {job.scaling.num_workers} workers, lr {t.lr:g} "
                     f"({t.scheduler}, {t.warmup_ratio:.0%} warmup), weight decay {t.weight_decay:g}"),
        ("L2-SP", f"{t.l2sp:g}" if t.l2sp else ""),
        ("max length", f"{job.model.max_seq_length} tokens, {job.model.pooling} pooling"),
    ]
    table = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v]
    return "## Training\n\n" + "\n".join(table) + "\n\nThe whole job is in `run.json` beside this folder."


def _evaluation(job: JobConfig, evaluation: dict) -> str:
    if not evaluation.get("after"):
        return "## Evaluation\n\nThe job evaluated nothing (`eval.data` was empty)."
    parts = ["## Evaluation", "", "nDCG@10 before and after fine-tuning, at every served size."]
    for label, before, after, data in (("in domain", "before", "after", f"`{job.eval.data}` ({job.eval.split})"),
                                       ("out of domain", "ood_before", "ood_after", f"`{job.eval.ood_data}` ({job.eval.ood_split})")):
        if not evaluation.get(after):
            continue
        old, new = by_dim(evaluation.get(before)), by_dim(evaluation[after])
        parts += ["", f"{label}: {data}", "", "| dims | before | after | change |", "|---:|---:|---:|---:|"]
        for dim in sorted(new):
            b = old.get(dim, {}).get(METRIC)
            a = new[dim][METRIC]
            parts.append(f"| {dim} | {b:.4f} | {a:.4f} | {a - b:+.4f} |" if b is not None else f"| {dim} | - | {a:.4f} | |")
    flags = evaluation.get("flags") or []
    parts += ["", "Guards (forgetting out of domain, truncation cliff): "
              + ("; ".join(flags) if flags else "no flag raised.")]
    return "\n".join(parts)


def _versions() -> str:
    found = [f"raykit {__version__}"]
    for package in FRAMEWORKS:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return "## Framework versions\n\n" + ", ".join(found)


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and ":" not in name and not name.startswith((".", "/")) and not Path(name).exists()
