"""ALBEF's retrieval and VQA fine-tuning objectives (salesforce/ALBEF ``models/model_{retrieval,vqa}.py``) over
tensors, and the recipe that runs them on ALBEF's task models (epic.models.albef.tasks_albef).

    L = L_ita + L_itm      (ALBEF's Retrieval.py)

L_ita is the pretraining contrastive loss with one change: a caption's positives are *every* batch or queue entry
of the same image (``idx``: a COCO image has 5 captions), targets = positives / their count, mixed with the
momentum model's softmax at weight alpha. L_itm draws, per image, one hard negative caption and, per caption, one
hard negative image from the in-batch softmax similarities, never of the same image (ALBEF masks eq(idx, idx.T)).

VQA: the answer decoder's sequence loss (epic.objectives.answer_generation, shared with X-VLM).

Momentum distillation of SNLI-VE, NLVR2 and VQA (ALBEF's ``distill: True``, the task model's ``distill``), with
p_m the momentum model's softmax and alpha ramped as in pretraining (``model.config.alpha_ramp_steps``):

    L_cls = (1 - alpha) CE(logits, y) + alpha CE(logits, p_m)                       (model_ve.py, model_nlvr.py)
    L_answer = (1 - alpha) NLL(answer) + alpha sum_t CE(logits_t, p_m,t)            (xbert BertLMHeadModel; in
                                                                                     answer_generation)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .albef_losses import NEGATIVE_WEIGHT_FLOOR, itm_loss, itm_pairs
from .answer_generation import answer_weights, vqa_losses  # noqa: F401  (shared with X-VLM; old import path)
from .contrastive import (alpha_ramp, dequeue_and_enqueue, enqueue, gather_features, soft_cross_entropy,
                          with_queue)

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "image_ids")


def same_image_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """[B, B + Q] targets: 1 / (number of positives) on every column of the same image, 0 elsewhere (ALBEF's
    sim_targets = pos_idx / pos_idx.sum(1)). Row i's own column (i) is always a positive."""
    positives = (idx.view(-1, 1) == idx_all.view(1, -1)).float()
    return positives / positives.sum(dim=1, keepdim=True)


def retrieval_contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                               text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
                               idx: torch.Tensor, idx_queue: torch.Tensor, temp: torch.Tensor, alpha: float):
    """(loss, sim_i2t, sim_t2i): ALBEF's retrieval ITA with momentum distillation, similarities in fp32.

    targets = alpha * softmax(momentum similarities) + (1 - alpha) * same_image_targets; loss = (CE_i2t + CE_t2i)/2.
    ``idx_queue`` [1, Q] holds the image ids of the queued features (-100: empty, never a positive)."""
    temp = temp.float()
    text_all = with_queue(text_feat_m.float(), text_queue)
    image_all = with_queue(image_feat_m.float(), image_queue)
    idx_all = torch.cat([idx.view(1, -1), idx_queue.detach().to(idx.device)], dim=1)
    targets = same_image_targets(idx, idx_all)
    with torch.no_grad():
        targets_i2t = alpha * F.softmax(image_feat_m.float() @ text_all / temp, dim=1) + (1.0 - alpha) * targets
        targets_t2i = alpha * F.softmax(text_feat_m.float() @ image_all / temp, dim=1) + (1.0 - alpha) * targets
    sim_i2t = image_feat.float() @ text_all / temp
    sim_t2i = text_feat.float() @ image_all / temp
    loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return loss, sim_i2t, sim_t2i


def other_image_weights(sim: torch.Tensor, same_image: torch.Tensor,
                        floor: float = NEGATIVE_WEIGHT_FLOOR) -> torch.Tensor:
    """Hard-negative sampling weights [B, B]: softmax(sim) in fp32 (+ floor), 0 on every sample of the same image
    (ALBEF masks eq(idx, idx.T)); a row with a non-finite similarity is uniform over the other images (the guard of
    albef_losses.hard_negative_weights). A row without any other image cannot draw a negative: a clear error."""
    sim = sim.detach().float()
    finite_rows = torch.isfinite(sim).all(dim=1, keepdim=True)
    sim = torch.where(finite_rows, sim, torch.zeros_like(sim))
    weights = (F.softmax(sim, dim=1) + floor).masked_fill(same_image, 0.0)
    if bool((weights.sum(dim=1) == 0).any()):
        raise ValueError("ALBEF retrieval ITM needs, for every sample, another image in its micro-batch (its hard "
                         "negative); this micro-batch holds one image only: raise data.micro_batch_size")
    return weights


