"""Image-text contrastive alignment with momentum distillation and feature queues (ALBEF's ITA, Li et al. 2021,
Sec. 3.2-3.3), as functions over tensors.

Shapes: B local batch, D contrastive dimension, Q queue length. Features are L2-normalised rows [B, D]; the queues
are columns [D, Q] (ALBEF's layout), filled with the *momentum* encoders' features of earlier batches.

Naming: this is the *contrastive* objective; "ITC" in this code base means EPIC's image-token consistency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # (loss_i2t + loss_t2i) / 2
    sim_i2t: torch.Tensor  # [B, B + Q] online image vs momentum texts (batch first, then the queue), / temp
    sim_t2i: torch.Tensor  # [B, B + Q] online text vs momentum images


def alpha_ramp(alpha: float, step: int, ramp_steps: int) -> float:
    """ALBEF's distillation weight: alpha * min(1, i / len(loader)) through the first epoch, then alpha.

    ``step`` counts optimizer steps from 0, ``ramp_steps`` is the length of that first epoch in steps
    (0: no ramp)."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)


def with_queue(feat_m: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """[D, B + Q]: this batch's momentum features (columns) followed by the queue."""
    return torch.cat([feat_m.t(), queue.detach().to(feat_m.dtype)], dim=1)


def momentum_distilled_targets(sim_m: torch.Tensor, alpha: float) -> torch.Tensor:
    """ALBEF's MoD targets: alpha * softmax(momentum similarities) + (1 - alpha) * one-hot(own pair).

    ``sim_m`` [B, B + Q] are the momentum model's similarities against batch + queue; the positive of row i is
    column i (the batch comes first)."""
    one_hot = torch.zeros_like(sim_m)
    one_hot.fill_diagonal_(1.0)  # fills (i, i) for i < B only: the queue columns get 0
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * one_hot


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_j targets_ij log softmax(logits)_ij, averaged over rows."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                     text_feat_m: torch.Tensor, image_queue: torch.Tensor, text_queue: torch.Tensor,
                     temp: torch.Tensor, alpha: float) -> ContrastiveOutput:
    """ALBEF's image-text contrastive loss with momentum distillation.

    sim_i2t = image_feat · [text_feat_m; text_queue] / temp (and symmetrically sim_t2i); targets from the momentum
    similarities (``momentum_distilled_targets``); loss = (CE(sim_i2t, y_i2t) + CE(sim_t2i, y_t2i)) / 2. The
    similarities are computed in fp32 (a half-precision sim / 0.07 overflows easily, ALBEF #107). ``temp`` should
    already be clamped (``ALBEF.temperature()``); gradients reach the online features and the temperature."""
    temp = temp.float()
    text_all = with_queue(text_feat_m.float(), text_queue)
    image_all = with_queue(image_feat_m.float(), image_queue)
    with torch.no_grad():
        sim_i2t_m = image_feat_m.float() @ text_all / temp
        sim_t2i_m = text_feat_m.float() @ image_all / temp
        targets_i2t = momentum_distilled_targets(sim_i2t_m, alpha)
        targets_t2i = momentum_distilled_targets(sim_t2i_m, alpha)
    sim_i2t = image_feat.float() @ text_all / temp
    sim_t2i = text_feat.float() @ image_all / temp
    loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return ContrastiveOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


# ------------------------------------------------------------------------------------------------ queues
@torch.no_grad()
def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features concatenated in rank order (ALBEF's concat_all_gather; no gradient). Without an
    initialised process group (or with one rank) the features themselves."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def enqueue(queue: torch.Tensor, features: torch.Tensor, ptr: int) -> int:
    """Write ``features`` [N, D] into the queue columns ptr, ptr+1, ... (wrapping past the end); returns the next
    pointer. ALBEF asserts Q % N == 0 instead of wrapping; wrapping also serves a last partial batch."""
    size = queue.shape[1]
    count = features.shape[0]
    if count > size:
        raise ValueError(f"{count} features do not fit a queue of {size}; raise queue_size above the global batch")
    if features.shape[1] != queue.shape[0]:
        raise ValueError(f"features of width {features.shape[1]} do not match the queue's {queue.shape[0]}")
    columns = (ptr + torch.arange(count, device=queue.device)) % size
    queue[:, columns] = features.t().to(queue.dtype)
    return (ptr + count) % size


@torch.no_grad()
def dequeue_and_enqueue(image_queue: torch.Tensor, text_queue: torch.Tensor, queue_ptr: torch.Tensor,
                        image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                        gather: Callable[[torch.Tensor], torch.Tensor] = gather_features) -> None:
    """ALBEF's _dequeue_and_enqueue: gather the momentum features of every rank, write them over the oldest queue
    entries and advance the shared pointer (in place; every rank ends with the same queues)."""
    if queue_ptr.is_meta:  # FLOP counting on the meta device: the copy costs no FLOPs and has no pointer value
        return
    image_feats = gather(image_feat_m)
    text_feats = gather(text_feat_m)
    ptr = int(queue_ptr.item())
    enqueue(image_queue, image_feats, ptr)
    queue_ptr[0] = enqueue(text_queue, text_feats, ptr)
