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
  vqa        ALBEF's answer decoder (model_vqa.py): the question is fused with the image by the whole BERT; a
             ``text_decoder`` (BERT LM with causal self-attention and cross-attention over the question states in
             every layer, initialised from the pretrained embeddings, fusion layers and MLM head) is trained on
             each answer's token sequence, and prediction ranks the answer list: the k answers whose first token
             is likeliest, re-scored by their whole sequence (``rank_answers``; k = eval.k_test, ALBEF's 128).

VE, NLVR2 and VQA drop what ALBEF's fine-tuning models lack (contrastive projections, ITM/MLM heads, temperature,
queues). Their momentum distillation (ALBEF's ``distill: True``) is not implemented: they train with the plain
losses (ALBEF's ``distill: False``). ALBEF's NLVR2 text-assignment pre-step
(Pretrain_nlvr.py) is not implemented either: the two-image layers start from the pretrained fusion layers.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Dict, Tuple

import torch
from torch import nn

from ..split_bert_tasks import (AnswerDecoder, AnswerRanking, adapt_task_state, answer_sequence_nll,
                                decoder_keys_from_encoder, fuse_two_images, fused_infer, share_cross_attention,
                                two_image_layer_keys, two_image_num_layers)
from .configuration_albef import ALBEFConfig
from .modeling_albef import (ALBEF, MASK_VALUE, MOMENTUM_PAIRS, TIED_SOURCES, BertLayer, MLMHead, TextEmbeddings,
                             additive_mask, init_bert_weights)

__all__ = ["answer_sequence_nll", "build_task_model"]  # answer_sequence_nll: re-exported (its old home)


TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve")
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
        state = adapt_task_state(type(self).__name__, own, state, PRETRAINING_PARTS, self.new_parts, TIED_SOURCES)
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


class _FusionOnlyALBEF(_TaskALBEF):
    """An ALBEF without the pretraining parts (model_ve.py / model_nlvr.py / model_vqa.py keep only the encoders)."""

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg)
        for name in ("vision_proj", "text_proj", "itm_head", *(momentum for _, momentum in MOMENTUM_PAIRS)):
            delattr(self, name)
        for name in ("temp", "image_queue", "text_queue", "queue_ptr", "momentum_step"):
            delattr(self, name)
        del self.text_encoder.cls

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """No momentum model to update (the trainer calls this after every optimizer step)."""

    def infer(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, text_embeds=None):
        """One (text, image) fusion: the pretraining model's infer without the contrastive features."""
        return fused_infer(self, input_ids, attention_mask, pixel_values, image_embeds, text_embeds)


class _ALBEFClassifier(_FusionOnlyALBEF):
    new_parts = ("cls_head.",)

    def __init__(self, cfg: ALBEFConfig, num_classes: int):
        super().__init__(cfg)
        self.cls_head = classifier_head(cfg.hidden_size, num_classes)


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
    return dataclasses.replace(cfg, num_hidden_layers=two_image_num_layers(cfg.fusion_layer, cfg.num_hidden_layers),
                               consistency_head=False)


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
        layers = self.text_encoder.bert.encoder.layer[self.config.fusion_layer:]
        return fuse_two_images(layers, text_embeds, additive_mask(attention_mask, text_embeds.dtype),
                               (image0_embeds, image1_embeds))

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))  # both images, one pass
        text_embeds = self.encode_text(input_ids, attention_mask)
        fused = self.fuse_two_images(text_embeds, attention_mask, image_embeds[:batch], image_embeds[batch:])
        return self.cls_head(fused[:, 0])


# ------------------------------------------------------------------------------------------------ VQA
def answer_decoder(cfg: ALBEFConfig) -> AnswerDecoder:
    """``text_decoder``: ALBEF's BertLMHeadModel (model_vqa.py: config_decoder.fusion_layer = 0, num_hidden_layers =
    6, so every layer cross-attends to the question states; the LM head tied to its own word embeddings), BERT-
    initialised, then loaded from the pretrained embeddings, fusion layers and MLM head (VQA.py)."""
    embeddings = TextEmbeddings(cfg)
    layers = [BertLayer(cfg, cfg.fusion_layer + i) for i in range(cfg.num_fusion_layers)]
    decoder = AnswerDecoder(embeddings, layers, MLMHead(cfg, embeddings.word_embeddings), MASK_VALUE)
    decoder.apply(partial(init_bert_weights, std=cfg.initializer_range))
    decoder.cls.predictions.bias.data.zero_()
    return decoder


class ALBEFForVQA(AnswerRanking, _FusionOnlyALBEF):
    """model_vqa.py: the question is encoded with the image by the whole BERT (text + fusion layers), and the
    answer decoder scores answers as token sequences; prediction ranks the answer list (``rank_answers``): the k
    answers whose first token is likeliest are re-scored by their whole sequence (ALBEF's k_test 128;
    ``eval.k_test`` here, 0 = every answer).

    The answer list's token ids are set by ``set_answer_list(tokenizer, answers)`` (epic/finetune.py does) and are
    not part of the state dict (the answer list file is)."""

    task = "vqa"
    new_parts = ("text_decoder.",)

    def __init__(self, cfg: ALBEFConfig, num_answers: int):
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}: give the VQA answer list")
        if cfg.encoder_width != cfg.hidden_size:
            raise ValueError(f"ALBEF's answer decoder starts from the fusion layers, whose cross-attention reads "
                             f"width encoder_width={cfg.encoder_width}; the question states have hidden_size="
                             f"{cfg.hidden_size}: VQA needs them equal (ALBEF: 768 and 768)")
        super().__init__(cfg)
        self.init_answer_list(num_answers)
        self.text_decoder = answer_decoder(cfg)

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = decoder_keys_from_encoder(state, self.config.fusion_layer)
        for part in ("weight", "bias"):  # the decoder's tied LM head
            alias = f"text_decoder.cls.predictions.decoder.{part}"
            source = ("text_decoder.bert.embeddings.word_embeddings.weight" if part == "weight"
                      else "text_decoder.cls.predictions.bias")
            if alias not in state and source in state:
                state[alias] = state[source]
        return super().adapt_loaded_state(state)

    def question_states(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """The fused question states [B, Lq, H] (text encoder + fusion layers over the image)."""
        return self.infer(input_ids, attention_mask, pixel_values=pixel_values)["text_feats"]


TASK_MODELS = {"retrieval": ALBEFForRetrieval, "vqa": ALBEFForVQA, "nlvr2": ALBEFForNLVR2, "snli_ve": ALBEFForSNLIVE}


def build_task_model(task: str, config: ALBEFConfig, num_answers: int = 0) -> ALBEF:
    """The ALBEF downstream model of ``task`` (the registry's ``tasks`` entry for the family)."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; ALBEF offers {TASKS}")
    if task == "vqa":
        return ALBEFForVQA(config, num_answers)
    return TASK_MODELS[task](config)
