"""Where trained weights come from: a run dir, one DeepSpeed checkpoint, an export dir or an official METER .ckpt.

    source = locate("runs/meter_4m")              # newest COMPLETE checkpoint of the run
    config = read_config_dict(source)             # the resolved run config saved with it (dict), None if official
    weights = read_weights(source)                # fp32, our key layout (official: METER's key layout)

DeepSpeed checkpoints are consolidated with DeepSpeed's own `zero_to_fp32` (the fp32 master weights from the
optimizer partitions), so the result does not depend on the world size that wrote them. Checkpoints whose
optimizer state is not ZeRO-partitioned (stage 0) fall back to the module weights in `mp_rank_00_model_states.pt`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

log = logging.getLogger(__name__)

VLM_ENGINE = "vlm"  # tag of the main VLM engine inside a step_* checkpoint (epic.engine.checkpoint)
GENERATOR_ENGINE = "generator"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "deepspeed" | "export" | "official"
    path: Path  # step_* checkpoint dir | export dir | .ckpt file

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def locate(path: str | Path) -> WeightSource:
    """A run dir / its checkpoints dir / a step_* dir, an export dir, or an official METER .ckpt file."""
    from epic.engine.checkpoint import find_checkpoint

    path = Path(path)
    if path.is_file():
        return WeightSource("official", path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run dir, a checkpoint dir (step_*), an export dir "
                                f"(tools/export.py) or an official METER .ckpt")
    if (path / EXPORT_WEIGHTS).is_file() and (path / EXPORT_CONFIG).is_file():
        return WeightSource("export", path)
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (no step_*/COMPLETE) and is not an export "
                                f"dir ({EXPORT_WEIGHTS} + {EXPORT_CONFIG}); has the run saved one yet?")
    return WeightSource("deepspeed", found)


def run_dir_of(source: WeightSource) -> Optional[Path]:
    """The run dir that wrote a DeepSpeed checkpoint (…/RUN/checkpoints/step_*), else None."""
    if source.kind == "deepspeed" and source.path.parent.name == "checkpoints":
        return source.path.parent.parent
    return None


def read_config_dict(source: WeightSource) -> Optional[dict]:
    """The resolved config the weights were trained with; for an official METER checkpoint only its `model`
    section, from the tensor shapes and its Lightning hyper_parameters (plus a METER config beside it, FILE.json,
    as for a teacher)."""
    if source.kind == "deepspeed":
        from epic.engine.checkpoint import read_trainer_state

        state = read_trainer_state(source.path)
        if "config" not in state:
            raise KeyError(f"{source.path}/trainer_state.json has no 'config'; it was not written by epic's trainer")
        return state["config"]
    if source.kind == "export":
        with open(source.path / EXPORT_CONFIG) as f:
            return yaml.safe_load(f)
    import dataclasses

    from epic.models.meter import official_meter_config

    beside = source.path.with_suffix(".json")
    cfg = official_meter_config(str(source.path), str(beside) if beside.is_file() else None)
    return {"model": {**dataclasses.asdict(cfg), "vit_pretrained": None, "text_pretrained": None}}


def read_step(source: WeightSource) -> int:
    if source.kind == "deepspeed":
        from epic.engine.checkpoint import read_trainer_state

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
