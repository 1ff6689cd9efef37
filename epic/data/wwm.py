"""Whole-word masking for MLM (ViLT pretrains with ``whole_word_masking=True``, 15%).

Words are read from a fast tokenizer's ``word_ids()`` (the pre-tokenizer's words), so WordPiece pieces
(``play ##ing``) and byte-level BPE pieces (``Ġplay ing``) of one word are masked together; HF's
``DataCollatorForWholeWordMask`` instead groups only ``##`` pieces, which is why METER notes whole-word masking
"does not work for RoBERTa".

Per caption: target = max(1, round(probability x real tokens)); words are visited in random order and a word is
taken whole when it still fits under the target (HF's rule, so a caption whose words are all longer than the
target keeps none); every chosen token then becomes <mask> (80%), a random non-special token (10%) or stays
(10%). One difference from ViLT, on purpose: HF's collator counts the target over all padded positions and then
drops the padding it picked (so short captions get fewer masks, or none); here it counts real tokens only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .text import MLM_IGNORE_INDEX, NOT_A_WORD, word_ids_matrix  # noqa: F401 (re-exported)

def choose_whole_words(word_ids: Sequence[int], probability: float, generator: torch.Generator) -> list[int]:
    """Token positions of the words picked for one caption (see the module docstring)."""
    positions: dict[int, list[int]] = {}
    for position, word in enumerate(word_ids):
        if word != NOT_A_WORD:
            positions.setdefault(int(word), []).append(position)
    real = sum(len(p) for p in positions.values())
    if real == 0:
        return []
    target = max(1, round(probability * real))
    words = list(positions)
    chosen: list[int] = []
    for k in torch.randperm(len(words), generator=generator).tolist():
        if len(chosen) >= target:
            break
        piece = positions[words[k]]
        if len(chosen) + len(piece) <= target:
            chosen.extend(piece)
    return sorted(chosen)


def whole_word_mask(input_ids: torch.Tensor, word_ids: torch.Tensor, mask_token_id: int,
                    replacement_ids: torch.Tensor, probability: float, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlm_input_ids, mlm_labels) with whole words selected; labels are -100 outside the selection."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {probability}")
    if word_ids.shape != input_ids.shape:
        raise ValueError(f"word_ids has shape {tuple(word_ids.shape)} but input_ids {tuple(input_ids.shape)}")
    selected = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row in range(input_ids.shape[0]):
        selected[row, choose_whole_words(word_ids[row].tolist(), probability, generator)] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, MLM_IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = replacement_ids[torch.randint(len(replacement_ids), input_ids.shape, generator=generator)]
    masked = torch.where(selected & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels
