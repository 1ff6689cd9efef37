"""ALBEF (Li et al., NeurIPS 2021, "Align before Fuse"): ViT + BERT split into text and fusion layers, a contrastive
space with momentum encoders and feature queues, ITM and MLM heads.

Submodule and parameter names are ALBEF's own (salesforce/ALBEF ``models/model_pretrain.py``): ``visual_encoder``
(timm's ViT has ALBEF's key names), ``text_encoder.bert.{embeddings,encoder.layer.N}`` and ``text_encoder.cls``
(BERT's MLM head, tied to the word embeddings), ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, the
momentum copies ``*_m`` and the buffers ``image_queue``, ``text_queue``, ``queue_ptr``; so an official checkpoint
loads with a key check and no renaming (``convert_albef.py``).

What is not trained: the momentum copies and the queues. The momentum copies hold their weights as fp32
*buffers* (``parameters_to_buffers``), not parameters: they are never in ``parameters()``, hence never in an
optimizer, a ZeRO partition or a gradient reduction, and DeepSpeed's half-precision cast (which casts parameters
only) leaves them in fp32, so the 0.5% momentum steps are not rounded away in bf16. Everything is in
``state_dict`` under ALBEF's names, hence in every checkpoint. Buffers are not broadcast by DeepSpeed: build the
model with the same seed on every rank (the trainer does) so that copies and queues start identical.
``after_optimizer_step`` (momentum update + step count) is called by the trainer after each optimizer step (ALBEF
updates at the start of the next forward: the same sequence of values).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..interface import CONSISTENCY_HEAD, VLPModel, penultimate, read_export, write_export
from .configuration_albef import ALBEFConfig, config_from_dict
from .weights import load_bert_weights, load_deit_weights

#: the additive mask value of BERT/ALBEF's get_extended_attention_mask: (1 - mask) * -10000
MASK_VALUE = -10000.0
#: (online, momentum) submodule names; ALBEF's model_pairs
MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                  ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))
#: momentum copies (buffers) holding an LM head tied to their word embeddings: re-tied after ``_apply``
MOMENTUM_LM_MODULES = ("text_encoder_m", "text_decoder_m")
#: state-dict keys that alias another key (the MLM decoder is tied to the word embeddings, its bias to cls bias)
TIED_SOURCES = {f"{encoder}.cls.predictions.decoder.{part}": f"{encoder}.{source}"
                for encoder in ("text_encoder", "text_encoder_m")
                for part, source in (("weight", "bert.embeddings.word_embeddings.weight"),
                                     ("bias", "cls.predictions.bias"))}
TIED_KEYS = tuple(TIED_SOURCES)


def fill_tied_aliases(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a state dict saved without the tied aliases (safetensors refuses shared tensors;
    ``save_pretrained`` drops them) loads strictly, the aliases taken from their sources."""
    for alias, source in TIED_SOURCES.items():
        encoder = module._modules.get(alias.split(".")[0])
        if encoder is None or "cls" not in encoder._modules:  # a task model without that MLM head (VE, NLVR2)
            continue
        if prefix + alias not in state_dict and prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]


