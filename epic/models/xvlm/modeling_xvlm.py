"""X-VLM (Zeng et al., "Multi-Grained Vision Language Pre-Training", ICML 2022): Swin image encoder with a pooled
token in front, BERT split into text layers and fusion layers (cross-attention to the image tokens), contrastive
projections, ITM / MLM / box heads, and region features taken through the image attention mask.

Submodule names follow X-VLM's state dict (``vision_encoder``, ``text_encoder.bert``, ``text_encoder.cls``,
``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, ``bbox_head``); only the Swin tower is timm's (patch merging
at the start of a stage instead of the end, no persistent index / mask buffers), which ``convert_xvlm`` translates.

Shapes: B batch, L text length, N = grid^2 Swin tokens (7 x 7 = 49 for Swin-B at 224), C Swin width (1024),
H text width (768). ``image_embeds`` = [pooled token, Swin tokens] [B, 1 + N, C]; ``image_atts`` [B, 1 + N] says
which of them the fusion layers may attend to (all ones for whole images; the box's patches for a region).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..interface import CONSISTENCY_HEAD, VLPModel, penultimate
from .configuration_xvlm import XVLMConfig

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

#: substrings that exempt a parameter from weight decay (X-VLM's optim.py; "bias" also catches Swin's
#: relative_position_bias_table, as there)
NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                       "norm1.weight", "norm2.bias", "norm2.weight")
#: parameters X-VLM creates from scratch besides the cross-attention and trains at lr x lr_mult (its init_params)
HEAD_PREFIXES = ("vision_proj.", "text_proj.", "temp", "itm_head.", "bbox_head.", CONSISTENCY_HEAD + ".")


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's init (HF ``_init_weights``): N(0, std) weights, zero bias, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, K] 1 = attend, 0 = not -> [B, 1, 1, K] additive scores (0 or the dtype's minimum)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


# ------------------------------------------------------------------------------------------------ vision tower
def build_swin(cfg: XVLMConfig) -> nn.Module:
    """timm's Swin with X-VLM's settings (patch 4, mlp 4, qkv bias, no absolute position, patch norm, no head)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=cfg.image_size, patch_size=cfg.swin_patch_size, in_chans=3, num_classes=0,
                           global_pool="", embed_dim=cfg.swin_embed_dim, depths=tuple(cfg.swin_depths),
                           num_heads=tuple(cfg.swin_num_heads), window_size=cfg.swin_window_size, mlp_ratio=4.0,
                           qkv_bias=True, drop_rate=0.0, drop_path_rate=cfg.swin_drop_path_rate)


def load_swin_checkpoint(swin: nn.Module, path: str) -> None:
    """Load a Microsoft Swin checkpoint (``{'model': state_dict}``, e.g. swin_base_patch4_window7_224_22k.pth) into
    timm's Swin: timm's filter renumbers patch merging and resizes relative position tables; the classifier is
    dropped (X-VLM does not use it). Anything else missing or left over is an error."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision_pretrained {path!r} does not exist; give a local Swin checkpoint "
                                "(e.g. swin_base_patch4_window7_224_22k.pth from microsoft/Swin-Transformer)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint_filter_fn(state, swin)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = swin.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the configured Swin (swin_* keys of XVLMConfig): "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")


def match_swin_mask_dtype(swin: nn.Module, dtype: torch.dtype) -> None:
    """Cast timm's shifted-window masks (non-persistent fp32 buffers) to the activation dtype. DeepSpeed's fp16 /
    bf16 engines cast parameters only and keep fp32 buffers, and fp32 mask + 16-bit scores fails in attention."""
    for block in swin.modules():
        mask = block._buffers.get("attn_mask") if hasattr(block, "_buffers") else None
        if mask is not None and mask.dtype != dtype:
            block._buffers["attn_mask"] = mask.to(dtype)


def swin_tokens(swin: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> last-stage tokens after the final LayerNorm, row-major [B, grid^2, C]."""
    match_swin_mask_dtype(swin, pixel_values.dtype)
    x = swin.forward_features(pixel_values)  # [B, grid, grid, C]
    return x.flatten(1, 2)


