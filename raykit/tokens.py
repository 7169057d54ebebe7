"""Texts into a model's input. `Tokenizing`: the one rule (tokenizer, prompts, length) for an encoder
and for processes that tokenize without its weights. `Backend`: a fast tokenizer's call made by its
Rust backend alone (the `tokenizers` library), where that gives the same ids and masks as transformers.

transformers' `tokenizer(texts, padding=True, truncation=True, return_tensors=...)` runs the Rust
encoding without the GIL, then builds Python lists of every text's ids and pads them in Python, with
the GIL. A training worker's read-ahead threads share that lock with the loop's thread, which on a
GPU is the one launching kernels: beside one thread feeding through transformers' call, a stand-in
for that thread kept 67 to 74% of its speed; beside one feeding through `Backend.padded`, 83 to 92%,
and the feed delivered 1.36x to 1.44x the pairs a second (bench/feed.py, 2 AMD EPYC cores, three runs).

`backend()` checks the backend against the tokenizer on PROBES (after each prompt) and gives None
where they differ: a slow (Python) tokenizer, a class that changes what its backend gives, inputs
other than ids, type ids and mask. Callers then keep transformers.

No torch or transformers import at the module's top: `raykit embed`'s tokenizer actors use Backend
without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Texts tokenized both ways before the backend alone is trusted: accents and other scripts,
# whitespace, special tokens written out, one past any max_seq_length, and an empty one (padding).
PROBES = ("Statins lower LDL cholesterol.", "  Ünïcödé,\ttabs\nand   spaces ", "déjà vu 東京 Москва", "[CLS] <s> </s> [SEP] <pad>",
          "word " * 600, "")
INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # the model inputs Backend.padded can give


class Backend:
    """The `tokenizers` backend of a fast tokenizer, truncating as transformers does. `spec`: what
    backend() read from the tokenizer (its JSON, truncation and padding sides, pad ids, input names).
    Pickles as its spec: a copy for another thread or actor builds its own."""

    def __init__(self, spec: dict, max_seq_length: int):
        from tokenizers import Tokenizer

        self.spec, self.max_seq_length = spec, max_seq_length
        tokenizer = Tokenizer.from_str(spec["json"])
        # what transformers sets on the backend for `truncation=True, max_length=...` and no padding
        tokenizer.enable_truncation(max_seq_length, stride=0, strategy="longest_first", direction=spec["truncation_side"])
        tokenizer.no_padding()
        # without the character offsets transformers asks for and raykit never reads
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    def __reduce__(self):
        return Backend, (self.spec, self.max_seq_length)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, unpadded: transformers' `tokenizer(texts, truncation=True, max_length=...)["input_ids"]`."""
        return [e.ids for e in self._encode(texts, add_special_tokens=True)]

    def padded(self, texts: list[str]) -> dict[str, np.ndarray]:
        """transformers' `tokenizer(texts, padding=True, truncation=True, max_length=..., return_tensors="np")`:
        int64 arrays (len(texts), longest), padded on the tokenizer's side."""
        encodings = self._encode(texts, add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        real = np.arange(lengths.max(initial=0)) < lengths[:, None]  # (B, T): a text's tokens, then its padding
        if self.spec["padding_side"] == "left":
            real = real[:, ::-1]
        out = {}
        for name, field, pad in (("input_ids", "ids", self.spec["pad_id"]), ("token_type_ids", "type_ids", self.spec["pad_type_id"])):
            if name in self.spec["inputs"]:
                out[name] = np.full(real.shape, pad, dtype=np.int64)
                # row by row in reading order, which is each text's tokens in order on either side
                out[name][real] = np.fromiter(chain.from_iterable(getattr(e, field) for e in encodings), dtype=np.int64, count=int(lengths.sum()))
        if "attention_mask" in self.spec["inputs"]:
            out["attention_mask"] = real.astype(np.int64)
        return out


def backend(tokenizer, max_seq_length: int, prompts=("",), padding: bool = True) -> Backend | None:
    """`tokenizer`'s Backend at `max_seq_length`, or None where it would not give what `tokenizer`
    gives, unpadded and (with `padding`) padded, on PROBES after each of `prompts`."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    if padding and (tokenizer.pad_token_id is None or not set(tokenizer.model_input_names) <= set(INPUTS)):
        return None  # no pad token: transformers refuses to pad, and raykit keeps its error
    spec = {"json": tokenizer.backend_tokenizer.to_str(), "truncation_side": tokenizer.truncation_side,
            "padding_side": tokenizer.padding_side, "pad_id": tokenizer.pad_token_id, "pad_type_id": tokenizer.pad_token_type_id,
            "inputs": list(tokenizer.model_input_names)}
    fast = Backend(spec, max_seq_length)
    for prompt in prompts:
        probes = [prompt + t for t in PROBES]
        if fast.ids(probes) != tokenizer(probes, truncation=True, max_length=max_seq_length)["input_ids"]:
            return None
        if padding:
            want = tokenizer(probes, padding=True, truncation=True, max_length=max_seq_length, return_tensors="np")
            got = fast.padded(probes)
            if set(want) != set(got) or not all(np.array_equal(want[name], got[name]) for name in want):
                return None
    return fast


@dataclass(frozen=True)
class Tokenizing:
    """How an encoder turns texts into its model's input: its tokenizer, its prompts, its length. One
    rule for the encoder and for processes that tokenize without its weights (the tokenizer actors
    of raykit/train/feed.py). A copy (copy.deepcopy) is another thread's: a fast tokenizer used from
    two threads at once fails ("Already borrowed")."""

    tokenizer: Any
    prompts: dict[str, str]  # {"query": ..., "document": ...}
    max_seq_length: int
    backend: Backend | None = None  # the tokenizer's Rust backend alone, where it gives the same

    def prompted(self, texts, role: str) -> list[str]:
        """`texts` as the model sees them in `role` ("query" or "document"): after that role's prompt."""
        prompt = self.prompts.get(role, "")
        return [prompt + t for t in texts] if prompt else list(texts)

    def tokenize(self, texts: list[str], *, role: str) -> dict[str, torch.Tensor]:
        """Padded, truncated tensors of `texts` in `role`."""
        import torch

        texts = self.prompted(texts, role)
        if self.backend is not None and texts:  # the same tensors, without holding the GIL for most of the time
            return {name: torch.from_numpy(array) for name, array in self.backend.padded(texts).items()}
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"))
