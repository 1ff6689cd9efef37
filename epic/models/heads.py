"""METER's heads (meter/modules/heads.py): pooler, ITM and MLM; names match METER's state dict."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_meter import METERConfig


class Pooler(nn.Module):
    """First token → Linear → tanh."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


class ITMHead(nn.Module):
    """Matched / not matched logits from ``cls_feats`` = [text pooled, image pooled] (2H → 2)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.fc = nn.Linear(input_size, 2)

    def forward(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self.fc(cls_feats)


class MLMTransform(nn.Module):
    """dense → GELU → LayerNorm (HF's BertPredictionHeadTransform)."""

    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class MLMHead(nn.Module):
    """transform → vocabulary decoder (not tied to the word embeddings) + bias."""

    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.transform = MLMTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(text_feats)) + self.bias


def new_consistency_head(hidden_size: int, std: float) -> nn.Linear:
    """EPIC's head beta (Eq. 1): D_i = sigmoid(beta^T h_i + b) on every fused text state; N(0, std) weight, zero
    bias (METER's / BERT's init). Families create it when their config has ``consistency_head: true``."""
    head = nn.Linear(hidden_size, 1)
    head.weight.data.normal_(mean=0.0, std=std)
    head.bias.data.zero_()
    return head
