"""Hard-negative mining, teacher scoring, and the strategy combinations end to end (tiny models, local Ray).

One LoRA run mines, trains and reports (a module fixture); the tests read it, and reuse its triplets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, REPO, check_run, check_trackers
from helpers import TRAIN_JOB as JOB
from helpers import train_overrides as overrides

from raykit.cli import main
from raykit.data import load_beir
from raykit.encoder import Encoder
from raykit.errors import RaykitError
from raykit.jobfile import load_job
from raykit.train.mine import run as mine

# Mining as jobs/lora_hardneg_mnr.yaml does it, scaled to the quickstart set: the top-ranked
# candidates past the first two, fp32 so that an in-memory ranking reproduces them exactly.
MINE = ["mine.top_k=10", "mine.range_min=2", "mine.num_negatives=2", "mine.sampling=top", "mine.embed.shard_mb=0.01",
        "mine.embed.precision=fp32", "mine.embed.concurrency=1"]


# E5's prompts: mining, training, evaluation and the exported model each put them before their texts
E5 = {"query": "query: ", "document": "passage: "}
PROMPTS = ['model.prompts.query="query: "', 'model.prompts.document="passage: "']


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tiny_model, tmp_path_factory) -> Path:
    """jobs/lora_hardneg_mnr.yaml's shape on 2 workers: mine, then LoRA on the triplets, with Matryoshka,
    an out-of-domain set, a periodic evaluation, two trackers and checkpoints by the clock. Its mined
    triplets serve the other tests."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = overrides(tiny_model, out, "lora.rank=4", "train.lr=1e-2", "train.eval_every=2", "mine.enabled=true", *MINE,
                     *PROMPTS,
                     "loss.matryoshka_dims=[16,32]", f"eval.ood_data={QUICKSTART}", "eval.ood_split=train",
                     "eval.max_ood_drop=0.5", "train.report_to=[tensorboard,mlflow]", "train.checkpoint_every=0.1s",
                     "scaling.peak_tflops=0.001")
    assert main(["train", JOB, *args]) == 0
    return out


def test_lora_on_mined_hard_negatives_with_matryoshka_the_forgetting_guard_and_trackers(lora_run, tiny_model):
    summary, metrics = check_run(lora_run, tiny_model, "lora")  # sentence-transformers' encode_query/_document score as raykit did
    assert json.loads((lora_run / "model" / "config_sentence_transformers.json").read_text())["prompts"] == E5
    assert summary["config"]["data"]["train"] == str(lora_run / "mined" / "triplets.jsonl")
    assert summary["resumed_from"] == []
    # by the clock: a report that finds 0.1 s gone since the last checkpoint makes one (the evaluation at
    # step 2 alone takes longer, so step 3's report does)
    assert summary["checkpoints"]["count"] >= 1 and summary["checkpoints"]["seconds"] > 0
    evaluation = json.loads((lora_run / "eval.json").read_text())
    assert set(evaluation) >= {"before", "after", "ood_before", "ood_after", "flags"}
    assert set(evaluation["ood_after"]) == {"16", "32"}
    assert (lora_run / "ndcg_by_dim.png").stat().st_size > 0 and (lora_run / "forgetting.png").stat().st_size > 0
    assert [m["step"] for m in metrics if "ndcg@10/32" in m] == [2]  # train.eval_every
    check_trackers(lora_run, metrics)
    # MFU against the job's peak (0.001 TFLOPS per worker): on every progress line, and the run's as a whole
    assert all(m["mfu"] > 0 for m in metrics)
    throughput = summary["throughput"]
    assert throughput["peak_tflops_per_worker"] == 0.001 and throughput["flops_per_pair"] > 0
    assert throughput["mfu"] == pytest.approx(throughput["pairs_per_s"] * throughput["flops_per_pair"] / (2 * 1e9), rel=0.01)


def test_mined_negatives_are_ranked_candidates_past_range_min_and_never_positives(lora_run, tiny_model):
    triplets = lora_run / "mined" / "triplets.jsonl"
    rows = read_jsonl(triplets)
    beir = load_beir(str(QUICKSTART), "train")
    positives = {q: {d for d, r in docs.items() if r > 0} for q, docs in beir.qrels.items()}
    assert len(rows) == sum(len(p) for p in positives.values())

    # The same ranking, computed in memory: negatives are candidates 2 and 3 after removing positives.
    encoder = Encoder.from_pretrained(tiny_model, 32, E5)
    ids = list(beir.corpus)
    docs = encoder.encode([beir.corpus[i] for i in ids], role="document")
    for row in rows[:20]:
        q = row["query_id"]
        assert not set(row["negative_ids"]) & positives[q]
        scores = encoder.encode([beir.queries[q]], role="query") @ docs.T
        ranked = [ids[j] for j in scores[0].argsort(descending=True).tolist() if ids[j] not in positives[q]]
        assert row["negative_ids"] == ranked[2:4]
        assert row["negatives"] == [beir.corpus[i] for i in row["negative_ids"]]

    # A rerun reuses the file; mining settings of another job are refused, naming what differs.
    job = load_job(JOB, overrides(tiny_model, lora_run, *MINE, *PROMPTS, f"mine.output={triplets}"))
    written = triplets.stat().st_mtime_ns
    assert mine(job) == str(triplets) and triplets.stat().st_mtime_ns == written
    with pytest.raises(RaykitError, match=r"holds triplets of another job \(mine.range_min: 2 there, 3 here\); delete it to make it again, or set mine.output"):
        mine(load_job(JOB, overrides(tiny_model, lora_run, *MINE, *PROMPTS, "mine.range_min=3", f"mine.output={triplets}")))
    assert triplets.stat().st_mtime_ns == written

    # A margin keeps only candidates scoring well below the positive. Written beside the run's
    # triplets with the same stem, it ranks against the corpus embeddings that mining committed.
    margin = load_job(JOB, overrides(tiny_model, lora_run, *MINE, *PROMPTS, "mine.margin=0.01", "mine.range_min=0", "mine.top_k=230",
                                     f"mine.output={lora_run / 'mined' / 'triplets.parquet'}"))
    import pyarrow.parquet as pq

    table = pq.read_table(mine(margin)).to_pylist()
    assert table and all(s <= r["positive_retriever_score"] - 0.01 + 1e-6 for r in table for s in r["negative_retriever_scores"])


