"""ALBEF's released checkpoints (``ALBEF_4M.pth``, ``ALBEF.pth``: ``{'model': state_dict, 'config': ...}``) -> our
ALBEF (tower initialisations, DeiT-B and bert-base-uncased, are in ``weights.py``).

Our parameter names are ALBEF's, so conversion is a key check, not a renaming: every official key must be used and
every model key given, or a ``ValueError`` lists what is unexpected and what is missing. Two official quirks are
handled: ``text_encoder{,_m}.bert.embeddings.position_ids`` (a persistent buffer in the transformers version ALBEF
used; ours computes positions) is checked and dropped, and the MLM decoder's tied aliases are checked to equal the
word embeddings / MLM bias. A different ``image_res`` resamples both ViTs' position embeddings bicubically (ALBEF's
interpolate_pos_embed). Load only trusted files: ``.pth`` checkpoints are pickles (read with ``weights_only``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Optional, Union

import torch
from timm.layers import resample_abs_pos_embed

from .configuration_albef import ALBEFConfig, config_from_dict
from .modeling_albef import ALBEF
from .weights import read_checkpoint, state_dict_of

logger = logging.getLogger(__name__)

#: our buffers that ALBEF's checkpoints do not have (ALBEF counts iterations in its training loop)
NOT_IN_OFFICIAL = ("momentum_step",)
POSITION_ID_KEYS = ("text_encoder.bert.embeddings.position_ids", "text_encoder_m.bert.embeddings.position_ids")
VISION_PREFIXES = ("visual_encoder.", "visual_encoder_m.")
#: ALBEF's Pretrain.yaml key -> ALBEFConfig field
OFFICIAL_MODEL_KEYS = {"image_res": "image_size", "vision_width": "vision_width", "embed_dim": "embed_dim",
                       "temp": "temp", "queue_size": "queue_size", "momentum": "momentum", "alpha": "alpha",
                       "mlm_probability": "mlm_probability"}
REQUIRED_OFFICIAL_KEYS = ("image_res", "vision_width", "embed_dim", "bert_config")
#: config_bert.json key -> ALBEFConfig field
BERT_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
                    "fusion_layer": "fusion_layer", "num_attention_heads": "num_attention_heads",
                    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
                    "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
                    "hidden_dropout_prob": "hidden_dropout_prob",
                    "attention_probs_dropout_prob": "attention_probs_dropout_prob", "pad_token_id": "pad_token_id",
                    "encoder_width": "encoder_width", "initializer_range": "initializer_range"}
REQUIRED_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "fusion_layer", "num_attention_heads",
                      "intermediate_size")


# ------------------------------------------------------------------------------------------------ reading files
def _read_json_or_dict(value: Union[str, dict, None], what: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{what} {value!r} is not a file (give the dict itself or a JSON/YAML path)")
        with open(value) as f:
            if value.endswith((".yaml", ".yml")):
                import yaml
                return yaml.safe_load(f)
            return json.load(f)
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict or a path, got {type(value).__name__}")
    return dict(value)


# ------------------------------------------------------------------------------------------------ config
def _layer_count(state_dict: Dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layer indices matching {pattern!r} are not contiguous: {sorted(indices)}")
    return len(indices)


def _require(state_dict: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no {key!r}; it is not an ALBEF pretraining checkpoint "
                         f"({{'model': state_dict}} with visual_encoder.*, text_encoder.bert.*, ...)")
    return state_dict[key]


def albef_config_from_official(official_config: Union[str, dict], state_dict: Dict[str, torch.Tensor],
                               overrides: Optional[dict] = None) -> ALBEFConfig:
    """ALBEFConfig from ALBEF's own config (Pretrain.yaml keys with ``bert_config`` = config_bert.json as a dict or a
    path) plus what only the tensors tell (ViT patch size and depth, queue length).

    Training keys of ALBEF's YAML (train_file, optimizer, schedular, batch_size, ...) are ignored. ALBEF hard-codes
    the ViT's 12 heads, so ``vision_heads`` defaults to vision_width // 64; ``overrides`` may set any ALBEFConfig
    field. A config value that contradicts a tensor shape raises (except ``image_size``: the position embeddings are
    resampled)."""
    values = _read_json_or_dict(official_config, "ALBEF config")
    missing = [key for key in REQUIRED_OFFICIAL_KEYS if key not in values]
    if missing:
        raise ValueError(f"the ALBEF config lacks {missing}; it needs ALBEF's configs/Pretrain.yaml keys "
                         f"{list(REQUIRED_OFFICIAL_KEYS)} with bert_config = config_bert.json (dict or path)")
    bert = _read_json_or_dict(values["bert_config"], "bert_config")
    missing = [key for key in REQUIRED_BERT_KEYS if key not in bert]
    if missing:
        raise ValueError(f"bert_config lacks {missing} (ALBEF's config_bert.json has them, fusion_layer included)")
    if bert.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"bert_config hidden_act {bert['hidden_act']!r} is not supported (ALBEF uses 'gelu')")
    fields = {field: values[key] for key, field in OFFICIAL_MODEL_KEYS.items() if key in values}
    fields.update({field: bert[key] for key, field in BERT_CONFIG_KEYS.items() if key in bert})

    patch = _require(state_dict, "visual_encoder.patch_embed.proj.weight")
    word = _require(state_dict, "text_encoder.bert.embeddings.word_embeddings.weight")
    from_tensors = dict(
        patch_size=patch.shape[-1],
        vision_width=patch.shape[0],
        vision_layers=_layer_count(state_dict, r"visual_encoder\.blocks\.(\d+)\."),
        vision_mlp_ratio=_require(state_dict, "visual_encoder.blocks.0.mlp.fc1.weight").shape[0] / patch.shape[0],
        vocab_size=word.shape[0],
        hidden_size=word.shape[1],
        num_hidden_layers=_layer_count(state_dict, r"text_encoder\.bert\.encoder\.layer\.(\d+)\."),
        fusion_layer=min((int(m.group(1)) for key in state_dict
                          if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.crossattention\.", key))),
                         default=-1),
        intermediate_size=_require(state_dict, "text_encoder.bert.encoder.layer.0.intermediate.dense.weight").shape[0],
        max_position_embeddings=_require(state_dict,
                                         "text_encoder.bert.embeddings.position_embeddings.weight").shape[0],
        type_vocab_size=_require(state_dict, "text_encoder.bert.embeddings.token_type_embeddings.weight").shape[0],
        embed_dim=_require(state_dict, "vision_proj.weight").shape[0],
        queue_size=_require(state_dict, "image_queue").shape[1],
    )
    contradictions = [f"{name}={fields[name]} but the tensors say {value}" for name, value in from_tensors.items()
                      if name in fields and fields[name] != value]
    if contradictions:
        raise ValueError("the ALBEF config contradicts the checkpoint: " + "; ".join(contradictions))
    fields.update(from_tensors)
    fields.setdefault("encoder_width", fields["vision_width"])
    fields["vision_heads"] = max(1, fields["vision_width"] // 64)
    fields.update(overrides or {})
    fields.update(vit_pretrained=None, text_pretrained=None)
    return config_from_dict(fields, source="ALBEF config")


# ------------------------------------------------------------------------------------------------ state dicts
def to_official_state_dict(model: ALBEF) -> Dict[str, torch.Tensor]:
    """Our state dict in ALBEF's layout: the same names, plus the position_ids buffers ALBEF's BERT saved."""
    out = {k: v for k, v in model.state_dict().items() if k not in NOT_IN_OFFICIAL}
    positions = torch.arange(model.config.max_position_embeddings).expand(1, -1)
    for key in POSITION_ID_KEYS:
        out[key] = positions.clone()
    out["temp"] = out["temp"].reshape(())  # ALBEF's temperature is 0-d (ours [1], see ALBEF.__init__)
    return out


def _resample_position_embeddings(official: Dict[str, torch.Tensor], model: ALBEF) -> None:
    grid = model.config.image_size // model.config.patch_size
    for prefix in VISION_PREFIXES:
        key = prefix + "pos_embed"
        if key in official and official[key].shape[1] != 1 + grid * grid:
            old = round((official[key].shape[1] - 1) ** 0.5)
            logger.info("resampling %s from %dx%d to %dx%d patches", key, old, old, grid, grid)
            official[key] = resample_abs_pos_embed(official[key].float(), [grid, grid], [old, old],
                                                   num_prefix_tokens=1, interpolation="bicubic", antialias=False)


def from_official_state_dict(official: Dict[str, torch.Tensor], model: ALBEF) -> Dict[str, torch.Tensor]:
    """ALBEF's state dict -> ours, after checking the key set and the tied aliases; raises listing bad keys."""
    official = dict(official)
    for key in POSITION_ID_KEYS:
        if key in official:
            ids = official.pop(key)
            if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
                raise ValueError(f"{key} is not 0..{ids.numel() - 1}: this BERT uses custom positions")
    ours = {k: v for k, v in model.state_dict().items() if k not in NOT_IN_OFFICIAL}
    unexpected = sorted(set(official) - set(ours))
    missing = sorted(set(ours) - set(official))
    if unexpected or missing:
        hint = ""
        if any(k.startswith(("text_encoder.cls.", "image_queue", "visual_encoder_m.")) for k in missing):
            hint = (" (a fine-tuned ALBEF checkpoint has no MLM head, queues or momentum copies; "
                    "load_official_albef reads pretraining checkpoints such as ALBEF_4M.pth)")
        raise ValueError(f"official ALBEF checkpoint does not match the model: unexpected keys {unexpected}, "
                         f"missing keys {missing}{hint}")
    for prefix in ("text_encoder.", "text_encoder_m."):
        pairs = ((prefix + "cls.predictions.decoder.weight", prefix + "bert.embeddings.word_embeddings.weight"),
                 (prefix + "cls.predictions.decoder.bias", prefix + "cls.predictions.bias"))
        for alias, source in pairs:
            if not torch.equal(official[alias], official[source]):
                raise ValueError(f"{alias} differs from {source}; ALBEF ties them (an untied MLM decoder is not "
                                 f"an ALBEF checkpoint)")
    if official["temp"].numel() != 1:
        raise ValueError(f"temp has shape {tuple(official['temp'].shape)}; ALBEF's temperature is one number")
    official["temp"] = official["temp"].reshape(1)
    _resample_position_embeddings(official, model)
    official["momentum_step"] = torch.zeros((), dtype=torch.long)  # unknown: the alpha ramp restarts if trained on
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}" for k, v in official.items()
                    if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
    if shape_errors:
        raise ValueError("official ALBEF tensors do not fit the config: " + "; ".join(shape_errors))
    return official


