"""Reading weight files, and ALBEF's tower initialisations (DeiT-B for the ViT, a local HF BERT for the text
encoder). No model class here: modeling_albef uses it at construction, convert_albef for official checkpoints."""
from __future__ import annotations

import os
from typing import Dict

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def read_checkpoint(path: str, weights_only: bool = True) -> dict:
    """The top-level object of a ``.pth`` / ``.bin`` (torch.load) or ``.safetensors`` file.

    ``weights_only`` (default) refuses pickled objects other than tensors and containers; pass False only for a
    file you trust (a pickle can run code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # pickles with objects beyond tensors and containers
        raise ValueError(f"cannot read {path!r} as a weights-only torch checkpoint ({error}); if you trust the "
                         f"file, pass weights_only=False, or re-save it as {{'model': state_dict}}") from error


def state_dict_of(checkpoint: dict, source: str) -> Dict[str, torch.Tensor]:
    """ALBEF's ``{'model': sd}`` (also ``{'state_dict': sd}`` or a bare state dict)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), dict):
            return dict(checkpoint[key])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise ValueError(f"{source} holds no state dict: expected {{'model': state_dict}} (ALBEF's format), found keys "
                     f"{sorted(checkpoint)[:10]}")


# ------------------------------------------------------------------------------------------------ tower inits
def load_deit_weights(vit: nn.Module, path: str) -> None:
    """DeiT-B (``deit_base_patch16_224-b5f2ef4d.pth``: ``{'model': sd}``) into ALBEF's ViT, as ALBEF's init_deit:
    the classifier head is dropped, the position embeddings resampled to this resolution, every ViT key required."""
    state = state_dict_of(read_checkpoint(path), path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist.", "fc_norm."))}
    if "dist_token" in state:
        raise ValueError(f"{path!r} is a distilled DeiT (dist_token); ALBEF initialises from the plain DeiT-B")
    grid = vit.patch_embed.grid_size
    if "pos_embed" in state and state["pos_embed"].shape[1] != 1 + grid[0] * grid[1]:
        old = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), list(grid), [old, old],
                                                    num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    result = vit.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path!r} does not fit the ViT (vision_width/layers/patch_size): missing "
                         f"{sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}")


def _hf_weights_file(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder!r} has no model.safetensors or pytorch_model.bin (a local HF BERT folder, "
                            f"e.g. bert-base-uncased saved with save_pretrained)")


def load_bert_weights(text_encoder: nn.Module, folder: str) -> None:
    """A local HF BERT (bert-base-uncased) into ``text_encoder``, as ALBEF's BertForMaskedLM.from_pretrained: the
    cross-attention layers stay randomly initialised, the pooler and NSP head are not used."""
    state = state_dict_of(read_checkpoint(_hf_weights_file(folder)), folder)
    renamed = {}
    for key, value in state.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.startswith(("bert.pooler.", "cls.seq_relationship.")) or key.endswith("position_ids") \
                or key.endswith("token_type_ids"):
            continue
        renamed[key] = value
    result = text_encoder.load_state_dict(renamed, strict=False)
    missing = [k for k in result.missing_keys if ".crossattention." not in k
               and not k.startswith("cls.predictions.decoder.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder!r} does not fit the text encoder (vocab/hidden/layers): missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")
    # the decoder is tied to the word embeddings (HF files may omit it or store the same values)
