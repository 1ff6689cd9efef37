"""Where EPIC corrupts a caption: saliency-based masking (Sec. 4.4, Eq. 8) or uniform masking (ablation "ITC+LM").

    alpha = softmax( (1/h) sum_k q_k^V (K_k^W)^T )  over the sentence's real tokens          (Eq. 8)
    M     = m positions sampled without replacement from Categorical(alpha),  m = ceil(mask_ratio * len)

†CMLM (App. J) uses the same masking for METER's MLM: ``saliency_mlm_inputs`` draws ceil(mlm_probability * len)
positions from alpha and corrupts them as BERT does (80% <mask>, 10% random, 10% kept), so the only difference from
vanilla CMLM is *which* tokens are masked.

Both are one call of ``epic.kernels.saliency_mask`` (Gumbel-top-k, exact counts); uniform masking is the same
op with all scores equal, so alpha is uniform over the real tokens. "Real" tokens exclude <s>, </s> and padding.
"""
from __future__ import annotations

from typing import Optional

import torch

from epic.data.text import corrupt_selected_for_mlm
from epic.kernels import saliency_mask


def real_text_tokens(batch: dict) -> torch.Tensor:
    """[B, L] bool: tokens of the caption itself (attention_mask and not a special token)."""
    return batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()


def saliency_masking(query: torch.Tensor, keys: torch.Tensor, real: torch.Tensor, mask_ratio: float,
                     generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 + sampling: (M [B, L] bool, alpha [B, L] fp32) from the teacher's query [B, H, dh], keys [B, H, L, dh].

    Eq. 8 has no 1/sqrt(d_h) temperature and neither has this (the paper's formula, taken as written).
    """
    mask, alpha = saliency_mask(query, keys, real, mask_ratio, generator=generator)
    return mask.clone(), alpha.clone()  # plain tensors even when computed under inference_mode


def uniform_masking(real: torch.Tensor, mask_ratio: float, generator: Optional[torch.Generator]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation "ITC+LM": m = ceil(mask_ratio * len) real positions uniformly without replacement; alpha uniform."""
    batch, length = real.shape
    zeros_query = torch.zeros(batch, 1, 1, device=real.device)
    zeros_keys = torch.zeros(batch, 1, length, 1, device=real.device)
    mask, alpha = saliency_mask(zeros_query, zeros_keys, real, mask_ratio, generator=generator)
    return mask.clone(), alpha.clone()



def cached_alpha_query_keys(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha [B, L] (from the saliency cache) as a (query [B, 1, 1], keys [B, 1, L, 1]) pair for Eq. 8's op.

    With one head, query 1 and keys log(alpha), the op's scores are log alpha, its softmax over the real tokens
    gives alpha back (renormalised) and its Gumbel-top-k keys are log alpha + g: the masking draws from the cached
    alpha with the same noise, from the same generator, as it would from the teacher's query and keys.
    """
    batch, length = alpha.shape
    query = torch.ones(batch, 1, 1, device=alpha.device, dtype=torch.float32)
    keys = torch.log(alpha.float().clamp_min(1e-30)).view(batch, 1, length, 1)  # padding: masked out by `real`
    return query, keys


def saliency_mlm_inputs(batch: dict, query: torch.Tensor, keys: torch.Tensor, probability: float, mask_token_id: int,
                        replacement_ids: torch.Tensor, generator: Optional[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """†CMLM (App. J): (mlm_input_ids, mlm_labels, M, alpha) with M drawn from the teacher's alpha (Eq. 8).

    m = ceil(probability * len) positions per caption (METER's 15% budget), then BERT's 80/10/10 corruption.
    """
    positions, alpha = saliency_masking(query, keys, real_text_tokens(batch), probability, generator)
    ids, labels = corrupt_selected_for_mlm(batch["input_ids"], positions, mask_token_id, replacement_ids, generator)
    return ids, labels, positions, alpha
