"""Word-patch alignment (ViLT Sec. 3.2, after UNITER's WRA): an optimal-transport distance between a caption's
word states and its image's patch states, pulled down for matched pairs and pushed up for mismatched ones, on the
ITM pass (ViLT's ``compute_itm_wpa``). Losses over tensors: nothing here knows a model.

The transport plan is the inexact proximal point method IPOT (Xie et al., UAI 2019) with ViLT's settings:
cosine cost, beta = 0.5, 50 outer iterations, 1 inner Sinkhorn step, uniform marginals over the real tokens
(text: without its first and last real token, [CLS] and [SEP]; image: without the image [CLS]). The plan is not
differentiated (it is computed on the detached cost, as ViLT does); the distance <C, T> is, through the cost.
Everything runs in float32 (autocast off), as ViLT forces it even under fp16 training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: ViLT's settings (objectives.compute_itm_wpa)
WPA_WEIGHT = 0.1
IPOT_BETA = 0.5
IPOT_ITERATIONS = 50
IPOT_INNER_STEPS = 1
#: ViLT zeroes padded entries by adding this to their denominators
_PAD_DENOMINATOR = 1e4


def cosine_cost(text: torch.Tensor, image: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """C_ij = 1 - cos(text_i, image_j): [B, M, D], [B, N, D] -> [B, M, N]."""
    return 1.0 - F.normalize(text, dim=-1, eps=eps) @ F.normalize(image, dim=-1, eps=eps).transpose(1, 2)


@torch.no_grad()
def ipot_plan(cost: torch.Tensor, text_valid: torch.Tensor, image_valid: torch.Tensor, beta: float = IPOT_BETA,
              iterations: int = IPOT_ITERATIONS, inner_steps: int = IPOT_INNER_STEPS) -> torch.Tensor:
    """IPOT transport plan T [B, M, N] between uniform marginals over the valid text (M) and image (N) entries.

    Proximal point: T <- argmin <C, T> + beta KL(T || T_prev) over the couplings, each solved inexactly by
    ``inner_steps`` Sinkhorn steps on the kernel Q = exp(-C / beta) * T_prev; padded rows and columns stay 0.
    Update order as ViLT: image scaling first, from the text scaling of the previous iteration.
    """
    joint = text_valid.unsqueeze(2) & image_valid.unsqueeze(1)
    num_text = text_valid.sum(1, keepdim=True).to(cost.dtype)   # [B, 1]
    num_image = image_valid.sum(1, keepdim=True).to(cost.dtype)  # [B, 1]
    text_pad = (~text_valid).to(cost.dtype) * _PAD_DENOMINATOR
    image_pad = (~image_valid).to(cost.dtype) * _PAD_DENOMINATOR
    kernel = torch.exp(-cost / beta) * joint
    plan = joint.to(cost.dtype)
    text_scale = text_valid.to(cost.dtype) / num_text  # sigma [B, M]
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner_steps):
            image_scale = 1.0 / (num_image * torch.einsum("bmn,bm->bn", q, text_scale) + image_pad)  # delta [B, N]
            text_scale = 1.0 / (num_text * torch.einsum("bmn,bn->bm", q, image_scale) + text_pad)
        plan = text_scale.unsqueeze(2) * q * image_scale.unsqueeze(1)
    return plan * joint


def wpa_valid_masks(attention_mask: torch.Tensor, image_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ViLT's WPA token sets: text without its first and last real token ([CLS], [SEP]), image without its [CLS]."""
    text_valid = attention_mask.bool().clone()
    last = attention_mask.long().sum(1) - 1
    text_valid[torch.arange(text_valid.shape[0], device=text_valid.device), last.clamp(min=0)] = False
    text_valid[:, 0] = False
    image_valid = image_masks.bool().clone()
    image_valid[:, 0] = False
    if text_valid.device.type != "meta" and (not bool(text_valid.any(1).all()) or not bool(image_valid.any(1).all())):
        raise ValueError("word-patch alignment needs at least one word (besides [CLS]/[SEP]) and one patch per pair")
    return text_valid, image_valid


def wpa_distance(text_feats: torch.Tensor, image_feats: torch.Tensor, text_valid: torch.Tensor,
                 image_valid: torch.Tensor, beta: float = IPOT_BETA, iterations: int = IPOT_ITERATIONS,
                 inner_steps: int = IPOT_INNER_STEPS) -> torch.Tensor:
    """Per pair OT distance <C, T> [B] in float32; gradients reach the features through C only."""
    device_type = "cpu" if text_feats.device.type == "meta" else text_feats.device.type  # meta: FLOP counting
    with torch.autocast(device_type=device_type, enabled=False):
        cost = cosine_cost(text_feats.float(), image_feats.float())
        joint = text_valid.unsqueeze(2) & image_valid.unsqueeze(1)
        cost = cost.masked_fill(~joint, 0.0)
        plan = ipot_plan(cost.detach(), text_valid, image_valid, beta, iterations, inner_steps)
        return (cost * plan).sum(dim=(1, 2))


def wpa_loss(distance: torch.Tensor, itm_labels: torch.Tensor, weight: float = WPA_WEIGHT) -> torch.Tensor:
    """weight * (sum of matched distances - sum of mismatched ones) / B (ViLT's itm_wpa_loss)."""
    sign = itm_labels.to(distance.dtype) * 2.0 - 1.0  # +1 matched, -1 mismatched
    return weight * (sign * distance).sum() / distance.numel()


def word_patch_alignment_loss(text_feats: torch.Tensor, image_feats: torch.Tensor, attention_mask: torch.Tensor,
                              image_masks: torch.Tensor, itm_labels: torch.Tensor, weight: float = WPA_WEIGHT
                              ) -> torch.Tensor:
    """The whole WPA term of ViLT's ITM pass from the fused states of that pass (image [CLS] first)."""
    text_valid, image_valid = wpa_valid_masks(attention_mask, image_masks)
    return wpa_loss(wpa_distance(text_feats, image_feats, text_valid, image_valid), itm_labels, weight)
