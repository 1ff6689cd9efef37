"""X-VLM's retrieval and VQA fine-tuning objectives (zengyan-97/X-VLM ``models/model_{retrieval,vqa}.py``), and the
recipe that runs them on X-VLM's task models (epic.models.xvlm.tasks_xvlm).

    L = L_itc + L_itm      (X-VLM's Retrieval.py: loss_itc + loss_itm)

Both are X-VLM's pretraining losses (epic.objectives.xvlm) with the image ids ``idx``: L_itc is the contrastive
loss over the all-gathered batch whose positives are every pair of the same image (targets = positives / their
count; no momentum encoder, no queue: ALBEF's retrieval has both), L_itm draws per image one hard negative caption
and per caption one hard negative image from the in-batch softmax similarities + 1e-5, never of the same image
(X-VLM masks eq(idx, idx.T)). VQA: epic.objectives.answer_generation (the same loss as ALBEF's).
The model is reached through its methods only; no model family is imported.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .answer_generation import vqa_losses
from .xvlm import contrastive_loss, matching_loss

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "image_ids")


def retrieval_losses(model, batch: Dict[str, torch.Tensor], rng: Optional[torch.Generator] = None
                     ) -> Dict[str, torch.Tensor]:
    """One X-VLM retrieval fine-tuning forward (model_retrieval.XVLM.forward): ``loss`` = L_itc + L_itm, each term
    and the ITM accuracy. ``batch``: ``pixel_values``, ``input_ids``, ``attention_mask``, ``image_ids`` (row b = an
    image with one of its captions). Each image and caption is encoded once; the ITM pass fuses the 3B pairs."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"X-VLM retrieval fine-tuning needs batches with {missing} (epic.data.tasks' retrieval loader)")
    text_atts = batch["attention_mask"]
    idx = batch["image_ids"].to(text_atts.device).long()
    image_embeds = model.encode_image(batch["pixel_values"])
    image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
    text_embeds = model.encode_text(batch["input_ids"], text_atts)
    image_feat, text_feat = model.image_features(image_embeds), model.text_features(text_embeds)
    loss_itc = contrastive_loss(image_feat, text_feat, model.temp, idx)
    loss_itm, accuracy = matching_loss(model, image_embeds, image_atts, image_feat, text_embeds, text_atts, text_feat,
                                       rng, idx)
    return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
            "itm_acc": accuracy.detach()}


def xvlm_task_recipe(model, batch: dict, rng: torch.Generator, task: str, finetune) -> Dict[str, torch.Tensor]:
    """The TASK_RECIPES entry (epic.objectives.recipes) for X-VLM's retrieval and VQA (NLVR2 is finetune.py's
    cross-entropy on the two-image classifier, as X-VLM's)."""
    if task == "retrieval":
        return retrieval_losses(model, batch, rng)
    if task == "vqa":
        return vqa_losses(model, batch)
    raise ValueError(f"no X-VLM task recipe for {task!r}")
