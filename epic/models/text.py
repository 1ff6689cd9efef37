"""METER's text tower: a Hugging Face RoBERTa (or BERT) encoder whose pooler is never used."""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from .configuration_meter import METERConfig

TEXT_FAMILIES = {"roberta": (RobertaConfig, RobertaModel), "bert": (BertConfig, BertModel)}


def build_text_tower(cfg: METERConfig) -> nn.Module:
    """``RobertaModel``/``BertModel`` from the sizes in ``cfg``, or ``from_pretrained(cfg.text_pretrained)``."""
    if cfg.text_model_type not in TEXT_FAMILIES:
        raise ValueError(f"text_model_type={cfg.text_model_type!r}; choose one of {sorted(TEXT_FAMILIES)}")
    _, model_class = TEXT_FAMILIES[cfg.text_model_type]
    if cfg.text_pretrained:
        if not os.path.isdir(cfg.text_pretrained):
            raise FileNotFoundError(
                f"text_pretrained={cfg.text_pretrained!r} is not a local folder; save the HF model there first "
                f"(model.save_pretrained(DIR)) — there is no hub access here")
        model = model_class.from_pretrained(cfg.text_pretrained, add_pooling_layer=False)
        check_text_tower_matches(model.config, cfg)
        return model
    return model_class(text_hf_config(cfg), add_pooling_layer=False)


def text_hf_config(cfg: METERConfig, hidden_size: int = 0, layers: int = 0, heads: int = 0,
                   intermediate_size: int = 0):
    """HF ``RobertaConfig``/``BertConfig`` of the text family at ``cfg``'s sizes; a non-zero argument replaces one
    (the EPIC generator is a smaller or equal member of the same family)."""
    config_class, _ = TEXT_FAMILIES[cfg.text_model_type]
    return config_class(
        vocab_size=cfg.vocab_size,
        hidden_size=hidden_size or cfg.text_hidden_size,
        num_hidden_layers=layers or cfg.text_layers,
        num_attention_heads=heads or cfg.text_heads,
        intermediate_size=intermediate_size or cfg.text_intermediate_size,
        max_position_embeddings=cfg.text_max_position_embeddings,
        type_vocab_size=cfg.text_type_vocab_size,
        layer_norm_eps=cfg.text_layer_norm_eps,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.initializer_range,
    )


def check_text_tower_matches(hf_config, cfg: METERConfig) -> None:
    """A pretrained text tower must agree with the METER config on the sizes the rest of the model relies on."""
    pairs = {"vocab_size": (hf_config.vocab_size, cfg.vocab_size),
             "text_hidden_size": (hf_config.hidden_size, cfg.text_hidden_size),
             "pad_token_id": (hf_config.pad_token_id, cfg.pad_token_id)}
    wrong = {name: got for name, got in pairs.items() if got[0] != got[1]}
    if wrong:
        details = ", ".join(f"{name}: pretrained {a} vs config {b}" for name, (a, b) in wrong.items())
        raise ValueError(f"text_pretrained={cfg.text_pretrained!r} disagrees with the METER config ({details}); "
                         f"set these config fields to the pretrained model's values")


def prepared_attention_mask(text_tower: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] padding mask → the [B, 1, 1, L] mask HF uses as is for its attention implementation.

    Handing HF a ready 4-D mask skips its ``attention_mask.all()`` check, a device→host sync on every forward
    (and impossible on the meta device, where ``step_flops_per_sample`` counts FLOPs).
    """
    implementation = text_tower.config._attn_implementation
    if implementation == "sdpa":
        return attention_mask[:, None, None, :].bool()  # True = attend
    if implementation == "eager":
        dtype = text_tower.get_input_embeddings().weight.dtype
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return attention_mask  # flash-attention variants take the 2-D mask


def encode_text_tokens(text_tower: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] ids → [B, L, text_hidden] last hidden states (token type 0, RoBERTa positions from the padding)."""
    mask = prepared_attention_mask(text_tower, attention_mask)
    return text_tower(input_ids=input_ids, attention_mask=mask).last_hidden_state