@torch.no_grad()
def enqueue_with_ids(model, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor,
                     gather=gather_features) -> None:
    """ALBEF's retrieval _dequeue_and_enqueue: features and their image ids, gathered over ranks, at one pointer."""
    if model.queue_ptr.is_meta:
        return
    ptr = int(model.queue_ptr.item())
    dequeue_and_enqueue(model.image_queue, model.text_queue, model.queue_ptr, image_feat_m, text_feat_m,
                        gather=gather)
    enqueue(model.idx_queue, gather(idx.view(-1, 1).to(model.idx_queue.dtype)), ptr)


def retrieval_losses(model, batch: Dict[str, torch.Tensor], rng: Optional[torch.Generator] = None,
                     alpha: Optional[float] = None, gather=gather_features) -> Dict[str, torch.Tensor]:
    """One ALBEF retrieval fine-tuning forward: ``loss`` = L_ita + L_itm, each term, ITM accuracy and alpha.

    ``batch``: ``pixel_values``, ``input_ids``, ``attention_mask``, ``image_ids`` (row b = image b with one of its
    captions). ``alpha`` None ramps ``model.config.alpha`` over ``alpha_ramp_steps`` optimizer steps (ALBEF's
    warm-up ramp over the first epoch). Each image and caption is encoded once; the ITM pass fuses the 3B pairs."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"ALBEF retrieval fine-tuning needs batches with {missing} (epic.data.tasks' retrieval loader)")
    if alpha is None:
        alpha = alpha_ramp(model.config.alpha, int(model.momentum_step), model.config.alpha_ramp_steps)
    pixel_values, input_ids, attention_mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    idx = batch["image_ids"].to(input_ids.device).long()
    image_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(input_ids, attention_mask)
    momentum = model.momentum_features(input_ids, attention_mask, pixel_values)
    loss_ita, sim_i2t, sim_t2i = retrieval_contrastive_loss(
        model.image_feat(image_embeds), model.text_feat(text_embeds), momentum["image_feat_m"],
        momentum["text_feat_m"], model.image_queue, model.text_queue, idx, model.idx_queue, model.temperature(),
        alpha)
    enqueue_with_ids(model, momentum["image_feat_m"], momentum["text_feat_m"], idx, gather)

    batch_size = idx.shape[0]
    same_image = idx.view(-1, 1) == idx.view(1, -1)
    negatives = {
        "text_index": torch.multinomial(other_image_weights(sim_i2t[:, :batch_size], same_image), 1,
                                        generator=rng).squeeze(1),
        "image_index": torch.multinomial(other_image_weights(sim_t2i[:, :batch_size], same_image), 1,
                                         generator=rng).squeeze(1)}
    pairs = itm_pairs(batch_size, negatives, image_embeds.device)
    fused = model.fuse(text_embeds[pairs["text_index"]], attention_mask[pairs["text_index"]],
                       image_embeds[pairs["image_index"]])
    logits = model.itm_score(fused[:, 0])
    loss_itm = itm_loss(logits, pairs["labels"])
    accuracy = (logits.argmax(-1) == pairs["labels"]).float().mean()
    return {"loss": loss_ita + loss_itm, "loss_ita": loss_ita.detach(), "loss_itm": loss_itm.detach(),
            "itm_acc": accuracy.detach(), "alpha": torch.tensor(alpha)}


def distillation_alpha(model) -> float:
    """The distillation weight at this step: config.alpha ramped over alpha_ramp_steps optimizer steps (ALBEF's
    warm_up: alpha * min(1, i / len(loader)) in the first epoch)."""
    return alpha_ramp(model.config.alpha, int(model.momentum_step), model.config.alpha_ramp_steps)


def distilled_classification_loss(logits: torch.Tensor, logits_m: torch.Tensor, labels: torch.Tensor,
                                  alpha: float) -> torch.Tensor:
    """L_cls: (1 - alpha) CE(logits, labels) + alpha CE(logits, softmax(logits_m)), in fp32 (model_ve.py)."""
    logits = logits.float()
    soft = soft_cross_entropy(logits, F.softmax(logits_m.detach().float(), dim=1))
    return (1.0 - alpha) * F.cross_entropy(logits, labels) + alpha * soft


def classification_losses(model, batch: Dict[str, torch.Tensor], task: str) -> Dict[str, torch.Tensor]:
    """SNLI-VE / NLVR2 fine-tuning: the class loss (distilled when the model has a momentum copy) and accuracy."""
    images = ((batch["pixel_values_0"], batch["pixel_values_1"]) if task == "nlvr2" else (batch["pixel_values"],))
    inputs = (*images, batch["input_ids"], batch["attention_mask"])
    logits = model(*inputs)
    accuracy = 100.0 * (logits.detach().argmax(-1) == batch["labels"]).float().mean()
    if not model.distill:
        return {"loss": F.cross_entropy(logits.float(), batch["labels"]), "accuracy": accuracy}
    alpha = distillation_alpha(model)
    loss = distilled_classification_loss(logits, model.momentum_logits(*inputs), batch["labels"], alpha)
    return {"loss": loss, "accuracy": accuracy, "alpha": torch.tensor(alpha)}


def text_assignment_pairs(similarity: torch.Tensor, rng: torch.Generator, image_ids: Optional[torch.Tensor] = None):
    """Pretrain_nlvr.py's pairs: per caption b, with prob. 2/3 its image and one other drawn by image similarity
    (softmax of ``similarity``, own image excluded), its image as image 0 (label 0) or image 1 (label 1) with equal
    odds; else two other images (label 2). ``image_ids`` also excludes other captions' copies of the own image (the
    retrieval files hold several captions per image). Returns (index_0, index_1, labels), each [B]."""
    batch = similarity.shape[0]
    device = similarity.device
    own = torch.arange(batch, device=device)
    same = own.view(-1, 1) == own.view(1, -1)
    if image_ids is not None:
        ids = image_ids.to(device).view(-1)
        same = same | (ids.view(-1, 1) == ids.view(1, -1))
    weights = F.softmax(similarity.detach().float(), dim=1).masked_fill(same, 0.0)
    if bool(((weights > 0).sum(dim=1) < 2).any()):
        raise ValueError(f"ALBEF's text assignment draws two other images per caption: this micro-batch of {batch} "
                         f"has a caption with fewer than 2 other images (raise data.micro_batch_size, >= 3)")
    keep_own = torch.rand(batch, generator=rng, device=rng.device).to(device) > 1 / 3
    own_first = torch.rand(batch, generator=rng, device=rng.device).to(device) > 0.5
    other = torch.multinomial(weights, 1, generator=rng).squeeze(1)
    two_others = torch.multinomial(weights, 2, generator=rng)
    labels = torch.where(keep_own, torch.where(own_first, 0, 1), 2)
    index_0 = torch.where(labels == 0, own, torch.where(labels == 1, other, two_others[:, 0]))
    index_1 = torch.where(labels == 0, other, torch.where(labels == 1, own, two_others[:, 1]))
    return index_0, index_1, labels


def text_assignment_losses(model, batch: dict, rng: torch.Generator,
                           hard_pairs: bool = True) -> Dict[str, torch.Tensor]:
    """The TA pre-step's cross-entropy over the 3 assignments (model_pretrain_nlvr.py), and its accuracy.
    ``hard_pairs``: the other images drawn by image similarity (Pretrain_nlvr.py); False draws them uniformly, so
    that every model is scored on the same pairs for a given ``rng`` seed (the evaluation)."""
    image_embeds = model.encode_image(batch["pixel_values"])
    batch_size = image_embeds.shape[0]
    similarity = (model.image_similarity(image_embeds) if hard_pairs
                  else torch.zeros(batch_size, batch_size, device=image_embeds.device))
    index_0, index_1, labels = text_assignment_pairs(similarity, rng, batch.get("image_ids"))
    logits = model.assignment_logits(image_embeds[index_0], image_embeds[index_1], batch["input_ids"],
                                     batch["attention_mask"])
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = 100.0 * (logits.argmax(-1) == labels).float().mean()
    return {"loss": loss, "accuracy": accuracy.detach()}


def albef_task_recipe(model, batch: dict, rng: torch.Generator, task: str, finetune) -> Dict[str, torch.Tensor]:
    """The TASK_RECIPES entry (epic.objectives.recipes) for ALBEF's retrieval, VQA, SNLI-VE, NLVR2 and NLVR2's TA
    pre-step."""
    if task == "nlvr2_ta":  # evaluation (eval mode): the same uniformly drawn pairs for every model
        hard = model.training and getattr(finetune, "ta_pairs", "hard") == "hard"
        return text_assignment_losses(model, batch, rng, hard_pairs=hard)
    if task == "retrieval":
        return retrieval_losses(model, batch, rng)
    if task == "vqa":  # distilled when the model has a momentum copy (ALBEF's distill: True)
        return vqa_losses(model, batch, distill_alpha=distillation_alpha(model) if model.distill else None)
    if task in ("snli_ve", "nlvr2"):
        return classification_losses(model, batch, task)
    raise ValueError(f"no ALBEF task recipe for {task!r}")