def test_full_distillation_with_a_cross_encoder_teacher_and_l2sp(lora_run, tiny_model, tiny_teacher, tmp_path):
    """jobs/full_matryoshka_distill.yaml's shape: mine (here: reuse the LoRA run's triplets), score with
    the teacher, MarginMSE + Matryoshka, L2-SP, on one ZeRO-2 worker."""
    out = tmp_path / "run"
    args = overrides(tiny_model, out, "train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3", "scaling.num_workers=1",
                     "train.l2sp=0.1", "mine.enabled=true", *MINE, *PROMPTS, f"mine.output={lora_run / 'mined' / 'triplets.jsonl'}",
                     "loss.name=margin_mse", "loss.matryoshka_dims=[16,32]", "teacher.concurrency=1",
                     f"teacher.model={tiny_teacher}", "teacher.max_seq_length=64")
    assert main(["train", JOB, *args]) == 0
    scored = read_jsonl(out / "scored" / "triplets.jsonl")
    assert all(isinstance(r["positive_score"], float) and len(r["negative_scores"]) == 2 for r in scored)
    # the teacher's score is its logit for (query, document) read together
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        logit = teacher(**tok(scored[0]["query"], scored[0]["negatives"][1], return_tensors="pt", truncation=True, max_length=64)).logits
    assert scored[0]["negative_scores"][1] == pytest.approx(float(logit[0, 0]), abs=1e-4)
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 4 and (out / "model" / "model.safetensors").exists()
    assert json.loads((out / "model" / "config_sentence_transformers.json").read_text())["prompts"] == E5


def test_distillation_without_scores_or_teacher_is_one_clear_error(tiny_model, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]}) + "\n" for i in range(40)))
    assert main(["train", JOB, *overrides(tiny_model, tmp_path / "run", f"data.train={pairs}", "loss.name=margin_mse")]) == 2
    assert "has no teacher scores; set teacher.model" in capsys.readouterr().err
    assert main(["train", JOB, *overrides(tiny_model, tmp_path / "run", "train.strategy=full", "deepspeed.zero_stage=3",
                                          "train.l2sp=0.1")]) == 2
    assert "train.l2sp: needs every weight on every worker" in capsys.readouterr().err
    assert main(["train", JOB, *overrides(tiny_model, tmp_path / "run", "loss.matryoshka_dims=[16,64]")]) == 2
    assert "loss.matryoshka_dims: 64 is larger than the model's 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_four_combination_jobs_load(tmp_path):
    for name in ("lora_inbatch", "lora_hardneg_mnr", "full_matryoshka_distill", "lora_matryoshka"):
        job = load_job(REPO / "jobs" / f"{name}.yaml", [f"output_dir={tmp_path / name}"])
        assert job.eval.ood_data.endswith("cranfield") and job.eval.data.endswith("scifact"), name
    assert load_job(REPO / "jobs" / "lora_hardneg_mnr.yaml").mine.enabled
    distill = load_job(REPO / "jobs" / "full_matryoshka_distill.yaml")
    assert distill.loss.name == "margin_mse" and distill.loss.matryoshka_dims and distill.train.strategy == "full"
    assert load_job(REPO / "jobs" / "lora_matryoshka.yaml").loss.matryoshka_dims == (64, 128, 256, 384)


def test_teacher_actor_scores_like_its_model(tiny_model, tiny_teacher):
    """The scoring actor's code, called directly: a bi-encoder teacher gives scale x cosine, a cross-encoder its logit."""
    from raykit.train.score import _Teacher

    batch = {"i": [0, 1], "query": ["pump reset", "valve torque"], "docs": [json.dumps(["a", "b"]), json.dumps(["c", "d", "e"])]}
    bi = _Teacher(tiny_model, "bi_encoder", 64, 4, scale=20.0)(batch)
    encoder = Encoder.from_pretrained(tiny_model)
    q, d = encoder.encode(["valve torque"], role="query"), encoder.encode(["c", "d", "e"], role="document")
    assert json.loads(bi["scores"][1]) == pytest.approx((20.0 * (q @ d.T))[0].tolist(), abs=1e-4)
    cross = _Teacher(tiny_teacher, "cross_encoder", 64, 4, scale=20.0)(batch)
    assert [len(json.loads(s)) for s in cross["scores"]] == [2, 3]
