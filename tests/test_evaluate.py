import math

import pytest
import torch
from distributed import run_two
from helpers import QUICKSTART

from raykit.config import ModelConfig
from raykit.data import load_beir
from raykit.encoder import Encoder
from raykit.evaluate import evaluate, format_table, score_rankings


def test_metrics_on_a_hand_made_ranking():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 2, "x": 0}}
    ranked = {"q1": ["z", "a", "y", "b"], "q2": ["x", "c"]}
    m = score_rankings(ranked, qrels)
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (2 / math.log2(3)) / 2  # linear gain, as pytrec_eval/BEIR
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["recall@100"] == pytest.approx(1.0)
    assert score_rankings({}, qrels)["ndcg@10"] == 0.0


def test_truncated_dims_and_table(tiny_model):
    beir = load_beir(str(QUICKSTART), "test")
    encoder = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=32))
    results = evaluate(encoder, beir, dims=(8, 32), batch_size=64)
    assert set(results) == {8, 32}
    assert all(0.0 <= m["ndcg@10"] <= 1.0 for m in results.values())
    assert "ndcg@10" in format_table(results, results)
    with pytest.raises(ValueError, match="larger than the model"):
        evaluate(encoder, beir, dims=(64,))


def _eval_worker(rank, model_path, out_path):
    beir = load_beir(str(QUICKSTART), "test")
    encoder = Encoder.load(ModelConfig(name=model_path, max_seq_length=32))
    results = evaluate(encoder, beir, dims=(8, 32), batch_size=16)
    if rank == 0:
        torch.save(results, out_path)


def test_sharded_evaluation_equals_one_process(tiny_model, tmp_path):
    run_two(_eval_worker, tiny_model, str(tmp_path / "r.pt"))
    sharded = torch.load(tmp_path / "r.pt")
    beir = load_beir(str(QUICKSTART), "test")
    single = evaluate(Encoder.load(ModelConfig(name=tiny_model, max_seq_length=32)), beir, dims=(8, 32), batch_size=16)
    for dim in (8, 32):
        for name in single[dim]:
            assert sharded[dim][name] == pytest.approx(single[dim][name], abs=1e-6)