def prepend_pooled_token(tokens: torch.Tensor, patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X-VLM's image embedding: the average of the patch tokens (over ``patch_mask`` [B, N] when given: a region)
    in front of the patch tokens: [B, N, C] -> [B, 1 + N, C]."""
    if patch_mask is None:
        pooled = tokens.mean(dim=1, keepdim=True)
    else:
        weights = patch_mask.to(tokens.dtype).unsqueeze(-1)  # [B, N, 1]
        pooled = (weights * tokens).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    return torch.cat([pooled, tokens], dim=1)


# ----------------------------------------------------------------------------------------------- BERT pieces
class BertEmbeddings(nn.Module):
    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text length {length} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate the captions")
        positions = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention projections; keys / values from ``kv_width`` inputs (the image width for cross)."""

    def __init__(self, cfg: XVLMConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.attention_probs_dropout_prob)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, heads, T, dh]."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = hidden if context is None else context
        q, k, v = self.heads(self.query(hidden)), self.heads(self.key(context)), self.heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: XVLMConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: XVLMConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.output(self.self(hidden, mask, context), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Post-LN BERT layer: self-attention -> (fusion layers: cross-attention to the image) -> feed-forward."""

    def __init__(self, cfg: XVLMConfig, cross_width: Optional[int]):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        if cross_width is not None:
            self.crossattention = BertAttention(cfg, cross_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, image_embeds: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attention(hidden, mask)
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("a fusion layer needs image_embeds (its cross-attention reads the image tokens)")
            x = self.crossattention(x, image_mask, image_embeds)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: XVLMConfig, cross_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, cross_width if i >= cfg.fusion_layer else None)
                                   for i in range(cfg.num_hidden_layers))


class XVLMBert(nn.Module):
    """Embeddings + encoder (X-VLM's ``text_encoder.bert``); text layers run alone, fusion layers with the image."""

    def __init__(self, cfg: XVLMConfig, cross_width: int):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, cross_width)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """transform -> decoder tied to the word embeddings (set by the owner) + bias."""

    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class XVLMTextEncoder(nn.Module):
    """X-VLM's ``text_encoder``: BERT (``bert``) and its MLM head (``cls``), decoder tied to the word embeddings."""

    def __init__(self, cfg: XVLMConfig, cross_width: int):
        super().__init__()
        self.bert = XVLMBert(cfg, cross_width)
        self.cls = BertOnlyMLMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


def build_mlp(width: int, out: int) -> nn.Sequential:
    """X-VLM's heads: Linear(w, 2w) -> LayerNorm -> GELU -> Linear(2w, out) (keys .0 .1 .3)."""
    return nn.Sequential(nn.Linear(width, width * 2), nn.LayerNorm(width * 2), nn.GELU(), nn.Linear(width * 2, out))


def read_bert_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    """A local HF BERT checkpoint (model.safetensors or pytorch_model.bin; old gamma/beta names renamed)."""
    st, binary = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        state = load_file(st)
    elif os.path.isfile(binary):
        state = torch.load(binary, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"text_pretrained {folder!r} holds neither model.safetensors nor pytorch_model.bin; "
                                "give a local bert-base-uncased folder")
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in state.items()}


def load_bert_weights(text_encoder: XVLMTextEncoder, folder: str) -> List[str]:
    """Load BERT into the text encoder; returns the parameters left new (the fusion layers' cross-attention, which
    X-VLM trains at lr x lr_mult). The pooler and the next-sentence head are not used."""
    state = read_bert_state_dict(folder)
    state = {k: v for k, v in state.items() if k.startswith(("bert.embeddings.", "bert.encoder.", "cls.predictions."))
             and not k.endswith(("position_ids", "decoder.bias"))}
    if "cls.predictions.decoder.weight" not in state and "bert.embeddings.word_embeddings.weight" in state:
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    if unexpected or any(".crossattention." not in k for k in missing):
        raise ValueError(f"{folder} does not fit the configured BERT (XVLMConfig text sizes): unexpected "
                         f"{unexpected[:8]}, missing {[k for k in missing if '.crossattention.' not in k][:8]}")
    return missing


