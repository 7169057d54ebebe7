"""Knowledge distillation from a teacher's scores: MarginMSE and KL over a candidate list.

The student's score of a (query, document) pair is `scale * cosine` (the same 1/temperature as MNR),
so its margins live on a scale comparable to a cross-encoder's logits. Teacher scores come with the
data (`positive_score`, `negative_scores`), computed once by `raykit score`.

- MarginMSE (Hofstätter et al., 2020): for each hard negative, (s(q,p) - s(q,n)) should equal the
  teacher's margin (t(q,p) - t(q,n)). Only margins are matched, so the teacher's offset is free.
- KL: the student's softmax over [positive, negatives] should match the teacher's (KL(teacher || student)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def student_scores(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 1 + k) scores of each query against its positive and its k negatives."""
    negatives = negatives.reshape(queries.shape[0], -1, queries.shape[-1])  # (B, k, D)
    docs = torch.cat([positives[:, None, :], negatives], 1).float()  # (B, 1+k, D)
    return scale * torch.einsum("bd,bkd->bk", queries.float(), docs)


def margin_mse_loss(queries, positives, negatives, teacher_pos, teacher_neg, scale: float = 20.0) -> torch.Tensor:
    """Mean over (query, negative) of ((s_p - s_n) - (t_p - t_n))^2."""
    s = student_scores(queries, positives, negatives, scale)  # (B, 1+k)
    t_neg = teacher_neg.reshape(s.shape[0], -1).float()
    student_margin = s[:, :1] - s[:, 1:]  # (B, k)
    teacher_margin = teacher_pos.float()[:, None] - t_neg  # (B, k)
    return F.mse_loss(student_margin, teacher_margin)


def kl_loss(queries, positives, negatives, teacher_pos, teacher_neg, scale: float = 20.0, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over each query's [positive, negatives], teacher logits / temperature."""
    s = student_scores(queries, positives, negatives, scale)  # (B, 1+k)
    t = torch.cat([teacher_pos.float()[:, None], teacher_neg.reshape(s.shape[0], -1).float()], 1) / temperature
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean")
