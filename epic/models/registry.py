"""Model families by name: ``model.family`` in a run config picks the config class, model class and official
converter (as LAVIS's ``arch`` and timm's ``register_model`` do).

A family joins with one entry in ``FAMILIES`` (import paths as strings: importing this module imports no family;
each is imported the first time it is asked for). Its modules must provide

    config     a dataclass with a ``family`` field (the ``model:`` section of the YAML is validated against it)
    model      a ``epic.models.interface.VLPModel`` subclass (``from_config``, ``from_pretrained``, ...)
    converter  ``load_official(path, config=None) -> model``: the official checkpoint -> our model
    tasks      optional ``build_task_model(task, config, num_answers) -> model`` for epic/finetune.py
    official_config  optional ``(path, config=None) -> config``: an official file's architecture without its weights
    tiny_config  the name of a packaged run config (epic/configs/) with a tiny model of the family: the
               interface conformance test (tests/test_model_interface.py) builds it, so a new family is tested
               against the interface the moment it is registered

    model = build_model(cfg.model)                          # the family's from_config
    model = load_official("meter", "meter_clip16_288_roberta_pretrain.ckpt")
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Optional

from epic.config import register_model_config


@dataclass(frozen=True)
class Family:
    name: str
    config: str  # "module:ConfigClass"
    model: str  # "module:ModelClass"
    converter: str  # "module:function" -> load_official(path, config=None)
    tasks: Optional[str] = None  # "module:function" -> build_task_model(task, config, num_answers)
    tiny_config: str = ""  # a packaged run config with a tiny model (tests/test_model_interface.py builds it)
    official_config: Optional[str] = None  # "module:function" -> (path, config=None) -> the file's model config
    # the data.normalization (epic.data.transforms) its official weights were trained with: what fine-tuning and
    # evaluation of an official checkpoint normalise with unless the config says otherwise
    normalization: str = "clip"


FAMILIES: dict[str, Family] = {
    "meter": Family("meter", config="epic.models.meter.configuration_meter:METERConfig",
                    model="epic.models.meter.modeling_meter:METER",
                    converter="epic.models.meter.convert_meter:load_official_meter",
                    tasks="epic.models.downstream:build_task_model", tiny_config="shapes_tiny",
                    official_config="epic.models.meter.convert_meter:official_meter_config"),
    "vilt": Family("vilt", config="epic.models.vilt.configuration_vilt:ViLTConfig",
                   model="epic.models.vilt.modeling_vilt:ViLT",
                   converter="epic.models.vilt.convert_vilt:load_official_vilt",
                   tasks="epic.models.vilt.tasks_vilt:build_task_model", tiny_config="vilt_shapes_tiny",
                   official_config="epic.models.vilt.convert_vilt:official_vilt_config",
                   normalization="inception"),  # ViLT's pixelbert transform: mean = std = 0.5
    "albef": Family("albef", config="epic.models.albef.configuration_albef:ALBEFConfig",
                    model="epic.models.albef.modeling_albef:ALBEF",
                    converter="epic.models.albef.convert_albef:load_official_albef",
                    tasks="epic.models.albef.tasks_albef:build_task_model", tiny_config="albef_shapes_tiny",
                    official_config="epic.models.albef.convert_albef:official_albef_config"),
    "xvlm": Family("xvlm", config="epic.models.xvlm.configuration_xvlm:XVLMConfig",
                   model="epic.models.xvlm.modeling_xvlm:XVLM",
                   converter="epic.models.xvlm.convert_xvlm:load_official_xvlm",
                   tasks="epic.models.xvlm.tasks_xvlm:build_task_model", tiny_config="xvlm_shapes_tiny",
                   official_config="epic.models.xvlm.convert_xvlm:official_xvlm_config"),
}


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown model family {name!r}.{hint} Registered families: {', '.join(FAMILIES)} "
                       f"(epic/models/registry.py)")
    return FAMILIES[name]


def config_class(family: str) -> type:
    return _import(get_family(family).config)


def model_class(family: str) -> type:
    return _import(get_family(family).model)


def family_of(config) -> str:
    """The family name of a model config dataclass (its ``family`` field)."""
    name = getattr(config, "family", None)
    if name is None:
        raise ValueError(f"{type(config).__name__} has no 'family' field; every family config needs one")
    return name


def build_model(config):
    """A freshly initialised model of ``config``'s family (``Model.from_config``)."""
    return model_class(family_of(config)).from_config(config)


def load_official(family: str, path: str, config=None, **options):
    """An official checkpoint of ``family`` -> our model (``config``: the family's own config values, a dict or a
    JSON path; ``options``: the converter's own switches, e.g. METER's ``allow_missing_heads``)."""
    return _import(get_family(family).converter)(path, config, **options)


def official_config(family: str, path: str, config=None):
    """The model config an official checkpoint of ``family`` holds (without loading its weights), or None when the
    family registers no ``official_config``."""
    entry = get_family(family)
    return None if entry.official_config is None else _import(entry.official_config)(path, config)


def build_task_model(task: str, config, num_answers: int = 0):
    """The downstream model of ``task`` for ``config``'s family (epic/finetune.py, epic/evaluate.py)."""
    entry = get_family(family_of(config))
    if entry.tasks is None:
        raise ValueError(f"model family {entry.name!r} registers no downstream task models (Family.tasks)")
    return _import(entry.tasks)(task, config, num_answers)


for _entry in FAMILIES.values():  # epic.config validates `model:` against the family's dataclass
    register_model_config(_entry.name, lambda entry=_entry: _import(entry.config))
