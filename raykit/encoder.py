"""The bi-encoder: a Hugging Face AutoModel, pooling, L2 normalization, a max sequence length.

Saved models are plain sentence-transformers directories (modules.json, 1_Pooling, 2_Normalize), so
`SentenceTransformer(path)` loads them and gives the same embeddings as `Encoder.encode`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raykit import cache, storage, tokens
from raykit.config import ModelConfig, Prompts
from raykit.errors import RaykitError
from raykit.tokens import Tokenizing


def resolve_model(name: str, key: str = "model.name") -> str:
    """A local directory for `pkg:PACKAGE/SUBDIR` (weights shipped in a Python package) or an s3://
    folder (fetched once per node, e.g. a raykit run's model/ on a cluster); else `name`. `key`: the
    job key that named it, for the error."""
    if storage.is_uri(name):
        return cache.local_copy(name)
    if not name.startswith("pkg:"):
        # A path (not a hub id like org/name) that is not there: say so, not the hub's "Repo id" rule.
        if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
            raise RaykitError(f"{key}: {name}: no such folder; point it at a model folder, a pkg: path or a hub id")
        return name
    package, _, sub = name[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RaykitError(f"{key}: {name}: Python package '{package}' is not installed; pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0], sub)
    if not path.is_dir():
        raise RaykitError(f"{key}: {name}: no folder '{sub}' inside package '{package}'")
    return str(path)


def hub_options(revision: str, trust_remote_code: bool) -> dict:
    """What every from_pretrained of one model gets: its pinned revision and whether its own code may run."""
    return {"revision": revision or None, "trust_remote_code": trust_remote_code}


def load_error(key: str, name: str, e: Exception) -> RaykitError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "trust_remote_code" in str(e):
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        return RaykitError(f"{key}: {name} runs Python code from its repository; review it, then set "
                           f"{section}trust_remote_code=true")
    return RaykitError(f"{key}: cannot load '{name}' ({first}); use a local folder, a pkg: path, or a hub id "
                       "reachable from this machine")


def model_config(name: str, key: str = "model.name", embedding: bool = True, revision: str = "",
                 trust_remote_code: bool = False):
    """A model's Hugging Face config, read without its weights: a job is checked against it on the
    driver before anything is written. One line naming `key` when it cannot be read, or when an
    `embedding` model's sentence-transformers modules are ones raykit does not run."""
    from transformers import AutoConfig

    path = resolve_model(name, key)
    try:
        config = AutoConfig.from_pretrained(path, **hub_options(revision, trust_remote_code))
    except (OSError, ValueError) as e:
        raise load_error(key, name, e) from None
    if embedding:
        stored_settings(name, revision, key)
    return config


def position_limit(config) -> int:
    """The longest input a model's position embeddings cover (0: no such limit, e.g. rotary positions)."""
    limit = getattr(config, "max_position_embeddings", 0) or 0
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):  # positions start after the padding index
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return max(limit, 0) if config.model_type not in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2") else 0


def check_length(config, length: int, name: str, key: str = "max_seq_length") -> int:
    """The model's position limit (0: none); a `length` asked for past it is refused in one line naming `key`."""
    limit = position_limit(config)
    if limit and length > limit:
        raise RaykitError(f"{key}: {length} is past the {limit} positions {name} has; use {limit} or less")
    return limit


