"""Cold start's query writers (raykit/train/synth.py runs them on Ray Data, a batch of documents a
call): model-free (a document's title, then sentences of its text, as its queries: title-body pairs
and the inverse cloze task), a Hugging Face causal or seq2seq LM in an actor, or an OpenAI-compatible
server such as vLLM. Each gives rows (query, positive, positive_id), seeded per document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np

from raykit.data import doc_text
from raykit.errors import RaykitError

# What a causal LM or an endpoint is asked when synth.prompt is unset (a chat model's template wraps it).
INSTRUCTION = ("Write one short search query that the following document answers. Reply with the query only.\n\n"
               "Document: {document}\n\nQuery:")
KEY_ENV = "OPENAI_API_KEY"  # the endpoint's bearer token, if it wants one
SENTENCE_WORDS = (6, 40)  # model-free: sentences this long (in words) make queries; shorter say too little
KEEP_SENTENCE = 0.1  # ICT keeps the query in its positive 10% of the time: lexical overlap is a signal too
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def doc_key(seed: int, doc_id: str) -> int:
    """A document's place in the seeded sample, and the seed of what is drawn for it: the same on
    any worker and any shard layout."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "little") >> 1


def model_free(batch: dict, queries_per_doc: int, seed: int) -> dict:
    """A batch of documents' rows without a model: pseudo_queries of each, seeded per document."""
    out = {"query": [], "positive": [], "positive_id": []}
    for doc_id, title, text in zip(batch["id"], batch["title"], batch["text"]):
        for query, positive in pseudo_queries(title, text, queries_per_doc, np.random.default_rng(doc_key(seed, doc_id))):
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


class Generator:
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
        torch.manual_seed(doc_key(self.seed, ids[0]))  # a batch's draws follow from its first document
        sample = {"do_sample": True, "temperature": self.temperature, "top_p": 0.95} if self.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=self.max_new, num_return_sequences=self.n,
                                      pad_token_id=self.tokenizer.pad_token_id, **sample)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]  # the prompt comes back in front of the answer
        answers = [clean_query(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return _rows(ids, texts, answers, self.n)


class Endpoint:
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
                           "seed": doc_key(self.seed, doc_id) % 2**31,
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
