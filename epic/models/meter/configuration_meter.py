"""METER architecture configuration (HF style: one config dataclass per model family)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class METERConfig:
    family: str = "meter"  # `model.family` of the run config (epic.models.registry)
    # Vision tower: CLIP ViT (OpenAI layout, QuickGELU, pre-norm). METER keeps only the first 11 of CLIP's 12
    # blocks and applies ln_post to every token, so `vit_layers` counts the blocks actually built.
    image_size: int = 288
    patch_size: int = 16
    vit_width: int = 768
    vit_layers: int = 11
    vit_heads: int = 12
    vit_pretrained: Optional[str] = None  # local OpenAI-CLIP state dict (.pt / .bin / .safetensors)

    # Text tower: HF RoBERTa (or BERT) built from these sizes, or loaded from a local pretrained path.
    text_model_type: str = "roberta"  # "roberta" | "bert"
    text_pretrained: Optional[str] = None  # local HF folder; overrides the sizes below
    vocab_size: int = 50265
    text_hidden_size: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate_size: int = 3072
    text_max_position_embeddings: int = 514  # RoBERTa: max_text_len slots + 2 (positions start at pad_token_id + 1)
    text_type_vocab_size: int = 1  # RoBERTa 1, BERT 2
    text_layer_norm_eps: float = 1e-5  # roberta-base 1e-5, bert-base 1e-12
    max_text_len: int = 50
    pad_token_id: int = 1

    # Co-attention fusion (METER's BertCrossLayer stack).
    hidden_size: int = 768
    num_heads: int = 12
    num_fusion_layers: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12  # fusion layers and MLM head (METER builds them from a default RobertaConfig)
    num_token_types: int = 2  # 3 for NLVR2 (second image gets type 2)

    # Std of the normal init of every randomly initialised Linear / Embedding weight (vision tower, text tower,
    # fusion, heads). METER and BERT use 0.02, made for width 768 and pretrained towers. A tiny model trained from
    # scratch needs more: at width 64 a 0.02 projection scales its input by sqrt(64) * 0.02 = 0.16, so the
    # cross-attention's value -> output path passes ~3% of the other stream and image-text matching never
    # starts (tests/test_models.py::test_tiny_model_learns_image_text_matching).
    initializer_range: float = 0.02

    # EPIC's consistency head beta (Eq. 1, ``itc_score``: Linear(hidden_size, 1)); the run wiring switches it on for
    # EPIC runs (epic.enabled), a checkpoint that has it switches it on when loaded.
    consistency_head: bool = False
