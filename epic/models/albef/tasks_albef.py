"""ALBEF's downstream task models (salesforce/ALBEF ``models/model_{retrieval,ve,nlvr}.py``), the registry's ``tasks``
entry for the family. Each task model *is* an ALBEF (subclass), so module names stay ALBEF's.

  retrieval  the whole pretraining model (momentum encoders, queues, ITM head) plus ``idx_queue``, the image ids
             of the queued features: fine-tuned with ALBEF's contrastive loss whose positives are every batch or
             queue entry of the same image (momentum-distilled) + ITM with hard negatives that are never the same
             image (``epic.objectives.albef_tasks.retrieval_losses``); evaluated by the contrastive similarity
             shortlist (``retrieval_embeddings``, eval.k_test: ALBEF's k_test 256) re-ranked by the ITM "match"
             logit (epic.eval.retrieval's default pair score, as ALBEF's evaluation ranks).
  snli_ve    ``cls_head`` Linear(H, H) -> ReLU -> Linear(H, 3) on the fused [CLS] (model_ve.py).
  nlvr2      ALBEF's two-image encoder (model_nlvr.py): every fusion layer of the pretrained model becomes two
             consecutive layers (self-attention, cross-attention, FFN), the first reading image 0 and the second
             image 1 (xbert: encoder_hidden_states[(layer - fusion_layer) % 2]); both copies start from the same
             pretrained layer and the pair shares the cross-attention key/value projections
             (``share_cross_attention``); ``cls_head`` H -> H -> ReLU -> 2 on the fused [CLS].

The classifiers drop what ALBEF's fine-tuning models lack (contrastive projections, ITM/MLM heads, temperature,
queues). Momentum distillation of the classifiers (ALBEF's ``distill: True`` for VE/NLVR2) is not implemented:
they train with plain cross-entropy (ALBEF's ``distill: False``). ALBEF's NLVR2 text-assignment pre-step
(Pretrain_nlvr.py) is not implemented either: the two-image layers start from the pretrained fusion layers.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_albef import ALBEFConfig
from .modeling_albef import ALBEF, MOMENTUM_PAIRS, TIED_SOURCES, additive_mask

log = logging.getLogger(__name__)

TASKS = ("retrieval", "nlvr2", "snli_ve")
SNLI_CLASSES = 3  # epic.eval.snli_ve.SNLI_LABELS order (contradiction, neutral, entailment), ALBEF's ve_dataset too
#: state-dict prefixes of the pretraining model that a classifier (VE, NLVR2) does not have
PRETRAINING_PARTS = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "vision_proj.",
                     "text_proj.", "itm_head.", "text_encoder.cls.", "temp", "image_queue", "text_queue",
                     "queue_ptr", "momentum_step", "idx_queue", "itc_score.", "generator.")


def classifier_head(hidden: int, num_classes: int) -> nn.Sequential:
    """ALBEF's cls_head: Linear(H, H) -> ReLU -> Linear(H, classes) (PyTorch's default Linear init, as ALBEF)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def resample_pos_embed(weight: torch.Tensor, target: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Pretrained at one resolution, fine-tuned at another (ALBEF: 256 -> 384): resample bicubically (ALBEF's
    interpolate_pos_embed)."""
    if weight.shape == target.shape:
        return weight
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(weight, new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)


class _TaskALBEF(ALBEF):
    task: str = ""
    #: own state-dict prefixes a pretraining checkpoint lacks (they keep their initialisation on load)
    new_parts: Tuple[str, ...] = ()

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """epic.models.downstream.load_pretrained_weights' family hook: pretraining weights -> this task's keys.
        Pretraining-only parts this model lacks are dropped, the tied MLM decoder aliases filled, the task's new
        parts kept at their initialisation, and the position embedding resampled to this image size."""
        own = self.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(PRETRAINING_PARTS)}
        for alias, source in TIED_SOURCES.items():
            if alias in own and alias not in state and source in state:
                state[alias] = state[source]
        added = sorted({k for k in own if k.startswith(self.new_parts) and k not in state})
        for key in added:
            state[key] = own[key]
        if added:
            log.info("%s: new parts keep their initialisation: %s", type(self).__name__,
                     sorted({k.split(".")[0] for k in added}))
        key = "visual_encoder.pos_embed"
        if key in state:
            state[key] = resample_pos_embed(state[key], own[key], self.visual_encoder.patch_embed.grid_size)
        return state


class ALBEFForRetrieval(_TaskALBEF):
    """model_retrieval.py: the pretraining model (momentum encoders, queues, ITM head) plus the queue of image ids.
    The MLM head is not used: its transform and bias are frozen (the decoder weight is the word embeddings)."""

    task = "retrieval"
    new_parts = ("idx_queue",)

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg)
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        predictions = self.text_encoder.cls.predictions
        predictions.transform.requires_grad_(False)
        predictions.bias.requires_grad_(False)


class _ALBEFClassifier(_TaskALBEF):
    """An ALBEF without the pretraining parts (model_ve.py / model_nlvr.py have only the encoders and cls_head)."""

    new_parts = ("cls_head.",)

    def __init__(self, cfg: ALBEFConfig, num_classes: int):
        super().__init__(cfg)
        for name in ("vision_proj", "text_proj", "itm_head", *(momentum for _, momentum in MOMENTUM_PAIRS)):
            delattr(self, name)
        for name in ("temp", "image_queue", "text_queue", "queue_ptr", "momentum_step"):
            delattr(self, name)
        del self.text_encoder.cls
        self.cls_head = classifier_head(cfg.hidden_size, num_classes)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """No momentum model to update (the trainer calls this after every optimizer step)."""

    def infer(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, text_embeds=None):
        """One (text, image) fusion: the pretraining model's infer without the contrastive features."""
        if image_embeds is None:
            image_embeds = self.encode_image(pixel_values)
        if text_embeds is None:
            text_embeds = self.encode_text(input_ids, attention_mask)
        fused = self.fuse(text_embeds, attention_mask, image_embeds)
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "text_feats": fused,
                "cls_feats": fused[:, 0], "image_feats": image_embeds}


