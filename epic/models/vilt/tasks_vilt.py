"""ViLT's downstream task models (dandelin/ViLT vilt_module.py: the heads and their names as ViLT's checkpoints).

Each task model *is* a ViLT plus its head, so state-dict keys stay ViLT's (``vqa_classifier.*``, ...).

  retrieval  ``rank_output`` Linear(H -> 1), initialised from the ITM head's "match" row (ViLT does the same);
             trained with a softmax over one positive and ``num_negatives`` negative captions per image (ViLT:
             15 random false texts, ``compute_irtr``).
  vqa        ``vqa_classifier`` H -> 2H -> LayerNorm -> GELU -> num_answers (BCE on soft scores x answers).
  nlvr2      ViLT's pair formulation: two passes over (text, image 0) with modality type 1 and (text, image 1)
             with type 2 (a third type row, copied from the image row), ``nlvr2_classifier`` on the
             concatenated pooled features: 2H -> 2H -> LayerNorm -> GELU -> 2.
  snli_ve    ``snli_classifier`` H -> 2H -> LayerNorm -> GELU -> 3 (as METER; ViLT has no SNLI-VE head).

The pretraining heads the tasks do not use (``mlm_score``; ``itm_score``, which ViLT freezes for retrieval) are
frozen, so they take no optimizer state. ViLT multiplies the lr of ``vqa_classifier`` / ``nlvr2_classifier``
(lr_mult 10 for VQA); our parameter groups put every head in 'head' (``train.lr_mult_head``).
"""
from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from .configuration_vilt import ViLTConfig
from .modeling_vilt import ViLT, init_vilt_weights

TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve")
SNLI_CLASSES = 3


def classifier_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """ViLT's task head: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, num_classes))


class _TaskViLT(ViLT):
    task: str = ""

    def __init__(self, config: ViLTConfig):
        super().__init__(config)
        self._modules["mlm_score"].requires_grad_(False)
        self._modules["itm_score"].requires_grad_(False)

    def _new_head(self, head: nn.Module) -> nn.Module:
        head.apply(partial(init_vilt_weights, std=self.config.initializer_range))
        return head


class ViLTForRetrieval(_TaskViLT):
    task = "retrieval"

    def __init__(self, config: ViLTConfig):
        super().__init__(config)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.init_rank_output_from_itm()

    @torch.no_grad()
    def init_rank_output_from_itm(self) -> None:
        """ViLT: rank_output.weight = itm_score.fc.weight[1:] (the "match" logit), same for the bias."""
        itm = self._modules["itm_score"].fc
        self.rank_output.weight.copy_(itm.weight[1:])
        self.rank_output.bias.copy_(itm.bias[1:])

    def pair_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """[P, H] -> [P] ranking score."""
        return self.rank_output(cls_feats).squeeze(-1).float()


class ViLTForVQA(_TaskViLT):
    task = "vqa"

    def __init__(self, config: ViLTConfig, num_answers: int):
        super().__init__(config)
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}: give the VQA answer list")
        self.num_answers = num_answers
        hidden = config.hidden_size
        self.vqa_classifier = self._new_head(classifier_head(hidden, 2 * hidden, num_answers))

    def forward(self, pixel_values, input_ids, attention_mask, image_embeds=None) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values, image_embeds=image_embeds)
        return self.vqa_classifier(out["cls_feats"])


class ViLTForNLVR2(_TaskViLT):
    task = "nlvr2"

    def __init__(self, config: ViLTConfig):
        if config.num_token_types < 3:
            config = dataclasses.replace(config, num_token_types=3)  # the second image gets modality type 2
        super().__init__(config)
        hidden = config.hidden_size
        self.nlvr2_classifier = self._new_head(classifier_head(2 * hidden, 2 * hidden, 2))

    @torch.no_grad()
    def copy_image_type_row(self) -> None:
        """ViLT: the new third modality-type row starts as the image row (row 1)."""
        weight = self.token_type_embeddings.weight
        weight[2:] = weight[1:2]

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        first = self.infer(input_ids, attention_mask, pixel_values=pixel_values_0, image_token_type_idx=1)
        second = self.infer(input_ids, attention_mask, pixel_values=pixel_values_1, image_token_type_idx=2)
        return self.nlvr2_classifier(torch.cat([first["cls_feats"], second["cls_feats"]], dim=-1))


class ViLTForSNLIVE(_TaskViLT):
    task = "snli_ve"

    def __init__(self, config: ViLTConfig):
        super().__init__(config)
        hidden = config.hidden_size
        self.snli_classifier = self._new_head(classifier_head(hidden, 2 * hidden, SNLI_CLASSES))

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values)
        return self.snli_classifier(out["cls_feats"])


TASK_MODELS = {"retrieval": ViLTForRetrieval, "vqa": ViLTForVQA, "nlvr2": ViLTForNLVR2, "snli_ve": ViLTForSNLIVE}


def build_task_model(task: str, config: ViLTConfig, num_answers: int = 0) -> ViLT:
    """The ViLT downstream model of ``task`` (the registry's ``tasks`` entry for the family)."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "vqa":
        return ViLTForVQA(config, num_answers)
    return TASK_MODELS[task](config)
