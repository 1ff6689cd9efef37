"""Read X-VLM's released checkpoints (zengyan-97/X-VLM, e.g. ``4m_base_model_state_step_199999.th``) and write ours
back in its key layout.

A released file is ``{'model': state_dict, 'config': ...}`` (or a bare state dict) with X-VLM's names:
``vision_encoder.*`` (Microsoft's Swin: patch merging at the *end* of a stage, persistent ``relative_position_index``
and ``attn_mask`` buffers), ``text_encoder.bert.*`` + ``text_encoder.cls.predictions.*`` (xbert; decoder tied to the
word embeddings, ``position_ids`` buffer), ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, ``bbox_head``.
Ours differ only in the Swin tower (timm: merging at the *start* of the next stage, derived buffers not stored)
and in storing the tied decoder and its bias once.

``config`` is X-VLM's own configuration (``configs/Pretrain_XVLM_base_4m.yaml`` keys) in which ``vision_config``
and ``text_config`` hold the Swin JSON and the BERT JSON (with ``fusion_layer``) as dicts instead of file paths,
or a path to such a JSON file; a config stored in the checkpoint wins.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Union

import torch

from .configuration_xvlm import XVLMConfig
from .modeling_xvlm import XVLM

#: Swin JSON keys X-VLM reads (``ckpt`` names the ImageNet weights, not needed for a full checkpoint)
SWIN_JSON_KEYS = {"ckpt", "vision_width", "image_res", "window_size", "embed_dim", "depths", "num_heads"}
#: BERT JSON keys of X-VLM's config_bert*.json (HF BertConfig plus fusion_layer / encoder_width)
BERT_JSON_KEYS = {"architectures", "attention_probs_dropout_prob", "gradient_checkpointing", "hidden_act",
                  "hidden_dropout_prob", "hidden_size", "initializer_range", "intermediate_size", "layer_norm_eps",
                  "max_position_embeddings", "model_type", "num_attention_heads", "num_hidden_layers", "pad_token_id",
                  "position_embedding_type", "transformers_version", "type_vocab_size", "use_cache", "vocab_size",
                  "fusion_layer", "encoder_width", "torch_dtype", "layer_norm_type"}
_BERT_TO_OURS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
                 "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
                 "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
                 "layer_norm_eps": "layer_norm_eps", "hidden_dropout_prob": "hidden_dropout_prob",
                 "attention_probs_dropout_prob": "attention_probs_dropout_prob", "pad_token_id": "pad_token_id",
                 "fusion_layer": "fusion_layer", "initializer_range": "initializer_range"}
#: official keys rebuilt from the config (checked when present, filled when absent)
_DERIVED = re.compile(r"(relative_position_index|attn_mask|embeddings\.position_ids|predictions\.decoder\.bias)$")
#: official keys X-VLM's forward never reads (a Swin classifier, when a checkpoint kept it)
_UNUSED = re.compile(r"^vision_encoder\.head\.")


class XVLMConversionError(ValueError):
    """The checkpoint or its config does not describe the X-VLM architecture we build (the message says what)."""


# ---------------------------------------------------------------------------------------------------- config
def _read_json_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise FileNotFoundError(f"X-VLM config {config!r} does not exist (give X-VLM's config as a dict or a "
                                    "JSON file with vision_config / text_config as dicts)")
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise XVLMConversionError(f"X-VLM config must be a dict or a JSON path, got {type(config).__name__}")
    return config


def xvlm_config_from_official(config: Union[dict, str]) -> XVLMConfig:
    """XVLMConfig from X-VLM's own config (Pretrain_XVLM_base_4m.yaml keys, vision_config / text_config as dicts)."""
    config = _read_json_config(config)
    for key in ("vision_config", "text_config", "image_res", "embed_dim", "temp"):
        if key not in config:
            raise XVLMConversionError(f"X-VLM config lacks '{key}' (Pretrain_XVLM_base_4m.yaml has it)")
    if config.get("use_clip_vit", False) or not config.get("use_swin", True):
        raise XVLMConversionError("only X-VLM's Swin variant is supported (use_swin: true, use_clip_vit: false)")
    if config.get("use_roberta", False):
        raise XVLMConversionError("only X-VLM's BERT text encoder is supported (use_roberta: false)")
    vision, text = config["vision_config"], config["text_config"]
    for name, value, known in (("vision_config", vision, SWIN_JSON_KEYS), ("text_config", text, BERT_JSON_KEYS)):
        if isinstance(value, str):
            raise XVLMConversionError(f"{name} is the path {value!r}; put the JSON's contents (a dict) there instead")
        unknown = sorted(set(value) - known)
        if unknown:
            raise XVLMConversionError(f"{name} has keys this converter does not know: {unknown}; known: {sorted(known)}")
    for key in ("window_size", "embed_dim", "depths", "num_heads"):
        if key not in vision:
            raise XVLMConversionError(f"vision_config lacks '{key}' (config_swinB_224.json has it)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "fusion_layer"):
        if key not in text:
            raise XVLMConversionError(f"text_config lacks '{key}' (config_bert.json has it)")
    if text.get("hidden_act", "gelu") != "gelu" or text.get("position_embedding_type", "absolute") != "absolute":
        raise XVLMConversionError("text_config must use hidden_act 'gelu' and absolute position embeddings")
    image_res = int(config["image_res"])
    if "image_res" in vision and int(vision["image_res"]) != image_res:
        raise XVLMConversionError(f"image_res {image_res} differs from vision_config image_res {vision['image_res']}")
    values = dict(image_size=image_res, swin_window_size=int(vision["window_size"]),
                  swin_embed_dim=int(vision["embed_dim"]), swin_depths=list(vision["depths"]),
                  swin_num_heads=list(vision["num_heads"]), embed_dim=int(config["embed_dim"]),
                  temp=float(config["temp"]))
    values.update({ours: text[theirs] for theirs, ours in _BERT_TO_OURS.items() if theirs in text})
    cfg = XVLMConfig(**values)
    if "vision_width" in vision and int(vision["vision_width"]) != cfg.vision_width:
        raise XVLMConversionError(f"vision_config vision_width {vision['vision_width']} does not match embed_dim x "
                                  f"2^(stages-1) = {cfg.vision_width}")
    if "patch_size" in config and int(config["patch_size"]) != cfg.image_stride:
        raise XVLMConversionError(f"patch_size {config['patch_size']} must be the Swin output stride {cfg.image_stride}")
    return cfg


# ------------------------------------------------------------------------------------------------ state dicts
def _swin_to_official(key: str) -> str:
    return re.sub(r"^vision_encoder\.layers\.(\d+)\.downsample",
                  lambda m: f"vision_encoder.layers.{int(m.group(1)) - 1}.downsample", key)


def _swin_from_official(key: str) -> str:
    return re.sub(r"^vision_encoder\.layers\.(\d+)\.downsample",
                  lambda m: f"vision_encoder.layers.{int(m.group(1)) + 1}.downsample", key)


def to_official_state_dict(model: XVLM) -> Dict[str, torch.Tensor]:
    """Our weights under X-VLM's names, with the buffers and tied copies X-VLM's state dict holds."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(("itc_score.",)):
            continue  # EPIC's consistency head is ours, X-VLM has none
        out[_swin_to_official(key)] = value
    for name, buffer in model.vision_encoder.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")) and buffer is not None:
            out[_swin_to_official(f"vision_encoder.{name}")] = buffer.float() if buffer.is_floating_point() else buffer
    out["temp"] = out["temp"].reshape(())  # X-VLM's temperature is 0-d (ours [1], see XVLM.__init__)
    head = model.text_encoder.cls.predictions
    out["text_encoder.cls.predictions.decoder.bias"] = head.bias.detach()
    out["text_encoder.bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    return out


def from_official_state_dict(official: Dict[str, torch.Tensor], model: XVLM) -> Dict[str, torch.Tensor]:
    """X-VLM's state dict -> ours for ``model``; unknown, missing or misshapen keys are an error."""
    expected = to_official_state_dict(model)
    unknown = sorted(k for k in official if k not in expected and not _UNUSED.search(k))
    missing = sorted(k for k in expected if k not in official and not _DERIVED.search(k))
    if unknown or missing:
        raise XVLMConversionError(
            f"checkpoint keys do not match X-VLM as configured: {len(unknown)} unknown {unknown[:10]}, "
            f"{len(missing)} missing {missing[:10]}. Check the config (depths, layers, fusion_layer) against the "
            "checkpoint; a fine-tuned checkpoint lacks pretraining heads such as bbox_head")
    bad = [f"{k}: {tuple(official[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in official and tuple(official[k].shape) != tuple(v.shape)]
    if bad:
        raise XVLMConversionError(f"checkpoint shapes do not match the config: {bad[:10]}")
    for key, value in expected.items():
        if _DERIVED.search(key) and key in official and not key.endswith("decoder.bias"):
            if not torch.equal(official[key].to(value.dtype), value):
                raise XVLMConversionError(f"buffer {key} differs from the one the config implies (window size?)")
    decoder = official["text_encoder.cls.predictions.decoder.weight"]
    if not torch.equal(decoder, official["text_encoder.bert.embeddings.word_embeddings.weight"]):
        raise XVLMConversionError("text_encoder.cls.predictions.decoder.weight differs from the word embeddings; "
                                  "X-VLM ties them and so does this model")
    if "text_encoder.cls.predictions.decoder.bias" in official and not torch.equal(
            official["text_encoder.cls.predictions.decoder.bias"], official["text_encoder.cls.predictions.bias"]):
        raise XVLMConversionError("text_encoder.cls.predictions.decoder.bias differs from .bias (they are tied)")
    ours = {}
    for key, value in official.items():
        if _DERIVED.search(key) or _UNUSED.search(key):
            continue
        ours[_swin_from_official(key)] = value.reshape(1) if key == "temp" else value
    return ours


def read_official_checkpoint(path: str) -> tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(state_dict, config or None) of an X-VLM checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"X-VLM checkpoint {path!r} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=False)  # X-VLM pickles its config next to the weights
    if isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):
        return blob["model"], blob.get("config")
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob, None
    raise XVLMConversionError(f"{path} is neither {{'model': state_dict, ...}} nor a bare state dict")


def _official_config_dict(path: str, config, stored):
    if stored is not None and isinstance(stored, dict) and isinstance(stored.get("vision_config"), dict) \
            and isinstance(stored.get("text_config"), dict):
        return stored
    if config is None:
        raise XVLMConversionError(f"{path} carries no usable config; pass X-VLM's config (dict or JSON path) with "
                                  "vision_config / text_config as dicts")
    return config


def official_xvlm_config(path: str, config: Union[dict, str, None] = None) -> XVLMConfig:
    """The XVLMConfig of a released X-VLM checkpoint (its stored config, else ``config``), e.g. the architecture of a
    fine-tuning run started from it."""
    _, stored = read_official_checkpoint(path)
    return xvlm_config_from_official(_official_config_dict(path, config, stored))


def load_official_xvlm(path: str, config: Union[dict, str, None] = None, consistency_head: bool = False,
                       saliency_query: str = "fused_cls") -> XVLM:
    """An :class:`XVLM` holding a released X-VLM checkpoint. ``config``: X-VLM's own config (dict or JSON path); the
    checkpoint's stored config wins when it carries one. ``consistency_head`` adds EPIC's (new, initialised) head."""
    state, stored = read_official_checkpoint(path)
    cfg = xvlm_config_from_official(_official_config_dict(path, config, stored))
    cfg.consistency_head, cfg.saliency_query = consistency_head, saliency_query
    model = XVLM(cfg)
    ours = from_official_state_dict(state, model)
    ours.update({k: v for k, v in model.state_dict().items() if k.startswith("itc_score.")})
    model.load_state_dict(ours, strict=True)
    return model.eval()
