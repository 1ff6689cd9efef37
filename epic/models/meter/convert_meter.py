"""METER's official-checkpoint converter, beside the model (as timm keeps ``_convert_openai_clip`` beside its ViT):
the official key layout (OpenAI-CLIP names under ``vit_model.visual``, PyTorch-Lightning ``.ckpt``) <-> ours, the
architecture from tensor shapes and METER's own config keys, and ``load_official_meter`` (the registry's
``converter`` for ``model.family: meter``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Dict, Optional

import torch

from ..vision import clip_to_timm_state_dict, read_state_dict, timm_to_clip_state_dict
from .configuration_meter import METERConfig
from .modeling_meter import METER, config_from_dict

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ official import
OFFICIAL_VISION_PREFIX = "vit_model.visual."
# Keys present in official METER checkpoints that METER itself never uses (CLIP's text tower, unused buffers).
OFFICIAL_UNUSED_PATTERNS = (
    r"vit_model\.positional_embedding", r"vit_model\.ln_final\..*", r"vit_model\.token_embedding\..*",
    r"vit_model\.transformer\..*", r"vit_model\.text_projection", r"vit_model\.logit_scale",
    r"vit_model\.visual\.proj", r"text_transformer\.pooler\..*", r"text_transformer\.embeddings\.position_ids",
    r"text_transformer\.embeddings\.token_type_ids",
)
OFFICIAL_DOWNSTREAM_HEADS = ("vqa_classifier.", "nlvr2_classifier.", "snli_classifier.", "rank_output.")
CLIP_FULL_DEPTH = 12  # METER keeps CLIP's first 11 blocks; a 12th in a file is dropped
TEXT_LAYER_NORM_EPS = {"roberta": 1e-5, "bert": 1e-12}


def to_official_state_dict(model: METER) -> Dict[str, torch.Tensor]:
    """Our state dict in METER's key layout (OpenAI-CLIP names under ``vit_model.visual``)."""
    out = {}
    vision = {}
    for key, value in model.state_dict().items():
        if key.startswith("vit_model."):
            vision[key[len("vit_model."):]] = value
        else:
            out[key] = value
    out.update(timm_to_clip_state_dict(vision, prefix=OFFICIAL_VISION_PREFIX))
    return out


