"""Cold start: (query, positive) pairs made from a corpus alone, for a team with no labelled queries yet.

`raykit synth JOB.yaml` (or `synth.enabled: true` before training):
1. read the corpus in shards (`raykit embed`'s plan; a BEIR folder gives its corpus.jsonl only, never
   its queries or qrels) and, with `synth.max_docs`, keep a seeded sample of exactly that many;
2. make queries on Ray Data, one batch of documents per call:
   - model-free (no `synth.generator`): the document's title, then sentences of its text, are its
     queries and the document without them the positive (title-body pairs, as E5 pre-trains; the
     inverse cloze task of Lee et al. 2019);
   - a Hugging Face causal or seq2seq LM in an actor pool on GPUs or CPUs (`synth.generator`), or
     an OpenAI-compatible server such as vLLM (`synth.endpoint`), `queries_per_doc` per document;
3. de-duplicate: a query made for two documents tells neither apart, so both go;
4. the round trip: embed the corpus with model.name (through `raykit embed`'s pipeline, resumable),
   and keep a pair only when its document ranks in the top `filter_top_k` of the whole corpus for
   its query (Promptagator's consistency filter, with the retriever about to be fine-tuned);
5. write the pairs (query, positive, positive_id) in one put; a rerun with the same settings reuses them.
The pairs are gathered on the driver, as mining's triplets are: sample a corpus of many millions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import numpy as np

from raykit import identity, pairs, storage
from raykit.cluster import (
    actor_count,
    connect_ray,
    quiet_ray_data,
    raised_by_raykit,
    require_shared_storage,
    worker_error,
)
from raykit.config import EmbedJob, JobConfig
from raykit.data import doc_text
from raykit.embed import corpus, pipeline, search
from raykit.encoder import Encoder, check_length, model_config
from raykit.errors import RaykitError
from raykit.log import format_duration

log = logging.getLogger(__name__)

# What a causal LM or an endpoint is asked when synth.prompt is unset (a chat model's template wraps it).
INSTRUCTION = ("Write one short search query that the following document answers. Reply with the query only.\n\n"
               "Document: {document}\n\nQuery:")
KEY_ENV = "OPENAI_API_KEY"  # the endpoint's bearer token, if it wants one
SENTENCE_WORDS = (6, 40)  # model-free: sentences this long (in words) make queries; shorter say too little
KEEP_SENTENCE = 0.1  # ICT keeps the query in its positive 10% of the time: lexical overlap is a signal too
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def pairs_path(job: JobConfig) -> str:
    return job.synth.output or storage.join(storage.resolve(job.output_dir), "synth", "pairs.jsonl")


def check(job: JobConfig) -> None:
    """What can be checked before anything is written: the corpus, the generator, the filter's model."""
    cfg = job.synth
    if cfg.enabled and job.data.train:
        raise RaykitError(f"data.train: {job.data.train} and synth.enabled: the synthetic pairs are the training data; "
                          "set data.train= (empty), or synth.enabled=false to train on data.train")
    if not cfg.corpus:
        raise RaykitError("synth.corpus: not set; point it at the documents to make queries for, e.g. synth.corpus=../shared/data/scifact")
    if not storage.exists(storage.resolve(cfg.corpus)):
        raise RaykitError(f"synth.corpus: {cfg.corpus}: no such file or folder; point it at a BEIR folder or .jsonl/.parquet documents")
    corpus.input_files(storage.resolve(cfg.corpus))  # raises naming the file when it is not a corpus
    if cfg.generator and not cfg.endpoint:
        config = model_config(cfg.generator, "synth.generator")
        generates = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # the heads generate() runs on
        if not (config.is_encoder_decoder or any(a.endswith(generates) for a in config.architectures or [])):
            raise RaykitError(f"synth.generator: {cfg.generator} is neither a causal nor a seq2seq LM "
                              f"({', '.join(config.architectures or ['no architecture'])}); use e.g. a doc2query T5 or an instruct LLM")
    if cfg.filter_top_k:
        config = model_config(job.model.name, "model.name", revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
        check_length(config, job.model.max_seq_length, job.model.name, "model.max_seq_length")


def run(job: JobConfig) -> str:
    """Make pairs from job.synth.corpus; returns the pairs file (reused if already written)."""
    cfg = job.synth
    out = pairs_path(job)
    key = "synth.output" if cfg.output else "output_dir"
    storage.check_output(key, out, folder=False)
    require_shared_storage(key, out)
    if not cfg.corpus:
        check(job)  # names the missing key
    source = storage.resolve(cfg.corpus)
    filtered_by = {"model": job.model.name, "revision": job.model.revision, "max_seq_length": job.model.max_seq_length,
                   "prompts": job.to_dict()["model"]["prompts"]} if cfg.filter_top_k else {}
    settings = identity.of({"synth": {**job.to_dict()["synth"], "corpus": source}, "filter": filtered_by, "seed": job.train.seed},
                           ("synth.output", "synth.enabled", "synth.concurrency", "synth.num_gpus", "synth.batch_size",
                            "synth.embed.concurrency", "synth.embed.cpus_per_actor", "synth.embed.num_gpus"))
    if identity.reusable(out, settings, "pairs", key):
        log.info(f"synth: {out} exists; reusing it (delete it to make pairs again)")
        return out
    check(job)
    started = time.time()
    quiet_ray_data()
    connect_ray(dashboard=False)
    items = [{"shard": json.dumps(s.__dict__)} for s in corpus.plan(source, cfg.embed.shard_mb)]
    total, cutoff = _census(items, cfg.max_docs, job.train.seed)  # reads every document: bad input ends here
    identity.record(out + ".job.json", settings)  # before the pairs: they mark the work complete
    made = _generate(job, source, items, total, cutoff)
    unique = _deduplicate(made)
    kept = _round_trip(job, source, out, unique) if cfg.filter_top_k else unique
    if not kept:
        raise RaykitError(f"synth: no pair survived the round trip (top {cfg.filter_top_k} of the corpus); "
                          "raise synth.filter_top_k, or use a stronger generator")
    stats = {"documents": len({r["positive_id"] for r in made}), "made": len(made), "unique": len(unique), "kept": len(kept),
             "keep_rate": round(len(kept) / max(1, len(unique)), 4) if cfg.filter_top_k else None,
             "seconds": round(time.time() - started, 1)}
    storage.put_text(out + ".stats.json", json.dumps(stats, indent=2))
    pairs.write(out, kept)  # last: the pairs mark the work complete
    filtered = (f"{len(kept)} kept by the round trip ({100 * stats['keep_rate']:.0f}%)" if cfg.filter_top_k
                else "no round trip (synth.filter_top_k=0)")
    log.info(f"synth: {len(kept)} pairs from {stats['documents']} documents -> {out} | made {len(made)}, {len(unique)} "
             f"after de-duplication, {filtered} | {stats['seconds']:.0f} s")
    return out


# --- 1-2. documents to queries, on Ray Data ----------------------------------------------------------


def _generate(job: JobConfig, source: str, items: list[dict], total: int, cutoff: int | None) -> list[dict]:
    import ray.data

    cfg = job.synth
    docs = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _read_docs, fn_kwargs={"cutoff": cutoff, "seed": job.train.seed})
    options = {"queries_per_doc": cfg.queries_per_doc, "seed": job.train.seed}
    if not cfg.generator:
        made = docs.map_batches(_model_free, fn_kwargs=options, batch_size=cfg.batch_size * 32)
        what = "model-free (titles and sentences as queries)"
    else:
        maker = _Endpoint if cfg.endpoint else _Generator
        # the endpoint's key as the submitting shell has it, in the actors' environment: never in a job or a log
        key = {"runtime_env": {"env_vars": {KEY_ENV: os.environ[KEY_ENV]}}} if cfg.endpoint and os.environ.get(KEY_ENV) else {}
        made = docs.map_batches(
            maker, fn_constructor_kwargs={**options, **_generator_kwargs(cfg)}, batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=_generators(cfg)),
            num_gpus=cfg.num_gpus, num_cpus=0 if cfg.num_gpus else 1, **key)
        what = f"{cfg.generator}" + (f" at {cfg.endpoint}" if cfg.endpoint else "")
    log.info(f"synth: queries for {total} documents of {source} by {what}")
    rows, done, last, started = [], 0, 0.0, time.time()
    try:
        for batch in made.iter_batches(batch_size=None, batch_format="pandas"):
            rows += batch.to_dict("records")
            done += batch["positive_id"].nunique()  # a batch holds whole documents (a document without queries is not counted)
            if time.time() - last > 10:
                last, rate = time.time(), done / max(1e-9, time.time() - started)
                log.info(f"synth: {done}/{total} documents | {len(rows)} queries | {rate:.1f} docs/s | "
                         f"ETA {format_duration((total - done) / max(rate, 1e-9))}")
    except Exception as e:  # noqa: BLE001 - a worker's bad-input error arrives wrapped by Ray
        raise worker_error(e, "synth stopped", "rerun the same command") from None
    rows.sort(key=lambda r: (r["positive_id"], r["query"]))  # one order, whichever actor finished first
    return rows


