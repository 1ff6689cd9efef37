"""Box regression losses over tensors (X-VLM's bbox loss, after DETR): L1 + generalised IoU on normalised boxes.

Boxes are (cx, cy, w, h) in [0, 1] (fractions of the image side), as X-VLM's box head predicts them; GIoU works on
corners (x0, y0, x1, y1). Rezatofighi et al., CVPR 2019: GIoU = IoU - |C \\ (A u B)| / |C|, C the smallest
enclosing box.
"""
from __future__ import annotations

from typing import Optional

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]).clamp(min=0) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1]).clamp(min=0)


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of row i of ``a`` with row i of ``b`` (corners, [..., 4]) -> ([...], [...])."""
    lo, hi = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(dim=-1)
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Paired GIoU in [-1, 1] of corner boxes [..., 4] (row i of ``a`` with row i of ``b``)."""
    iou, union = paired_box_iou(a, b)
    enclosing = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou - (enclosing - union) / enclosing


def box_regression_losses(pred: torch.Tensor, target: torch.Tensor, is_image: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's box losses: (L1 summed over the 4 coordinates, 1 - GIoU), each summed over the boxes and divided by
    their number. Rows with ``is_image`` = 1 (a whole-image caption inside a region batch, target (0.5, 0.5, 1, 1))
    are left out. A row whose target box is degenerate (x1 < x0 or y1 < y0) adds no GIoU term (X-VLM drops the
    batch's GIoU term then; per row keeps the other boxes' signal). No box at all: both losses are 0 with a graph."""
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, 4] (cx, cy, w, h)")
    keep = torch.ones(pred.shape[0], dtype=pred.dtype, device=pred.device)
    if is_image is not None:
        keep = 1 - is_image.to(pred.dtype)
    num_boxes = keep.sum()
    l1 = (pred - target).abs().sum(dim=-1)
    pred_xyxy, target_xyxy = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)
    valid = ((target_xyxy[:, 2:] >= target_xyxy[:, :2]).all(-1) & (pred_xyxy[:, 2:] >= pred_xyxy[:, :2]).all(-1))
    giou = torch.where(valid, 1 - generalized_box_iou(pred_xyxy, target_xyxy.where(valid[:, None], pred_xyxy)),
                       torch.zeros_like(l1))
    denominator = num_boxes.clamp(min=1)
    return (l1 * keep).sum() / denominator, (giou * keep).sum() / denominator


def box_accuracy(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Fraction of predicted boxes whose IoU with the target exceeds ``threshold`` (grounding accuracy)."""
    iou, _ = paired_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return (iou > threshold).float().mean()