# --------------------------------------------------------------------------------------------------- the model
class XVLM(VLPModel):
    family = "xvlm"
    config_class = XVLMConfig

    def __init__(self, cfg: XVLMConfig):
        super().__init__()
        if cfg.vocab_size <= cfg.pad_token_id:
            raise ValueError(f"vocab_size {cfg.vocab_size} (pad_token_id {cfg.pad_token_id}): set model.vocab_size to the "
                             "tokenizer's size (configs with vocab_size 0 take it from data.tokenizer)")
        self.config = cfg
        self.vision_encoder = build_swin(cfg)
        self.text_encoder = XVLMTextEncoder(cfg, cross_width=cfg.vision_width)
        self.text_encoder.apply(lambda m: init_bert_weights(m, cfg.initializer_range))
        # Heads keep PyTorch's default Linear init, as X-VLM's do.
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        # X-VLM's temperature is 0-d; ours has shape [1] because DeepSpeed's broadcast of a 0-d 16-bit parameter
        # fails (view as uint8); the converter reshapes both ways.
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temp)))
        self.itm_head = build_mlp(cfg.hidden_size, 2)
        self.bbox_head = build_mlp(cfg.hidden_size, 4)
        if cfg.consistency_head:
            head = nn.Linear(cfg.hidden_size, 1)
            init_bert_weights(head, cfg.initializer_range)
            setattr(self, CONSISTENCY_HEAD, head)
        if cfg.vision_pretrained:
            load_swin_checkpoint(self.vision_encoder, cfg.vision_pretrained)
        if cfg.text_pretrained:
            load_bert_weights(self.text_encoder, cfg.text_pretrained)

    @classmethod
    def from_config(cls, config) -> "XVLM":
        if isinstance(config, dict):
            config = XVLMConfig.from_dict(config)
        return cls(config)

    # ------------------------------------------------------------------------------------------------ files
    def save_pretrained(self, directory: str) -> None:
        """``model.safetensors`` (our key layout; the tied decoder stored once) and ``config.json``."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        save_model(self, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> "XVLM":
        from safetensors.torch import load_model

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}; it was not written by XVLM.save_pretrained")
        with open(path) as f:
            values = json.load(f)
        if values.get("family", "xvlm") != "xvlm":
            raise ValueError(f"{path} describes the {values['family']!r} family; load it with that family's class")
        values.update(vision_pretrained=None, text_pretrained=None)  # the weights file holds every tensor
        model = cls(XVLMConfig.from_dict(values, source=path))
        load_model(model, os.path.join(directory, WEIGHTS_NAME))
        return model

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """epic.models.downstream.load_pretrained_weights' family hook: the tied MLM decoder (the word embeddings,
        stored once by save_pretrained) filled from its source, so an export loads for zero-shot evaluation."""
        alias = "text_encoder.cls.predictions.decoder.weight"
        source = "text_encoder.bert.embeddings.word_embeddings.weight"
        if alias not in state and source in state and hasattr(self.text_encoder, "cls"):
            state = {**state, alias: state[source]}
        return state

    # -------------------------------------------------------------------------------------------- encoders
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [B, 3, {size}, {size}] "
                             f"(config.image_size={size}; resize the images or build the model at this size)")

    def encode_image(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + N, C]: the mean of the Swin tokens, then the Swin tokens. Deterministic:
        ``generator`` (the interface's random stream) is never drawn from."""
        self._check_pixels(pixel_values)
        pixel_values = pixel_values.to(self.vision_encoder.patch_embed.proj.weight.dtype)  # fp32 data, bf16 engine
        return prepend_pooled_token(swin_tokens(self.vision_encoder, pixel_values))

    def region_embeds(self, image_embeds: torch.Tensor, image_atts: torch.Tensor,
                      image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Region features (X-VLM's get_vision_embeds with a box): the image's tokens (row ``image_index`` of
        ``image_embeds`` per region, when given) with the pooled token recomputed over the box's patches
        (``image_atts[:, 1:]``). The fusion layers then read them with ``image_atts`` as the attention mask."""
        if image_index is not None:
            image_embeds = image_embeds.index_select(0, image_index)
        if image_atts.shape != image_embeds.shape[:2]:
            raise ValueError(f"image_atts {tuple(image_atts.shape)} must be [B, 1 + N] = {tuple(image_embeds.shape[:2])}")
        if bool((image_atts[:, 1:].sum(dim=1) == 0).any()):
            raise ValueError("a region's image_atts selects no patch; every box covers at least one patch")
        return prepend_pooled_token(image_embeds[:, 1:], image_atts[:, 1:])

    def _text_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return additive_mask(attention_mask, dtype)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text layers (before ``fusion_layer``): [B, L] -> text_embeds [B, L, H]."""
        bert = self.text_encoder.bert
        x = bert.embeddings(input_ids)
        mask = self._text_mask(attention_mask, x.dtype)
        for layer in bert.encoder.layer[:self.config.fusion_layer]:
            x = layer(x, mask)
        return x

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
             image_atts: Optional[torch.Tensor] = None, stop: Optional[int] = None) -> torch.Tensor:
        """The fusion layers (``fusion_layer`` .. ``stop`` - 1, default all): text states attend to themselves and,
        through cross-attention, to the image tokens allowed by ``image_atts`` (default: all)."""
        if image_atts is None:
            image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        mask = self._text_mask(attention_mask, text_embeds.dtype)
        image_mask = additive_mask(image_atts, text_embeds.dtype)
        x = text_embeds
        stop = self.config.num_hidden_layers if stop is None else stop
        for layer in self.text_encoder.bert.encoder.layer[self.config.fusion_layer:stop]:
            x = layer(x, mask, image_embeds, image_mask)
        return x

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Contrastive image feature: L2-normalised vision_proj of the pooled token [B, embed_dim]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Contrastive text feature: L2-normalised text_proj of the text [CLS] state [B, embed_dim]."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def retrieval_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             text_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """X-VLM's retrieval shortlist (Retrieval.py): the contrastive features of the pooled image token and the
        text [CLS]; epic.eval.retrieval re-ranks the k_test best by the ITM match logit, as X-VLM does."""
        return self.image_features(image_embeds), self.text_features(text_embeds)

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_embeds: Optional[torch.Tensor] = None, image_atts: Optional[torch.Tensor] = None,
              image_index: Optional[torch.Tensor] = None, text_embeds: Optional[torch.Tensor] = None
              ) -> Dict[str, torch.Tensor]:
        """The fused forward. With ``image_atts`` (a box's patches, from ``epic.data.regions``) the image side is
        the region (pooled token over the box, cross-attention masked to it); ``image_index`` picks each row's
        image from ``image_embeds`` (several regions of one image). ``image_feats`` are the image tokens the fusion
        layers read (X-VLM has no fused image stream)."""
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("infer needs pixel_values or image_embeds (from encode_image)")
            image_embeds = self.encode_image(pixel_values)
        if image_atts is not None:
            image_embeds = self.region_embeds(image_embeds, image_atts, image_index)
        elif image_index is not None:
            image_embeds = image_embeds.index_select(0, image_index)
        if text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        text_feats = self.fuse(text_embeds, attention_mask, image_embeds, image_atts)
        return {
            "image_embeds": image_embeds,
            "image_atts": image_atts if image_atts is not None else torch.ones(
                image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device),
            "text_embeds": text_embeds,
            "image_feat": self.image_features(image_embeds),
            "text_feat": self.text_features(text_embeds),
            "text_feats": text_feats,
            "cls_feats": text_feats[:, 0],
            "image_feats": image_embeds,
        }

    # ----------------------------------------------------------------------------------------------- heads
    def itm_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self.itm_head(cls_feats)

    def mlm_transform(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls.predictions.transform(text_feats)

    def mlm_output_embedding(self):
        head = self.text_encoder.cls.predictions
        return head.decoder.weight, head.bias

    def mlm_score(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls.predictions(text_feats)

    def bbox_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """Box head on the fused [CLS]: (cx, cy, w, h) in [0, 1] through a sigmoid, [B, 4]."""
        return self.bbox_head(cls_feats).sigmoid()

    def predict_bbox(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
                     image_index: Optional[torch.Tensor] = None, text_embeds: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """Where the text is in the whole image: the fusion reads every image token (X-VLM's predict_bbox on the
        full-attention embeddings), the box head reads the fused [CLS]; [B, 4] (cx, cy, w, h) normalised."""
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values, image_embeds=image_embeds,
                         image_index=image_index, text_embeds=text_embeds)
        return self.bbox_score(out["cls_feats"])

    # ------------------------------------------------------------------------------------ EPIC saliency (Eq. 8)
    @property
    def saliency_layer(self) -> int:
        """Index of the penultimate fusion layer (the last BERT layer but one)."""
        return self.config.num_hidden_layers - 2

    def text_to_image_attention(self):
        """Grad-CAM's site: the penultimate cross layer's cross-attention (image [CLS] first)."""
        layers = [layer for layer in self.text_encoder.bert.encoder.layer if layer.has_cross_attention]
        return penultimate(layers).crossattention.self, lambda text_len: 1

    def saliency_qk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None):
        """EPIC Eq. 8 for X-VLM, at the penultimate fusion layer; raw projections (no 1/sqrt(dh)).

        X-VLM's cross-attention runs from text to image only, so no image-[CLS] query over text keys exists as
        Eq. 8 assumes (METER). ``config.saliency_query`` chooses the stand-in:

        * ``"fused_cls"`` (default, as for ALBEF): the fused [CLS] state entering that layer queries the text keys
          of the layer's self-attention. After the earlier fusion layers [CLS] has read the image, so its attention
          over the words is image-conditioned, and it is what ITM and the box head read. (With only two fusion
          layers there is no earlier one and this query is text-only: use at least three, as X-VLM's six.)
        * ``"image_cls_cross"``: the layer's cross-attention logits between every text token and the pooled image
          token, i.e. query = cross-attention *key* projection of the pooled token, keys = cross-attention *query*
          projections of the text states (after that layer's self-attention). This is the same image-[CLS] <-> text
          score as METER's, read from the only direction X-VLM computes.
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("saliency_qk needs pixel_values or image_embeds")
            image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        hidden = self.fuse(text_embeds, attention_mask, image_embeds, stop=self.saliency_layer)
        layer = self.text_encoder.bert.encoder.layer[self.saliency_layer]
        if self.config.saliency_query == "fused_cls":
            attn = layer.attention.self
            return attn.heads(attn.query(hidden[:, :1]))[:, :, 0], attn.heads(attn.key(hidden))
        states = layer.attention(hidden, self._text_mask(attention_mask, hidden.dtype))
        cross = layer.crossattention.self
        return cross.heads(cross.key(image_embeds[:, :1]))[:, :, 0], cross.heads(cross.query(states))

    def saliency_teacher(self) -> "XVLM":
        """A frozen copy pruned to what ``saliency_qk`` runs: the towers and BERT layers up to the saliency layer;
        no heads, no projections, no later layers."""
        teacher = copy.deepcopy(self)
        del teacher.text_encoder.cls  # the MLM head (its decoder only shares the word embeddings)
        for name in ("vision_proj", "text_proj", "itm_head", "bbox_head", CONSISTENCY_HEAD):
            if hasattr(teacher, name):
                delattr(teacher, name)
        layers = teacher.text_encoder.bert.encoder.layer
        teacher.text_encoder.bert.encoder.layer = nn.ModuleList(list(layers)[:self.saliency_layer + 1])
        teacher.requires_grad_(False)
        return teacher.eval()

    # ------------------------------------------------------------------------------------------- optimizer
    def param_groups_spec(self) -> Dict[str, Dict[str, List[str]]]:
        """X-VLM's optim.py grouping: the parameters X-VLM creates new (``init_params``: the fusion layers'
        cross-attention, the projections, ``temp``, the ITM and box heads; here also EPIC's consistency head) get
        lr x lr_mult (2): cross-attention -> 'fusion', the rest -> 'head'; everything loaded from Swin / BERT
        (including the fusion layers' self-attention and feed-forward and the MLM head) -> 'backbone'. No decay on
        names containing bias / LayerNorm / norm / norm1 / norm2 (so ``temp`` decays, as in X-VLM)."""
        spec = {g: {"decay": [], "no_decay": []} for g in ("backbone", "fusion", "head")}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            decay = "no_decay" if any(s in name for s in NO_DECAY_SUBSTRINGS) else "decay"
            spec[self.lr_group(name)][decay].append(name)
        return spec

    def lr_group(self, name: str) -> str:
        """'fusion' | 'head' | 'backbone' of a parameter (pretraining: X-VLM's init_params, see param_groups_spec;
        the task models override it with their own init_params)."""
        return "fusion" if ".crossattention." in name else "head" if name.startswith(HEAD_PREFIXES) else "backbone"
