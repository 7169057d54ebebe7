"""The bi-encoder: a Hugging Face AutoModel, pooling, L2 normalization, a max sequence length.

Saved models are plain sentence-transformers directories (modules.json, 1_Pooling, 2_Normalize), so
`SentenceTransformer(path)` loads them and gives the same embeddings as `Encoder.encode`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raykit.config import ModelConfig
from raykit.errors import RaykitError


def resolve_model(name: str) -> str:
    """A local directory for `pkg:PACKAGE/SUBDIR` (weights shipped in a Python package); else `name`."""
    if not name.startswith("pkg:"):
        return name
    package, _, sub = name[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RaykitError(f"model.name: {name}: Python package '{package}' is not installed; pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0], sub)
    if not path.is_dir():
        raise RaykitError(f"model.name: {name}: no folder '{sub}' inside package '{package}'")
    return str(path)


class Encoder(nn.Module):
    """Text -> L2-normalized embedding. `forward` takes token ids, `encode` takes strings."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, normalize: bool, max_seq_length: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length

    @classmethod
    def load(cls, cfg: ModelConfig) -> "Encoder":
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model(cfg.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # fp32 master weights whatever the checkpoint's dtype; bf16 comes from autocast or DeepSpeed.
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            hint = "a local folder, a pkg: path, or a hub id reachable from this machine"
            raise RaykitError(f"model.name: cannot load '{cfg.name}' ({str(e).splitlines()[0]}); use {hint}") from None
        if getattr(model, "pooler", None) is not None:
            # BERT-style poolers feed next-sentence prediction, not our pooling of hidden states: an
            # unused parameter that DDP and ZeRO would wait forever for. Frozen, and saved unchanged.
            model.pooler.requires_grad_(False)
        return cls(model, tokenizer, cfg.pooling, cfg.normalize, cfg.max_seq_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )

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
    def encode(self, texts: list[str], batch_size: int = 64, device=None, module: nn.Module | None = None) -> torch.Tensor:
        """Embeddings (N, H) float32 on CPU, in input order.

        Texts go through in length order so each batch pads to similar lengths. `module` lets a
        wrapper (DDP, DeepSpeed) run the forward; it defaults to this encoder.
        """
        module = module or self
        device = device or next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in self.tokenize([texts[i] for i in idx]).items()}
            out[idx] = module(**batch).float().cpu()
        return out

    def save(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write a sentence-transformers directory. `state_dict` overrides the model's own (ZeRO-3)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
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
        _write_json(path / "config_sentence_transformers.json", {"similarity_fn_name": "cosine" if self.normalize else "dot"})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
