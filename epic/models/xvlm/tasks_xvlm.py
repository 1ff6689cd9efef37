"""X-VLM's downstream task models (zengyan-97/X-VLM ``models/model_{retrieval,vqa,nlvr}.py``), the registry's
``tasks`` entry for the family. Each task model *is* an XVLM (subclass), so module names stay X-VLM's.

  retrieval  the pretraining model without its MLM and box heads (model_retrieval.py: contrastive + matching
             losses only): fine-tuned with X-VLM's in-batch contrastive loss whose positives are every caption of
             the same image (all-gathered, no momentum encoder, no queue) + ITM with hard negatives that are never
             the same image (``epic.objectives.xvlm_tasks.retrieval_losses``); evaluated by the contrastive
             shortlist (``retrieval_embeddings``, eval.k_test: X-VLM's k_test 128) re-ranked by the ITM "match"
             logit (epic.eval.retrieval's default pair score, as Retrieval.py's evaluation).
  nlvr2      the two-image encoder (model_nlvr.py, as ALBEF's: each fusion layer doubled, image 0 / image 1
             alternating, cross-attention key / value shared per pair; epic.models.split_bert_tasks) and X-VLM's
             ``cls_head`` = build_mlp(H, 2): Linear(H, 2H) -> LayerNorm -> GELU -> Linear(2H, 2) on the fused [CLS]
             (ALBEF's is Linear-ReLU-Linear).
  vqa        the answer decoder (model_vqa.py, as ALBEF's: the question fused with the image by the whole BERT; a
             ``text_decoder`` of num_fusion_layers BERT layers with causal self-attention and cross-attention over
             the question states, initialised from the pretrained embeddings, fusion layers and MLM head) trained on
             answer sequences; prediction ranks the answer list (k = eval.k_test, X-VLM's 128). Unlike ALBEF's,
             X-VLM's decoder works when the image width differs from the text width (Swin-B 1024 vs BERT 768): its
             cross-attention key / value read question states, so they are then new (BERT init) and trained at
             lr x lr_mult (X-VLM's init_params); with equal widths they are copied from the fusion layers.

Like X-VLM's fine-tuning models, the classifiers and the VQA model drop the contrastive projections, temperature,
ITM, MLM and box heads. The parameters X-VLM creates new for a task (its ``init_params``: NLVR2's cls_head, VQA's
decoder cross-attention key / value when widths differ; none for retrieval) form the 'head' lr group (train.
lr_mult_head = X-VLM's lr_mult 2), everything else 'backbone'. X-VLM's optional NLVR2 pre-training step
(NLVR_pretrain.py, ``--load_nlvr_pretrain``) is not implemented: the two-image layers start from the pretrained
fusion layers, X-VLM's default path. A fine-tuning image size other than the pretraining one (X-VLM: 224 -> 384 with
Swin window 7 -> 12: ``model.image_size=384 model.swin_window_size=12``) resamples the Swin relative position
tables (timm's resize_rel_pos_bias_table, as X-VLM's interpolate_relative_pos_embed).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch
from torch import nn

from ..interface import CONSISTENCY_HEAD
from ..split_bert_tasks import (AnswerDecoder, AnswerRanking, adapt_task_state, decoder_keys_from_encoder,
                                fuse_two_images, fused_infer, share_cross_attention, two_image_layer_keys,
                                two_image_num_layers)
from .configuration_xvlm import XVLMConfig
from .modeling_xvlm import (XVLM, BertEmbeddings, BertLayer, BertOnlyMLMHead, additive_mask, build_mlp,
                            init_bert_weights)

TASKS = ("retrieval", "vqa", "nlvr2")
#: state-dict prefixes of the pretraining model that X-VLM's fine-tuning models lack
PRETRAINING_PARTS = ("text_encoder.cls.", "bbox_head.", "vision_proj.", "text_proj.", "temp", "itm_head.",
                     CONSISTENCY_HEAD + ".", "generator.")
#: the MLM decoder weight is the word embeddings (a tied alias, stored once)
TIED_SOURCES = {"text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
                "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight"}
REL_POS_TABLE = "relative_position_bias_table"


def _delete(model: nn.Module, path: str) -> None:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    delattr(owner, name)


class _TaskXVLM(XVLM):
    task: str = ""
    #: submodules / parameters X-VLM's model for this task does not have
    removed: Tuple[str, ...] = ("text_encoder.cls", "bbox_head")
    #: own state-dict prefixes a pretraining checkpoint lacks (they keep their initialisation on load)
    new_parts: Tuple[str, ...] = ()

    def __init__(self, cfg: XVLMConfig):
        super().__init__(dataclasses.replace(cfg, consistency_head=False))
        for path in self.removed:
            _delete(self, path)

    def is_init_param(self, name: str) -> bool:
        """X-VLM's init_params of this task (trained at lr x lr_mult)."""
        return name.startswith(self.new_parts)

    def lr_group(self, name: str) -> str:
        return "head" if self.is_init_param(name) else "backbone"

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """epic.models.downstream.load_pretrained_weights' family hook: pretraining weights -> this task's keys
        (pretraining-only parts dropped, tied aliases filled, new parts kept at init) and the Swin relative
        position tables resampled to this model's window size."""
        own = self.state_dict()
        state = adapt_task_state(type(self).__name__, own, state, PRETRAINING_PARTS, self.new_parts, TIED_SOURCES)
        for key, value in list(state.items()):
            if key.endswith(REL_POS_TABLE) and key in own and value.shape != own[key].shape:
                from timm.layers import resize_rel_pos_bias_table

                attention = self.get_submodule(key[:-len(REL_POS_TABLE) - 1])
                state[key] = resize_rel_pos_bias_table(value, new_window_size=attention.window_size,
                                                       new_bias_shape=own[key].shape)
        return state


