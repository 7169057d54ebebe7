"""Cold start (`raykit synth`, `synth.enabled`): pairs from a corpus alone, then training on them.

The model-free path and the causal-LM path run for real on local Ray (the generator a tiny random LM:
mechanics, not quality). A seq2seq LM, a chat template and an OpenAI-compatible endpoint are checked
in this process; the endpoint is a stub HTTP server on loopback, since a vLLM server cannot run here."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import QUICKSTART, refused
from helpers import TRAIN_JOB as JOB
from helpers import train_overrides as overrides

from raykit.cli import main
from raykit.data import load_beir
from raykit.encoder import Encoder
from raykit.errors import RaykitError
from raykit.jobfile import load_job
from raykit.train import queries

SYNTH = [f"synth.corpus={QUICKSTART}", "synth.embed.shard_mb=0.01", "synth.embed.precision=fp32", "synth.embed.concurrency=1"]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory, tiny_model) -> dict[str, str]:
    """A tiny random causal LM (GPT-2) and seq2seq LM (T5), with the tiny BERT's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    paths = {"causal": tmp_path_factory.mktemp("tiny-gpt2"), "seq2seq": tmp_path_factory.mktemp("tiny-t5")}
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(paths["causal"])
    T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.sep_token_id)).save_pretrained(paths["seq2seq"])
    for path in paths.values():
        tok.save_pretrained(path)
    return {k: str(v) for k, v in paths.items()}


def test_model_free_queries_are_the_title_then_sentences_and_leave_the_positive():
    sentences = ["Statins lower LDL cholesterol in most adults.", "They act on HMG-CoA reductase in liver cells.",
                 "Muscle pain is the side effect patients report most."]
    text = " ".join(sentences)
    made = queries.pseudo_queries("Statins and cholesterol", text, 3, np.random.default_rng(0))
    assert made[0][0] == "Statins and cholesterol" and [q for q, _ in made[1:]] in ([sentences[0], sentences[1]],
                                                                                   [sentences[0], sentences[2]], [sentences[1], sentences[2]])
    assert made == queries.pseudo_queries("Statins and cholesterol", text, 3, np.random.default_rng(0))  # seeded per document
    assert queries.pseudo_queries("", "One sentence only, with nothing else in it.", 2, np.random.default_rng(0)) == []
    assert queries.pseudo_queries("", "Too short. Also short.", 1, np.random.default_rng(0)) == []  # under 6 words each
    # the query is cut from its positive 90% of the time (ICT): the rest, lexical overlap teaches too
    draws = [queries.pseudo_queries("", text, 1, np.random.default_rng(seed))[0] for seed in range(2000)]
    assert all(q in sentences for q, _ in draws)
    left_in = np.mean([q in positive for q, positive in draws])
    assert 0.07 < left_in < 0.13
    assert queries.clean_query('  \nQuery: "do statins cause muscle pain?"\nsecond line') == "do statins cause muscle pain?"


@pytest.fixture(scope="module")
def coldstart_run(ray_cluster, tiny_model, tmp_path_factory) -> Path:
    """jobs/scifact_coldstart.yaml's shape on the quickstart corpus: synthetic pairs, then LoRA on them
    (one worker: the pairs are the point)."""
    out = tmp_path_factory.mktemp("coldstart") / "run"
    args = overrides(tiny_model, out, "data.train=", "synth.enabled=true", "synth.filter_top_k=20", *SYNTH, "scaling.num_workers=1")
    assert main(["train", JOB, *args]) == 0
    return out


