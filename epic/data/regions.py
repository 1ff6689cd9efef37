"""Region samples for X-VLM (dataset/pretrain_dataset.py RegionTextJsonDataset), as pure functions.

A region-annotated sample holds ``regions: [{"caption", "attributes", "bbox": [x, y, w, h]}]`` (pixels of the
stored image, COCO's convention) and optionally whole-image captions. One training example from it, as X-VLM
makes it: a random crop that keeps one chosen region whole, an optional horizontal flip, a resize to the model's
square input; then up to ``max_regions`` (caption, box) rows — the whole-image caption first when there is one
(box (0.5, 0.5, 1, 1), every patch, ``is_image`` 1) — for regions of which more than ``min_perc_in_image`` of the
area survives the crop. Each row carries the box as (cx, cy, w, h) / image side and the patch mask the fusion
layers attend to (``box_patch_mask``).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image


@dataclass
class RegionRow:
    caption: str
    target_bbox: list  # (cx, cy, w, h) normalised to [0, 1]
    image_atts: list  # [1 + grid^2] 0/1: the pooled token, then the box's patches (row-major)
    is_image: int  # 1: a whole-image caption (no box loss)


def validate_regions(regions, width: int, height: int, where: str = "sample") -> list:
    """Regions as dicts with a non-empty caption and a positive box inside the image; else a ValueError."""
    if not isinstance(regions, list):
        raise ValueError(f"{where}: 'regions' must be a list of {{caption, bbox: [x, y, w, h]}}")
    for i, region in enumerate(regions):
        if not isinstance(region, dict) or not isinstance(region.get("caption"), (str, list)) or not region["caption"]:
            raise ValueError(f"{where}: region {i} needs a non-empty 'caption'")
        box = region.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f"{where}: region {i} 'bbox' must be [x, y, w, h] numbers, got {box!r}")
        x, y, w, h = box
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width + 1e-6 or y + h > height + 1e-6:
            raise ValueError(f"{where}: region {i} box {box} is empty or leaves the {width}x{height} image")
    return regions


def normalise_box(x: float, y: float, w: float, h: float, width: float, height: float) -> list:
    """[x, y, w, h] in pixels -> (cx, cy, w, h) as fractions of the image's width and height."""
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


def box_patch_mask(x: float, y: float, w: float, h: float, image_size: int, grid: int) -> list:
    """X-VLM's get_image_attns: 1 for the pooled token and for every output patch the box [x, y, w, h] (pixels of
    the square model input of side ``image_size``) touches, at least one patch; row-major over ``grid`` x ``grid``."""
    patch = image_size / grid
    x_min = min(math.floor(x / patch), grid - 1)
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch), grid))
    y_min = min(math.floor(y / patch), grid - 1)
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch), grid))
    mask = [0] * (1 + grid * grid)
    mask[0] = 1
    for row in range(y_min, y_max):
        for col in range(x_min, x_max):
            mask[1 + row * grid + col] = 1
    return mask


def _caption(value, rng: random.Random) -> str:
    return rng.choice(value) if isinstance(value, list) else value


