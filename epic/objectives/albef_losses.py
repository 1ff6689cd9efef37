"""ALBEF's pretraining objectives (salesforce/ALBEF ``models/model_pretrain.py``) as functions over tensors, and the
recipe that runs them on an ALBEF model: contrastive with momentum distillation (``contrastive.py``), image-text
matching with hard negatives, masked language modelling with the momentum model's soft labels.

    L = L_ita + L_itm + L_mlm       (ALBEF's Pretrain.py; EPIC adds lambda * L_ITC + L_GEN, Eq. 9)

The recipe speaks to the model only through its methods (encode_image, encode_text, fuse, image_feat, text_feat,
temperature, momentum_features, momentum_mlm_logits, itm_score, mlm_score, queues), so it reads any model that
offers them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .contrastive import alpha_ramp, contrastive_loss, dequeue_and_enqueue, gather_features


#: floor added to every off-diagonal hard-negative weight (X-VLM adds 1e-5 to ALBEF's softmax for the same crash)
NEGATIVE_WEIGHT_FLOOR = 1e-5


BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")


def check_batch(batch: dict) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing} (has {sorted(batch)}); the MLM collator of epic.data yields them")


# ------------------------------------------------------------------------------------------------ ITM hard negatives
def hard_negative_weights(sim: torch.Tensor, floor: float = NEGATIVE_WEIGHT_FLOOR) -> torch.Tensor:
    """Sampling weights for one hard negative per row: softmax(sim) over the in-batch columns, own pair excluded.

    ``sim`` [B, B] (row i's positive at column i). ALBEF's version crashes ``torch.multinomial`` ("invalid
    multinomial distribution", ALBEF #18/#93/#107/#131) when a row sums to zero (the positive takes all the softmax
    mass, so zeroing the diagonal leaves zeros) or holds NaN/inf (sim/temp overflow under AMP). Here: the softmax is
    taken in fp32; a row with any non-finite similarity becomes uniform over the other samples; ``floor`` is added
    to every off-diagonal weight, so every row has positive mass; the diagonal is 0."""
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"hard_negative_weights needs a square in-batch similarity [B, B], got {tuple(sim.shape)}")
    sim = sim.detach().float()
    finite_rows = torch.isfinite(sim).all(dim=1, keepdim=True)
    sim = torch.where(finite_rows, sim, torch.zeros_like(sim))
    weights = F.softmax(sim, dim=1) + floor
    weights.fill_diagonal_(0.0)
    return weights


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                          generator: Optional[torch.Generator] = None) -> Optional[Dict[str, torch.Tensor]]:
    """One negative text per image and one negative image per text, drawn in proportion to the in-batch softmax
    similarities (ALBEF), vectorised (one ``torch.multinomial`` call per direction, no per-row ``.item()``).

    Returns ``{'text_index': [B], 'image_index': [B]}``: image i is paired with text ``text_index[i]``, text j
    with image ``image_index[j]``; never the own pair. With B = 1 there is no other sample to draw: returns None
    (the recipe then drops ITM for that micro-batch, see ``itm_hard_negative_loss``)."""
    batch = sim_i2t.shape[0]
    if batch < 2:
        return None
    text_index = torch.multinomial(hard_negative_weights(sim_i2t[:, :batch]), 1, generator=generator).squeeze(1)
    image_index = torch.multinomial(hard_negative_weights(sim_t2i[:, :batch]), 1, generator=generator).squeeze(1)
    return {"text_index": text_index, "image_index": image_index}


def itm_pairs(batch: int, negatives: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """The 3B ITM pairs, in ALBEF's order: B positives (text i, image i), B texts with a hard negative image,
    B images with a hard negative text. Labels: 1 = matched for the first B, 0 for the 2B negatives."""
    own = torch.arange(batch, device=device)
    text_index = torch.cat([own, own, negatives["text_index"].to(device)])
    image_index = torch.cat([own, negatives["image_index"].to(device), own])
    labels = torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                        torch.zeros(2 * batch, dtype=torch.long, device=device)])
    return {"text_index": text_index, "image_index": image_index, "labels": labels}


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM head over the 3B pairs (ALBEF: F.cross_entropy(vl_output, itm_labels))."""
    return F.cross_entropy(logits.float(), labels)


# ------------------------------------------------------------------------------------------------ MLM
def mlm_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, logits_m: Optional[torch.Tensor],
                          alpha: float) -> torch.Tensor:
    """ALBEF's MLM: (1 - alpha) * CE(logits, labels) + alpha * soft CE(logits, softmax(logits_m)), both averaged
    over the masked positions.

    ``logits`` [M, V] and ``logits_m`` [M, V] at the M masked positions, ``labels`` [M] (every entry a target),
    or all three over [B, L] with -100 on unmasked positions. ``logits_m`` None (or alpha 0) is plain MLM. No masked position:
    a zero that keeps the graph (ALBEF's mean over nothing would be NaN)."""
    if labels.dim() > 1:
        keep = labels != -100
        logits, labels = logits[keep], labels[keep]
        logits_m = None if logits_m is None else logits_m[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    log_probs = F.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(log_probs, labels)
    if logits_m is None or alpha == 0:
        return hard
    soft = -(F.softmax(logits_m.float(), dim=-1) * log_probs).sum(dim=-1).mean()
    return (1.0 - alpha) * hard + alpha * soft


def mlm_positions(labels: torch.Tensor, mlm_probability: float):
    """(positions, targets [M]): ``positions`` indexes [B, L, ...] tensors at the M positions with a label.

    On the meta device (FLOP counting, where a boolean selection has no known size) the first
    round(mlm_probability * L) positions of every caption stand in: the same M as a real 15% batch."""
    if labels.is_meta:
        count = max(1, round(mlm_probability * labels.shape[1]))
        return (slice(None), slice(0, count)), labels[:, :count].reshape(-1)
    masked = labels != -100
    return masked, labels[masked]


def rows(states: torch.Tensor, positions) -> torch.Tensor:
    """[B, L, H] states at ``positions`` (from ``mlm_positions``) as [M, H]."""
    return states[positions].reshape(-1, states.shape[-1])


# ------------------------------------------------------------------------------------------------ the recipe
@dataclass
class ALBEFStepOutput:
    loss: torch.Tensor
    loss_ita: torch.Tensor
    loss_itm: torch.Tensor
    loss_mlm: torch.Tensor
    itm_accuracy: torch.Tensor
    alpha: float
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor

    def scalars(self) -> Dict[str, torch.Tensor]:
        return {"loss": self.loss, "loss_ita": self.loss_ita.detach(), "loss_itm": self.loss_itm.detach(),
                "loss_mlm": self.loss_mlm.detach(), "itm_acc": self.itm_accuracy.detach(),
                "alpha": torch.tensor(self.alpha)}


def itm_hard_negative_loss(model, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                           attention_mask: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of ITM over 3B pairs with hard negatives, fused in one pass that reuses the unimodal
    encodings. A micro-batch of 1 has no negative: the loss is a zero that still reaches the ITM head (so every
    rank's gradient reduction sees the same parameters) and a warning is logged."""
    batch = image_embeds.shape[0]
    negatives = sample_hard_negatives(sim_i2t, sim_t2i, generator)
    if negatives is None:
        warnings.warn("ALBEF ITM needs >= 2 samples per micro-batch for a hard negative; ITM is skipped for "
                      "micro-batches of 1 (raise data.micro_batch_size)", RuntimeWarning)  # shown once per place
        fused = model.fuse(text_embeds, attention_mask, image_embeds)
        return model.itm_score(fused[:, 0]).sum() * 0.0, torch.zeros((), device=image_embeds.device)
    pairs = itm_pairs(batch, negatives, image_embeds.device)
    fused = model.fuse(text_embeds[pairs["text_index"]], attention_mask[pairs["text_index"]],
                       image_embeds[pairs["image_index"]])
    logits = model.itm_score(fused[:, 0])
    accuracy = (logits.argmax(-1) == pairs["labels"]).float().mean()
    return itm_loss(logits, pairs["labels"]), accuracy


def albef_losses(model, batch: Dict[str, torch.Tensor], alpha: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, image_embeds: Optional[torch.Tensor] = None,
                 mlm_batch: Optional[dict] = None, gather=gather_features) -> ALBEFStepOutput:
    """One ALBEF pretraining forward on a micro-batch (``pixel_values``, ``input_ids``, ``attention_mask``,
    ``mlm_input_ids``, ``mlm_labels``): L_ita + L_itm + L_mlm, in ALBEF's order (the contrastive loss reads the
    queue, then this micro-batch's momentum features, gathered over ranks, are enqueued).

    The image is encoded once (or ``image_embeds`` is given) and reused by the contrastive, ITM and MLM passes.
    ``alpha``: the distillation weight; None ramps ``model.config.alpha`` over ``alpha_ramp_steps`` optimizer
    steps (``model.momentum_step``, which the checkpoint carries). ``mlm_batch`` replaces the MLM inputs and labels
    (EPIC's CMLM). The momentum update is *not* done here: the trainer calls ``model.after_optimizer_step()``."""
    check_batch(batch)
    if alpha is None:
        if model.momentum_step.is_meta:  # FLOP counting on the meta device: the ramp's end value
            alpha = model.config.alpha
        else:
            alpha = alpha_ramp(model.config.alpha, int(model.momentum_step), model.config.alpha_ramp_steps)
    pixel_values, input_ids, attention_mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    if image_embeds is None:
        image_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(input_ids, attention_mask)
    image_feat, text_feat = model.image_feat(image_embeds), model.text_feat(text_embeds)
    momentum = model.momentum_features(input_ids, attention_mask, pixel_values)
    ita = contrastive_loss(image_feat, text_feat, momentum["image_feat_m"], momentum["text_feat_m"],
                           model.image_queue, model.text_queue, model.temperature(), alpha)
    dequeue_and_enqueue(model.image_queue, model.text_queue, model.queue_ptr, momentum["image_feat_m"],
                        momentum["text_feat_m"], gather=gather)

    loss_itm, itm_accuracy = itm_hard_negative_loss(model, image_embeds, text_embeds, attention_mask,
                                                    ita.sim_i2t, ita.sim_t2i, generator)

    masked_batch = mlm_batch if mlm_batch is not None else batch
    labels, mlm_ids = masked_batch["mlm_labels"], masked_batch["mlm_input_ids"]
    positions, targets = mlm_positions(labels, model.config.mlm_probability)
    fused = model.fuse(model.encode_text(mlm_ids, attention_mask), attention_mask, image_embeds)
    logits = model.mlm_score(rows(fused, positions))
    logits_m = None
    if alpha > 0 and targets.numel() > 0:
        logits_m = model.momentum_mlm_logits(mlm_ids, attention_mask, momentum["image_embeds_m"], positions)
        logits_m = logits_m.reshape(-1, logits_m.shape[-1])
    loss_mlm = mlm_distillation_loss(logits, targets, logits_m, alpha)

    loss = ita.loss + loss_itm + loss_mlm
    return ALBEFStepOutput(loss=loss, loss_ita=ita.loss, loss_itm=loss_itm, loss_mlm=loss_mlm,
                           itm_accuracy=itm_accuracy, alpha=alpha, image_embeds=image_embeds, text_embeds=text_embeds)


def albef_recipe(model, batch: dict, image_embeds: torch.Tensor, rng: torch.Generator,
                 mlm_batch: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """ALBEF's entry of the family recipes (``losses(model, batch, image_embeds, rng, mlm_batch=None)``):
    ``loss`` = L_ita + L_itm + L_mlm and each term, detached."""
    return albef_losses(model, batch, None, rng, image_embeds=image_embeds, mlm_batch=mlm_batch).scalars()
