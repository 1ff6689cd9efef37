"""DeepSpeed engine set-up: batch arithmetic, parameter groups (from the model's ``param_groups_spec()``), the
DeepSpeed config, and the one engine factory (``create_engine``) every engine of a run is made by. Names no model
family."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

class SetupError(ValueError):
    """A problem with the run set-up (config, DeepSpeed JSON, world size) found before training starts."""


@dataclass(frozen=True)
class BatchMath:
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    grad_accum_steps: int


def derive_batch_math(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchMath:
    """global batch = micro batch x gradient-accumulation steps x world size, or a clear error."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step != 0:
        lower = max(per_step, (global_batch_size // per_step) * per_step)
        raise SetupError(
            f"train.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size "
            f"({micro_batch_size}) x world size ({world_size}) = {per_step}. Use a global batch of {lower} or "
            f"{lower + per_step}, or change the micro batch / number of ranks.")
    return BatchMath(global_batch_size, micro_batch_size, world_size, global_batch_size // per_step)


LR_GROUPS = ("backbone", "fusion", "head")  # the groups a model's param_groups_spec() may name


def default_param_groups_spec(model: nn.Module) -> dict:
    """For modules without ``param_groups_spec()``: one group, decay on matrices, none on vectors (nanoGPT's rule)."""
    spec = {"backbone": {"decay": [], "no_decay": []}}
    for name, param in model.named_parameters():
        if param.requires_grad:
            spec["backbone"]["decay" if param.ndim >= 2 else "no_decay"].append(name)
    return spec


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, lr_mults: Optional[Mapping[str, float]] = None
                       ) -> list[dict]:
    """AdamW groups from the model's own ``param_groups_spec()``: (lr group x its multiplier) x (decay | none).

    Groups are ordered by (multiplier, no-decay) and keep the order of ``named_parameters`` inside each group.
    """
    spec = model.param_groups_spec() if hasattr(model, "param_groups_spec") else default_param_groups_spec(model)
    lr_mults = dict(lr_mults or {})
    placement: dict[str, tuple[float, bool]] = {}
    for group, kinds in spec.items():
        if group not in LR_GROUPS:
            raise SetupError(f"{type(model).__name__}.param_groups_spec() names group {group!r}; the trainer knows "
                             f"{LR_GROUPS} (lr multipliers train.lr_mult_fusion / train.lr_mult_head)")
        for kind, names in kinds.items():
            for name in names:
                if name in placement:
                    raise SetupError(f"{type(model).__name__}.param_groups_spec() lists {name!r} twice")
                placement[name] = (float(lr_mults.get(group, 1.0)), kind == "no_decay")
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name not in placement:
            raise SetupError(f"{type(model).__name__}.param_groups_spec() does not place trainable {name!r}")
        mult, no_decay = key = placement[name]
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lr * mult, "lr_mult": mult,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")


def adamw_kernel_options(impl: str = "auto", on_cuda: Optional[bool] = None) -> dict:
    """torch.optim.AdamW's kernel choice for ``train.optimizer_impl``: auto = one fused kernel for all parameters
    on CUDA (``fused=True``), the multi-tensor ``foreach`` path elsewhere; ``for_loop`` is the per-parameter one.
    All compute the same update (tests/test_fast_path.py checks them against a hand-written AdamW step)."""
    if impl not in ADAMW_IMPLS:
        raise SetupError(f"train.optimizer_impl={impl!r}; use one of {', '.join(ADAMW_IMPLS)}")
    if impl == "auto":
        impl = "fused" if (torch.cuda.is_available() if on_cuda is None else on_cuda) else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False, "fused": False}}[impl]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float,
                    lr_mult_fusion: float = 1.0, lr_mult_head: float = 1.0,
                    lr_mults: Optional[Mapping[str, float]] = None, impl: str = "auto") -> torch.optim.AdamW:
    mults = dict(lr_mults) if lr_mults is not None else {"fusion": lr_mult_fusion, "head": lr_mult_head}
    groups = build_param_groups(model, lr, weight_decay, mults)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             **adamw_kernel_options(impl))


# ----------------------------------------------------------------------------------------------------------------
# The engine factory: every DeepSpeed engine of a run (the VLM, the EPIC generator) is made here
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW and the lr schedule of one engine."""

    lr: float
    weight_decay: float
    betas: tuple
    eps: float
    schedule: str
    max_steps: int
    warmup_ratio: float
    hold_ratio: float = 0.8
    final_lr_scale: float = 0.01
    warmup_start_scale: float = 0.0
    lr_mults: Mapping[str, float] = field(default_factory=dict)  # lr group -> multiplier of ``lr``
    impl: str = "auto"  # AdamW kernel (train.optimizer_impl): auto = fused on CUDA, see adamw_kernel_options


def optimizer_spec(train, lr: Optional[float] = None, weight_decay: Optional[float] = None,
                   lr_mults: Optional[Mapping[str, float]] = None) -> OptimizerSpec:
    """The run's ``train:`` section as an OptimizerSpec (``lr`` / ``weight_decay`` / ``lr_mults`` override it)."""
    return OptimizerSpec(lr=train.lr if lr is None else lr,
                         weight_decay=train.weight_decay if weight_decay is None else weight_decay,
                         betas=tuple(train.betas), eps=train.eps, schedule=train.schedule, max_steps=train.max_steps,
                         warmup_ratio=train.warmup_ratio, hold_ratio=train.hold_ratio,
                         final_lr_scale=train.final_lr_scale, warmup_start_scale=train.warmup_start_scale,
                         lr_mults=dict(lr_mults) if lr_mults is not None else
                         {"fusion": train.lr_mult_fusion, "head": train.lr_mult_head},
                         impl=getattr(train, "optimizer_impl", "auto"))


