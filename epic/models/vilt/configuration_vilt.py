"""ViLT architecture configuration (HF style: one config dataclass per model family).

Defaults are ViLT-B/32 as released (dandelin/ViLT ``config.py`` + ``vit32_base``): a ViT-B/32 transformer (hidden
768, 12 layers, 12 heads, MLP ratio 4) over [BERT text embeddings; 32 px patches], bert-base-uncased vocabulary
(30522), 40 text positions, at most 200 image patches per image in pretraining.

Images are fixed squares of ``image_size`` pixels here (ViLT resizes the shorter side to 384 and pads a batch to
its largest image; we resize to a 384 x 384 square instead, so every patch is a real one and ViLT's padded-patch
branch of the sampling never fires on our data; it is implemented and tested all the same).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class ViLTConfig:
    family: str = "vilt"  # registry name (model.family in a run config)

    # Joint transformer (timm ViT blocks: pre-LN, qkv bias, GELU MLP, LayerNorm eps 1e-6, final norm).
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    drop_rate: float = 0.1  # ViLT's drop_rate: embeddings, attention output and MLP dropout (no attention-prob drop)
    vit_layer_norm_eps: float = 1e-6

    # Image side: side of the square input; the position-embedding grid is image_size // patch_size per side.
    image_size: int = 384
    patch_size: int = 32
    max_image_len: int = 200  # pretraining keeps at most this many patches per image (-1: all); evaluation: all
    # Local file with timm's vit_base_patch32_384 weights (ImageNet-21k, fine-tuned on 1k at 384; .pth, .bin,
    # .safetensors or Google's .npz). ViLT starts from them; the text side starts from scratch.
    vit_pretrained: Optional[str] = None

    # Text side: BERT word + position (+ BERT's own token-type 0) embeddings, LayerNorm eps 1e-12.
    vocab_size: int = 30522  # bert-base-uncased; 0 = take it from the run's tokenizer
    max_text_len: int = 40
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12  # text embeddings and the MLM head (HF BertConfig default)

    # Modality-type embeddings: 0 text, 1 image (2: NLVR2's second image).
    num_token_types: int = 2

    # N(0, initializer_range) init of the modules ViLT creates itself (text embeddings, modality types, pooler,
    # heads); the transformer keeps timm's ViT init (or the pretrained ViT).
    initializer_range: float = 0.02

    # EPIC's image-token consistency head beta (Eq. 1), Linear(hidden, 1) on every text state; a model option.
    consistency_head: bool = False

    # What the EPIC generator reads of a VLM's text side (its family and default sizes). ViLT has no text tower;
    # the paper's generator for ViLT is BERT-base (Sec. 5.1), so: a BERT of the joint transformer's sizes.
    @property
    def text_model_type(self) -> str:
        return "bert"

    @property
    def text_hidden_size(self) -> int:
        return self.hidden_size

    @property
    def text_layers(self) -> int:
        return self.num_layers

    @property
    def text_heads(self) -> int:
        return self.num_heads

    @property
    def text_intermediate_size(self) -> int:
        return self.hidden_size * self.mlp_ratio

    @property
    def text_max_position_embeddings(self) -> int:
        return self.max_text_len

    @property
    def text_type_vocab_size(self) -> int:
        return 2  # BERT's own token types (ViLT's text embeddings keep them)

    @property
    def text_layer_norm_eps(self) -> float:
        return self.layer_norm_eps

    @property
    def dropout(self) -> float:
        return self.drop_rate

    @property
    def vit_width(self) -> int:
        return self.hidden_size  # width of the image [CLS] a conditioned generator reads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> "ViLTConfig":
        problems = []
        if self.family != "vilt":
            problems.append(f"family={self.family!r}: a ViLTConfig is always family 'vilt'")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.num_layers < 2:
            problems.append(f"num_layers={self.num_layers}: EPIC's saliency reads the penultimate layer, use >= 2")
        if self.vocab_size <= 0:
            problems.append(f"vocab_size={self.vocab_size}: set it (0 means 'from the tokenizer', filled in by the "
                            f"run config before the model is built)")
        if self.max_image_len == 0 or self.max_image_len < -1:
            problems.append(f"max_image_len={self.max_image_len}: use a positive count or -1 (every patch)")
        if self.num_token_types < 2:
            problems.append(f"num_token_types={self.num_token_types}: ViLT needs at least text and image types")
        if problems:
            raise ValueError("invalid ViLTConfig: " + "; ".join(problems))
        return self


def vilt_config_from_dict(values: dict, source: str = "config") -> ViLTConfig:
    """ViLTConfig from a dict (our field names); ``family: vilt`` is accepted, unknown fields are an error."""
    values = dict(values)
    if values.get("family", "vilt") != "vilt":
        raise ValueError(f"{source} is a {values['family']!r} model config, not a ViLT one")
    known = {f.name for f in dataclasses.fields(ViLTConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source} has unknown ViLTConfig fields {unknown}; known fields: {sorted(known)}")
    return ViLTConfig(**values)
