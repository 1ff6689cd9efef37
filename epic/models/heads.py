"""The pooler, ITM and MLM heads METER (meter/modules/heads.py) and ViLT (vilt/modules/heads.py) share, sized by
numbers (not by a family config); parameter names match both official state dicts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Pooler(nn.Module):
    """First token → Linear → tanh."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class ITMHead(nn.Module):
    """Matched / not matched logits (class 1 = matched) from ``cls_feats``: METER's [text pooled, image pooled]
    (2H → 2), ViLT's pooled [CLS] (H → 2)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.fc = nn.Linear(input_size, 2)

    def forward(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self.fc(cls_feats)


class MLMTransform(nn.Module):
    """dense → GELU → LayerNorm (HF's BertPredictionHeadTransform)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class MLMHead(nn.Module):
    """transform → vocabulary decoder (not tied to the word embeddings, in METER and ViLT alike) + bias."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = MLMTransform(hidden_size, eps)
        self.decoder = nn.Linear(hidden_size, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(text_feats)) + self.bias


def new_consistency_head(hidden_size: int, std: float) -> nn.Linear:
    """EPIC's head beta (Eq. 1): D_i = sigmoid(beta^T h_i + b) on every fused text state; N(0, std) weight, zero
    bias (METER's / BERT's init). Families create it when their config has ``consistency_head: true``."""
    head = nn.Linear(hidden_size, 1)
    head.weight.data.normal_(mean=0.0, std=std)
    head.bias.data.zero_()
    return head