class XVLMForRetrieval(_TaskXVLM):
    """model_retrieval.py: the encoders, projections, temperature and ITM head (no MLM or box head)."""

    task = "retrieval"


class _FusionOnlyXVLM(_TaskXVLM):
    """X-VLM without the contrastive and matching parts (model_nlvr.py / model_vqa.py keep only the encoders)."""

    removed = _TaskXVLM.removed + ("vision_proj", "text_proj", "temp", "itm_head")

    def infer(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, text_embeds=None):
        """One (text, image) fusion over every image token: the pretraining infer without the contrastive features."""
        return fused_infer(self, input_ids, attention_mask, pixel_values, image_embeds, text_embeds)


class XVLMForNLVR2(_FusionOnlyXVLM):
    """model_nlvr.py: the two-image encoder and cls_head = build_mlp(H, 2) on the fused [CLS]."""

    task = "nlvr2"
    new_parts = ("cls_head.",)

    def __init__(self, cfg: XVLMConfig):
        doubled = dataclasses.replace(cfg, num_hidden_layers=two_image_num_layers(cfg.fusion_layer,
                                                                                  cfg.num_hidden_layers))
        super().__init__(doubled)
        self.pretrained_layers = cfg.num_hidden_layers  # the pretrained model's depth (before the doubling)
        share_cross_attention(self.text_encoder.bert.encoder.layer, cfg.fusion_layer)
        self.cls_head = build_mlp(cfg.hidden_size, 2)  # PyTorch's default Linear init, as X-VLM's build_mlp

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = two_image_layer_keys(state, self.config.fusion_layer, self.pretrained_layers)
        return super().adapt_loaded_state(state)

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))  # both images, one pass
        text_embeds = self.encode_text(input_ids, attention_mask)
        layers = self.text_encoder.bert.encoder.layer[self.config.fusion_layer:]
        fused = fuse_two_images(layers, text_embeds, additive_mask(attention_mask, text_embeds.dtype),
                                (image_embeds[:batch], image_embeds[batch:]))
        return self.cls_head(fused[:, 0])


def answer_decoder(cfg: XVLMConfig) -> AnswerDecoder:
    """``text_decoder``: X-VLM's BertLMHeadModel with config_dec.fusion_layer = 0 (every layer cross-attends),
    encoder_width = hidden_size (it reads the question states) and num_dec_layers = the fusion layers' count; the LM
    head tied to its own word embeddings; BERT init, then loaded from the pretrained model (model_vqa.py)."""
    embeddings = BertEmbeddings(cfg)
    layers = [BertLayer(cfg, cross_width=cfg.hidden_size) for _ in range(cfg.num_hidden_layers - cfg.fusion_layer)]
    head = BertOnlyMLMHead(cfg)
    head.predictions.decoder.weight = embeddings.word_embeddings.weight
    decoder = AnswerDecoder(embeddings, layers, head)
    decoder.apply(lambda m: init_bert_weights(m, cfg.initializer_range))
    head.predictions.bias.data.zero_()
    return decoder


class XVLMForVQA(AnswerRanking, _FusionOnlyXVLM):
    """model_vqa.py: the question encoded with the image by the whole BERT, the answer decoder over its states;
    ``forward`` ranks the answer list set by ``set_answer_list`` (epic/finetune.py does, k = eval.k_test)."""

    task = "vqa"
    new_parts = ("text_decoder.",)

    def __init__(self, cfg: XVLMConfig, num_answers: int):
        super().__init__(cfg)
        self.init_answer_list(num_answers)
        self.text_decoder = answer_decoder(self.config)

    @property
    def copies_cross_key_value(self) -> bool:
        """The pretrained cross-attention key / value read vision_width inputs; the decoder's read hidden_size ones."""
        return self.config.vision_width == self.config.hidden_size

    def is_init_param(self, name: str) -> bool:
        """X-VLM's VQA init_params: the decoder's cross-attention key / value when they cannot be copied."""
        if self.copies_cross_key_value or not name.startswith("text_decoder."):
            return False
        return ".crossattention.self.key." in name or ".crossattention.self.value." in name

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = decoder_keys_from_encoder(state, self.config.fusion_layer, self.copies_cross_key_value)
        return super().adapt_loaded_state(state)

    def question_states(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """The fused question states [B, Lq, H] (text layers + fusion layers over the whole image)."""
        return self.infer(input_ids, attention_mask, pixel_values=pixel_values)["text_feats"]


def build_task_model(task: str, config: XVLMConfig, num_answers: int = 0) -> XVLM:
    """The X-VLM downstream model of ``task`` (the registry's ``tasks`` entry for the family)."""
    if task == "retrieval":
        return XVLMForRetrieval(config)
    if task == "nlvr2":
        return XVLMForNLVR2(config)
    if task == "vqa":
        return XVLMForVQA(config, num_answers)
    raise ValueError(f"X-VLM has no {task!r} task model; X-VLM fine-tunes {TASKS} (SNLI-VE is not among its "
                     "downstream tasks)")
