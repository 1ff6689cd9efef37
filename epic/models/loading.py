"""The one weight loader: a run dir, one DeepSpeed checkpoint, an export dir or an official checkpoint -> a model.

    loaded = load_model("runs/meter_4m")          # LoadedModel(model, source, config): any family, via the registry
    source = locate("runs/meter_4m")              # newest COMPLETE checkpoint of the run
    config = read_config_dict(source)             # the resolved run config saved with it (dict), None if official
    weights = read_weights(source)                # fp32, our key layout (official: the family's own key layout)

The teacher (epic.models.teacher), fine-tuning, evaluation and tools/export.py all read weights through here.

DeepSpeed checkpoints are consolidated with DeepSpeed's own `zero_to_fp32` (the fp32 master weights from the
optimizer partitions), so the result does not depend on the world size that wrote them. Checkpoints whose
optimizer state is not ZeRO-partitioned (stage 0) fall back to the module weights in `mp_rank_00_model_states.pt`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from epic.ckpt_files import find_checkpoint, read_trainer_state

from .interface import CONSISTENCY_HEAD

log = logging.getLogger(__name__)

VLM_ENGINE = "vlm"  # tag of the main VLM engine inside a step_* checkpoint (epic.engine.checkpoint)
GENERATOR_ENGINE = "generator"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"  # the resolved run config (tools/export.py)
MODEL_CONFIG = "config.json"  # the bare model config (VLPModel.save_pretrained)


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "deepspeed" | "export" | "official"
    path: Path  # step_* checkpoint dir | export dir | .ckpt file

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def locate(path: str | Path) -> WeightSource:
    """A run dir / its checkpoints dir / a step_* dir, an export dir, or an official checkpoint file."""
    path = Path(path)
    if path.is_file():
        return WeightSource("official", path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run dir, a checkpoint dir (step_*), an export dir "
                                f"(tools/export.py) or an official METER .ckpt")
    if (path / EXPORT_WEIGHTS).is_file() and ((path / EXPORT_CONFIG).is_file() or (path / MODEL_CONFIG).is_file()):
        return WeightSource("export", path)
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (no step_*/COMPLETE) and is not an export "
                                f"dir ({EXPORT_WEIGHTS} + {EXPORT_CONFIG} or {MODEL_CONFIG}); has the run saved one yet?")
    return WeightSource("deepspeed", found)


def run_dir_of(source: WeightSource) -> Optional[Path]:
    """The run dir that wrote a DeepSpeed checkpoint (…/RUN/checkpoints/step_*), else None."""
    if source.kind == "deepspeed" and source.path.parent.name == "checkpoints":
        return source.path.parent.parent
    return None


def read_config_dict(source: WeightSource) -> Optional[dict]:
    """The resolved config the weights were trained with; for an official checkpoint its ``model`` section, from
    its family's ``official_config`` (tensor shapes, the file's own hyper-parameters, FILE.json beside it; None if
    the family registers none), and the family's ``data.normalization``."""
    if source.kind == "deepspeed":
        state = read_trainer_state(source.path)
        if "config" not in state:
            raise KeyError(f"{source.path}/trainer_state.json has no 'config'; it was not written by epic's trainer")
        return state["config"]
    if source.kind == "export":
        if (source.path / EXPORT_CONFIG).is_file():
            with open(source.path / EXPORT_CONFIG) as f:
                return yaml.safe_load(f)
        return {"model": json.loads((source.path / MODEL_CONFIG).read_text())}  # save_pretrained: the model only
    from .registry import family_of, get_family

    cfg = official_model_config(source.path)
    if cfg is None:
        return None
    return {"model": dataclasses.asdict(without_local_weights(cfg)),
            "data": {"normalization": get_family(family_of(cfg)).normalization}}


def read_step(source: WeightSource) -> int:
    if source.kind == "deepspeed":
        return int(read_trainer_state(source.path).get("step", 0))
    if source.kind == "export" and (source.path / "export.json").is_file():
        return int(json.loads((source.path / "export.json").read_text()).get("step", 0))
    return 0


def has_engine(source: WeightSource, engine: str) -> bool:
    return source.kind == "deepspeed" and (source.path / engine).is_dir()