def _generators(cfg) -> int:
    """Generator actors: synth.concurrency, else one per GPU, or on CPUs one per free core but one: a
    pool holding every CPU would leave none to read the documents it waits for. Free, not total: a
    CPU another job holds (or a placement group Ray Train has not yet released) is not the pool's,
    and counting it hung the pipeline with every free CPU in the pool."""
    import ray

    batches = -(-cfg.max_docs // cfg.batch_size) if cfg.max_docs else 1 << 30
    if cfg.concurrency or cfg.num_gpus:
        return actor_count(cfg.concurrency, cfg.num_gpus, 1, batches)
    free = min(ray.cluster_resources().get("CPU", 1), ray.available_resources().get("CPU", 1))
    return max(1, min(int(free) - 1, batches))


def _generator_kwargs(cfg) -> dict:
    return {"model": cfg.generator, "endpoint": cfg.endpoint, "prompt": cfg.prompt, "max_input_tokens": cfg.max_input_tokens,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}


def _doc_key(seed: int, doc_id: str) -> int:
    """A document's place in the seeded sample, and the seed of what is drawn for it: the same on
    any worker and any shard layout."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "little") >> 1


def _census(items: list[dict], max_docs: int, seed: int) -> tuple[int, int | None]:
    """(documents to make queries for, the largest key in the sample) with max_docs: the sample is the
    max_docs documents with the smallest keys; its cutoff None when the corpus has no more. One pass
    over the corpus, counting its documents, and keeping 8 bytes per document for a sample."""
    import ray

    try:
        found = ray.get([ray.remote(num_cpus=1)(_keys).remote(item["shard"], seed, bool(max_docs)) for item in items])
    except Exception as e:  # noqa: BLE001 - a bad document: the task's DataError, wrapped by Ray
        raise raised_by_raykit(e) or e from None
    if not max_docs:
        return sum(found), None
    keys = np.concatenate(found)
    if len(keys) <= max_docs:
        return len(keys), None
    return max_docs, int(np.partition(keys, max_docs - 1)[max_docs - 1])


def _keys(shard: str, seed: int, keys: bool) -> np.ndarray | int:
    ids, _ = corpus.read(corpus.Shard(**json.loads(shard)))
    return np.array([_doc_key(seed, i) for i in ids], dtype=np.int64) if keys else len(ids)


def _read_docs(row: dict, cutoff: int | None, seed: int) -> list[dict]:
    """A shard's documents as rows (id, title, text): those in the sample only."""
    ids, titles, texts = corpus.read_parts(corpus.Shard(**json.loads(row["shard"])))
    return [{"id": i, "title": h, "text": t} for i, h, t in zip(ids, titles, texts)
            if cutoff is None or _doc_key(seed, i) <= cutoff]


def _model_free(batch: dict, queries_per_doc: int, seed: int) -> dict:
    out = {"query": [], "positive": [], "positive_id": []}
    for doc_id, title, text in zip(batch["id"], batch["title"], batch["text"]):
        for query, positive in pseudo_queries(title, text, queries_per_doc, np.random.default_rng(_doc_key(seed, doc_id))):
            out["query"].append(query)
            out["positive"].append(positive)
            out["positive_id"].append(doc_id)
    return out


def pseudo_queries(title: str, text: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Up to n (query, positive) pairs from one document without a model: its title first, then
    sentences of its text (the inverse cloze task). The positive is the document without its query
    (with it, KEEP_SENTENCE of the time); a one-sentence, untitled document makes none."""
    title, sentences = title.strip(), _SENTENCE_END.split(text.strip())
    lo, hi = SENTENCE_WORDS
    usable = [i for i, s in enumerate(sentences) if lo <= len(s.split()) <= hi] if len(sentences) > 1 else []
    out = []
    if title and text.strip():
        out.append((title, text.strip() if rng.random() >= KEEP_SENTENCE else doc_text(title, text)))
    for i in sorted(rng.choice(usable, size=min(n - len(out), len(usable)), replace=False)) if n > len(out) else []:
        rest = sentences if rng.random() < KEEP_SENTENCE else sentences[:i] + sentences[i + 1:]
        out.append((sentences[i], doc_text(title, " ".join(rest))))
    return out[:n]


def clean_query(text: str) -> str:
    """A generator's answer as a query: its first non-empty line, without a 'Query:' label or quotes."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = re.sub(r"^(query|question)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'`").strip()


class _Generator:
    """A Hugging Face LM in an actor: causal (left-padded, its chat template when it has one) or
    seq2seq (doc2query); `queries_per_doc` samples per document, seeded per document."""

    def __init__(self, model: str, endpoint: str, prompt: str, max_input_tokens: int, max_new_tokens: int,
                 temperature: float, queries_per_doc: int, seed: int):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        from raykit.device import local_device
        from raykit.encoder import resolve_model
        from raykit.precision import use_bf16

        path = resolve_model(model)
        config = AutoConfig.from_pretrained(path)
        self.seq2seq = bool(config.is_encoder_decoder)
        self.device = local_device()
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right" if self.seq2seq else "left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if use_bf16("auto", self.device) else torch.float32
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.model = cls.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        self.template = prompt or ("{document}" if self.seq2seq else INSTRUCTION)
        self.chat = not self.seq2seq and bool(getattr(self.tokenizer, "chat_template", None))
        self.n, self.seed, self.temperature = queries_per_doc, seed, temperature
        self.max_input, self.max_new = max_input_tokens, max_new_tokens

    def _input(self, document: str) -> str:
        ids = self.tokenizer(document, add_special_tokens=False, truncation=True, max_length=self.max_input)["input_ids"]
        text = self.template.replace("{document}", self.tokenizer.decode(ids))
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    def __call__(self, batch: dict) -> dict:
        import torch

        ids, texts = list(batch["id"]), [doc_text(h, t) for h, t in zip(batch["title"], batch["text"])]
        enc = self.tokenizer([self._input(t) for t in texts], return_tensors="pt", padding=True,
                             add_special_tokens=not self.chat).to(self.device)
        torch.manual_seed(_doc_key(self.seed, ids[0]))  # a batch's draws follow from its first document
        sample = {"do_sample": True, "temperature": self.temperature, "top_p": 0.95} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=self.max_new, num_return_sequences=self.n,
                                      pad_token_id=self.tokenizer.pad_token_id, **sample)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]  # the prompt comes back in front of the answer
        answers = [clean_query(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return _rows(ids, texts, answers, self.n)


class _Endpoint:
    """An OpenAI-compatible chat-completions server (vLLM, TGI, ...): requests in threads, since the
    actor only waits; transient failures (connection, 429, 5xx) are retried with backoff."""

    ATTEMPTS = 5

    def __init__(self, model: str, endpoint: str, prompt: str, max_input_tokens: int, max_new_tokens: int,
                 temperature: float, queries_per_doc: int, seed: int):
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.template = model, prompt or INSTRUCTION
        self.max_chars = 4 * max_input_tokens  # ~4 characters a token: the server's tokenizer is not here
        self.max_new, self.temperature, self.n, self.seed = max_new_tokens, temperature, queries_per_doc, seed
        self.key = os.environ.get(KEY_ENV, "")

    def __call__(self, batch: dict) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        ids, texts = list(batch["id"]), [doc_text(h, t) for h, t in zip(batch["title"], batch["text"])]
        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            answers = [a for got in pool.map(self._ask, ids, texts) for a in got]
        return _rows(ids, texts, answers, self.n)

    def _ask(self, doc_id: str, text: str) -> list[str]:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "n": self.n, "max_tokens": self.max_new, "temperature": self.temperature,
                           "seed": _doc_key(self.seed, doc_id) % 2**31,
                           "messages": [{"role": "user", "content": self.template.replace("{document}", text[:self.max_chars])}]})
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        for attempt in range(self.ATTEMPTS):
            try:
                request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=120) as reply:
                    choices = json.loads(reply.read())["choices"]
                answers = [clean_query(c["message"]["content"] or "") for c in choices][: self.n]
                return answers + [""] * (self.n - len(answers))
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500:
                    raise RaykitError(f"synth.endpoint: {self.url} answered {e.code} {e.reason}; check synth.generator "
                                      "(the model name it serves) and OPENAI_API_KEY") from None
                failure = f"{e.code} {e.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                failure = str(getattr(e, "reason", e))
            time.sleep(min(30.0, 2.0**attempt))
        raise RaykitError(f"synth.endpoint: {self.url} did not answer after {self.ATTEMPTS} attempts ({failure}); is the server up?")


def _rows(ids: list[str], texts: list[str], answers: list[str], n: int) -> dict:
    """Rows (query, positive, positive_id) from n answers per document; empty answers dropped."""
    out = {"query": [], "positive": [], "positive_id": []}
    for k, answer in enumerate(answers):
        if answer:
            out["query"].append(answer)
            out["positive"].append(texts[k // n])
            out["positive_id"].append(ids[k // n])
    return out


# --- 3-4. de-duplication and the round trip ----------------------------------------------------------


def _deduplicate(rows: list[dict]) -> list[dict]:
    """One row per (query, document); a query made for more than one document is dropped for all."""
    def norm(q: str) -> str:
        return " ".join(q.lower().split()).strip(" .?!")

    docs_of: dict[str, set[str]] = {}
    for r in rows:
        docs_of.setdefault(norm(r["query"]), set()).add(r["positive_id"])
    out, seen = [], set()
    for r in rows:
        key = norm(r["query"])
        if key and len(docs_of[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _round_trip(job: JobConfig, source: str, out: str, rows: list[dict]) -> list[dict]:
    """The rows whose document model.name ranks in the top filter_top_k of the corpus for their query."""
    cfg, model = job.synth, job.model
    own = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    store = out.rsplit(".", 1)[0] + ".embeddings"  # a rerun finds it committed and skips it
    committed = pipeline.run(EmbedJob(model=model.name, corpus=source, output=store, max_seq_length=model.max_seq_length,
                                      prompts=model.prompts, embed=cfg.embed, **own))
    encoder = Encoder.from_pretrained(model.name, committed["model"]["max_seq_length"], committed["model"]["prompts"], **own)
    log.info(f"synth: round trip of {len(rows)} queries against {committed['rows']} documents (top {cfg.filter_top_k})")
    kept = []
    for block in range(0, len(rows), search.QUERY_BLOCK):
        chunk = rows[block:block + search.QUERY_BLOCK]
        q_emb = search.encode_texts(encoder, committed, [r["query"] for r in chunk], "query")
        for r, hits in zip(chunk, search.top_k(store, committed, q_emb, cfg.filter_top_k)):
            ranks = [i for i, (doc, _) in enumerate(hits) if doc == r["positive_id"]]
            if ranks:
                kept.append({**r, "round_trip_rank": ranks[0] + 1})
    return kept
