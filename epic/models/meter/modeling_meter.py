"""METER (Dou et al., CVPR 2022): CLIP-ViT + RoBERTa towers, co-attention fusion, pooler/ITM/MLM heads.

Submodule names follow METER's state dict (``text_transformer``, ``cross_modal_*``, ``token_type_embeddings``,
``mlm_score``, ``itm_score``); only the vision tower differs (timm names under ``vit_model`` instead of OpenAI-CLIP
names under ``vit_model.visual``), which ``convert_meter.to_official_state_dict`` / ``load_official_meter``
translate.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from functools import partial
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..fast_path import checkpointed
from ..fusion import BertCrossLayer, additive_attention_mask
from ..heads import ITMHead, MLMHead, Pooler, new_consistency_head
from ..interface import CONSISTENCY_HEAD, VLPModel, penultimate, read_export, write_export
from ..text import build_text_tower, encode_text_tokens
from ..vision import build_vision_tower, encode_image_tokens, load_clip_weights
from .configuration_meter import METERConfig

logger = logging.getLogger(__name__)



def init_meter_weights(module: nn.Module, std: float = 0.02) -> None:
    """METER's init for the modules it creates (objectives.init_weights): N(0, std), zero bias, unit LayerNorm.

    METER's std is 0.02; ``METERConfig.initializer_range`` sets it (``module.apply(partial(init_meter_weights,
    std=cfg.initializer_range))``)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class METER(VLPModel):
    """METER behind the family interface (``epic.models.interface.VLPModel``).

    Saliency (EPIC Eq. 8): the penultimate fusion layer's image-stream cross-attention, the image [CLS] token's
    query against every text token's key.
    """

    family = "meter"

    def __init__(self, cfg: METERConfig):
        super().__init__()
        self.config = cfg
        self.vit_model = build_vision_tower(cfg)
        if cfg.vit_pretrained:
            load_clip_weights(self.vit_model, cfg.vit_pretrained)
        self.text_transformer = build_text_tower(cfg)

        self.cross_modal_text_transform = nn.Linear(cfg.text_hidden_size, cfg.hidden_size)
        self.cross_modal_image_transform = nn.Linear(cfg.vit_width, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.num_token_types, cfg.hidden_size)
        self.cross_modal_text_layers = nn.ModuleList(BertCrossLayer(cfg) for _ in range(cfg.num_fusion_layers))
        self.cross_modal_image_layers = nn.ModuleList(BertCrossLayer(cfg) for _ in range(cfg.num_fusion_layers))
        self.cross_modal_text_pooler = Pooler(cfg.hidden_size)
        self.cross_modal_image_pooler = Pooler(cfg.hidden_size)
        self.mlm_score = MLMHead(cfg.hidden_size, cfg.vocab_size, cfg.layer_norm_eps)
        self.itm_score = ITMHead(cfg.hidden_size * 2)
        # activation checkpointing of the fusion layers (epic.models.fast_path.set_activation_checkpointing sets
        # it together with the towers' own switches)
        self.grad_checkpointing = False
        for name, module in self.named_children():
            if name not in ("vit_model", "text_transformer"):
                module.apply(partial(init_meter_weights, std=cfg.initializer_range))
        if cfg.consistency_head:  # last, so that every other weight draws the same random numbers with or without it
            self.add_module(CONSISTENCY_HEAD, new_consistency_head(cfg.hidden_size, cfg.initializer_range))

    @classmethod
    def from_config(cls, cfg: METERConfig) -> "METER":
        return cls(cfg)

    # The heads keep METER's state-dict names (``itm_score.fc``, ``mlm_score.decoder``); the interface calls them.
    @property
    def itm_score(self) -> ITMHead:
        """[B, 2H] cls_feats -> [B, 2] matched / not matched logits."""
        return self._modules["itm_score"]

    @property
    def mlm_score(self) -> MLMHead:
        """[B, L, H] text_feats -> [B, L, V] vocabulary logits."""
        return self._modules["mlm_score"]

    def mlm_transform(self, text_feats: torch.Tensor) -> torch.Tensor:
        return self.mlm_score.transform(text_feats)

    def mlm_output_embedding(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.mlm_score.decoder.weight, self.mlm_score.bias

    # ----------------------------------------------------------------------------------------------- towers
    def encode_image(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B, 3, S, S] → vision tower output [B, N_img, vit_width] (ln_post on every token); deterministic, so
        ``generator`` is never drawn from."""
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [B, 3, {size}, {size}] "
                             f"(config.image_size={size}; resize the images or build the model at this size)")
        return encode_image_tokens(self.vit_model, pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] → text tower output [B, L, text_hidden_size]."""
        return encode_text_tokens(self.text_transformer, input_ids, attention_mask)

    def retrieval_embeddings(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval's shortlist vectors (fp32): the mean-pooled unimodal features after the two
        ``cross_modal_*_transform`` layers, which map both towers into the space the fusion layers read (text:
        real tokens only). METER has no contrastive head, so this is a heuristic, not a trained similarity."""
        image = self.cross_modal_image_transform(image_embeds).float().mean(dim=1)
        weights = attention_mask.to(text_embeds.dtype).unsqueeze(-1)
        text = (self.cross_modal_text_transform(text_embeds) * weights).float().sum(dim=1)
        return image, text / weights.float().sum(dim=1).clamp_min(1.0)

    # ----------------------------------------------------------------------------------------------- fusion
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
              text_embeds: Optional[torch.Tensor] = None, image_token_type_idx: int = 1, stop_before_last_layer: bool = False,
              return_saliency_qk: bool = False) -> Dict[str, torch.Tensor]:
        """METER's forward up to the poolers.

        ``image_embeds`` (output of ``encode_image``) skips the vision tower, ``text_embeds`` (output of
        ``encode_text`` for these ``input_ids``) the text tower. Returns ``text_embeds`` and
        ``image_embeds`` (unimodal tower outputs), ``text_feats`` [B, L, H], ``image_feats`` [B, N, H] and
        ``cls_feats`` [B, 2H]. ``return_saliency_qk`` adds, from the penultimate fusion layer's image-stream
        cross-attention (EPIC Eq. 8), ``saliency_query`` [B, heads, dh] (query of the image [CLS]) and
        ``saliency_keys`` [B, heads, L, dh] (keys of every text position, padding included: mask it with
        ``attention_mask``); both are raw projections, without the 1/√dh attention scale.
        ``stop_before_last_layer`` (needs ``return_saliency_qk``) runs only what those two need: the layers
        before the penultimate one and the penultimate image layer's self-attention; no feats are returned.
        """
        num_layers = self.config.num_fusion_layers
        if return_saliency_qk and num_layers < 2:
            raise ValueError(f"saliency needs a penultimate fusion layer, but num_fusion_layers={num_layers}")
        if stop_before_last_layer and not return_saliency_qk:
            raise ValueError("stop_before_last_layer only serves the saliency teacher; pass return_saliency_qk=True")
        if not 0 <= image_token_type_idx < self.config.num_token_types:
            raise ValueError(f"image_token_type_idx={image_token_type_idx} but the model has "
                             f"{self.config.num_token_types} token types (NLVR2's second image needs num_token_types=3)")
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("infer needs pixel_values or image_embeds (the output of encode_image)")
            image_embeds = self.encode_image(pixel_values)
        if text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)

        text_states = self.cross_modal_text_transform(text_embeds) + self.token_type_embeddings(
            torch.zeros_like(input_ids))
        image_states = self.cross_modal_image_transform(image_embeds)
        image_types = torch.full(image_states.shape[:2], image_token_type_idx, dtype=torch.long,
                                 device=image_states.device)
        image_states = image_states + self.token_type_embeddings(image_types)
        text_mask = additive_attention_mask(attention_mask, text_states.dtype)
        image_mask = None  # every image token is real: METER's all-ones mask adds zeros

        out = {"text_embeds": text_embeds, "image_embeds": image_embeds}
        penultimate = num_layers - 2
        for index, (text_layer, image_layer) in enumerate(zip(self.cross_modal_text_layers,
                                                              self.cross_modal_image_layers)):
            wants_saliency = return_saliency_qk and index == penultimate
            if wants_saliency and stop_before_last_layer:
                query, keys = image_layer.cross_query_key(image_states, text_states, image_mask)
                out.update(saliency_query=query[:, :, 0], saliency_keys=keys)
                return out
            # both streams read the previous layer's outputs (parallel update)
            recompute = self.grad_checkpointing and self.training
            new_text, _ = checkpointed(text_layer, text_states, image_states, text_mask, image_mask,
                                       enabled=recompute)
            new_image, query_key = checkpointed(image_layer, image_states, text_states, image_mask, text_mask,
                                                wants_saliency, enabled=recompute)
            if wants_saliency:
                out.update(saliency_query=query_key[0][:, :, 0], saliency_keys=query_key[1])
            text_states, image_states = new_text, new_image

        cls_feats = torch.cat([self.cross_modal_text_pooler(text_states),
                               self.cross_modal_image_pooler(image_states)], dim=-1)
        out.update(text_feats=text_states, image_feats=image_states, cls_feats=cls_feats)
        return out

    def compile_parts(self) -> Dict[str, object]:
        """What ``train.compile`` compiles (epic.models.fast_path.compile_parts): both towers (the ViT through
        ``forward_features``, what ``encode_image`` calls) and each fusion layer (the heads are single GEMMs)."""
        parts = {"vit_model": (self.vit_model, "forward_features"), "text_transformer": self.text_transformer}
        for stream in ("text", "image"):
            for index, layer in enumerate(getattr(self, f"cross_modal_{stream}_layers")):
                parts[f"cross_modal_{stream}_layers.{index}"] = layer
        return parts

    def text_to_image_attention(self):
        """Grad-CAM's site: the penultimate text-stream co-attention layer's cross-attention (image [CLS] first)."""
        return penultimate(self.cross_modal_text_layers).crossattention.self, lambda text_len: 1

    # ----------------------------------------------------------------------------------------------- saliency
    def saliency_qk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EPIC Eq. 8's inputs: the image [CLS] query [B, heads, dh] and the text keys [B, heads, L, dh] of the
        penultimate fusion layer's image-stream cross-attention (runs only the layers up to it)."""
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values, image_embeds=image_embeds,
                         return_saliency_qk=True, stop_before_last_layer=True)
        return out["saliency_query"], out["saliency_keys"]

    def saliency_teacher(self) -> "METER":
        """A frozen copy without what ``saliency_qk`` never runs: the last fusion layer of both streams, the
        penultimate text layer (its keys come from that layer's *input*), the poolers and the heads."""
        layers = self.config.num_fusion_layers
        if layers < 2:
            raise ValueError(f"num_fusion_layers={layers}: EPIC's saliency needs a penultimate fusion layer")
        teacher = copy.deepcopy(self)
        teacher.cross_modal_text_layers = nn.ModuleList(
            list(teacher.cross_modal_text_layers[:layers - 2]) + [nn.Identity()])
        teacher.cross_modal_image_layers = nn.ModuleList(list(teacher.cross_modal_image_layers[:layers - 1]))
        for name in ("cross_modal_text_pooler", "cross_modal_image_pooler", "mlm_score", "itm_score",
                     CONSISTENCY_HEAD):
            if name in teacher._modules:
                teacher._modules[name] = None
        return teacher.eval().requires_grad_(False)

    # ----------------------------------------------------------------------------------------------- optimizer
    def param_groups_spec(self) -> Dict[str, Dict[str, List[str]]]:
        """Names of the trainable parameters grouped for lr multipliers and weight decay (see ``param_groups_spec``)."""
        return param_groups_spec(name for name, p in self.named_parameters() if p.requires_grad)

    # ----------------------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str) -> None:
        """Write ``model.safetensors`` (our key layout) and ``config.json`` (METERConfig) to ``directory``."""
        config = dataclasses.replace(self.config, vit_pretrained=None, text_pretrained=None)  # weights are in the file
        write_export(directory, self.state_dict(), dataclasses.asdict(config))

    @classmethod
    def from_pretrained(cls, directory: str) -> "METER":
        """Inverse of ``save_pretrained`` (a consistency head in the weights but not in an older config.json is
        re-created)."""
        values, state, source = read_export(directory, "METER.save_pretrained or tools/convert_meter_ckpt.py")
        cfg = config_from_dict(values, source=source)
        with_head = cfg.consistency_head or any(key.startswith(CONSISTENCY_HEAD + ".") for key in state)
        model = cls(dataclasses.replace(cfg, vit_pretrained=None, text_pretrained=None, consistency_head=with_head))
        model.load_state_dict(state)
        return model


def config_from_dict(values: dict, source: str = "config") -> METERConfig:
    """METERConfig from a dict, with a clear error on unknown fields."""
    known = {f.name for f in dataclasses.fields(METERConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source} has unknown METERConfig fields {unknown}; known fields: {sorted(known)}")
    return METERConfig(**values)


# ------------------------------------------------------------------------------------------------ parameter groups
HEAD_MODULES = ("mlm_score", "itm_score", "itc_score", "vqa_classifier", "nlvr2_classifier", "snli_classifier")
FUSION_MARKER = "cross_modal"  # METER: lr × lr_mult_cross_modal for any name containing it


def lr_group_of(name: str) -> str:
    """'fusion' (``cross_modal*``), 'head' (pretraining and downstream heads) or 'backbone' (towers, token types)."""
    if FUSION_MARKER in name:
        return "fusion"
    if name.split(".")[0] in HEAD_MODULES:
        return "head"
    return "backbone"


def uses_weight_decay(name: str) -> bool:
    """No decay on biases and on every normalisation layer (LayerNorm, timm's norm/norm1/norm2/norm_pre, CLIP ln_*)."""
    if name.endswith("bias"):
        return False
    return not any(part == "LayerNorm" or part.startswith("norm") or part.startswith("ln_")
                   for part in name.split(".")[:-1])


def param_groups_spec(names: Iterable[str]) -> Dict[str, Dict[str, List[str]]]:
    """{'backbone'|'fusion'|'head': {'decay': [...], 'no_decay': [...]}} — a pure function of parameter names."""
    spec = {group: {"decay": [], "no_decay": []} for group in ("backbone", "fusion", "head")}
    for name in names:
        spec[lr_group_of(name)]["decay" if uses_weight_decay(name) else "no_decay"].append(name)
    return spec
