"""METER's co-attention fusion layer (``BertCrossLayer``, meter/modules/bert_model.py).

Each stream runs, with residual connections and post-LayerNorm as in BERT:
    self-attention on its own tokens  →  cross-attention (queries from its own stream, keys/values from the other
    stream's layer input, masked with the other stream's mask)  →  feed-forward (GELU).
Module names equal METER's so official state-dict keys map one to one
(``attention.self.query``, ``crossattention.output.LayerNorm``, ``intermediate.dense``, ``output.dense`` ...).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_meter import METERConfig

QueryKey = Tuple[torch.Tensor, torch.Tensor]


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1 = attend / 0 = padding → [B, 1, 1, L] additive mask (0 or dtype's most negative value)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class BertSelfAttention(nn.Module):
    """Multi-head attention; ``context`` is the own stream (self-attention) or the other stream (cross-attention)."""

    def __init__(self, cfg: METERConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads != 0:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention_dropout = cfg.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H] → [B, heads, L, H / heads]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def query_key(self, hidden_states: torch.Tensor, context: torch.Tensor) -> QueryKey:
        """Per-head query and key projections, [B, heads, L_q, dh] and [B, heads, L_k, dh] (no 1/√dh scaling)."""
        return self.split_heads(self.query(hidden_states)), self.split_heads(self.key(context))

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                return_query_key: bool = False) -> Tuple[torch.Tensor, Optional[QueryKey]]:
        query, key = self.query_key(hidden_states, context)
        value = self.split_heads(self.value(context))
        attended = F.scaled_dot_product_attention(  # softmax(QKᵀ/√dh + mask) V
            query, key, value, attn_mask=context_mask,
            dropout_p=self.attention_dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).flatten(2)
        return attended, ((query, key) if return_query_key else None)


class BertSelfOutput(nn.Module):
    """Output projection, dropout, residual, post-LayerNorm."""

    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(attended)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                return_query_key: bool = False) -> Tuple[torch.Tensor, Optional[QueryKey]]:
        attended, query_key = self.self(hidden_states, context, context_mask, return_query_key)
        return self.output(attended, hidden_states), query_key


class BertIntermediate(nn.Module):
    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size * cfg.mlp_ratio)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size * cfg.mlp_ratio, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertCrossLayer(nn.Module):
    """One co-attention layer of one stream: self-attention → cross-attention to the other stream → FFN."""

    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.crossattention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, hidden_states: torch.Tensor, other_states: torch.Tensor, attention_mask: torch.Tensor,
                other_attention_mask: torch.Tensor, return_cross_query_key: bool = False
                ) -> Tuple[torch.Tensor, Optional[QueryKey]]:
        """Masks are additive [B, 1, 1, L] (``additive_attention_mask``). Optionally also returns the
        cross-attention's per-head query (own stream) and key (other stream) projections."""
        self_attended, _ = self.attention(hidden_states, hidden_states, attention_mask)
        cross_attended, query_key = self.crossattention(
            self_attended, other_states, other_attention_mask, return_cross_query_key)
        return self.output(self.intermediate(cross_attended), cross_attended), query_key

    def cross_query_key(self, hidden_states: torch.Tensor, other_states: torch.Tensor,
                        attention_mask: torch.Tensor) -> QueryKey:
        """The cross-attention's query and key projections without running the rest of the layer
        (self-attention is needed for the query; the keys only need the other stream's input)."""
        self_attended, _ = self.attention(hidden_states, hidden_states, attention_mask)
        return self.crossattention.self.query_key(self_attended, other_states)