def region_example(image: Image.Image, regions: Sequence[dict], captions: Optional[Sequence[str]], rng: random.Random,
                   image_size: int, grid: int, max_regions: int = 5, min_perc_in_image: float = 0.5,
                   hflip: bool = True) -> tuple[Image.Image, list]:
    """(the cropped, maybe flipped, resized image; its RegionRows). ``hflip`` False for data whose captions name
    left and right (the shapes world; X-VLM's careful_hflip)."""
    width, height = image.size
    validate_regions(list(regions), width, height)
    x, y, w, h = rng.choice(list(regions))["bbox"]
    x0, y0 = rng.randint(0, math.floor(x)), rng.randint(0, math.floor(y))
    x1 = rng.randint(min(math.ceil(x + w), width), width)
    y1 = rng.randint(min(math.ceil(y + h), height), height)
    crop_w, crop_h = x1 - x0, y1 - y0
    image = image.crop((x0, y0, x1, y1))
    flip = hflip and rng.random() < 0.5
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = image.resize((image_size, image_size), Image.BICUBIC)
    rows, budget = [], max_regions
    if captions:
        rows.append(RegionRow(_caption(list(captions), rng), [0.5, 0.5, 1.0, 1.0], [1] * (1 + grid * grid), 1))
        budget -= 1
    for region in rng.sample(list(regions), len(regions)):
        if budget <= 0:
            break
        rx, ry, rw, rh = region["bbox"]
        ix0, iy0 = max(x0, rx), max(y0, ry)
        ix1, iy1 = min(x0 + crop_w, rx + rw), min(y0 + crop_h, ry + rh)
        if ix1 <= ix0 or iy1 <= iy0 or (ix1 - ix0) * (iy1 - iy0) / (rw * rh) <= min_perc_in_image:
            continue
        bx, by, bw, bh = ix0 - x0, iy0 - y0, ix1 - ix0, iy1 - iy0
        if flip:
            bx = crop_w - bx - bw
        sx, sy = image_size / crop_w, image_size / crop_h
        bx, bw, by, bh = bx * sx, bw * sx, by * sy, bh * sy
        caption = _caption(region["caption"], rng)
        attributes = region.get("attributes")
        if isinstance(attributes, (str, list)) and attributes:  # X-VLM's layout: prefix one attribute word
            caption = f"{_caption(attributes, rng)} {caption}"  # (a dict, as the shapes world writes, only describes)
        rows.append(RegionRow(caption, normalise_box(bx, by, bw, bh, image_size, image_size),
                              box_patch_mask(bx, by, bw, bh, image_size, grid), 0))
        budget -= 1
    return image, rows


def decode_region_sample(raw: dict):
    """(image, regions, whole-image captions) of a raw shard sample with .json "regions", or a skip reason (str):
    'missing_regions' when the sample has none, else the reasons of epic.data.shards."""
    import json

    from .shards import read_image

    if "json" not in raw or not raw["json"]:
        return "missing_regions"
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "bad_text"
    regions = meta.get("regions") if isinstance(meta, dict) else None
    if not regions:
        return "missing_regions"
    image = read_image(raw)
    if isinstance(image, str):
        return image
    try:
        validate_regions(regions, *image.size, where=str(raw.get("__key__")))
    except ValueError:
        return "bad_regions"
    captions = meta.get("caption") or []
    return image, regions, [captions] if isinstance(captions, str) else list(captions)


def collate_region_batch(examples, tokenizer, max_text_len: int, rng: random.Random, batch_size: int,
                         mask_prob: float = 0.25, max_masks: int = 8) -> dict:
    """A region batch from ``examples`` = [(image tensor [3, S, S], [RegionRow, ...]), ...]: every image once in
    ``pixel_values``, ``batch_size`` rows (X-VLM's collate: a random subset when there are more, rows repeated
    when fewer) with ``image_index`` naming each row's image, tokenised captions, X-VLM MLM masking
    (``mlm_input_ids``, ``mlm_labels``), ``image_atts``, ``target_bbox`` and ``is_image``."""
    import torch

    from .text import tokenize_captions
    from .xvlm_masking import mask_batch, word_starts

    examples = [(image, rows) for image, rows in examples if rows]
    if not examples:
        raise ValueError("no region rows to collate (every image lost its regions to the crop)")
    flat = [(i, row) for i, (_, rows) in enumerate(examples) for row in rows]
    if len(flat) >= batch_size:
        flat = [flat[j] for j in sorted(rng.sample(range(len(flat)), batch_size))]
    else:
        flat = (flat * math.ceil(batch_size / len(flat)))[:batch_size]
    used = sorted({i for i, _ in flat})
    remap = {old: new for new, old in enumerate(used)}
    text = tokenize_captions(tokenizer, [row.caption for _, row in flat], [None] * len(flat), max_text_len)
    starts = torch.tensor([word_starts(tokenizer.convert_ids_to_tokens(ids)) for ids in text["input_ids"].tolist()])
    mlm_input_ids, mlm_labels = mask_batch(text["input_ids"], text["special_tokens_mask"], rng, tokenizer.mask_token_id,
                                           len(tokenizer), mask_prob, max_masks, word_start=starts)
    return {
        "pixel_values": torch.stack([examples[i][0] for i in used]),
        "image_index": torch.tensor([remap[i] for i, _ in flat], dtype=torch.long),
        **text,
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
        "image_atts": torch.tensor([row.image_atts for _, row in flat], dtype=torch.long),
        "target_bbox": torch.tensor([row.target_bbox for _, row in flat], dtype=torch.float32),
        "is_image": torch.tensor([row.is_image for _, row in flat], dtype=torch.long),
    }