def _checkpoint_and_config(path_or_state_dict, config, weights_only: bool):
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "the given state dict"
    checkpoint = (read_checkpoint(path_or_state_dict, weights_only) if isinstance(path_or_state_dict, str)
                  else path_or_state_dict)
    state_dict = state_dict_of(checkpoint, source)
    if config is None:
        config = checkpoint.get("config")
        if config is None:
            raise ValueError(f"{source} stores no 'config'; pass ALBEF's configs/Pretrain.yaml (as a dict or path) "
                             f"with bert_config = configs/config_bert.json")
    return state_dict, config


def official_albef_config(path_or_state_dict, config: Union[str, dict, None] = None,
                          overrides: Optional[dict] = None, weights_only: bool = True) -> ALBEFConfig:
    """The architecture of an official ALBEF checkpoint (its config + tensor shapes) as an ALBEFConfig, without
    building the model (the registry's ``official_config``)."""
    state_dict, config = _checkpoint_and_config(path_or_state_dict, config, weights_only)
    return albef_config_from_official(config, state_dict, overrides)


def load_official_albef(path_or_state_dict, config: Union[str, dict, None] = None,
                        overrides: Optional[dict] = None, weights_only: bool = True,
                        allow_missing_heads: bool = False) -> ALBEF:
    """Our ALBEF from an official checkpoint (path or loaded dict), momentum copies and queues included.

    ``config``: ALBEF's own config (Pretrain.yaml keys, ``bert_config`` dict or path inside), as a dict or a
    JSON/YAML path; None takes the ``'config'`` ALBEF stores in its checkpoints. ``overrides``: ALBEFConfig fields
    (e.g. ``vision_heads`` for non-standard ViTs, ``saliency``, ``consistency_head``). ``weights_only``: see
    ``read_checkpoint``. ``allow_missing_heads``: the switch the framework's loader passes to every converter
    (epic.models.loading.load_official_file, e.g. for ``finetune.py --init ALBEF_4M.pth``); it changes nothing here:
    ALBEF's pretraining checkpoints hold every head, and fine-tuned ones (no MLM head, queues or momentum copies)
    are refused either way with a message saying so."""
    del allow_missing_heads
    state_dict, config = _checkpoint_and_config(path_or_state_dict, config, weights_only)
    model = ALBEF(albef_config_from_official(config, state_dict, overrides))
    model.load_state_dict(from_official_state_dict(state_dict, model))
    return model
