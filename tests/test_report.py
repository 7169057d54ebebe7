"""The run report: truncation-cliff and forgetting flags, the plots, and the model card."""

from __future__ import annotations

from raykit.config import EvalConfig
from raykit.train.report import flags, text, write_plots


def results(**ndcg):
    return {dim[1:]: {"ndcg@10": v, "recall@100": 0.9, "mrr@10": 0.5} for dim, v in ndcg.items()}


def test_cliff_and_forgetting_are_flagged_and_healthy_runs_are_not(tmp_path):
    cfg = EvalConfig(data="d/scifact", ood_data="d/cranfield", dims=(64, 128, 384), cliff=0.10, max_ood_drop=0.01)
    healthy = {"before": results(d64=0.48, d128=0.60, d384=0.64), "after": results(d64=0.66, d128=0.70, d384=0.72),
               "ood_before": results(d64=0.2, d128=0.25, d384=0.30), "ood_after": results(d64=0.2, d128=0.25, d384=0.295)}
    assert flags(healthy, cfg) == []
    sick = {**healthy, "after": results(d64=0.50, d128=0.70, d384=0.72), "ood_after": results(d64=0.1, d128=0.2, d384=0.25)}
    found = flags(sick, cfg)
    assert len(found) == 2
    assert found[0].startswith("truncation cliff: nDCG@10 at 64 dims is 0.5000, 29% below 128 dims")
    assert found[1].startswith("forgetting: out-of-domain nDCG@10 fell 0.0500 (0.3000 -> 0.2500")
    sick["flags"] = found
    report = "\n".join(text(sick, cfg))
    assert "FLAG truncation cliff" in report and "out of domain: d/cranfield" in report
    written = write_plots(sick, cfg, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in written] == ["ndcg_by_dim.png", "forgetting.png"]
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_model_card_carries_the_recipe_the_tables_and_the_flags():
    from raykit.jobfile import load_job
    from raykit.train.card import model_card

    job = load_job(None, ["model.name=BAAI/bge-small-en-v1.5", "data.train=s3://b/pairs.jsonl", "eval.data=d/scifact",
                          "eval.ood_data=d/cranfield", "loss.matryoshka_dims=[64,384]", "train.scheduler=linear"])
    evaluation = {"before": results(d64=0.48, d384=0.64), "after": results(d64=0.50, d384=0.72),
                  "ood_before": results(d64=0.2, d384=0.30), "ood_after": results(d64=0.1, d384=0.25),
                  "flags": ["forgetting: out-of-domain nDCG@10 fell 0.0500"]}
    summary = {"output_dir": "s3://b/runs/bge-r16", "model": "s3://b/runs/bge-r16/model", "steps": 120, "train_pairs": 3840}
    card = model_card(job, evaluation, summary)
    front, body = card.split("\n---\n", 1)
    assert "library_name: sentence-transformers" in front and "base_model: BAAI/bge-small-en-v1.5" in front
    assert "- matryoshka" in front and "- lora" in front
    assert body.startswith("\n# bge-r16\n")
    assert 'SentenceTransformer("s3://b/runs/bge-r16/model", truncate_dim=64)' in body
    assert "| data | `s3://b/pairs.jsonl` (3,840 pairs) |" in body
    assert "120 steps, batch 32 x 1 workers, lr 2e-05 (linear, 10% warmup)" in body
    assert "| 384 | 0.6400 | 0.7200 | +0.0800 |" in body  # in domain
    assert "| 384 | 0.3000 | 0.2500 | -0.0500 |" in body  # out of domain
    assert "forgetting: out-of-domain nDCG@10 fell 0.0500" in body and "raykit 0.1.0" in body
    # a local base model is no hub id: the card names it without claiming a base_model on the hub
    local = model_card(load_job(None, ["model.name=runs/x/model"]), {}, summary)
    assert "base_model" not in local and "evaluated nothing" in local


def test_loss_curve_plots_loss_lr_and_validation(tmp_path):
    from raykit.train.report import write_loss_curve

    history = [{"step": s, "loss": 2.0 / s, "lr": 1e-3} for s in range(1, 11)]
    history[4]["val_ndcg@10"] = 0.5
    path = write_loss_curve(history, str(tmp_path))
    assert path.endswith("loss_curve.png") and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert write_loss_curve([], str(tmp_path / "none")) is None
