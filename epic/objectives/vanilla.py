"""METER's pretraining step (ITM + MLM) with every image encoded once and shared by both objectives.

``SaliencyCMLM`` is the "†CMLM" variant of App. J (Table 8): the same step, with the MLM positions drawn from a
frozen teacher's saliency (Eq. 8) instead of uniformly; no generator, no ITC.

The official code runs the vision tower once per objective (and once more for ITM's negative images). Encoding
once and indexing the features for ITM's mismatched pairs gives the same losses and, because gradients from both
uses accumulate into the one shared activation, the same parameter gradients at ~3/4 of the FLOPs
(tools/bench_step.py measures it).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from .itm import draw_itm_pairs, itm_loss
from .mlm import compute_mlm

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")


def check_batch(batch: dict) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(f"the batch lacks {missing} (has {sorted(batch)}); the MLM collator of epic.data yields them")


def vanilla_losses(model, batch: dict, generator: torch.Generator, share_image_embeds: bool = True
                   ) -> Dict[str, torch.Tensor]:
    """``loss`` = L_ITM + L_MLM (METER sums its losses unweighted), plus each term and accuracy, detached."""
    check_batch(batch)
    pixel_values = batch["pixel_values"]
    pairs = draw_itm_pairs(pixel_values.shape[0], generator, pixel_values.device)
    if share_image_embeds:
        image_embeds = model.encode_image(pixel_values)
        mlm = compute_mlm(model, batch, image_embeds)
        itm = itm_loss(model, batch["input_ids"], batch["attention_mask"], image_embeds[pairs.image_index],
                       pairs.labels)
    else:  # the official way: the vision tower runs for each pass
        mlm = compute_mlm(model, batch, model.encode_image(pixel_values))
        itm = itm_loss(model, batch["input_ids"], batch["attention_mask"],
                       model.encode_image(pixel_values[pairs.image_index]), pairs.labels)
    loss = mlm["loss_mlm"] + itm["loss_itm"]
    return {"loss": loss, "loss_mlm": mlm["loss_mlm"].detach(), "loss_itm": itm["loss_itm"].detach(),
            "mlm_acc": mlm["mlm_acc"], "itm_acc": itm["itm_acc"]}


class SaliencyCMLM:
    """†CMLM (App. J): replaces a batch's ``mlm_input_ids`` / ``mlm_labels`` by saliency-masked ones.

    ``teacher``: an ``epic.models.teacher.SaliencyTeacher`` (frozen, inference mode); ``probability``: the MLM
    budget (data.mlm_probability, m = ceil(p * len)); ``replacement_ids``: BERT's random-replacement ids.
    """

    def __init__(self, teacher, probability: float, mask_token_id: int, replacement_ids: torch.Tensor):
        self.teacher, self.probability = teacher, probability
        self.mask_token_id, self.replacement_ids = mask_token_id, replacement_ids

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        from .saliency import saliency_mlm_inputs

        query, keys = self.teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        ids, labels, positions, alpha = saliency_mlm_inputs(batch, query.clone(), keys.clone(), self.probability,
                                                            self.mask_token_id, self.replacement_ids, generator)
        return {**batch, "mlm_input_ids": ids, "mlm_labels": labels, "cmlm_positions": positions,
                "cmlm_alpha": alpha}


def cmlm_losses(model, batch: dict, generator: torch.Generator, cmlm: SaliencyCMLM) -> Dict[str, torch.Tensor]:
    """†CMLM's step: L_ITM + L_MLM on saliency-masked captions; ``content_hit_rate`` when the batch has content_mask
    (the shapes world: share of masked positions on content words)."""
    masked = cmlm(batch, generator)
    out = vanilla_losses(model, masked, generator)
    if "content_mask" in batch:
        positions = masked["cmlm_positions"]
        hits = (positions & batch["content_mask"].to(positions.device)).sum()
        out["cmlm_content_hit_rate"] = (hits.float() / positions.sum().clamp(min=1)).detach()
    return out


def step_flops_per_sample(cfg, share_image_embeds: bool = True, text_len: Optional[int] = None,
                          batch_size: int = 2) -> float:
    """Training FLOPs (forward + backward) per sample of ``vanilla_losses`` for a METERConfig's sizes.

    Counted by FlopCounterMode on the meta device: exact for these shapes, no memory, a few seconds for METER-B.
    Captions are taken at full length (``text_len``, default ``cfg.max_text_len``). For TFLOP/s and MFU logging.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from epic.models.meter import METER

    length = text_len or cfg.max_text_len
    meta = torch.device("meta")
    with meta:
        model = METER(dataclasses.replace(cfg, vit_pretrained=None, text_pretrained=None))
    ids = torch.zeros(batch_size, length, dtype=torch.long, device=meta)
    batch = {"pixel_values": torch.empty(batch_size, 3, cfg.image_size, cfg.image_size, device=meta),
             "input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids, "mlm_labels": ids}
    with FlopCounterMode(display=False) as counter:
        vanilla_losses(model, batch, torch.Generator(), share_image_embeds)["loss"].backward()
    return counter.get_total_flops() / batch_size