class Encoder(nn.Module):
    """Text -> L2-normalized embedding. `forward` takes token ids, `encode` takes strings."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, normalize: bool, max_seq_length: int,
                 prompts: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = {role: text for role, text in (prompts or {}).items() if text}  # {"query": ..., "document": ...}
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        # config attributes training changed (attention dropout) and their base values, which a saved
        # model's config.json keeps: its users fine-tune it further with the family's own settings
        self.base_config: dict[str, float] = {}

    @classmethod
    def load(cls, cfg: ModelConfig, max_seq_length: int = 0, key: str = "model.name", stored: dict | None = None,
             attention_dropout: float = -1) -> "Encoder":
        """`max_seq_length`: one the user set (refused past the model's positions), beside cfg's.
        `key`: where the model was named, for errors; `stored`: its folder's settings, if already read;
        `attention_dropout`: train.attention_dropout (-1: the model's own)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load, per worker: noise in every log
        path = resolve_model(cfg.name, key)
        hub = hub_options(cfg.revision, cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **hub)
            config = AutoConfig.from_pretrained(path, **hub)
            base_config = _set_attention_dropout(config, attention_dropout)
            # fp32 master weights whatever the checkpoint's dtype; bf16 comes from autocast or DeepSpeed.
            model = AutoModel.from_pretrained(path, config=config, dtype=torch.float32, **hub)
        except (OSError, ValueError) as e:
            raise load_error(key, cfg.name, e) from None
        # asked for by name: refused past the limit; a default longer than the model: the limit
        limit = check_length(model.config, max_seq_length, cfg.name)
        if getattr(model, "pooler", None) is not None:
            # BERT-style poolers feed next-sentence prediction, not our pooling of hidden states: an
            # unused parameter that DDP and ZeRO would wait forever for. Frozen, and saved unchanged.
            model.pooler.requires_grad_(False)
        # the job's prompts, else those the model's folder stores (a raykit or sentence-transformers save)
        stored = stored if stored is not None else stored_settings(cfg.name, cfg.revision, key)
        prompts = cfg.prompts.as_dict() or stored.get("prompts", {})
        encoder = cls(model, tokenizer, cfg.pooling, cfg.normalize, min(cfg.max_seq_length, limit or cfg.max_seq_length), prompts)
        encoder.base_config = base_config
        return encoder

    @classmethod
    def from_pretrained(cls, name: str, max_seq_length: int = 0, prompts: dict[str, str] | None = None,
                        revision: str = "", trust_remote_code: bool = False) -> "Encoder":
        """Load a saved model with the pooling, normalization, max length and prompts its folder
        declares; `prompts` for a model whose folder stores none.

        Reads the sentence-transformers files (modules.json, 1_Pooling/config.json,
        sentence_bert_config.json) that raykit and sentence-transformers write; a plain Hugging Face
        model without them gets ModelConfig's defaults (mean pooling, normalized, 256 tokens).
        """
        stored = stored_settings(name, revision, key="model")
        settings = {**stored, "prompts": Prompts(**(stored.get("prompts") or prompts or {}))}
        if max_seq_length:
            settings["max_seq_length"] = max_seq_length
        # outside a train job the model is named by the `model` key (embed, search)
        return cls.load(ModelConfig(name=name, revision=revision, trust_remote_code=trust_remote_code, **settings),
                        max_seq_length, key="model", stored=stored)

    def fingerprint(self) -> str:
        """The identity of what this encoder computes: weights, tokenizer, pooling, normalization, max
        length, prompts.

        Two encoders with the same fingerprint embed every text identically, so stored document
        embeddings may be searched with queries from either; anything else is a serving mismatch.
        """
        h = hashlib.sha256()
        settings = {"pooling": self.pooling, "normalize": self.normalize, "max_seq_length": self.max_seq_length}
        if self.prompts:  # only then: a model without prompts keeps the fingerprint it always had
            settings["prompts"] = self.prompts
        h.update(json.dumps(settings, sort_keys=True).encode())
        if self.tokenizer.is_fast:
            # without the truncation and padding a fast tokenizer keeps from its last call: raykit sets
            # both on every call, and the fingerprint must not change once the encoder has tokenized
            vocab = json.loads(self.tokenizer.backend_tokenizer.to_str())
            for state in ("truncation", "padding"):
                vocab.pop(state, None)
        else:
            vocab = self.tokenizer.get_vocab()
        h.update(hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).digest())
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "sha256:" + h.hexdigest()

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenizing(self) -> Tokenizing:
        rule = self.max_seq_length, tuple(self.prompts.values())
        if getattr(self, "_backend_for", None) != rule:  # checked once, and again if the length or prompts change
            self._backend = tokens.backend(self.tokenizer, self.max_seq_length, ("", *self.prompts.values()))
            self._backend_for = rule
        return Tokenizing(self.tokenizer, self.prompts, self.max_seq_length, self._backend)

    def prompted(self, texts, role: str) -> list[str]:
        return self.tokenizing().prompted(texts, role)

    def tokenize(self, texts: list[str], *, role: str) -> dict[str, torch.Tensor]:
        return self.tokenizing().tokenize(texts, role=role)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, device=None, module: nn.Module | None = None, *,
               role: str) -> torch.Tensor:
        """Embeddings (N, H) float32 on CPU, in input order, of `texts` as queries or documents (`role`).

        Texts go through in length order so each batch pads to similar lengths. `module` lets a
        wrapper (DDP, DeepSpeed) run the forward; it defaults to this encoder.
        """
        module = module or self
        device = device or next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx], role=role).items()}
            out[idx] = module(**batch).float().cpu()
        return out

    def save(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write a sentence-transformers directory. `state_dict` overrides the model's own (ZeRO-3)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.model.config
        live = {name: getattr(config, name) for name in self.base_config}
        try:
            # some families read these at run time (Falcon, GPT-Neo): the live model keeps the training value
            for name, value in self.base_config.items():
                setattr(config, name, value)
            with _no_deepspeed_probe():
                self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            if state_dict is not None:
                # save_pretrained writes the live module's dtype into config.json (bf16 under DeepSpeed);
                # loaders cast to it, so it must name the dtype of the weights actually saved.
                saved = next(v.dtype for v in state_dict.values() if v.is_floating_point())
                config.dtype = str(saved).removeprefix("torch.")
                config.save_pretrained(path)
        finally:
            for name, value in live.items():
                setattr(config, name, value)
        self.tokenizer.save_pretrained(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir(exist_ok=True)
        (path / "1_Pooling").mkdir(exist_ok=True)
        _write_json(path / "modules.json", modules)
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        _write_json(
            path / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": self.dim,
                "pooling_mode_cls_token": self.pooling == "cls",
                "pooling_mode_mean_tokens": self.pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
        )
        # sentence-transformers' encode_query/encode_document put these prompts before the text, as raykit does
        _write_json(path / "config_sentence_transformers.json", {
            "similarity_fn_name": "cosine" if self.normalize else "dot", "prompts": self.prompts, "default_prompt_name": None})


# The config attribute families name their attention dropout by (BERT, RoBERTa, MPNet, XLM-R: the
# first; ModernBERT, Qwen, Llama, Mistral: the second; GPT-2 style: the third).
ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def _set_attention_dropout(config, p: float) -> dict[str, float]:
    """Set a transformers config's attention dropout to `p` (-1: leave it as it is); return what it
    changed, with the values it had."""
    name = next((a for a in ATTENTION_DROPOUT if isinstance(getattr(config, a, None), (int, float))), None)
    if name is None or p == -1:
        return {}
    before = getattr(config, name)
    setattr(config, name, p)
    return {name: before}


def stored_settings(name: str, revision: str = "", key: str = "model.name") -> dict:
    """pooling / normalize / max_seq_length from a sentence-transformers folder (or hub repo), if it has them."""
    local = resolve_model(name, key)

    def read(file: str):
        path = Path(local, file)
        if path.is_file():
            return json.loads(path.read_text())
        if Path(local).is_dir():
            return None
        try:  # a hub id: the small config files, from the cache or the hub
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(name, file, revision=revision or None)).read_text())
        except Exception:  # noqa: BLE001 - absent file, offline, or not a hub id: use defaults
            return None

    settings = {}
    modules = read("modules.json")
    if modules is not None:
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
        unknown = [f"{kind} ({path})" for kind, path in kinds.items() if kind not in ("Transformer", "Pooling", "Normalize")]
        if unknown:  # never dropped: embeddings without them are not the model's
            raise RaykitError(f"{name}: sentence-transformers module {', '.join(unknown)} is not supported by raykit; "
                              "use a model of Transformer, Pooling and Normalize modules")
        settings["normalize"] = "Normalize" in kinds
        pooling = read(f"{kinds.get('Pooling') or '1_Pooling'}/config.json") or {}
        if pooling:
            settings["pooling"] = _pooling(pooling, name)
    length = (read("sentence_bert_config.json") or {}).get("max_seq_length")
    if not length and modules is not None:  # sentence-transformers 6 keeps it as the tokenizer's model_max_length
        length = (read("tokenizer_config.json") or {}).get("model_max_length")
    if length and int(length) < 1_000_000:  # a tokenizer without a limit says 1e30
        settings["max_seq_length"] = int(length)
    stored = (read("config_sentence_transformers.json") or {}).get("prompts") or {}
    # as sentence-transformers' encode_document: the first of these names the folder has, even if empty
    document = next((stored[k] for k in ("document", "passage", "corpus") if k in stored), "")
    if stored.get("query") or document:
        settings["prompts"] = {"query": stored.get("query", ""), "document": document}
    return settings


