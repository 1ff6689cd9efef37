"""Image-text matching (METER's ITM): half the pairs keep their image, the rest get another sample's image.

METER draws the mismatched image at random from the dataset; here it comes from the same micro-batch (the same
distribution), so the image features encoded once per step serve the MLM and ITM passes alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F


@dataclass
class ITMPairs:
    labels: torch.Tensor  # [B] int64: 1 = the caption's own image, 0 = another sample's image
    image_index: torch.Tensor  # [B] int64: which image of the batch each caption is paired with


def random_derangement(size: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation with one cycle through all ``size`` items: no item maps to itself."""
    order = torch.randperm(size, generator=generator, device=generator.device)
    successor = torch.empty_like(order)
    successor[order] = order.roll(-1)  # order[k] → order[k + 1]
    return successor


def draw_itm_pairs(batch_size: int, generator: torch.Generator, device: torch.device) -> ITMPairs:
    """⌊B/2⌋ matched pairs at random positions (as METER: pos_len = B // 2); the others take a deranged image."""
    if batch_size < 2:
        raise ValueError(f"ITM needs at least 2 samples per micro-batch to form a mismatched pair, got {batch_size}; "
                         f"raise data.micro_batch_size")
    num_matched = batch_size // 2
    labels = torch.cat([torch.ones(num_matched, dtype=torch.long), torch.zeros(batch_size - num_matched, dtype=torch.long)])
    labels = labels[torch.randperm(batch_size, generator=generator, device=generator.device).cpu()]
    other_image = random_derangement(batch_size, generator).cpu()
    image_index = torch.where(labels == 1, torch.arange(batch_size), other_image)
    # host-born draws: an asynchronous copy (a blocking one from pageable memory waits for the device's queue)
    return ITMPairs(labels=labels.to(device, non_blocking=True), image_index=image_index.to(device, non_blocking=True))


def itm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """ITM over tensors: cross-entropy of the [B, 2] matched / not-matched logits (class 1 = matched) in fp32,
    and the accuracy (detached)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=-1) == labels).float().mean()
    return {"loss_itm": loss, "itm_acc": accuracy.detach()}


def itm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, paired_image_embeds: torch.Tensor,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fusion on (caption, paired image) → ITM head → ``itm_cross_entropy``."""
    out = model.infer(input_ids=input_ids, attention_mask=attention_mask, image_embeds=paired_image_embeds)
    return itm_cross_entropy(model.itm_score(out["cls_feats"]), labels)


def compute_itm(model, batch: dict, image_embeds: torch.Tensor, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """ITM on ``batch`` reusing ``image_embeds`` (``model.encode_image(batch['pixel_values'])``)."""
    pairs = draw_itm_pairs(image_embeds.shape[0], generator, image_embeds.device)
    return itm_loss(model, batch["input_ids"], batch["attention_mask"], image_embeds[pairs.image_index], pairs.labels)
