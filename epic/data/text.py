"""Text side of a batch: tokenizer loading, tokenisation to a fixed length, the content-word mask and BERT masking.

Batch keys produced here (docs/CONTRACTS.md "Data batch"): input_ids, attention_mask, special_tokens_mask,
content_mask, mlm_input_ids, mlm_labels.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

MLM_IGNORE_INDEX = -100
_WORD = re.compile(r"\S+")


def load_tokenizer(path: str | os.PathLike):
    """A HF fast tokenizer from a local folder (e.g. the shapes world's DIR/tokenizer, or a roberta-base copy)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer at '{path}': expected a HF tokenizer folder (tokenizer.json + tokenizer_config.json); "
            "generate one with tools/make_synthetic_shards.py or save a pretrained tokenizer there with "
            "AutoTokenizer.from_pretrained(name).save_pretrained(path)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer at '{path}' is not a fast tokenizer; offsets (content mask) need one")
    for name in ("pad_token_id", "mask_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"tokenizer at '{path}' has no {name[:-3]}; set it in tokenizer_config.json")
    return tokenizer


def word_spans(caption: str) -> list[tuple[int, int]]:
    """Character spans of the whitespace-separated words of a caption."""
    return [m.span() for m in _WORD.finditer(caption)]


def content_spans(caption: str, content_words: Optional[Sequence[bool]]) -> list[tuple[int, int]]:
    """Character spans of the caption's content words; `content_words` has one flag per whitespace word."""
    if content_words is None:
        return []
    spans = word_spans(caption)
    if len(spans) != len(content_words):
        raise ValueError(
            f"content_words has {len(content_words)} flags but the caption has {len(spans)} whitespace words: "
            f"{caption!r}; give one flag per whitespace-separated word"
        )
    return [span for span, is_content in zip(spans, content_words) if is_content]


def content_mask_from_offsets(offsets: torch.Tensor, spans_per_row: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """[B, L] bool: True where a token's character span overlaps a content word (special/pad tokens span (0, 0))."""
    starts, ends = offsets[..., 0], offsets[..., 1]
    mask = torch.zeros(starts.shape, dtype=torch.bool)
    for row, spans in enumerate(spans_per_row):
        real = ends[row] > starts[row]
        for lo, hi in spans:
            mask[row] |= real & (starts[row] < hi) & (ends[row] > lo)
    return mask


def content_token_mask(caption: str, content_words: Sequence[bool], tokenizer, max_length: Optional[int] = None) -> torch.Tensor:
    """Per-token content flags of one caption, aligned with `tokenizer(caption)` (truncated/padded to max_length)."""
    kwargs = dict(truncation=True, max_length=max_length, padding="max_length") if max_length else {}
    encoded = tokenizer(caption, return_offsets_mapping=True, return_tensors="pt", **kwargs)
    return content_mask_from_offsets(encoded["offset_mapping"], [content_spans(caption, content_words)])[0]


NOT_A_WORD = -1


def word_ids_matrix(encoding, num_rows: int | None = None) -> torch.Tensor:
    """[B, L] int64 word index of every token of a batch encoding (``NOT_A_WORD`` on special and pad tokens)."""
    if not hasattr(encoding, "word_ids"):
        raise TypeError("whole-word masking needs a fast tokenizer's BatchEncoding (it has word_ids()); load the "
                        "tokenizer with use_fast=True")
    rows = num_rows if num_rows is not None else len(encoding["input_ids"])
    return torch.tensor([[NOT_A_WORD if w is None else w for w in encoding.word_ids(i)] for i in range(rows)],
                        dtype=torch.long)


def tokenize_captions(tokenizer, captions: Sequence[str], content_words: Sequence[Optional[Sequence[bool]]], max_text_len: int,
                      with_word_ids: bool = False) -> dict:
    """Tokenise a batch of captions to exactly max_text_len tokens: ids, attention/special/content masks (and, with
    ``with_word_ids``, ``word_ids`` [B, L]: each token's word index, -1 on special and pad tokens; see data/wwm.py)."""
    encoded = tokenizer(
        list(captions),
        max_length=max_text_len,
        truncation=True,
        padding="max_length",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    spans = [content_spans(c, flags) for c, flags in zip(captions, content_words)]
    extra = {"word_ids": word_ids_matrix(encoded, len(captions))} if with_word_ids else {}
    return {**extra, 
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].long(),
        "special_tokens_mask": encoded["special_tokens_mask"].bool(),
        "content_mask": content_mask_from_offsets(encoded["offset_mapping"], spans),
    }


def replacement_token_ids(tokenizer) -> torch.Tensor:
    """Token ids BERT's 10% random replacement may draw: the whole vocabulary except special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def mask_tokens_for_mlm(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    replacement_ids: torch.Tensor,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select each real token with `probability`; of those 80% -> <mask>, 10% -> random, 10% kept.

    Returns (mlm_input_ids, mlm_labels) with labels = original id at selected positions, -100 elsewhere.
    Specials and padding are never selected, and the random replacement never draws a special token.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {probability}")
    uniform = torch.rand(input_ids.shape, generator=generator)
    selected = (uniform < probability) & ~special_tokens_mask
    return corrupt_selected_for_mlm(input_ids, selected, mask_token_id, replacement_ids, generator)


def corrupt_selected_for_mlm(input_ids: torch.Tensor, selected: torch.Tensor, mask_token_id: int,
                             replacement_ids: torch.Tensor, generator: torch.Generator
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of already selected positions: 80% -> <mask>, 10% -> a random non-special id, 10% kept.

    Returns (mlm_input_ids, mlm_labels) as mask_tokens_for_mlm. Random numbers are drawn on the generator's
    device (CPU for the data loader) and moved to ``input_ids``'s device.
    """
    device = input_ids.device
    draw_device = generator.device if generator is not None else torch.device("cpu")
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, MLM_IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator, device=draw_device).to(device)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    random_index = torch.randint(len(replacement_ids), input_ids.shape, generator=generator, device=draw_device)
    random_ids = replacement_ids.to(device)[random_index.to(device)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels
