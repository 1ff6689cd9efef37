"""How EPIC corrupts a caption at the masked positions M (Sec. 4.3) and which tokens become inconsistent.

    w^mask = MASK(w, M)                                        (Eq. 3)
    w_bar_i ~ p_MLM(. | h_i^L) for i in M, w_bar_i = w_i else  (Eq. 4, 5; never a special token)
    T = { t in M : w_bar_t != w_t }                            (Eq. 6)
    L_GEN = mean_{i in M} -log p_MLM(w_i | h_i^L)              (Eq. 7, a mean instead of the paper's sum)

Sampling and L_GEN are one streaming call of ``epic.kernels.vocab_sample_and_loss`` (the [M, V] logits are never
held). The "ITC (rand.)" ablation draws w_bar_i uniformly from the non-special vocabulary instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from epic.kernels import vocab_sample_and_loss


def mask_tokens(input_ids: torch.Tensor, positions: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Eq. 3: w^mask, the caption with <mask> at the positions M."""
    return torch.where(positions, torch.full_like(input_ids, mask_token_id), input_ids)


def excluded_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids never sampled as replacements: the tokenizer's special tokens and model rows beyond the tokenizer."""
    return sorted(set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab_size)))


def sample_replacements(states: torch.Tensor, embedding: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, exclude_ids: Sequence[int], generator: Optional[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4, 5, 7: (w_bar at M [M] int64, L_GEN) from the generator's head-transformed states t(h_i) [M, d]."""
    samples, loss = vocab_sample_and_loss(states, embedding, bias, targets=targets, exclude_ids=exclude_ids,
                                          generator=generator)
    return samples, loss


def random_replacements(count: int, allowed_ids: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Ablation "ITC (rand.)": ``count`` ids uniformly from ``allowed_ids`` (the non-special vocabulary)."""
    gen_device = generator.device if generator is not None else allowed_ids.device
    index = torch.randint(len(allowed_ids), (count,), generator=generator, device=gen_device)
    return allowed_ids[index.to(allowed_ids.device, non_blocking=True)]  # a host-born draw: no blocking copy


def masked_count(batch: dict, positions: torch.Tensor, ratio: float) -> int:
    """M = sum_i ceil(ratio * len_i), the number of masked positions, as a Python int without reading the device:
    from the loader's ``real_lengths`` (host ints). A batch without them (built by hand) costs one host read."""
    from epic.kernels.saliency_mask import num_positions_to_mask

    lengths = batch.get("real_lengths")
    if lengths is None:
        lengths = (batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()).sum(dim=1).tolist()
    if len(lengths) != positions.shape[0]:
        raise ValueError(f"real_lengths has {len(lengths)} rows, the batch {positions.shape[0]}")
    return int(num_positions_to_mask(torch.as_tensor(lengths, dtype=torch.int64), ratio).sum())


def masked_flat_indices(positions: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` True entries of ``positions`` [B, L] as flat indices [M] in row-major order -- what
    ``positions.flatten().nonzero()`` gives, but of a shape known on the host, so the device is never waited for:
    a stable sort puts the True entries first, in index order. ``count`` must be the number of True entries (checked
    on the device, asynchronously)."""
    flat = positions.flatten()
    torch._assert_async(flat.sum() == count, "masked_flat_indices: count is not the number of masked positions "
                                             "(the batch's real_lengths do not match its attention/special masks)")
    order = torch.argsort((~flat).to(torch.uint8), stable=True)
    return order[:count]


def replace_at(input_ids: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """w_bar: ``input_ids`` with ``values`` (row-major order) written at ``positions``: [B, L] bool (boolean
    indexing: a host sync on CUDA), or [M] flat indices (``masked_flat_indices``: none)."""
    corrupted = input_ids.clone()
    if positions.dtype == torch.bool:
        corrupted[positions] = values.to(input_ids.dtype)
    else:
        corrupted.view(-1)[positions] = values.to(input_ids.dtype)
    return corrupted


def inconsistent_positions(input_ids: torch.Tensor, corrupted_ids: torch.Tensor, positions: torch.Tensor
                           ) -> torch.Tensor:
    """Eq. 6: T = masked positions whose sampled token differs from the original (a correct guess stays consistent)."""
    return positions & (corrupted_ids != input_ids)


def consistency_labels(inconsistent: torch.Tensor) -> torch.Tensor:
    """Eq. 2's targets: 1 = consistent (i not in T), 0 = inconsistent (i in T)."""
    return (~inconsistent).float()