@dataclass
class EngineSpec:
    """A module that gets its own DeepSpeed engine (own optimizer, schedule, loss scaler and checkpoint tag)."""

    module: nn.Module
    optimizer: Optional[OptimizerSpec]  # None: never stepped, only checkpointed (e.g. the VLM(SAS) generator)
    ds_config: Optional[str] = None  # its own DeepSpeed JSON; None: the main VLM's resolved config


def frozen_engine_ds_config(batch: BatchMath) -> dict:
    """DeepSpeed config of an engine that is only checkpointed, never stepped."""
    return {"train_batch_size": batch.global_batch_size,
            "train_micro_batch_size_per_gpu": batch.micro_batch_size,
            "gradient_accumulation_steps": batch.grad_accum_steps,
            "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}


def engine_ds_config(spec: EngineSpec, vlm_ds_config: dict, batch: BatchMath, grad_clip: float, on_cpu: bool) -> dict:
    """The resolved DeepSpeed config of one engine: the same rules (batch sizes, clipping, precision on CPU) for
    every engine."""
    if spec.optimizer is None:
        return frozen_engine_ds_config(batch)
    if spec.ds_config is None:
        return json.loads(json.dumps(vlm_ds_config))
    return resolve_ds_config(load_ds_config(spec.ds_config), batch, grad_clip, on_cpu)


def create_engine(spec: EngineSpec, vlm_ds_config: dict, batch: BatchMath, grad_clip: float, on_cpu: bool):
    """AdamW over the module's parameter groups + the lr schedule + ``deepspeed.initialize``."""
    from epic.engine.schedule import build_lr_scheduler

    ds = engine_ds_config(spec, vlm_ds_config, batch, grad_clip, on_cpu)
    optimizer = scheduler = None
    if spec.optimizer is not None:
        opt = spec.optimizer
        optimizer = build_optimizer(spec.module, opt.lr, opt.weight_decay, opt.betas, opt.eps, lr_mults=opt.lr_mults,
                                    impl=opt.impl)
        scheduler = build_lr_scheduler(optimizer, opt.schedule, opt.max_steps, opt.warmup_ratio, opt.hold_ratio,
                                       opt.final_lr_scale, opt.warmup_start_scale)
    return initialize_engine(spec.module, optimizer, scheduler, ds)


SHIPPED_DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def find_ds_config(path: str) -> str:
    """A DeepSpeed JSON path as given (absolute or from the working directory), else a shipped one by its
    relative path (``ds_configs/x.json`` or ``x.json``, from any directory). The one rule for every engine."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    for candidate in (SHIPPED_DS_CONFIGS.parent / path, SHIPPED_DS_CONFIGS / path):
        if candidate.is_file():
            return str(candidate)
    return path


def load_ds_config(path: str) -> dict:
    path = find_ds_config(path)
    if not os.path.isfile(path):
        choices = sorted(os.listdir(SHIPPED_DS_CONFIGS)) if SHIPPED_DS_CONFIGS.is_dir() else []
        raise SetupError(f"DeepSpeed config '{path}' not found. Shipped configs (ds_configs/): {', '.join(choices)}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise SetupError(f"DeepSpeed config '{path}' is not valid JSON: {err}") from err


def _reject_auto(ds: dict, where: str = "") -> None:
    """Plain DeepSpeed silently drops "auto" (only HF's Trainer fills it): `fp16.enabled: auto` means off."""
    for key, value in ds.items():
        if value == "auto":
            raise SetupError(f"DeepSpeed config key '{where}{key}' is \"auto\"; plain DeepSpeed ignores \"auto\" "
                             f"(only the HF Trainer fills it). Give an explicit value.")
        if isinstance(value, dict):
            _reject_auto(value, f"{where}{key}.")


def resolve_ds_config(ds: dict, batch: BatchMath, grad_clip: float, on_cpu: bool) -> dict:
    """Fill the batch sizes and clipping from our config; refuse contradictions and unusable precisions."""
    ds = json.loads(json.dumps(ds))
    _reject_auto(ds)
    wanted = {"train_batch_size": batch.global_batch_size,
              "train_micro_batch_size_per_gpu": batch.micro_batch_size,
              "gradient_accumulation_steps": batch.grad_accum_steps}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise SetupError(f"DeepSpeed config sets {key}={ds[key]} but the run config implies {value} "
                             f"(global batch {batch.global_batch_size}, micro {batch.micro_batch_size}, world "
                             f"{batch.world_size}). Remove it from the JSON: it is derived from the run config.")
        ds[key] = value
    if "optimizer" in ds or "scheduler" in ds:
        raise SetupError("DeepSpeed config must not define 'optimizer'/'scheduler': the trainer builds AdamW with "
                         "the model's parameter groups and the configured schedule itself.")
    ds["gradient_clipping"] = float(grad_clip)
    if on_cpu and ds.get("fp16", {}).get("enabled"):
        raise SetupError("fp16 is not supported by DeepSpeed on CPU: use ds_configs/cpu_zero2.json (fp32) or "
                         "ds_configs/cpu_zero2_bf16.json (for the EPIC generator: epic.generator.ds_config=null "
                         "takes the VLM's)")
    return ds


def engine_dtype(ds: dict) -> torch.dtype:
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float32


def initialize_engine(model: nn.Module, optimizer, lr_scheduler, ds_config: dict):
    """`deepspeed.initialize` with our optimizer and scheduler (so that both are checkpointed)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config)
    return engine


def loss_scale_of(engine) -> Optional[float]:
    opt = getattr(engine, "optimizer", None)
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None
