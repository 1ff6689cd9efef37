"""X-VLM architecture configuration (Zeng et al., ICML 2022; official code zengyan-97/X-VLM).

Defaults are X-VLM-base as released (``configs/Pretrain_XVLM_base_4m.yaml`` + ``config_swinB_224.json`` +
``config_bert.json``): Swin-B at 224 px (patch 4, window 7, embed 128, depths 2-2-18-2, heads 4-8-16-32; 7x7 = 49
output tokens, width 1024) and BERT-base whose first ``fusion_layer`` = 6 layers read text only and whose last 6
layers add cross-attention to the image tokens; contrastive projections to 256 with temperature 0.07.
``XVLMConfig.tiny()`` gives the small sizes used by tests and the shapes world.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional

#: EPIC saliency query choices (see modeling_xvlm.XVLM.saliency_qk)
SALIENCY_QUERIES = ("fused_cls", "image_cls_cross")


@dataclass
class XVLMConfig:
    family: str = "xvlm"  # registry name (``model.family`` in a run config)
    # checked at config time (epic.config.validate_micro_batch: pretraining and retrieval fine-tuning); class
    # attributes, not config keys
    min_micro_batch_size: ClassVar[int] = 2
    min_micro_batch_reason: ClassVar[str] = ("X-VLM's ITM draws each sample's hard negative from the other samples "
                                             "(of another image) of its micro-batch")

    # Vision tower: Swin Transformer (timm's implementation, X-VLM's hyper-parameters).
    image_size: int = 224
    swin_patch_size: int = 4
    swin_window_size: int = 7
    swin_embed_dim: int = 128
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    swin_num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    swin_drop_path_rate: float = 0.1  # X-VLM builds its Swin with drop_path_rate 0.1
    vision_pretrained: Optional[str] = None  # local Swin checkpoint (ImageNet-22k .pth with a 'model' dict)

    # Text encoder + fusion: BERT whose layers >= fusion_layer carry cross-attention to the image tokens.
    text_pretrained: Optional[str] = None  # local HF BERT folder (bert-base-uncased); cross-attention stays new
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    fusion_layer: int = 6
    max_text_len: int = 40  # X-VLM max_tokens (captions truncated to this many tokens)

    # Heads.
    embed_dim: int = 256  # contrastive projection size
    temp: float = 0.07  # initial contrastive temperature (a learned parameter)
    initializer_range: float = 0.02  # std of the normal init of new Linear / Embedding weights
    consistency_head: bool = False  # EPIC's beta (Eq. 1): Linear(hidden, 1) on the fused text states
    saliency_query: str = "fused_cls"  # EPIC Eq. 8 query: "fused_cls" | "image_cls_cross" (see saliency_qk)

    def __post_init__(self):
        if self.family != "xvlm":
            raise ValueError(f"XVLMConfig.family is {self.family!r}; it must be 'xvlm'")
        self.swin_depths = list(self.swin_depths)
        self.swin_num_heads = list(self.swin_num_heads)
        if len(self.swin_depths) != len(self.swin_num_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_num_heads {self.swin_num_heads} must have "
                             "one entry per Swin stage")
        if self.image_size % self.image_stride:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the Swin output stride "
                             f"{self.image_stride} (swin_patch_size x 2^(stages-1))")
        if self.max_text_len > self.max_position_embeddings:
            raise ValueError(f"max_text_len {self.max_text_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")
        if not 0 < self.fusion_layer < self.num_hidden_layers:
            raise ValueError(f"fusion_layer {self.fusion_layer} must split the {self.num_hidden_layers} BERT layers "
                             "into text layers and fusion layers (0 < fusion_layer < num_hidden_layers)")
        if self.num_hidden_layers - self.fusion_layer < 2:
            raise ValueError("EPIC's saliency reads the penultimate fusion layer: need at least 2 fusion layers "
                             f"(num_hidden_layers {self.num_hidden_layers} - fusion_layer {self.fusion_layer})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.saliency_query not in SALIENCY_QUERIES:
            raise ValueError(f"saliency_query {self.saliency_query!r}: expected one of {SALIENCY_QUERIES}")

    # ---------------------------------------------------------------------------------------- derived sizes
    @property
    def image_stride(self) -> int:
        """Pixels per output token side: patch size times one halving per Swin stage after the first."""
        return self.swin_patch_size * 2 ** (len(self.swin_depths) - 1)

    @property
    def image_grid(self) -> int:
        """Output tokens per image side (X-VLM's ``num_patch``: 224 / 32 = 7)."""
        return self.image_size // self.image_stride

    @property
    def vision_width(self) -> int:
        """Width of the Swin output tokens (embed_dim doubled at each stage after the first)."""
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)

    @property
    def num_image_tokens(self) -> int:
        """Pooled token + grid^2 Swin tokens."""
        return 1 + self.image_grid ** 2

    # Names the EPIC generator reads for its default sizes (epic.models.generator: the text tower's family and sizes;
    # X-VLM's text tower is BERT, so EPIC-X-VLM's generator is a BERT masked LM, bert-base-uncased for real runs).
    @property
    def text_model_type(self) -> str:
        return "bert"

    @property
    def text_hidden_size(self) -> int:
        return self.hidden_size

    @property
    def text_layers(self) -> int:
        return self.num_hidden_layers

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

    # ------------------------------------------------------------------------------------------- variants
    @classmethod
    def tiny(cls, **overrides) -> "XVLMConfig":
        """A small config of the same classes (tests, shapes world): 64 px, 2 Swin stages, 4 BERT layers."""
        base = dict(image_size=64, swin_patch_size=4, swin_window_size=4, swin_embed_dim=16, swin_depths=[1, 2],
                    swin_num_heads=[1, 2], swin_drop_path_rate=0.0, vocab_size=2000, hidden_size=32,
                    num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, max_text_len=32,
                    fusion_layer=2, embed_dim=16, pad_token_id=1, initializer_range=0.1)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "XVLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [f"{k} (did you mean {difflib.get_close_matches(k, known, 1)[0]}?)"
                     if difflib.get_close_matches(k, known, 1) else k for k in unknown]
            raise ValueError(f"{source}: unknown XVLMConfig keys {hints}; valid keys: {sorted(known)}")
        return cls(**values)
