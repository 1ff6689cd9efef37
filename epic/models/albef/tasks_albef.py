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

  nlvr2_ta   ALBEF's NLVR2 pre-step (Pretrain_nlvr.py): the two-image encoder with ``ta_head`` (caption of image 0,
             image 1 or neither), trained on image-caption pairs; its checkpoint initialises ``nlvr2``.

VE, NLVR2 and VQA drop what ALBEF's fine-tuning models lack (contrastive projections, ITM/MLM heads, temperature,
queues). With ``config.distill`` (ALBEF's ``distill: True``, the default) they keep a momentum copy of their own
parts (``distilled_parts``: ViT, text encoder and cls_head / answer decoder, model_ve/nlvr/vqa.py's model_pairs) as
fp32 buffers, out of the optimizer and in every checkpoint, updated after each optimizer step
(``after_optimizer_step``); ``momentum_logits`` gives its soft targets (epic.objectives.albef_tasks mixes them in at
alpha). A momentum part the loaded checkpoint lacks starts as a copy of the loaded online part.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..split_bert_tasks import (AnswerDecoder, AnswerRanking, adapt_task_state, answer_sequence_nll,
                                decoder_keys_from_encoder, fuse_two_images, fused_infer, share_cross_attention,
                                two_image_layer_keys, two_image_num_layers)
from .configuration_albef import ALBEFConfig
from .modeling_albef import (ALBEF, MASK_VALUE, MOMENTUM_PAIRS, TIED_SOURCES, BertLayer, MLMHead, TextEmbeddings,
                             additive_mask, init_bert_weights, parameters_to_buffers)

__all__ = ["answer_sequence_nll", "build_task_model"]  # answer_sequence_nll: re-exported (its old home)


TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve", "nlvr2_ta")
TA_CLASSES = 3  # text assignment: the caption is of image 0, of image 1, or of neither (model_pretrain_nlvr.py)
SNLI_CLASSES = 3  # epic.eval.snli_ve.SNLI_LABELS order (contradiction, neutral, entailment), ALBEF's ve_dataset too
#: state-dict prefixes of the pretraining model that a classifier (VE, NLVR2) does not have
PRETRAINING_PARTS = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "vision_proj.",
                     "text_proj.", "itm_head.", "text_encoder.cls.", "temp", "image_queue", "text_queue",
                     "queue_ptr", "momentum_step", "idx_queue", "itc_score.", "generator.",
                     "ta_head.",  # the text-assignment head: NLVR2 starts a fresh cls_head (NLVR.py, strict=False)
                     "cls_head_m.", "text_decoder_m.")  # a distilled checkpoint's momentum parts (distill=False)


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
        for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):  # ALBEF resamples both
            if key in state and key in own:
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
    """An ALBEF without the pretraining parts (model_ve.py / model_nlvr.py / model_vqa.py keep only the encoders),
    and, with ``config.distill``, a momentum copy ``<part>_m`` of each of ``distilled_parts``."""

    #: online parts with a momentum copy when config.distill (ALBEF's model_pairs of the task model)
    distilled_parts: Tuple[str, ...] = ()

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg)
        for name in ("vision_proj", "text_proj", "itm_head", *(momentum for _, momentum in MOMENTUM_PAIRS)):
            delattr(self, name)
        for name in ("temp", "image_queue", "text_queue", "queue_ptr", "momentum_step"):
            delattr(self, name)
        del self.text_encoder.cls
        self.distill = False

    def init_momentum_model(self) -> None:
        """ALBEF's copy_params for a task model, called once its parts exist: ``<part>_m`` = a copy of each of
        ``distilled_parts`` as fp32 buffers (ties kept: NLVR2's shared cross-attention key/value, the decoder's LM
        head), never trained, and ``momentum_step``, the optimizer steps taken (the alpha ramp)."""
        self.distill = bool(self.config.distill and self.distilled_parts)
        if not self.distill:
            return
        for part in self.distilled_parts:
            momentum = copy.deepcopy(getattr(self, part))
            parameters_to_buffers(momentum)
            setattr(self, part + "_m", momentum)
        self.register_buffer("momentum_step", torch.zeros((), dtype=torch.long))

    def momentum_pairs(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(online parameter, momentum buffer) of every distilled part, matched by name."""
        pairs = []
        for part in self.distilled_parts if self.distill else ():
            copies = dict(getattr(self, part + "_m").named_buffers())
            for name, param in getattr(self, part).named_parameters():
                if name not in copies:
                    raise RuntimeError(f"{part}_m has no copy of {part}.{name}")
                pairs.append((param, copies[name]))
        return pairs

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The momentum update theta_m <- m theta_m + (1 - m) theta (m = config.momentum, ALBEF's 0.995) and the
        ramp's step count, after every optimizer step taken; nothing without distillation."""
        if self.distill:
            super().after_optimizer_step()

    def _momentum_autocast(self, device: torch.device):
        online = self.visual_encoder.patch_embed.proj.weight.dtype
        if online == self.visual_encoder_m.patch_embed.proj.weight.dtype or online not in (torch.float16,
                                                                                          torch.bfloat16):
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=online)

    def _momentum_image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._run_vit(self.visual_encoder_m, pixel_values.to(self.visual_encoder_m.pos_embed.dtype))

    def _momentum_fused_states(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> torch.Tensor:
        """The momentum text encoder's fused text states over the momentum ViT's image tokens (one image each)."""
        bert = self.text_encoder_m.bert
        return bert.fuse(bert.encode_text(input_ids, attention_mask), attention_mask,
                         self._momentum_image_embeds(pixel_values))

    def _require_momentum(self) -> None:
        if not self.distill:
            raise RuntimeError(f"{type(self).__name__} was built with distill=False (or its task has no momentum "
                               f"distillation): there is no momentum model")

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A momentum part the checkpoint lacks (a TA or non-distilled checkpoint) starts as a copy of the loaded
        online part; a pretraining checkpoint's momentum encoders are taken as they are (ALBEF loads them)."""
        own = self.state_dict()
        state = dict(state)
        for part in self.distilled_parts if self.distill else ():
            prefix, copy_prefix = part + ".", part + "_m."
            if not any(k.startswith(copy_prefix) for k in state):
                for key in own:
                    if key.startswith(copy_prefix) and prefix + key[len(copy_prefix):] in state:
                        state[key] = state[prefix + key[len(copy_prefix):]]
        if self.distill:  # the source run's step count (e.g. pretraining's) is not this run's: the ramp restarts
            state["momentum_step"] = own["momentum_step"]  # (a resume loads the checkpoint directly, not via here)
        else:
            state.pop("momentum_step", None)
        return super().adapt_loaded_state(state)

    def infer(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, text_embeds=None):
        """One (text, image) fusion: the pretraining model's infer without the contrastive features."""
        return fused_infer(self, input_ids, attention_mask, pixel_values, image_embeds, text_embeds)


class _ALBEFClassifier(_FusionOnlyALBEF):
    new_parts = ("cls_head.", "cls_head_m.")
    distilled_parts = ("visual_encoder", "text_encoder", "cls_head")  # model_ve.py / model_nlvr.py

    def __init__(self, cfg: ALBEFConfig, num_classes: int):
        super().__init__(cfg)
        self.cls_head = classifier_head(cfg.hidden_size, num_classes)


class ALBEFForSNLIVE(_ALBEFClassifier):
    task = "snli_ve"

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg, SNLI_CLASSES)
        self.init_momentum_model()

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values)
        return self.cls_head(out["cls_feats"])

    @torch.no_grad()
    def momentum_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """The momentum model's class logits (model_ve.py's prediction_m), fp32."""
        self._require_momentum()
        with self._momentum_autocast(input_ids.device):
            fused = self._momentum_fused_states(pixel_values, input_ids, attention_mask)
            return self.cls_head_m(fused[:, 0]).float()



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
        self.init_momentum_model()  # after the sharing: the copy shares its key/value the same way

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        for prefix in ("text_encoder.bert.encoder.layer.", "text_encoder_m.bert.encoder.layer."):  # NLVR.py maps
            state = two_image_layer_keys(state, self.config.fusion_layer, self.pretrained_layers, prefix)  # both
        return super().adapt_loaded_state(state)

    def fuse_two_images(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image0_embeds: torch.Tensor,
                        image1_embeds: torch.Tensor, text_encoder: nn.Module = None) -> torch.Tensor:
        """The fusion layers over the text-encoder output, alternating the image the cross-attention reads
        (``text_encoder``: the momentum copy instead of the online one)."""
        layers = (self.text_encoder if text_encoder is None else text_encoder).bert.encoder.layer
        return fuse_two_images(layers[self.config.fusion_layer:], text_embeds,
                               additive_mask(attention_mask, text_embeds.dtype), (image0_embeds, image1_embeds))

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))  # both images, one pass
        text_embeds = self.encode_text(input_ids, attention_mask)
        fused = self.fuse_two_images(text_embeds, attention_mask, image_embeds[:batch], image_embeds[batch:])
        return self.cls_head(fused[:, 0])

    @torch.no_grad()
    def momentum_logits(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        """The momentum model's logits (model_nlvr.py's prediction_m), fp32."""
        self._require_momentum()
        batch = input_ids.shape[0]
        with self._momentum_autocast(input_ids.device):
            image_embeds = self._momentum_image_embeds(torch.cat([pixel_values_0, pixel_values_1]))
            text_embeds = self.text_encoder_m.bert.encode_text(input_ids, attention_mask)
            fused = self.fuse_two_images(text_embeds, attention_mask, image_embeds[:batch], image_embeds[batch:],
                                         text_encoder=self.text_encoder_m)
            return self.cls_head_m(fused[:, 0]).float()


class ALBEFForTextAssignment(ALBEFForNLVR2):
    """ALBEF's NLVR2 pre-step (Pretrain_nlvr.py / model_pretrain_nlvr.py): the two-image encoder learns, from
    image-caption pairs, whether the caption belongs to image 0, image 1 or neither (``ta_head``, 3 classes). Keeps
    ``vision_proj`` for the image similarity the pairs are drawn from; its checkpoint initialises ALBEFForNLVR2
    (the two-image layers as trained here, ``ta_head`` and ``vision_proj`` dropped, a fresh ``cls_head``)."""
    task = "nlvr2_ta"
    new_parts = ("ta_head.",)
    distilled_parts = ()  # model_pretrain_nlvr.py has no momentum model

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg)
        del self.cls_head
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.ta_head = nn.Linear(cfg.hidden_size, TA_CLASSES)

    @torch.no_grad()
    def image_similarity(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, B] cosine similarity of the images' projected [CLS] over ALBEF's fixed temperature 0.07."""
        feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        return feat @ feat.t() / 0.07

    def assignment_logits(self, image0_embeds: torch.Tensor, image1_embeds: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> torch.Tensor:
        text_embeds = self.encode_text(input_ids, attention_mask)
        return self.ta_head(self.fuse_two_images(text_embeds, attention_mask, image0_embeds, image1_embeds)[:, 0])

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))
        return self.assignment_logits(image_embeds[:batch], image_embeds[batch:], input_ids, attention_mask)


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
    new_parts = ("text_decoder.", "text_decoder_m.")
    distilled_parts = ("visual_encoder", "text_encoder", "text_decoder")  # model_vqa.py's model_pairs

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
        self.init_momentum_model()

    def adapt_loaded_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        state = dict(decoder_keys_from_encoder(state, self.config.fusion_layer))
        if self.distill and not any(k.startswith("text_decoder_m.") for k in state):  # VQA.py: the momentum
            momentum = {"text_encoder." + k[len("text_encoder_m."):]: v for k, v in state.items()  # decoder from
                        if k.startswith("text_encoder_m.")}                                         # the momentum
            state.update({"text_decoder_m." + k[len("text_decoder."):]: v for k, v in             # encoder
                          decoder_keys_from_encoder(momentum, self.config.fusion_layer).items()
                          if k.startswith("text_decoder.")})
        for decoder in ("text_decoder", "text_decoder_m"):
            for part in ("weight", "bias"):  # the decoder's tied LM head
                alias = f"{decoder}.cls.predictions.decoder.{part}"
                source = (f"{decoder}.bert.embeddings.word_embeddings.weight" if part == "weight"
                          else f"{decoder}.cls.predictions.bias")
                if alias not in state and source in state:
                    state[alias] = state[source]
        return super().adapt_loaded_state(state)

    def question_states(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """The fused question states [B, Lq, H] (text encoder + fusion layers over the image)."""
        return self.infer(input_ids, attention_mask, pixel_values=pixel_values)["text_feats"]

    @torch.no_grad()
    def momentum_answer_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor, question_index: torch.Tensor, answer_ids: torch.Tensor,
                               answer_mask: torch.Tensor) -> torch.Tensor:
        """The momentum decoder's next-token logits [P, La, V] (fp32) for answer p of question question_index[p],
        over the momentum encoders' question states (model_vqa.py's logits_m)."""
        self._require_momentum()
        with self._momentum_autocast(input_ids.device):
            states = self._momentum_fused_states(pixel_values, input_ids, attention_mask)
            return self.text_decoder_m(answer_ids, answer_mask, states[question_index],
                                       attention_mask[question_index]).float()


TASK_MODELS = {"retrieval": ALBEFForRetrieval, "vqa": ALBEFForVQA, "nlvr2": ALBEFForNLVR2, "snli_ve": ALBEFForSNLIVE,
               "nlvr2_ta": ALBEFForTextAssignment}


def build_task_model(task: str, config: ALBEFConfig, num_answers: int = 0) -> ALBEF:
    """The ALBEF downstream model of ``task`` (the registry's ``tasks`` entry for the family)."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; ALBEF offers {TASKS}")
    if task == "vqa":
        return ALBEFForVQA(config, num_answers)
    return TASK_MODELS[task](config)
