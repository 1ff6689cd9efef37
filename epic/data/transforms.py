"""Image transforms: the training transform (random resized crop + RandAugment without colour ops, paper App. F)
and METER's evaluation transform (bicubic resize + centre crop), both ending in the run's normalisation
(``data.normalization``: CLIP's mean/std by default, as METER, ALBEF and X-VLM; 0.5/0.5 for ViLT).

Choices (documented in the README's data section):
* crop scale (0.8, 1.0): a mild crop, since in the shapes world counts and positions are labels and a crop
  that cuts an object away would make a caption false (METER pretrains with no crop at all).
* RandAugment(num_ops=2, magnitude=9) as in ViLT/ALBEF-style pretraining, restricted to geometric ops and
  sharpness. Colour ops (brightness, colour, contrast, posterize, solarize, autocontrast, equalize) are
  removed: captions name colours, so changing colours would create inconsistent tokens (paper App. F).
* No horizontal flip: it would swap "left" and "right".
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                 IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = OPENAI_CLIP_MEAN
CLIP_STD = OPENAI_CLIP_STD
# data.normalization -> (mean, std) per RGB channel, applied after ToTensor (pixels in [0, 1]):
#   clip       OpenAI CLIP's statistics: METER's clip_transform, ALBEF, X-VLM (the default)
#   imagenet   ImageNet's (torchvision / timm default)
#   inception  0.5 / 0.5 (timm's "inception" constants), i.e. pixels to [-1, 1]: ViLT's pixelbert transform,
#              what its ViT-B/32 (vit_base_patch32_384, ImageNet-21k) weights expect
NORMALIZATIONS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                  "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
                  "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)}
TRAIN_CROP_SCALE = (0.8, 1.0)
RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 9
COLOUR_OPS = frozenset({"Brightness", "Color", "Contrast", "Posterize", "Solarize", "AutoContrast", "Equalize"})


class RandAugmentNoColour(T.RandAugment):
    """torchvision's RandAugment with every op that changes colours removed (geometry and sharpness remain)."""

    def _augmentation_space(self, num_bins: int, image_size: Tuple[int, int]) -> Dict[str, Tuple[torch.Tensor, bool]]:
        space = super()._augmentation_space(num_bins, image_size)
        return {name: value for name, value in space.items() if name not in COLOUR_OPS}


def normalize(name: str = "clip") -> T.Normalize:
    """The ``data.normalization`` step (see NORMALIZATIONS)."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown image normalization {name!r}; choose one of {tuple(NORMALIZATIONS)} "
                         f"(data.normalization)")
    mean, std = NORMALIZATIONS[name]
    return T.Normalize(mean, std)


def train_transform(image_size: int, randaugment: bool = True, crop_scale: Tuple[float, float] = TRAIN_CROP_SCALE,
                    normalization: str = "clip") -> T.Compose:
    """PIL RGB image -> float32 [3, S, S]: random resized crop, RandAugment (no colour ops), normalisation."""
    steps = [T.RandomResizedCrop(image_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC)]
    if randaugment:
        steps.append(RandAugmentNoColour(num_ops=RANDAUGMENT_OPS, magnitude=RANDAUGMENT_MAGNITUDE))
    steps += [T.ToTensor(), normalize(normalization)]
    return T.Compose(steps)


def eval_transform(image_size: int, normalization: str = "clip") -> T.Compose:
    """PIL RGB image -> float32 [3, S, S]: METER's clip_transform (bicubic resize, centre crop, normalisation)."""
    return T.Compose([
        T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize(normalization),
    ])


def seeded_transform(transform, image, seed: int) -> torch.Tensor:
    """Apply a torchvision transform with torch's global RNG seeded for this sample, restoring the RNG after.

    torchvision draws its randomness from the global generator; seeding it per sample makes augmentation a
    function of the sample's position in the stream (exact resume) without disturbing the caller's RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