def test_a_cold_start_trains_on_pairs_made_from_the_corpus_alone(coldstart_run, tiny_model, capsys):
    pairs = read_jsonl(coldstart_run / "synth" / "pairs.jsonl")
    summary = json.loads((coldstart_run / "run.json").read_text())
    assert summary["config"]["data"]["train"] == str(coldstart_run / "synth" / "pairs.jsonl")
    assert summary["train_pairs"] == len(pairs) and summary["steps"] == 4
    beir = load_beir(str(QUICKSTART), "train")
    titles = {json.loads(line)["_id"]: json.loads(line)["title"] for line in (QUICKSTART / "corpus.jsonl").read_text().splitlines()}
    # every quickstart document is a title and one sentence: the title is its one model-free query,
    # never one of the labelled queries
    assert all(p["query"] == titles[p["positive_id"]] for p in pairs)
    assert not {p["query"] for p in pairs} & set(beir.queries.values())

    # The round trip, recomputed here: a pair is kept exactly when its document ranks in the top 20.
    encoder = Encoder.from_pretrained(tiny_model, 32)
    ids = list(beir.corpus)
    docs = encoder.encode([beir.corpus[i] for i in ids], 64, role="document")
    queries = encoder.encode([titles[i] for i in ids], 64, role="query")
    # (the pipeline batches otherwise than this process: near-ties, within 1e-5, may fall either way)
    scores = queries @ docs.T
    best = {doc: int((scores[n] > scores[n, n] + 1e-5).sum()) + 1 for n, doc in enumerate(ids)}
    worst = {doc: int((scores[n] > scores[n, n] - 1e-5).sum()) + 1 for n, doc in enumerate(ids)}
    kept = {p["positive_id"] for p in pairs}
    assert all(best[doc] <= 20 for doc in kept) and all(worst[doc] > 20 for doc in set(ids) - kept)
    assert all(best[p["positive_id"]] <= p["round_trip_rank"] <= worst[p["positive_id"]] for p in pairs)
    assert 0 < len(pairs) < len(ids)
    stats = json.loads((coldstart_run / "synth" / "pairs.jsonl.stats.json").read_text())
    assert stats["documents"] == stats["made"] == stats["unique"] == len(ids) and stats["kept"] == len(pairs)
    assert stats["keep_rate"] == round(len(pairs) / len(ids), 4)

    # A rerun of the same settings reuses the pairs.
    before = (coldstart_run / "synth" / "pairs.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    args = overrides(tiny_model, coldstart_run, "data.train=", "synth.filter_top_k=20", *SYNTH)
    assert main(["synth", JOB, *args]) == 0
    assert "exists; reusing it" in capsys.readouterr().out
    assert (coldstart_run / "synth" / "pairs.jsonl").stat().st_mtime_ns == before


def test_a_causal_lm_writes_queries_for_a_seeded_sample_of_documents(ray_cluster, tiny_model, tiny_lms, tmp_path):
    args = overrides(tiny_model, tmp_path / "run", *SYNTH, f"synth.generator={tiny_lms['causal']}", "synth.max_docs=10",
                     "synth.queries_per_doc=2", "synth.filter_top_k=0", "synth.max_new_tokens=6", "synth.batch_size=4")
    assert main(["synth", JOB, *args]) == 0
    pairs = read_jsonl(tmp_path / "run" / "synth" / "pairs.jsonl")
    corpus = load_beir(str(QUICKSTART), "train").corpus
    keys = sorted(corpus, key=lambda i: queries.doc_key(42, i))
    assert {p["positive_id"] for p in pairs} == set(keys[:10])  # the 10 smallest keys under train.seed
    assert 10 <= len(pairs) <= 20 and all(p["query"] and p["positive"] == corpus[p["positive_id"]] for p in pairs)


def test_a_seq2seq_lm_and_a_chat_template_in_process(tiny_lms):
    batch = {"id": ["a", "b"], "title": ["Pumps", ""], "text": ["Prime the pump before starting it.", "Bleed the air from the line."]}
    options = {"endpoint": "", "prompt": "", "max_input_tokens": 16, "max_new_tokens": 5, "temperature": 0.7, "queries_per_doc": 3, "seed": 1}
    t5 = queries.Generator(tiny_lms["seq2seq"], **options)
    assert t5.seq2seq and t5.template == "{document}"  # doc2query reads the document alone
    rows = t5(batch)
    assert rows == t5(batch)  # the draws follow from the batch's first document
    assert len(rows["query"]) <= 6 and set(rows["positive_id"]) <= {"a", "b"}
    assert "Pumps Prime the pump before starting it." in rows["positive"] or rows["positive"].count("Bleed the air from the line.") == len(rows["query"])

    gpt = queries.Generator(tiny_lms["causal"], **{**options, "max_input_tokens": 4})
    assert not gpt.chat and gpt._input("one two three four five six") == queries.INSTRUCTION.replace("{document}", "one two three four")
    gpt.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    gpt.chat = True
    assert gpt._input("bleed the line") == "<user>" + queries.INSTRUCTION.replace("{document}", "bleed the line") + "<assistant>"


class _Server(BaseHTTPRequestHandler):
    """A stand-in for vLLM's /v1/chat/completions: 503 to the first request, then n answers that
    quote the document's first word."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"auth": self.headers.get("Authorization"), **body})
        if len(self.seen) == 1:
            self.send_response(503)
            self.end_headers()
            return
        word = body["messages"][0]["content"].split("Document: ")[1].split()[0]
        reply = {"choices": [{"message": {"content": f'Query: "how to {word.lower()} {i}"'}} for i in range(body["n"])]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_openai_compatible_endpoint_with_its_key_and_a_retry(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(queries.KEY_ENV, "sk-test-not-for-logs")
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        endpoint = queries.Endpoint("served-model", url, "", 64, 16, 0.7, 2, 0)
        rows = endpoint({"id": ["d1"], "title": [""], "text": ["Prime the pump before starting it."]})
        assert rows == {"query": ["how to prime 0", "how to prime 1"], "positive": ["Prime the pump before starting it."] * 2,
                        "positive_id": ["d1", "d1"]}
        last = _Server.seen[-1]
        assert len(_Server.seen) == 2 and last["auth"] == "Bearer sk-test-not-for-logs"  # the 503 was retried
        assert last["model"] == "served-model" and last["n"] == 2 and last["max_tokens"] == 16
        # a refusal that retrying cannot mend: one line, no key in it
        monkeypatch.setattr(_Server, "do_POST", lambda self: (self.send_response(401), self.end_headers()))
        with pytest.raises(RaykitError) as e:
            endpoint({"id": ["d2"], "title": [""], "text": ["x y z"]})
        assert "answered 401" in str(e.value) and "sk-test" not in str(e.value)
    finally:
        server.shutdown()


def test_plan_with_no_labels_writes_a_cold_start_job(tmp_path, capsys):
    out = tmp_path / "cold.yaml"
    assert main(["plan", "--gpu-mem", "24", "--no-labels", "--teacher", "--data", str(QUICKSTART), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "plan: lora rank 16 + synthetic pairs (raykit synth) + in-batch negatives" in said and "teacher waits" in said
    job = load_job(str(out))
    assert job.synth.enabled and job.synth.corpus == str(QUICKSTART) and not job.data.train and not job.mine.enabled
    assert yaml.safe_load(out.read_text())["loss"]["name"] == "mnr"


def test_bad_synth_input_is_one_line(capsys, tiny_model, tmp_path):
    base = overrides(tiny_model, tmp_path / "run", "data.train=")
    assert refused(capsys, "synth", JOB, *base, "synth.corpus=/no/such/corpus") == \
        "raykit: error: synth.corpus: /no/such/corpus: no such file or folder; point it at a BEIR folder or .jsonl/.parquet documents"
    assert "synth.generator: " + tiny_model + " is neither a causal nor a seq2seq LM (BertModel)" in \
        refused(capsys, "synth", JOB, *base, *SYNTH, f"synth.generator={tiny_model}")
    assert "synth.prompt: has no {document}" in refused(capsys, "synth", JOB, *base, *SYNTH, "synth.prompt=hello")
    assert "synth.corpus: not set" in refused(capsys, "synth", JOB, *base)
    assert "the synthetic pairs are the training data" in refused(capsys, "train", JOB, *overrides(tiny_model, tmp_path / "run"),
                                                                  "synth.enabled=true", *SYNTH)
    assert "mining reads labelled qrels" in refused(capsys, "train", JOB, *base, "synth.enabled=true", "mine.enabled=true", *SYNTH)
    # a bad document anywhere in the corpus, found by the census before anything is written
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"_id": "a", "text": "Prime the pump."}\n{"_id": "b"}\n')
    assert refused(capsys, "synth", JOB, *base, f"synth.corpus={bad}", "synth.filter_top_k=0") == \
        f"raykit: error: {bad}:2: 'text' is missing or not a string; every line needs id and text"
    assert not (tmp_path / "run").exists()