def _layer_count(state_dict: Dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layer indices matching {pattern!r} are not contiguous: {sorted(indices)}")
    return len(indices)


def _require(state_dict: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no {key!r}; it is not a METER (CLIP-ViT + RoBERTa/BERT) checkpoint")
    return state_dict[key]


def meter_config_from_official(state_dict: Dict[str, torch.Tensor], overrides: Optional[dict] = None) -> METERConfig:
    """Every size from tensor shapes; heads by METER's rules (width // 64) unless ``overrides`` gives them.

    ``overrides`` may set any METERConfig field. A size that contradicts the tensors is an error, except
    ``image_size`` (the position embedding is resampled, as METER's adapt_position_encoding does) and
    ``vit_layers`` up to the number of blocks in the file (later blocks are dropped; by default a 12th is).
    """
    overrides = dict(overrides or {})
    conv = _require(state_dict, OFFICIAL_VISION_PREFIX + "conv1.weight")
    vit_width, patch_size = conv.shape[0], conv.shape[-1]
    grid = round((_require(state_dict, OFFICIAL_VISION_PREFIX + "positional_embedding").shape[0] - 1) ** 0.5)
    vit_blocks = _layer_count(state_dict, re.escape(OFFICIAL_VISION_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    word = _require(state_dict, "text_transformer.embeddings.word_embeddings.weight")
    token_types = _require(state_dict, "text_transformer.embeddings.token_type_embeddings.weight").shape[0]
    text_model_type = overrides.get("text_model_type", "roberta" if token_types == 1 else "bert")
    fusion_hidden = _require(state_dict, "cross_modal_text_transform.weight").shape[0]
    fusion_intermediate = _require(state_dict, "cross_modal_text_layers.0.intermediate.dense.weight").shape[0]
    if fusion_intermediate % fusion_hidden:
        raise ValueError(f"fusion FFN width {fusion_intermediate} is not a multiple of hidden size {fusion_hidden}")
    inferred = dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        vit_width=vit_width,
        vit_layers=vit_blocks - 1 if vit_blocks == CLIP_FULL_DEPTH else vit_blocks,
        vit_heads=max(1, vit_width // 64),
        text_model_type=text_model_type,
        vocab_size=word.shape[0],
        text_hidden_size=word.shape[1],
        text_layers=_layer_count(state_dict, r"text_transformer\.encoder\.layer\.(\d+)\."),
        text_heads=max(1, word.shape[1] // 64),
        text_intermediate_size=_require(
            state_dict, "text_transformer.encoder.layer.0.intermediate.dense.weight").shape[0],
        text_max_position_embeddings=_require(
            state_dict, "text_transformer.embeddings.position_embeddings.weight").shape[0],
        text_type_vocab_size=token_types,
        text_layer_norm_eps=TEXT_LAYER_NORM_EPS.get(text_model_type, 1e-12),
        hidden_size=fusion_hidden,
        num_heads=max(1, fusion_hidden // 64),
        num_fusion_layers=_layer_count(state_dict, r"cross_modal_text_layers\.(\d+)\."),
        mlp_ratio=fusion_intermediate // fusion_hidden,
        num_token_types=_require(state_dict, "token_type_embeddings.weight").shape[0],
    )
    free = {"image_size", "vit_heads", "text_heads", "num_heads", "text_model_type", "text_layer_norm_eps"}
    contradictions = {name: (overrides[name], value) for name, value in inferred.items()
                      if name in overrides and name not in free and overrides[name] != value
                      and not (name == "vit_layers" and overrides[name] <= vit_blocks)}
    if contradictions:
        details = ", ".join(f"{name}={given} but the tensors say {found}"
                            for name, (given, found) in contradictions.items())
        raise ValueError(f"the METER config contradicts the checkpoint: {details}; drop these fields from the JSON")
    values = {**inferred, **overrides, "vit_pretrained": None, "text_pretrained": None}
    return config_from_dict(values, source="meter config overrides")


def _unused_official_key(key: str, vit_layers: int) -> bool:
    if any(re.fullmatch(pattern, key) for pattern in OFFICIAL_UNUSED_PATTERNS):
        return True
    block = re.match(re.escape(OFFICIAL_VISION_PREFIX) + r"transformer\.resblocks\.(\d+)\.", key)
    return bool(block) and int(block.group(1)) >= vit_layers


def from_official_state_dict(official: Dict[str, torch.Tensor], model: METER,
                             allow_missing_heads: bool = False) -> Dict[str, torch.Tensor]:
    """METER's key layout → ours, after checking the key set. Unknown or missing keys raise, listing them."""
    vit_layers = model.config.vit_layers
    downstream = sorted(k for k in official if k.startswith(OFFICIAL_DOWNSTREAM_HEADS))
    if downstream:
        logger.warning("skipping %d downstream-head tensors not part of METER pretraining: %s",
                       len(downstream), downstream)
    used = {k: v for k, v in official.items()
            if not _unused_official_key(k, vit_layers) and not k.startswith(OFFICIAL_DOWNSTREAM_HEADS)}
    # a task model's own downstream heads (rank_output, ...) are new: they keep their init (or, for rank_output,
    # take the ITM head's match row in load_pretrained_weights), as the official file's heads are skipped above
    expected = {k for k in to_official_state_dict(model) if not k.startswith(OFFICIAL_DOWNSTREAM_HEADS)}
    unexpected = sorted(set(used) - expected)
    missing = sorted(expected - set(used))
    missing_heads = [k for k in missing if k.startswith(("mlm_score.", "itm_score."))]
    if allow_missing_heads and missing_heads:
        logger.warning("checkpoint has no %s: those heads keep their random init", sorted(
            {k.split(".")[0] for k in missing_heads}))
        missing = [k for k in missing if k not in missing_heads]
    if unexpected or missing:
        hint = (" (a fine-tuned checkpoint without pretraining heads loads with allow_missing_heads=True)"
                if missing_heads and not allow_missing_heads else "")
        raise ValueError(f"official METER checkpoint does not match the model: unexpected keys {unexpected}, "
                         f"missing keys {missing}{hint}")
    vision = {k[len("vit_model."):]: v for k, v in used.items() if k.startswith(OFFICIAL_VISION_PREFIX)}
    ours = {"vit_model." + k: v for k, v in clip_to_timm_state_dict(vision, model.vit_model).items()}
    ours.update({k: v for k, v in used.items() if not k.startswith("vit_model.")})
    return ours


# METER's own config (zdou0830/METER meter/config.py, also saved by Lightning as ckpt["hyper_parameters"]["config"]
# and in hparams.yaml) -> METERConfig. Keys with the same name and meaning pass through (hidden_size, num_heads,
# mlp_ratio, max_text_len, vocab_size, image_size, patch_size).
OFFICIAL_CONFIG_RENAMES = {"num_top_layer": "num_fusion_layers", "drop_rate": "dropout",
                           "input_text_embed_size": "text_hidden_size", "input_image_embed_size": "vit_width"}
# Read but mapped by rule: `tokenizer` (roberta-* / bert-*: the text tower type), `vit` (a CLIP name 'ViT-B/16':
# its patch size; Swin is not supported), `loss_names` (which pretraining heads the checkpoint has).
OFFICIAL_CONFIG_RULES = ("tokenizer", "vit", "loss_names")
# METER keys that do not change the network: training, data, logging and environment settings; `num_layers` sizes
# a BertConfig whose layer count METER never uses (the fusion depth is num_top_layer); `vqav2_label_size` and
# `resolution_before` concern downstream heads / Swin, which the importer does not build.
OFFICIAL_CONFIG_IGNORED = frozenset({
    "exp_name", "seed", "datasets", "batch_size", "train_transform_keys", "val_transform_keys", "draw_false_image",
    "image_only", "resolution_before", "vqav2_label_size", "whole_word_masking", "mlm_prob", "draw_false_text",
    "num_layers", "optim_type", "learning_rate", "weight_decay", "decay_power", "max_epoch", "max_steps",
    "warmup_steps", "end_lr", "lr_mult_head", "lr_mult_cross_modal", "get_recall_metric", "resume_from",
    "fast_dev_run", "val_check_interval", "test_only", "data_root", "log_dir", "per_gpu_batchsize", "num_gpus",
    "num_nodes", "load_path", "num_workers", "precision"})
CLIP_PATCH_SIZES = {"ViT-B/32": 32, "ViT-B/16": 16, "ViT-L/14": 14, "ViT-L/14@336px": 14}


def read_official_checkpoint(path: str) -> tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state dict, METER config dict or None) of an official METER file: a Lightning ``.ckpt`` keeps the config
    under ``hyper_parameters["config"]`` (``save_hyperparameters()``); a plain state-dict file has none."""
    if not os.path.isfile(path) or path.endswith(".safetensors"):
        return read_state_dict(path), None
    from ..vision import is_torchscript_archive

    if is_torchscript_archive(path):
        return read_state_dict(path), None
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        hparams = obj.get("hyper_parameters")
        if isinstance(hparams, dict) and isinstance(hparams.get("config"), dict):
            hparams = hparams["config"]
        return obj["state_dict"], dict(hparams) if isinstance(hparams, dict) else None
    return read_state_dict(path), None


def read_meter_config_file(path: str) -> dict:
    """A METER config as JSON, or YAML (Lightning's hparams.yaml: ``config: {...}``; read with safe_load)."""
    import yaml

    with open(path) as f:
        text = f.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"--meter-config {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{' '.join(str(err).split())}") from None
    if isinstance(values, dict) and set(values) == {"config"} and isinstance(values["config"], dict):
        values = values["config"]
    if not isinstance(values, dict):
        raise ValueError(f"--meter-config {path} must hold a mapping of config keys, got {type(values).__name__}")
    return values


def overrides_from_official_config(values: Optional[dict], source: str = "meter config",
                                   strict: bool = True) -> tuple[dict, dict]:
    """METER's config keys (and/or METERConfig fields) -> (METERConfig overrides, report).

    report = {"used": {key: field}, "ignored": [training-only keys], "heads": {"mlm": bool, "itm": bool} or None}.
    A key that is neither a METER key nor a METERConfig field is an error when ``strict`` (a user's file: a typo
    would otherwise be dropped) and ignored with a warning otherwise (a checkpoint's own hyper_parameters, which a
    later METER version may extend).
    """
    known = {f.name for f in dataclasses.fields(METERConfig)}
    overrides: dict = {}
    used: dict = {}
    ignored: list = []
    heads = None

    def put(field: str, value, key: str) -> None:
        if field in overrides and overrides[field] != value:
            raise ValueError(f"{source}: '{key}' sets {field}={value!r} but another key set {field}="
                             f"{overrides[field]!r}; give one of them")
        overrides[field] = value
        used[key] = field

    for key, value in (values or {}).items():
        if key in known:
            put(key, value, key)
        elif key in OFFICIAL_CONFIG_RENAMES:
            put(OFFICIAL_CONFIG_RENAMES[key], value, key)
        elif key == "tokenizer":
            name = str(value).lower()
            if "roberta" not in name and "bert" not in name:
                raise ValueError(f"{source}: tokenizer={value!r}: only RoBERTa and BERT text towers are supported")
            put("text_model_type", "roberta" if "roberta" in name else "bert", key)
        elif key == "vit":
            if "swin" in str(value).lower():
                raise ValueError(f"{source}: vit={value!r}: METER's Swin image towers are not supported "
                                 f"(CLIP ViT only)")
            if value in CLIP_PATCH_SIZES:
                put("patch_size", CLIP_PATCH_SIZES[value], key)
            else:  # a local CLIP file path (METER's build_model accepts one): its sizes come from the tensors
                ignored.append(key)
        elif key == "loss_names":
            if not isinstance(value, dict):
                raise ValueError(f"{source}: loss_names must be a mapping (METER's _loss_names), got {value!r}")
            heads = {"mlm": float(value.get("mlm", 0)) > 0, "itm": float(value.get("itm", 0)) > 0}
            used[key] = "pretraining heads"
        elif key in OFFICIAL_CONFIG_IGNORED:
            ignored.append(key)
        elif not strict:
            logger.warning("%s: unknown METER config key %r ignored", source, key)
            ignored.append(key)
        else:
            raise ValueError(f"{source}: unknown key {key!r}: neither a METER config key (meter/config.py) nor a "
                             f"METERConfig field; METERConfig fields: {sorted(known)}")
    if "text_model_type" in overrides and "text_layer_norm_eps" not in overrides:
        overrides["text_layer_norm_eps"] = TEXT_LAYER_NORM_EPS[overrides["text_model_type"]]
    return overrides, {"used": used, "ignored": sorted(ignored), "heads": heads}


def _resolve_official(path_or_state_dict, meter_config: Optional[dict | str] = None):
    """(state dict, METERConfig, heads the config says are absent, reports) of an official METER checkpoint."""
    if isinstance(meter_config, str):
        meter_config = read_meter_config_file(meter_config)
    hparams = None
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state_dict, hparams = read_official_checkpoint(str(path_or_state_dict))
    else:
        state_dict = dict(path_or_state_dict)
    overrides, reports, heads_absent = {}, {}, False
    for source, values in (("checkpoint hyper_parameters", hparams), ("meter_config", meter_config)):
        if values:
            found, report = overrides_from_official_config(values, source, strict=source == "meter_config")
            overrides.update(found)
            reports[source] = report
            logger.info("%s: used %s; ignored (training-only) %s", source,
                        ", ".join(f"{k}->{v}" for k, v in report["used"].items()) or "nothing",
                        ", ".join(report["ignored"]) or "nothing")
            if report["heads"] is not None and not all(report["heads"].values()):
                heads_absent = True  # METER builds mlm_score / itm_score only for losses > 0
    return state_dict, meter_config_from_official(state_dict, overrides), heads_absent, reports


def official_meter_config(path: str, meter_config: Optional[dict | str] = None) -> METERConfig:
    """The METERConfig of an official checkpoint (tensor shapes, its hyper_parameters, ``meter_config``), e.g. the
    architecture of a fine-tuning run started from it."""
    return _resolve_official(path, meter_config)[1]


def load_official_meter(path_or_state_dict, meter_config: Optional[dict | str] = None,
                        allow_missing_heads: bool = False) -> METER:
    """Build our METER from an official METER checkpoint (PyTorch-Lightning ``.ckpt``: ``["state_dict"]``).

    Sizes come from the tensor shapes. What shapes cannot tell (head counts, max_text_len, dropout, the text tower
    type, a new image_size) comes from, in increasing priority: the checkpoint's own Lightning
    ``hyper_parameters["config"]``, then ``meter_config`` — a dict, or a JSON / YAML file (Lightning's hparams.yaml
    works), holding METER's own config keys (``hidden_size num_top_layer num_heads mlp_ratio
    input_text_embed_size input_image_embed_size vit tokenizer max_text_len patch_size image_size drop_rate``...;
    training-only keys are ignored) and/or METERConfig fields. Which keys were used and which ignored is logged and
    kept in ``model.official_config_report``. ``loss_names`` with ``mlm``/``itm`` at 0 allows the checkpoint to
    lack those heads. Load only trusted files: Lightning checkpoints are pickles.
    """
    state_dict, cfg, heads_absent, reports = _resolve_official(path_or_state_dict, meter_config)
    allow_missing_heads = allow_missing_heads or heads_absent
    model = METER(cfg)
    missing_heads_ok = model.load_state_dict(
        from_official_state_dict(state_dict, model, allow_missing_heads), strict=not allow_missing_heads)
    if allow_missing_heads:
        stray = [k for k in missing_heads_ok.missing_keys if not k.startswith(("mlm_score.", "itm_score."))]
        if stray or missing_heads_ok.unexpected_keys:
            raise ValueError(f"unexpected load result: missing {stray}, unexpected {missing_heads_ok.unexpected_keys}")
    model.official_config_report = reports
    return model
