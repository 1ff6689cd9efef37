"""METER's vision tower: an OpenAI-CLIP ViT built with timm's VisionTransformer.

METER (zdou0830/METER, meter/modules/clip_model.py) differs from a plain CLIP image encoder in two ways that we
match: it keeps only the first 11 of CLIP's 12 residual blocks (``vit_layers``), and it applies the final LayerNorm
(``ln_post``, timm's ``norm``) to every token, with no pooling and no projection. The output is [B, 1 + grid², width].
"""
from __future__ import annotations

import os
import re
import zipfile
from functools import partial
from typing import Dict

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .configuration_meter import METERConfig

CLIP_LAYER_NORM_EPS = 1e-5  # torch's default, as in OpenAI CLIP


def build_vision_tower(cfg: METERConfig) -> VisionTransformer:
    """CLIP ViT: pre-norm (ln_pre = timm norm_pre), QuickGELU, class token, final norm on all tokens, no head."""
    if cfg.image_size % cfg.patch_size != 0:
        raise ValueError(
            f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}; pick an image size "
            f"divisible by the patch size (METER uses 288 or 384 with patch 16)")
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.vit_width,
        depth=cfg.vit_layers,
        num_heads=cfg.vit_heads,
        mlp_ratio=4.0,
        pre_norm=True,  # CLIP's ln_pre; also makes the patch embedding bias-free like CLIP's conv1
        final_norm=True,  # CLIP's ln_post, applied by forward_features to every token
        global_pool="",
        num_classes=0,
        class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=CLIP_LAYER_NORM_EPS),
        act_layer="quick_gelu",
    )
    init_linear_weights(vit, cfg.initializer_range)
    return vit


def init_linear_weights(vit: VisionTransformer, std: float) -> None:
    """timm's ViT init (truncated normal, zero bias) for every Linear, at ``std`` instead of its fixed 0.02, so one
    ``initializer_range`` governs all randomly initialised weights (CLIP weights, when loaded, replace these)."""
    for module in vit.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def encode_image_tokens(vit: VisionTransformer, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] → [B, 1 + (S/patch)², width], ln_post applied to every token (METER's quirk)."""
    return vit.forward_features(pixel_values)


def is_torchscript_archive(path: str) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl``; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a local weight file: OpenAI TorchScript archive (.pt), plain torch pickle (.pt/.bin/.ckpt) or safetensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist; pass a local file path")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if is_torchscript_archive(path):  # OpenAI's released CLIP files are TorchScript archives
        return torch.jit.load(path, map_location="cpu").state_dict()
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _block_index(timm_key: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", timm_key)
    return int(match.group(1)) if match else None


def clip_to_timm_state_dict(clip_state_dict: Dict[str, torch.Tensor], vit: VisionTransformer,
                            prefix: str = "visual.") -> Dict[str, torch.Tensor]:
    """OpenAI-CLIP layout (``{prefix}conv1.weight``, ``transformer.resblocks.{i}.attn.in_proj_weight``, ...) → timm.

    Uses timm's own converter (``checkpoint_filter_fn`` → ``_convert_openai_clip``), which also resamples the
    position embedding bicubically to ``vit``'s grid (224 → 288 ...). Blocks beyond ``len(vit.blocks)`` (CLIP's
    12th, which METER drops) and the image projection ``proj`` are discarded.
    """
    visual = {"visual." + k[len(prefix):]: v for k, v in clip_state_dict.items() if k.startswith(prefix)}
    if "visual.class_embedding" not in visual:
        raise ValueError(
            f"no '{prefix}class_embedding' in the state dict: not an OpenAI-CLIP vision tower "
            f"(keys start with {sorted(clip_state_dict)[:3]} ...)")
    depth = len(vit.blocks)
    available = {int(m.group(1)) for k in visual if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    if len(available) < depth:
        raise ValueError(
            f"the CLIP weights have {len(available)} blocks but the config asks for vit_layers={depth}; "
            f"lower vit_layers or use a deeper CLIP checkpoint")
    # antialias=False: METER resamples with plain F.interpolate(mode='bicubic') (clip_model.adapt_position_encoding)
    converted = checkpoint_filter_fn(visual, vit, interpolation="bicubic", antialias=False)
    return {
        k: v for k, v in converted.items()
        if not k.startswith("head.") and (_block_index(k) is None or _block_index(k) < depth)
    }


def timm_to_clip_state_dict(timm_state_dict: Dict[str, torch.Tensor], prefix: str = "visual.") -> Dict[str, torch.Tensor]:
    """Inverse of ``clip_to_timm_state_dict`` (no resampling): timm key names → OpenAI-CLIP key names."""
    block_swaps = [("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "attn.in_proj_weight"),
                   ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
    top_level = {"patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
                 "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}
    out = {}
    for key, value in timm_state_dict.items():
        if key == "cls_token":
            out[prefix + "class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out[prefix + "positional_embedding"] = value.squeeze(0)
        elif key in top_level:
            out[prefix + top_level[key]] = value
        elif key.startswith("blocks."):
            rest = key[len("blocks."):]
            for old, new in block_swaps:
                rest = rest.replace(old, new)
            out[prefix + "transformer.resblocks." + rest] = value
        else:
            raise KeyError(f"vision tower parameter {key!r} has no OpenAI-CLIP name; update timm_to_clip_state_dict")
    return out


def load_clip_weights(vit: VisionTransformer, path: str) -> None:
    """Load a local OpenAI-CLIP checkpoint (JIT .pt, state dict or safetensors) into ``vit`` at its resolution."""
    weights = clip_to_timm_state_dict(read_state_dict(path), vit)
    missing, unexpected = vit.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"CLIP weights {path!r} do not fit the vision tower: missing {missing}, unexpected {unexpected}")