# ------------------------------------------------------------------------------------------------ building blocks
def parameters_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a (persistent, detached) buffer of the same name, keeping ties
    (one tensor stays one tensor). Forward code reads ``self.weight`` either way."""
    converted: Dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            tensor = converted.setdefault(id(param), param.detach().clone())
            del sub._parameters[name]
            sub.register_buffer(name, tensor)



def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's init (BertPreTrainedModel._init_weights): N(0, std) weights, zero bias, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 mask -> [B, 1, 1, L] additive mask, 0 on real tokens and -10000 on padding (as ALBEF's BERT)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


class TextEmbeddings(nn.Module):
    """word + token type (0) + absolute position embeddings -> LayerNorm -> dropout."""

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of length {length} exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}; truncate it (data.max_text_len)")
        positions = torch.arange(length, device=input_ids.device)
        types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfAttentionProjections(nn.Module):
    """BERT's ``attention.self``: query from the hidden states, key/value from the context (itself or the image)."""

    def __init__(self, cfg: ALBEFConfig, context_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(context_width, cfg.hidden_size)
        self.value = nn.Linear(context_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, heads, T, dh]."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q = self.split_heads(self.query(hidden_states))
        k = self.split_heads(self.key(context))
        v = self.split_heads(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=context_mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)


class AttentionOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (BERT's SelfOutput and Output)."""

    def __init__(self, in_width: int, cfg: ALBEFConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ALBEFConfig, context_width: int):
        super().__init__()
        self.self = SelfAttentionProjections(cfg, context_width)
        self.output = AttentionOutput(cfg.hidden_size, cfg)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor,
                context_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(hidden_states, context, context_mask), hidden_states)


class Intermediate(nn.Module):
    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """ALBEF's BertLayer: self-attention, then (fusion layers only) cross-attention over the image tokens, then FFN."""

    def __init__(self, cfg: ALBEFConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = index >= cfg.fusion_layer
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate = Intermediate(cfg)
        self.output = AttentionOutput(cfg.intermediate_size, cfg)

    def forward(self, hidden_states: torch.Tensor, text_mask: torch.Tensor, image_embeds: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attention(hidden_states, hidden_states, text_mask)
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("a fusion layer needs the image tokens (image_embeds)")
            x = self.crossattention(x, image_embeds, image_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, index) for index in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """``text_encoder.bert``: embeddings + the layer stack, run as text encoder or as fusion encoder."""

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def run_layers(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int,
                   image_embeds: Optional[torch.Tensor] = None,
                   image_atts: Optional[torch.Tensor] = None) -> torch.Tensor:
        text_mask = additive_mask(attention_mask, hidden_states.dtype)
        image_mask = None if image_atts is None else additive_mask(image_atts, hidden_states.dtype)
        for layer in self.encoder.layer[start:stop]:
            hidden_states = layer(hidden_states, text_mask, image_embeds, image_mask)
        return hidden_states

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ALBEF's ``mode='text'``: embeddings and layers [0, fusion_layer)."""
        return self.run_layers(self.embeddings(input_ids), attention_mask, 0, self.config.fusion_layer)

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
             image_atts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ALBEF's ``mode='fusion'``: layers [fusion_layer, num_hidden_layers) over the text-encoder output."""
        return self.run_layers(text_embeds, attention_mask, self.config.fusion_layer, len(self.encoder.layer),
                               image_embeds, image_atts)


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPredictionHead(nn.Module):
    """BERT's ``cls.predictions``: transform, then the decoder tied to the word embeddings plus its own bias."""

    def __init__(self, cfg: ALBEFConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    def __init__(self, cfg: ALBEFConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = LMPredictionHead(cfg, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class TextEncoder(nn.Module):
    """``text_encoder``: ALBEF's BertForMaskedLM (``bert`` without pooler, ``cls`` MLM head)."""

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = MLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.apply(partial(init_bert_weights, std=cfg.initializer_range))
        self.cls.predictions.bias.data.zero_()


def build_vision_encoder(cfg: ALBEFConfig) -> VisionTransformer:
    """ALBEF's VisionTransformer (models/vit.py) is timm's: pre-norm blocks, qkv bias, GELU, LayerNorm eps 1e-6,
    class token, final norm on every token, no head. The parameter names are the same as ALBEF's."""
    vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
                            depth=cfg.vision_layers, num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio,
                            qkv_bias=True, num_classes=0, global_pool="", class_token=True,
                            norm_layer=partial(nn.LayerNorm, eps=cfg.vision_layer_norm_eps))
    for module in vit.modules():  # ALBEF/timm init: trunc_normal(std) for Linear, zero bias
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=cfg.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return vit


# ------------------------------------------------------------------------------------------------ the model
class ALBEF(VLPModel):
    family = "albef"

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.config = cfg
        self.visual_encoder = build_vision_encoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        if cfg.vit_pretrained:
            load_deit_weights(self.visual_encoder, cfg.vit_pretrained)
        if cfg.text_pretrained:
            load_bert_weights(self.text_encoder, cfg.text_pretrained)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            init_bert_weights(head, cfg.initializer_range)
        # shape [1], not ALBEF's 0-d []: DeepSpeed's broadcast views every parameter as bytes, which a 0-d half
        # tensor cannot do (the converter reshapes to and from ALBEF's [])
        self.temp = nn.Parameter(torch.full((1,), float(cfg.temp)))

        # momentum copies (ALBEF's copy_params): same values, never trained, weights as fp32 buffers
        for online, momentum in MOMENTUM_PAIRS:
            copy_module = copy.deepcopy(getattr(self, online))
            parameters_to_buffers(copy_module)
            setattr(self, momentum, copy_module)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # optimizer steps taken (momentum updates done): drives the alpha ramp, and resumes with the checkpoint
        self.register_buffer("momentum_step", torch.zeros((), dtype=torch.long))
        if cfg.consistency_head:  # EPIC's beta (Eq. 1), created last: every other weight is drawn as without it
            setattr(self, CONSISTENCY_HEAD, nn.Linear(cfg.hidden_size, 1))
            init_bert_weights(getattr(self, CONSISTENCY_HEAD), cfg.initializer_range)
        self.register_load_state_dict_pre_hook(fill_tied_aliases)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (``.to``, ``.cuda``, ``.half``) replaces each buffer by name, which would split the
        momentum MLM decoder from the momentum word embeddings it is tied to (parameters keep their identity,
        buffers do not): tie them again afterwards."""
        super()._apply(fn, recurse)
        self._tie_momentum_decoder()
        return self

    def _tie_momentum_decoder(self) -> None:
        for name in MOMENTUM_LM_MODULES:  # the pretraining momentum MLM head, VQA's momentum answer decoder
            encoder = self.__dict__.get("_modules", {}).get(name)
            if encoder is None or "cls" not in encoder._modules:
                continue
            predictions = encoder.cls.predictions
            predictions.decoder._buffers["weight"] = encoder.bert.embeddings.word_embeddings._buffers["weight"]
            predictions.decoder._buffers["bias"] = predictions._buffers["bias"]

    @classmethod
    def from_config(cls, config) -> "ALBEF":
        if isinstance(config, dict):
            config = config_from_dict(config)
        if not isinstance(config, ALBEFConfig):
            raise TypeError(f"ALBEF.from_config needs an ALBEFConfig or a dict of its fields, got {type(config)}")
        return cls(config)

    # ----------------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, 3, S, S] -> ViT output [B, 1 + (S/patch)^2, vision_width] (final LayerNorm on every token).
        Deterministic: ``generator`` (the interface's random stream for sampling encoders) is never drawn from."""
        return self._run_vit(self.visual_encoder, pixel_values)

    def _run_vit(self, vit: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [B, 3, {size}, {size}] "
                             f"(config.image_size={size}; resize the images or build the model at this size)")
        return vit.forward_features(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder (BERT layers before ``fusion_layer``): [B, L] -> [B, L, hidden_size]."""
        return self.text_encoder.bert.encode_text(input_ids, attention_mask)

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """The fusion encoder: text-encoder states attend to themselves and (cross-attention) to the image tokens."""
        return self.text_encoder.bert.fuse(text_embeds, attention_mask, image_embeds)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of the image [CLS] into the contrastive space [B, embed_dim]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of the text [CLS] into the contrastive space [B, embed_dim]."""
        return F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def retrieval_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             text_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """epic.eval.retrieval's first-stage score: the contrastive features (ALBEF's k_test shortlist by
        image_feat @ text_feat.T, re-ranked by ITM); the [CLS] projections need no mask."""
        return self.image_feat(image_embeds), self.text_feat(text_embeds)

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_embeds: Optional[torch.Tensor] = None,
              text_embeds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """ALBEF's forward for one (text, image) pairing.

        Returns ``image_embeds`` (ViT output), ``text_embeds`` (text-encoder output), ``image_feat`` / ``text_feat``
        (normalised [CLS] projections), ``text_feats`` (fused text states, what MLM and EPIC's ITC read),
        ``cls_feats`` (fused [CLS], what ITM reads) and ``image_feats``: ALBEF has no fused image stream (its
        cross-attention only updates the text), so these are the ViT tokens themselves.
        ``image_embeds`` / ``text_embeds`` skip the encoders (ALBEF's ITM negatives reuse both).
        """
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("infer needs pixel_values or image_embeds (the output of encode_image)")
            image_embeds = self.encode_image(pixel_values)
        if text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        fused = self.fuse(text_embeds, attention_mask, image_embeds)
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "image_feat": self.image_feat(image_embeds),
                "text_feat": self.text_feat(text_embeds), "text_feats": fused, "cls_feats": fused[:, 0, :],
                "image_feats": image_embeds}

    # ----------------------------------------------------------------------------------------------- heads
    def itm_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self.itm_head(cls_feats)

    def mlm_score(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls(text_feats)

    def mlm_transform(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.cls.predictions.transform(text_feats)

    def mlm_output_embedding(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        predictions = self.text_encoder.cls.predictions
        return predictions.decoder.weight, predictions.bias

    def temperature(self) -> torch.Tensor:
        """The learnable temperature, clamped in place to [temp_min, temp_max] first (as ALBEF before every use)."""
        with torch.no_grad():
            self.temp.clamp_(self.config.temp_min, self.config.temp_max)
        return self.temp

    # ----------------------------------------------------------------------------------------------- momentum
    def momentum_pairs(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(online parameter, momentum buffer) for every weight of the momentum-tracked modules, matched by name."""
        pairs = []
        for online, momentum in MOMENTUM_PAIRS:
            copies = dict(getattr(self, momentum).named_buffers())
            for name, param in getattr(self, online).named_parameters():
                if name not in copies:
                    raise RuntimeError(f"{momentum} has no copy of {online}.{name}")
                pairs.append((param, copies[name]))
        return pairs

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum copies := online weights (ALBEF's copy_params; done at construction)."""
        for p, p_m in self.momentum_pairs():
            p_m.copy_(p)

    @torch.no_grad()
    def momentum_update(self, momentum: Optional[float] = None) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta for every momentum copy (m = config.momentum = 0.995), ALBEF's
        _momentum_update, in the copies' dtype (fp32 even when the online weights are half precision)."""
        m = self.config.momentum if momentum is None else momentum
        pairs = self.momentum_pairs()
        copies = [p_m for _, p_m in pairs]
        online = [p.detach() if p.dtype == p_m.dtype else p.detach().to(p_m.dtype) for p, p_m in pairs]
        torch._foreach_mul_(copies, m)
        torch._foreach_add_(copies, online, alpha=1.0 - m)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """What the trainer calls after every optimizer step that was taken (not after a skipped overflow step,
        not between accumulation micro-batches): the momentum update, and the step count of the alpha ramp."""
        self.momentum_update()
        self.momentum_step += 1

    def _momentum_autocast(self, device: torch.device):
        """fp32 momentum weights with half-precision online weights: run the momentum model under autocast at the
        online dtype (the cost of the online forward, not of an fp32 one)."""
        online, copy_dtype = self.vision_proj.weight.dtype, self.vision_proj_m.weight.dtype
        if online == copy_dtype or online not in (torch.float16, torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=online)

    @torch.no_grad()
    def momentum_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The momentum encoders' outputs: ``image_embeds_m``, ``image_feat_m``, ``text_feat_m`` (no gradients)."""
        with self._momentum_autocast(pixel_values.device):
            image_embeds_m = self._run_vit(self.visual_encoder_m, pixel_values.to(self.vision_proj_m.weight.dtype))
            text_embeds_m = self.text_encoder_m.bert.encode_text(input_ids, attention_mask)
            return {"image_embeds_m": image_embeds_m,
                    "image_feat_m": F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]).float(), dim=-1),
                    "text_feat_m": F.normalize(self.text_proj_m(text_embeds_m[:, 0, :]).float(), dim=-1)}

    @torch.no_grad()
    def momentum_mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            image_embeds_m: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The momentum model's MLM logits on the (masked) text with the momentum image tokens: [B, L, V], or
        [M, V] at the M True entries of ``positions`` [B, L] (the vocabulary projection then runs only there)."""
        bert = self.text_encoder_m.bert
        with self._momentum_autocast(input_ids.device):
            fused = bert.fuse(bert.encode_text(input_ids, attention_mask), attention_mask, image_embeds_m)
            return self.text_encoder_m.cls(fused if positions is None else fused[positions])

    # ----------------------------------------------------------------------------------------------- EPIC saliency
    def _saliency_layer_index(self) -> int:
        cfg = self.config
        if cfg.num_fusion_layers < 2:
            raise ValueError(f"EPIC saliency reads the penultimate fusion layer, but the model has "
                             f"{cfg.num_fusion_layers} fusion layer(s) (num_hidden_layers - fusion_layer); use >= 2")
        return cfg.num_hidden_layers - 2

    def text_to_image_attention(self):
        """Grad-CAM's site: the penultimate fusion layer's cross-attention (image [CLS] first)."""
        layers = self.text_encoder.bert.encoder.layer[self.config.fusion_layer:]
        return penultimate(layers).crossattention.self, lambda text_len: 1

    def saliency_qk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(query [B, heads, dh], keys [B, heads, L, dh]) for EPIC's Eq. 8, alpha = softmax(mean_k q_k K_k^T).

        Eq. 8 takes, in the penultimate fusion layer, the *image-stream [CLS]* query over the *text* keys: in
        METER's co-attention the image stream attends to the text. ALBEF has no such attention: its only
        cross-attention runs text -> image (text queries, image keys) and the image tokens are never updated by
        the text. ``config.saliency`` chooses the analogue:

        * ``"fused_cls"`` (default): the fused [CLS] query against the text keys of the penultimate fusion layer's
          *self-attention*. By then the [CLS] has read the image through the earlier fusion layers' cross-attention,
          so it plays the role of METER's image [CLS] (a multimodal summary, the state ITM reads), and its
          self-attention over the text is how much each word matters to that summary. It is the same kind of
          score as Eq. 8 (one query over all text keys of one layer, per head).
        * ``"image_cls_cross"``: the penultimate fusion layer's *cross-attention* logit with which each text
          token's query attends to the image [CLS] key: query = W_K of the image [CLS], keys = W_Q of every text
          state (the bilinear form is symmetric, so q_k K_k^T is exactly those logits). It keeps Eq. 8's
          image-[CLS]-text pairing, read in ALBEF's direction.

        Measured with tools/albef_shapes_saliency.py (tiny ALBEF, shapes world, 3 seeds): masking by
        ``fused_cls`` hits content words more often than uniform masking on every seed (0.48 vs 0.40 on average),
        ``image_cls_cross`` on one seed of three, hence the default.

        Both are raw projections without the 1/sqrt(dh) scale; keys cover every text position (mask padding with
        ``attention_mask``)."""
        index = self._saliency_layer_index()
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("saliency_qk needs pixel_values or image_embeds")
            image_embeds = self.encode_image(pixel_values)
        bert = self.text_encoder.bert
        hidden = bert.run_layers(bert.embeddings(input_ids), attention_mask, 0, index, image_embeds)
        layer = bert.encoder.layer[index]
        if self.config.saliency == "fused_cls":
            attn = layer.attention.self
            query = attn.split_heads(attn.query(hidden[:, :1]))[:, :, 0]
            keys = attn.split_heads(attn.key(hidden))
            return query, keys
        # image_cls_cross: text queries of the cross-attention, image [CLS] key
        after_self = layer.attention(hidden, hidden, additive_mask(attention_mask, hidden.dtype))
        cross = layer.crossattention.self
        query = cross.split_heads(cross.key(image_embeds[:, :1]))[:, :, 0]
        keys = cross.split_heads(cross.query(after_self))
        return query, keys

    def saliency_teacher(self) -> "ALBEF":
        """A frozen copy with only what ``saliency_qk`` runs: the ViT and the BERT layers up to the penultimate
        fusion layer. No momentum copies, queues, projections or heads (``infer`` on it raises)."""
        index = self._saliency_layer_index()
        layers = self.text_encoder.bert.encoder.layer
        skip = [self.text_encoder.cls, self.itm_head, self.vision_proj, self.text_proj, self.temp,
                self.image_queue, self.text_queue, self.queue_ptr, self.momentum_step, *layers[index + 1:]]
        skip += [getattr(self, momentum) for _, momentum in MOMENTUM_PAIRS]
        if self.consistency_head() is not None:
            skip.append(self.consistency_head())
        teacher = copy.deepcopy(self, memo={id(obj): None for obj in skip})  # skipped objects are not copied
        for name in ("itm_head", "vision_proj", "text_proj", CONSISTENCY_HEAD,
                     *(momentum for _, momentum in MOMENTUM_PAIRS)):
            teacher._modules.pop(name, None)
        teacher.text_encoder._modules.pop("cls")
        for name in ("image_queue", "text_queue", "queue_ptr", "momentum_step"):
            teacher._buffers.pop(name)
        teacher._parameters.pop("temp")
        teacher.text_encoder.bert.encoder.layer = nn.ModuleList(teacher.text_encoder.bert.encoder.layer[:index + 1])
        teacher.is_saliency_teacher = True
        teacher.requires_grad_(False)
        return teacher.eval()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.__dict__.get("is_saliency_teacher"):
                raise AttributeError(f"{name!r}: this ALBEF is a pruned saliency teacher (saliency_qk only)") from None
            raise

    # ----------------------------------------------------------------------------------------------- optimizer
    def param_groups_spec(self) -> Dict[str, Dict[str, List[str]]]:
        """{'backbone'|'fusion'|'head': {'decay': [...], 'no_decay': [...]}} over the *trainable* parameters.

        ALBEF trains everything at one lr (configs/Pretrain.yaml), so the groups only name the parts: fusion =
        BERT layers from ``fusion_layer`` on, head = MLM/ITM heads, projections, temperature and the consistency
        head, backbone = ViT, embeddings and text layers. Weight decay follows ALBEF's optimizer
        (optim/optim_factory.add_weight_decay): none on 1-d tensors and biases, decay on everything else (the
        0-d temperature included: ours is [1] for DeepSpeed, decayed by name). Momentum copies are buffers, never
        parameters, so never listed."""
        spec = {group: {"decay": [], "no_decay": []} for group in ("backbone", "fusion", "head")}
        fusion_prefixes = tuple(f"text_encoder.bert.encoder.layer.{i}." for i in
                                range(self.config.fusion_layer, len(self.text_encoder.bert.encoder.layer)))
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith(fusion_prefixes):
                group = "fusion"
            elif name.startswith(("visual_encoder.", "text_encoder.bert.")):
                group = "backbone"
            else:
                group = "head"
            decay = name == "temp" or not (param.ndim <= 1 or name.endswith(".bias"))
            spec[group]["decay" if decay else "no_decay"].append(name)
        return spec

    # ----------------------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str) -> None:
        """``model.safetensors`` (every tensor, momentum copies and queues included; tied aliases once) and
        ``config.json`` (ALBEFConfig; tower paths cleared since the weights are in the file)."""
        config = dataclasses.replace(self.config, vit_pretrained=None, text_pretrained=None)
        write_export(directory, {k: v for k, v in self.state_dict().items() if k not in TIED_KEYS},
                     dataclasses.asdict(config))

    @classmethod
    def from_pretrained(cls, directory: str) -> "ALBEF":
        values, state, source = read_export(
            directory, "ALBEF.save_pretrained or convert an official checkpoint with epic.models.albef.load_official_albef")
        cfg = config_from_dict(values, source=source)
        model = cls(dataclasses.replace(cfg, vit_pretrained=None, text_pretrained=None))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:  # the tied aliases are filled by fill_tied_aliases
            raise ValueError(f"{directory!r} does not match its config: missing keys {sorted(result.missing_keys)}, "
                             f"unexpected keys {sorted(result.unexpected_keys)}")
        return model

