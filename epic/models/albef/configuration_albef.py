"""ALBEF architecture configuration (HF style: one config dataclass per model family).

Defaults are ALBEF's pretraining model (salesforce/ALBEF ``configs/Pretrain.yaml`` + ``configs/config_bert.json``):
ViT-B/16 at 256 px (DeiT-B initialisation), BERT-base whose 12 layers are split into 6 text layers and 6 fusion
layers (``fusion_layer: 6``; fusion layers add a cross-attention that reads the image tokens), a 256-d contrastive
space, a 65,536-entry feature queue, momentum 0.995, temperature 0.07 and distillation weight alpha 0.4.
``ALBEFConfig.tiny()`` is a small random model of the same classes for tests and the shapes world.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

#: how ``saliency_qk`` picks the EPIC saliency query and keys (see ``modeling_albef.ALBEF.saliency_qk``)
SALIENCY_CHOICES = ("fused_cls", "image_cls_cross")


@dataclass
class ALBEFConfig:
    family: str = "albef"  # the registry name (model.family in a run config)
    # checked at config time (epic.config.validate_micro_batch); class attributes, not config keys
    min_micro_batch_size: ClassVar[int] = 2
    min_micro_batch_reason: ClassVar[str] = ("ALBEF's ITM draws each sample's hard negative from the other samples "
                                             "of its micro-batch")

    # Vision encoder: timm ViT (ALBEF's models/vit.py: pre-norm blocks, GELU, final LayerNorm on every token,
    # LayerNorm eps 1e-6, qkv bias). ALBEF hard-codes patch 16, width 768, depth 12, 12 heads.
    image_size: int = 256  # ALBEF's image_res
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_layer_norm_eps: float = 1e-6
    vit_pretrained: Optional[str] = None  # local DeiT-B file (deit_base_patch16_224-b5f2ef4d.pth: {'model': sd})

    # Text encoder + fusion: BERT (ALBEF's xbert.py; names as config_bert.json). Layers [0, fusion_layer) are the
    # text encoder, layers [fusion_layer, num_hidden_layers) the fusion encoder (self-attn -> cross-attn -> FFN).
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    fusion_layer: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    encoder_width: int = 768  # width of the image tokens the cross-attention reads (= vision_width)
    text_pretrained: Optional[str] = None  # local HF bert-base-uncased folder (cross-attention stays random)
    max_text_len: int = 25  # ALBEF Pretrain.py: tokenizer(..., max_length=25)

    # Contrastive space, momentum distillation and queue (Pretrain.yaml)
    embed_dim: int = 256
    temp: float = 0.07
    temp_min: float = 0.001  # ALBEF clamps the learnable temperature to [0.001, 0.5] before every use
    temp_max: float = 0.5
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    # distillation weight ramp: alpha * min(1, step / alpha_ramp_steps), ALBEF's ramp over the first epoch
    # (alpha * min(1, i / len(data_loader)) in epoch 0); set it to the run's steps per epoch, 0 = no ramp
    alpha_ramp_steps: int = 0
    mlm_probability: float = 0.15
    # Downstream momentum distillation (ALBEF's VE.yaml / NLVR.yaml / VQA.yaml ``distill: True``): SNLI-VE, NLVR2
    # and VQA keep a momentum copy of the task model whose softmax is mixed into the targets at weight alpha.
    # Pretraining and retrieval always distil (their queues need the momentum encoders); the NLVR2
    # text-assignment pre-step never does (ALBEF's model_pretrain_nlvr.py has no momentum model).
    distill: bool = True

    # Std of the normal init of the randomly initialised Linear / Embedding weights (BERT and ALBEF use 0.02;
    # tiny from-scratch models need more, see METERConfig.initializer_range).
    initializer_range: float = 0.02

    # EPIC: the consistency head beta (Eq. 1) on every fused text state, and which query/keys Eq. 8 uses.
    consistency_head: bool = False
    saliency: str = "fused_cls"  # one of SALIENCY_CHOICES

    def __post_init__(self):
        problems = []
        if self.family != "albef":
            problems.append(f"family is {self.family!r}; an ALBEFConfig is family 'albef'")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads:
            problems.append(f"vision_width {self.vision_width} is not a multiple of vision_heads {self.vision_heads}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        if not 0 < self.fusion_layer < self.num_hidden_layers:
            problems.append(f"fusion_layer {self.fusion_layer} must leave at least one text layer and one fusion "
                            f"layer (0 < fusion_layer < num_hidden_layers={self.num_hidden_layers})")
        if self.encoder_width != self.vision_width:
            problems.append(f"encoder_width {self.encoder_width} must equal vision_width {self.vision_width} (the "
                            f"cross-attention reads the ViT tokens directly)")
        if self.queue_size <= 0:
            problems.append(f"queue_size must be positive, got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            problems.append(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.temp_min <= self.temp <= self.temp_max:
            problems.append(f"temp {self.temp} must lie in [temp_min, temp_max] = [{self.temp_min}, {self.temp_max}]")
        if self.saliency not in SALIENCY_CHOICES:
            problems.append(f"saliency {self.saliency!r} is not one of {SALIENCY_CHOICES}")
        if problems:
            raise ValueError("invalid ALBEFConfig: " + "; ".join(problems))

    @property
    def num_fusion_layers(self) -> int:
        return self.num_hidden_layers - self.fusion_layer

    # -- the text-tower names other parts of the system read (the EPIC generator sizes a random BERT of the same
    # family from them, as for METER); read-only views of the BERT fields, not config keys
    @property
    def text_model_type(self) -> str:
        return "bert"

    @property
    def text_hidden_size(self) -> int:
        return self.hidden_size

    @property
    def text_layers(self) -> int:
        return self.fusion_layer  # ALBEF's text encoder is the BERT layers before the fusion layers

    @property
    def text_heads(self) -> int:
        return self.num_attention_heads

    @property
    def text_intermediate_size(self) -> int:
        return self.intermediate_size

    @property
    def text_max_position_embeddings(self) -> int:
        return self.max_position_embeddings

    @property
    def text_type_vocab_size(self) -> int:
        return self.type_vocab_size

    @property
    def text_layer_norm_eps(self) -> float:
        return self.layer_norm_eps

    @property
    def dropout(self) -> float:
        return self.hidden_dropout_prob

    @property
    def vit_width(self) -> int:
        return self.vision_width

    @classmethod
    def tiny(cls, **overrides) -> "ALBEFConfig":
        """A small random ALBEF of the real classes (tests, shapes world)."""
        values = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                      vocab_size=64, hidden_size=32, num_hidden_layers=4, fusion_layer=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40, encoder_width=32, max_text_len=16,
                      embed_dim=16, queue_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      initializer_range=0.08)
        values.update(overrides)
        return cls(**values)


def config_from_dict(values: dict, source: str = "config") -> ALBEFConfig:
    """ALBEFConfig from a dict, with a clear error on unknown fields."""
    known = {f.name for f in dataclasses.fields(ALBEFConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source} has unknown ALBEFConfig fields {unknown}; known fields: {sorted(known)}")
    return ALBEFConfig(**values)
