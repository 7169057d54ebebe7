"""The run report: truncation-cliff and forgetting flags, and the plots."""

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
