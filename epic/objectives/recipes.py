"""Each model family's recipe of base pretraining losses, in one place.

A recipe is ``losses(model, batch, image_embeds, rng, mlm_batch=None) -> dict`` with ``loss`` (the sum it
trains) and each term and accuracy. It reads the model only through ``epic.models.interface.VLPModel``
(``infer``, ``itm_score``, ``mlm_score``, ...) and computes the losses over tensors (``itm.py``, ``mlm.py``).
``image_embeds`` is ``model.encode_image(batch["pixel_values"])``, computed once per micro-batch by the caller and
shared by every pass (vanilla pretraining, and EPIC, whose step adds lambda * L_ITC on the same features).
``mlm_batch`` (EPIC's †CMLM) replaces the MLM inputs and labels.

A family joins with one entry in ``RECIPES`` (an import path, so no recipe module is imported before it is used).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

from .itm import draw_itm_pairs, itm_cross_entropy
from .mlm import mlm_cross_entropy
from .wpa import word_patch_alignment_loss

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")


def check_batch(batch: dict, keys=BATCH_KEYS) -> None:
    missing = [key for key in keys if key not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing} (has {sorted(batch)}); the MLM collator of epic.data yields them")


def itm_and_mlm_losses(model, batch: dict, image_embeds: torch.Tensor, rng: torch.Generator,
                       mlm_batch: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """METER's (and ViLT's base) recipe: L_ITM + L_MLM, summed unweighted as METER does.

    ITM pairs half the captions with another sample's image of the same micro-batch (its features indexed, not
    re-encoded); MLM predicts ``mlm_labels`` from ``mlm_input_ids`` with the caption's own image.
    """
    pairs = draw_itm_pairs(image_embeds.shape[0], rng, image_embeds.device)
    masked = mlm_batch if mlm_batch is not None else batch
    if masked["mlm_labels"].shape != masked["mlm_input_ids"].shape:
        raise ValueError(f"mlm_labels {tuple(masked['mlm_labels'].shape)} and mlm_input_ids "
                         f"{tuple(masked['mlm_input_ids'].shape)} differ in shape; the collator must emit one label "
                         f"per input position")
    text_feats = model.infer(input_ids=masked["mlm_input_ids"], attention_mask=masked["attention_mask"],
                             image_embeds=image_embeds)["text_feats"]
    mlm = mlm_cross_entropy(model.mlm_score(text_feats), masked["mlm_labels"])
    cls_feats = model.infer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            image_embeds=image_embeds[pairs.image_index])["cls_feats"]
    itm = itm_cross_entropy(model.itm_score(cls_feats), pairs.labels)
    return {"loss": mlm["loss_mlm"] + itm["loss_itm"], **mlm, **itm}


def itm_wpa_and_mlm_losses(model, batch: dict, image_embeds: torch.Tensor, rng: torch.Generator,
                           mlm_batch: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """ViLT's recipe (compute_mlm + compute_itm_wpa): L_MLM + L_ITM + 0.1 * L_WPA.

    The ITM pass (half the captions with another sample's image) also gives the word and patch states for
    word-patch alignment (IPOT optimal transport in fp32, epic.objectives.wpa), over matched and mismatched pairs.
    """
    pairs = draw_itm_pairs(image_embeds.shape[0], rng, image_embeds.device)
    masked = mlm_batch if mlm_batch is not None else batch
    text_feats = model.infer(input_ids=masked["mlm_input_ids"], attention_mask=masked["attention_mask"],
                             image_embeds=image_embeds)["text_feats"]
    mlm = mlm_cross_entropy(model.mlm_score(text_feats), masked["mlm_labels"])
    out = model.infer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      image_embeds=image_embeds[pairs.image_index])
    itm = itm_cross_entropy(model.itm_score(out["cls_feats"]), pairs.labels)
    wpa = word_patch_alignment_loss(out["text_feats"], out["image_feats"], batch["attention_mask"],
                                    out["image_masks"], pairs.labels)
    return {"loss": mlm["loss_mlm"] + itm["loss_itm"] + wpa, **mlm, **itm, "loss_wpa": wpa.detach()}


#: family -> "module:function" of its recipe
RECIPES: Dict[str, str] = {
    "meter": "epic.objectives.recipes:itm_and_mlm_losses",
    "vilt": "epic.objectives.recipes:itm_wpa_and_mlm_losses",
    "albef": "epic.objectives.albef_losses:albef_recipe",
    "xvlm": "epic.objectives.xvlm:caption_recipe",
}


def recipe_for(family: str):
    if family not in RECIPES:
        raise KeyError(f"no pretraining recipe for model family {family!r}; add one to epic/objectives/recipes.py "
                       f"RECIPES (known: {', '.join(RECIPES)})")
    module, _, name = RECIPES[family].partition(":")
    return getattr(importlib.import_module(module), name)


def base_losses(model, batch: dict, image_embeds: torch.Tensor, rng: torch.Generator,
                mlm_batch: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """The base losses of ``model``'s family (``model.family``) on shared image features."""
    return recipe_for(model.family)(model, batch, image_embeds, rng, mlm_batch=mlm_batch)

#: (family, task) -> "module:function" of a fine-tuning objective that replaces epic/finetune.py's default for that
#: task: ``losses(model, batch, rng, task, finetune_config) -> dict`` (``loss`` + scalars)
TASK_RECIPES: Dict[tuple, str] = {
    ("albef", "retrieval"): "epic.objectives.albef_tasks:albef_task_recipe",
    ("albef", "vqa"): "epic.objectives.albef_tasks:albef_task_recipe",
    ("albef", "nlvr2_ta"): "epic.objectives.albef_tasks:albef_task_recipe",
    ("albef", "snli_ve"): "epic.objectives.albef_tasks:albef_task_recipe",  # momentum-distilled classification
    ("albef", "nlvr2"): "epic.objectives.albef_tasks:albef_task_recipe",
    ("xvlm", "retrieval"): "epic.objectives.xvlm_tasks:xvlm_task_recipe",
    ("xvlm", "vqa"): "epic.objectives.xvlm_tasks:xvlm_task_recipe",
}


def task_recipe(family: str, task: str):
    """The family's own objective for ``task``, or None (epic/finetune.py's default objective applies)."""
    path = TASK_RECIPES.get((family, task))
    if path is None:
        return None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
