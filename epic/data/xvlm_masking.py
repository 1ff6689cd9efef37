"""X-VLM's MLM masking (dataset/pretrain_dataset.py TextMaskingGenerator), on token ids.

Per caption: n = min(max_masks, max(1, round(len * mask_prob))) positions (len counts the real tokens with the
leading [CLS], as X-VLM does; X-VLM-base: mask_prob 0.25, max_masks 8). Candidates are the real non-special tokens
in random order; from each candidate, with probability ``skipgram_prb`` a span of 2..``skipgram_size`` tokens is
taken instead of one, and spans are widened to whole words (``word_start``: False on a word's continuation
pieces); if the spans overshoot n, n of their positions are kept at random. Each chosen position becomes <mask>
with probability 0.8, else a uniformly random vocabulary id with probability 0.5, else stays.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

IGNORE_INDEX = -100


def num_masks(length_with_cls: int, mask_prob: float, max_masks: int) -> int:
    """How many positions X-VLM masks in a caption of ``length_with_cls`` tokens ([CLS] included)."""
    return min(max_masks, max(1, int(round(length_with_cls * mask_prob))))


def choose_masked_positions(candidates: Sequence[int], word_start: Sequence[bool], n: int, rng: random.Random,
                            skipgram_prb: float = 0.2, skipgram_size: int = 3, whole_word: bool = True) -> list[int]:
    """X-VLM's position choice: shuffled candidates, optional skip-gram spans, whole-word widening, then at most n.

    ``candidates``: maskable positions (sorted); ``word_start[p]``: position p begins a word."""
    if not candidates:
        return []
    allowed = set(candidates)
    order = list(candidates)
    rng.shuffle(order)
    chosen: set[int] = set()
    for pos in order:
        if len(chosen) >= n:
            break
        if pos in chosen:
            continue
        span = rng.randint(2, skipgram_size) if skipgram_prb > 0 and skipgram_size >= 2 and rng.random() < skipgram_prb \
            else 1
        start, end = pos, pos + span
        if whole_word:
            while start > 0 and start in allowed and not word_start[start]:
                start -= 1
            while end < len(word_start) and end in allowed and not word_start[end]:
                end += 1
        for p in range(start, end):
            if p not in allowed:
                break
            chosen.add(p)
    positions = sorted(chosen)
    if len(positions) > n:
        rng.shuffle(positions)
        positions = sorted(positions[:n])
    return positions


def mask_caption(input_ids: Sequence[int], special: Sequence[bool], rng: random.Random, mask_token_id: int,
                 vocab_size: int, mask_prob: float = 0.25, max_masks: int = 8, word_start: Optional[Sequence[bool]] = None,
                 skipgram_prb: float = 0.2, skipgram_size: int = 3, whole_word: bool = True) -> tuple[list[int], list[int]]:
    """(masked ids, labels: the original id at masked positions, -100 elsewhere) for one padded caption.

    ``special`` marks special tokens and padding (never masked); the length X-VLM counts is the real tokens up to
    and including [CLS] (trailing </s> / [SEP], which X-VLM's captions lack, is not counted)."""
    ids = list(input_ids)
    candidates = [i for i, s in enumerate(special) if not s]
    starts = list(word_start) if word_start is not None else [True] * len(ids)
    n = num_masks(len(candidates) + 1, mask_prob, max_masks)
    positions = choose_masked_positions(candidates, starts, n, rng, skipgram_prb, skipgram_size, whole_word)
    labels = [IGNORE_INDEX] * len(ids)
    for p in positions:
        labels[p] = ids[p]
        if rng.random() < 0.8:
            ids[p] = mask_token_id
        elif rng.random() < 0.5:
            ids[p] = rng.randint(0, vocab_size - 1)
    return ids, labels


def mask_batch(input_ids: torch.Tensor, special_tokens_mask: torch.Tensor, rng: random.Random, mask_token_id: int,
               vocab_size: int, mask_prob: float = 0.25, max_masks: int = 8, word_start: Optional[torch.Tensor] = None,
               skipgram_prb: float = 0.2, skipgram_size: int = 3, whole_word: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_caption`` per row of [B, L] tensors -> (mlm_input_ids, mlm_labels) [B, L] (the data contract's keys)."""
    rows = [mask_caption(ids, special, rng, mask_token_id, vocab_size, mask_prob, max_masks,
                         None if word_start is None else word_start[i].tolist(), skipgram_prb, skipgram_size, whole_word)
            for i, (ids, special) in enumerate(zip(input_ids.tolist(), special_tokens_mask.bool().tolist()))]
    return (torch.tensor([r[0] for r in rows], dtype=torch.long).view_as(input_ids),
            torch.tensor([r[1] for r in rows], dtype=torch.long).view_as(input_ids))


def word_starts(tokens: Sequence[str]) -> list[bool]:
    """Word-start flags from token strings: WordPiece continuations begin with '##'; byte-level BPE word starts
    begin with 'Ġ' (other pieces continue a word); special tokens and the first token start words."""
    if any(t.startswith("##") for t in tokens):
        return [not t.startswith("##") for t in tokens]
    if any(t.startswith("Ġ") for t in tokens):
        return [i == 0 or t.startswith("Ġ") or (t.startswith("<") and t.endswith(">")) for i, t in enumerate(tokens)]
    return [True] * len(tokens)
