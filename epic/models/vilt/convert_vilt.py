"""Official ViLT checkpoints (dandelin/ViLT, PyTorch-Lightning ``.ckpt`` such as ``vilt_200k_mlm_itm.ckpt``) <-> ours.

Our parameter names are ViLT's, so the conversion is a checked identity: the official file additionally holds
``text_embeddings.position_ids`` (a buffer older transformers saved; it must be ``arange``) and, for other
objectives or fine-tuned files, heads that are not part of ViLT pretraining (MPP, downstream classifiers), which
are skipped with a warning. Any other unknown key, or a missing one, is an error listing them.

``config`` is ViLT's own config dict (the keys of its ``config.py``; a Lightning checkpoint keeps it under
``hyper_parameters.config``, used when ``config`` is None) or a JSON file of it. Sizes it does not give come from
tensor shapes (``num_heads``: hidden_size // 64, ViLT-B's 12); sizes that contradict the tensors are an error,
except ``image_size``: ViLT interpolates its position-embedding grid to every image, and we resample it once to
the square ``image_size // patch_size`` grid with the same interpolation (bilinear, align_corners=True).
Lightning checkpoints are pickles: load only trusted files.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Dict, Optional

import torch

from .configuration_vilt import ViLTConfig, vilt_config_from_dict
from .modeling_vilt import CONSISTENCY_HEAD, ViLT

logger = logging.getLogger(__name__)

#: ViLT config.py keys that size the model, and their ViLTConfig names
MODEL_KEYS = {"hidden_size": "hidden_size", "num_heads": "num_heads", "num_layers": "num_layers",
              "mlp_ratio": "mlp_ratio", "patch_size": "patch_size", "image_size": "image_size",
              "max_text_len": "max_text_len", "vocab_size": "vocab_size", "max_image_len": "max_image_len",
              "drop_rate": "drop_rate"}
#: the other keys of ViLT's config.py (training, data and environment settings): accepted, not used by the model
OTHER_KEYS = frozenset("""exp_name seed datasets loss_names batch_size train_transform_keys val_transform_keys
    draw_false_image image_only vqav2_label_size gqa_label_size tokenizer whole_word_masking mlm_prob draw_false_text
    vit optim_type learning_rate weight_decay decay_power max_epoch max_steps warmup_steps end_lr lr_mult
    get_recall_metric resume_from fast_dev_run val_check_interval test_only data_root log_dir per_gpu_batchsize
    num_gpus num_nodes load_path num_workers precision""".split())
#: buffers some official files hold that our model does not keep in its state dict
OPTIONAL_BUFFERS = ("text_embeddings.position_ids", "text_embeddings.token_type_ids")
#: ViLT heads outside its MLM + ITM pretraining (masked patch prediction, downstream tasks): skipped on import
SKIPPED_PREFIXES = ("mpp_score.", "transformer.mask_token", "vqa_classifier.", "gqa_classifier.",
                    "nlvr2_classifier.", "rank_output.", "img_classifier.")
PRETRAINING_HEADS = ("mlm_score.", "itm_score.")
#: sizes the tensors fix (a config value that differs is an error)
SHAPE_FIXED = ("hidden_size", "num_layers", "mlp_ratio", "patch_size", "max_text_len", "vocab_size",
               "num_token_types")


def read_checkpoint(path: str) -> dict:
    """The object stored in ``path`` (weights-only load first; a Lightning pickle with its hyper-parameters
    needs the full unpickler, which is used for trusted files only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning checkpoints pickle their hyper-parameters
        logger.warning("%s is not a plain tensor file; unpickling it fully (trusted files only)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def _require(state_dict: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no {key!r}; it is not a ViLT checkpoint (dandelin/ViLT)")
    return state_dict[key]


def _block_count(state_dict: Dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(r"transformer\.blocks\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"transformer.blocks indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _read_vilt_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be ViLT's config dict or a JSON path, got {type(config).__name__}")
    unknown = sorted(set(config) - set(MODEL_KEYS) - OTHER_KEYS)
    if unknown:
        raise ValueError(f"unknown ViLT config keys {unknown}; ViLT's config.py has {sorted(set(MODEL_KEYS) | OTHER_KEYS)}")
    return dict(config)


def vilt_config_from_official(state_dict: Dict[str, torch.Tensor], config=None) -> ViLTConfig:
    """ViLTConfig from ViLT's config dict (or JSON path) and the tensor shapes of an official state dict."""
    given = {MODEL_KEYS[k]: v for k, v in _read_vilt_config(config).items() if k in MODEL_KEYS}
    words = _require(state_dict, "text_embeddings.word_embeddings.weight")
    hidden = words.shape[1]
    patch = _require(state_dict, "transformer.patch_embed.proj.weight").shape[-1]
    grid = round((_require(state_dict, "transformer.pos_embed").shape[1] - 1) ** 0.5)
    fc1 = _require(state_dict, "transformer.blocks.0.mlp.fc1.weight").shape[0]
    if fc1 % hidden:
        raise ValueError(f"MLP width {fc1} is not a multiple of hidden size {hidden}")
    inferred = dict(hidden_size=hidden, num_layers=_block_count(state_dict), mlp_ratio=fc1 // hidden,
                    patch_size=patch, max_text_len=_require(state_dict, "text_embeddings.position_embeddings.weight"
                                                             ).shape[0],
                    vocab_size=words.shape[0],
                    num_token_types=_require(state_dict, "token_type_embeddings.weight").shape[0])
    contradictions = [f"{name}={given[name]} but the tensors say {inferred[name]}" for name in SHAPE_FIXED
                      if name in given and given[name] != inferred[name]]
    if contradictions:
        raise ValueError("the ViLT config contradicts the checkpoint: " + ", ".join(contradictions))
    values = {**inferred, "num_heads": max(1, hidden // 64), "image_size": grid * patch, **given}
    if values.get("max_image_len") is None:
        values["max_image_len"] = -1
    values["mlp_ratio"] = int(values["mlp_ratio"])
    return vilt_config_from_dict(values, source="ViLT config")


def to_official_state_dict(model: ViLT) -> Dict[str, torch.Tensor]:
    """Our state dict in ViLT's layout: the same names, plus the ``position_ids`` buffer ViLT's files hold;
    EPIC's consistency head (not a ViLT module) is left out."""
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(CONSISTENCY_HEAD + ".")}
    out["text_embeddings.position_ids"] = torch.arange(model.config.max_text_len).unsqueeze(0)
    return out


def from_official_state_dict(official: Dict[str, torch.Tensor], model: ViLT,
                             allow_missing_heads: bool = False) -> Dict[str, torch.Tensor]:
    """ViLT's state dict -> ours (key check, buffer check, position grid resampled to the model's image size)."""
    official = dict(official)
    for key in OPTIONAL_BUFFERS:
        value = official.pop(key, None)
        if key.endswith("position_ids") and value is not None:
            if not torch.equal(value.flatten().long(), torch.arange(value.numel())):
                raise ValueError(f"{key} is not 0..{value.numel() - 1}; this is not a ViLT checkpoint")
    skipped = sorted(k for k in official if k.startswith(SKIPPED_PREFIXES))
    if skipped:
        logger.warning("skipping %d tensors of heads outside ViLT's MLM+ITM pretraining: %s", len(skipped),
                       sorted({k.split(".")[0] for k in skipped}))
    used = {k: v for k, v in official.items() if not k.startswith(SKIPPED_PREFIXES)}
    expected = {k for k in model.state_dict() if not k.startswith(CONSISTENCY_HEAD + ".")}
    unexpected = sorted(set(used) - expected)
    missing = sorted(expected - set(used))
    missing_heads = [k for k in missing if k.startswith(PRETRAINING_HEADS)]
    if allow_missing_heads and missing_heads:
        logger.warning("checkpoint has no %s: they keep their random init", sorted({k.split(".")[0] for k in missing_heads}))
        missing = [k for k in missing if k not in missing_heads]
    if unexpected or missing:
        hint = (" (a fine-tuned checkpoint without the MLM/ITM heads loads with allow_missing_heads=True)"
                if missing_heads and not allow_missing_heads else "")
        raise ValueError(f"official ViLT checkpoint does not match the model: unknown keys {unexpected}, missing "
                         f"keys {missing}{hint}")
    used = model.adapt_loaded_state(used)  # the position grid, resampled to the model's image size if needed
    return used


def _state_and_config(path_or_state_dict, config):
    """(state dict, ViLT config dict or path) of an official file; the file's own hyper-parameters when no
    config is given."""
    if not isinstance(path_or_state_dict, str):
        return dict(path_or_state_dict), config
    loaded = read_checkpoint(path_or_state_dict)
    hyper = (loaded.get("hyper_parameters") or {}).get("config") if isinstance(loaded, dict) else None
    if config is None and isinstance(hyper, dict):
        config = {k: v for k, v in hyper.items() if k in MODEL_KEYS or k in OTHER_KEYS}
    return loaded.get("state_dict", loaded), config


def official_vilt_config(path_or_state_dict, config=None) -> ViLTConfig:
    """The architecture of an official ViLT file (its tensors + ViLT config), without building the model."""
    return vilt_config_from_official(*_state_and_config(path_or_state_dict, config))


def load_official_vilt(path_or_state_dict, config=None, allow_missing_heads: bool = False) -> ViLT:
    """Our ViLT from an official ViLT checkpoint (``.ckpt`` with ``state_dict``, or a state dict)."""
    state_dict, config = _state_and_config(path_or_state_dict, config)
    model = ViLT(vilt_config_from_official(state_dict, config))
    result = model.load_state_dict(from_official_state_dict(state_dict, model, allow_missing_heads), strict=False)
    stray = [k for k in result.missing_keys if not (allow_missing_heads and k.startswith(PRETRAINING_HEADS))]
    if stray or result.unexpected_keys:
        raise ValueError(f"unexpected load result: missing {stray}, unexpected {result.unexpected_keys}")
    return model