def _pooling(config: dict, name: str) -> str:
    """mean or cls from a Pooling module's config: sentence-transformers 6's `pooling_mode`, or the
    older one flag per mode. Anything else is refused, not pooled another way."""
    mode = config.get("pooling_mode")
    if mode is None:
        flags = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                 for k, on in config.items() if k.startswith("pooling_mode_") and on]
        mode = flags[0] if len(flags) == 1 else "+".join(flags) or "none"
    if config.get("include_prompt", True) is False:
        raise RaykitError(f"{name}: its pooling leaves the prompt's tokens out (include_prompt: false); raykit pools every token")
    if mode not in ("mean", "cls"):
        raise RaykitError(f"{name}: pooling mode '{mode}' is not supported; raykit pools by mean or CLS token")
    return mode


@contextlib.contextmanager
def _no_deepspeed_probe():
    """save_pretrained unwraps the model through accelerate, which imports DeepSpeed only to ask whether
    the model is a DeepSpeedEngine: 2-5 s of CPU in every LoRA worker's export, and in raykit export.
    A model cannot be wrapped by a DeepSpeed this process never imported, so the probe is skipped then."""
    if "deepspeed" in sys.modules:
        yield
        return
    import accelerate.utils.other as unwrapping

    probe = unwrapping.is_deepspeed_available
    unwrapping.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        unwrapping.is_deepspeed_available = probe


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