def read_deepspeed_weights(ckpt_dir: Path, engine: str = VLM_ENGINE) -> dict[str, torch.Tensor]:
    """fp32 weights of one engine of a step_* checkpoint, independent of the world size that wrote it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (ckpt_dir / engine).is_dir():
        raise FileNotFoundError(f"{ckpt_dir} has no '{engine}' engine checkpoint (found "
                                f"{sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())})")
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=engine)
    except (ValueError, KeyError, FileNotFoundError, AssertionError) as err:
        module_file = ckpt_dir / engine / "mp_rank_00_model_states.pt"
        if not module_file.is_file():
            raise
        log.info("zero_to_fp32 does not apply to %s (%s): reading the module weights", ckpt_dir / engine, err)
        state = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_weights(source: WeightSource, engine: str = VLM_ENGINE) -> dict[str, torch.Tensor]:
    if source.kind == "deepspeed":
        return read_deepspeed_weights(source.path, engine)
    if source.kind == "export":
        from safetensors.torch import load_file

        if engine == VLM_ENGINE:
            return load_file(str(source.path / EXPORT_WEIGHTS))
        raise ValueError(f"an export dir holds the '{engine}' weights in HF format under {source.path}/{engine}")
    from epic.models.vision import read_state_dict

    return read_state_dict(str(source.path))


def tokenizer_path(source: WeightSource, config: Optional[dict]) -> Optional[str]:
    """The tokenizer the weights were trained with: export's own copy, else the run config's."""
    if source.kind == "export" and (source.path / "tokenizer").is_dir():
        return str(source.path / "tokenizer")
    data = (config or {}).get("data", {})
    if data.get("tokenizer"):
        return data["tokenizer"]
    if data.get("root"):
        return str(Path(data["root"]) / "tokenizer")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Weights -> model, for every family
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: torch.nn.Module  # a VLPModel of the family the source names, weights loaded, in train mode
    source: WeightSource
    config: Optional[dict]  # the resolved run config the weights were trained with (None: official / bare export)

    def run_config(self):
        """``config`` as an ``epic.config.Config`` (a pretraining run's)."""
        from epic.config import config_from_dict

        if self.config is None or "run" not in self.config:
            raise ValueError(f"{self.source.describe()} carries no run config")
        return config_from_dict(self.config)


def without_local_weights(model_cfg):
    """The model config with its local pretrained-tower paths (fields named ``*_pretrained``) cleared: the weights
    come from the checkpoint, so the original files are not read again."""
    cleared = {f.name: None for f in dataclasses.fields(model_cfg) if f.name.endswith("_pretrained")}
    return dataclasses.replace(model_cfg, **cleared)


def model_config_from_dict(values: dict, source: str = "model"):
    """A saved ``model:`` section (or a save_pretrained config.json) -> the family's config dataclass."""
    from epic.config import ConfigError, build_model_section

    try:
        return without_local_weights(build_model_section(dict(values), "model"))
    except ConfigError as err:
        raise ValueError(f"{source}: its model config does not fit this code ({err})") from err


def model_from_weights(model_cfg, weights: dict, source: str):
    """Build ``model_cfg``'s family (registry) and load ``weights`` strictly; an EPIC run's consistency head is
    rebuilt when the weights have it."""
    from .registry import build_model

    fields = {f.name for f in dataclasses.fields(model_cfg)}
    if "consistency_head" in fields and any(k.startswith(CONSISTENCY_HEAD + ".") for k in weights):
        model_cfg = dataclasses.replace(model_cfg, consistency_head=True)
    model = build_model(model_cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the saved config (missing {missing[:8]}, unexpected "
                         f"{unexpected[:8]})")
    return model


def official_family_and_overrides(path: Path, family: Optional[str] = None) -> tuple[str, Optional[dict]]:
    """``X.ckpt`` may have an ``X.json`` beside it with config values its tensors cannot tell (head counts...) and,
    optionally, ``"family"`` (default: ``family``, else METER)."""
    beside = Path(path).with_suffix(".json")
    overrides = json.loads(beside.read_text()) if beside.is_file() else None
    if overrides is not None and "family" in overrides:
        family = family or overrides["family"]
        overrides = {k: v for k, v in overrides.items() if k != "family"}
    return family or "meter", overrides


def official_model_config(path: Path, family: Optional[str] = None):
    """The model config of an official checkpoint (its family's ``official_config``), or None."""
    from .registry import official_config

    family, overrides = official_family_and_overrides(path, family)
    return official_config(family, str(path), overrides)


def load_official_file(path: Path, family: Optional[str] = None, **converter_options):
    """An official checkpoint through its family's converter (registry), with the JSON beside it."""
    from .registry import load_official

    family, overrides = official_family_and_overrides(path, family)
    return load_official(family, str(path), overrides, **converter_options)


def load_model(path: str | Path, engine: str = VLM_ENGINE, family: Optional[str] = None,
               allow_missing_heads: bool = True) -> LoadedModel:
    """Any weight source -> (model, source, run config). ``family`` only matters for official files (default:
    the ``family`` of the JSON beside the file, else METER); every other source names its family in its config.
    ``allow_missing_heads``: an official checkpoint without pretraining heads (a fine-tuned one) still loads."""
    source = locate(path)
    if source.kind == "official":
        model = load_official_file(source.path, family, allow_missing_heads=allow_missing_heads)
        return LoadedModel(model, source, None)
    config = read_config_dict(source)
    if not config or "model" not in config:
        raise ValueError(f"{source.describe()} has no model config")
    model_cfg = model_config_from_dict(config["model"], source.describe())
    model = model_from_weights(model_cfg, read_weights(source, engine), source.describe())
    return LoadedModel(model, source, config if "run" in config else None)