class ALBEFForSNLIVE(_ALBEFClassifier):
    task = "snli_ve"

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg, SNLI_CLASSES)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values)
        return self.cls_head(out["cls_feats"])



def nlvr2_config(cfg: ALBEFConfig) -> ALBEFConfig:
    """The two-image encoder's BERT: the text layers, then two layers per pretrained fusion layer (ALBEF's
    model_nlvr.py sets num_hidden_layers = 18 for 6 + 6)."""
    return dataclasses.replace(cfg, num_hidden_layers=cfg.fusion_layer + 2 * cfg.num_fusion_layers,
                               consistency_head=False)


def share_cross_attention(layers: nn.ModuleList, fusion_layer: int) -> None:
    """ALBEF's share_cross_attention: in each pair (fusion_layer + 2i, fusion_layer + 2i + 1) the first layer's
    cross-attention key and value projections become the second's (one parameter, two names)."""
    for first in range(fusion_layer, len(layers), 2):
        cross_0, cross_1 = layers[first].crossattention.self, layers[first + 1].crossattention.self
        cross_0.key, cross_0.value = cross_1.key, cross_1.value


def two_image_layer_keys(state: Dict[str, torch.Tensor], fusion_layer: int, pretrained_layers: int
                         ) -> Dict[str, torch.Tensor]:
    """ALBEF's NLVR.py weight mapping: pretrained fusion layer j -> layers fusion + 2 (j - fusion) and the one
    after it, for the online text encoder. A state that already has the two-image layers is returned as is."""
    prefix = "text_encoder.bert.encoder.layer."
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    if not indices or max(indices) >= pretrained_layers:  # already two-image (a fine-tuned NLVR2 checkpoint)
        return state
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix):].split(".", 1)
        j = int(index)
        if j < fusion_layer:
            out[key] = value
        else:
            first = fusion_layer + 2 * (j - fusion_layer)
            out[f"{prefix}{first}.{rest}"] = value
            out[f"{prefix}{first + 1}.{rest}"] = value
    return out


class ALBEFForNLVR2(_ALBEFClassifier):
    task = "nlvr2"

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(nlvr2_config(cfg), 2)
        self.pretrained_layers = cfg.num_hidden_layers  # the pretrained model's depth (before the doubling)
        share_cross_attention(self.text_encoder.bert.encoder.layer, cfg.fusion_layer)

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = two_image_layer_keys(state, self.config.fusion_layer, self.pretrained_layers)
        return super().adapt_loaded_state(state)

    def fuse_two_images(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image0_embeds: torch.Tensor,
                        image1_embeds: torch.Tensor) -> torch.Tensor:
        """The fusion layers over the text-encoder output, alternating the image the cross-attention reads."""
        bert = self.text_encoder.bert
        text_mask = additive_mask(attention_mask, text_embeds.dtype)
        hidden = text_embeds
        for offset, layer in enumerate(bert.encoder.layer[self.config.fusion_layer:]):
            hidden = layer(hidden, text_mask, (image0_embeds, image1_embeds)[offset % 2], None)
        return hidden

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))  # both images, one pass
        text_embeds = self.encode_text(input_ids, attention_mask)
        fused = self.fuse_two_images(text_embeds, attention_mask, image_embeds[:batch], image_embeds[batch:])
        return self.cls_head(fused[:, 0])


TASK_MODELS = {"retrieval": ALBEFForRetrieval, "nlvr2": ALBEFForNLVR2, "snli_ve": ALBEFForSNLIVE}


def build_task_model(task: str, config: ALBEFConfig, num_answers: int = 0) -> ALBEF:
    """The ALBEF downstream model of ``task`` (the registry's ``tasks`` entry for the family)."""
    if task == "vqa":
        raise ValueError("ALBEF's VQA (the answer decoder ranking the answer list) is not implemented; ALBEF "
                         "fine-tunes retrieval, nlvr2 and snli_ve here")
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; ALBEF offers {TASKS}")
    return TASK_MODELS[task](config)
