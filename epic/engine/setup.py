"""DeepSpeed engine set-up: batch arithmetic, parameter groups, the DeepSpeed config, `deepspeed.initialize`."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

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


def build_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                       lr_mult_fusion: float = 1.0, lr_mult_head: float = 1.0) -> list[dict]:
    """METER's groups: (backbone | fusion x5 | heads x5) x (decay | no decay on biases and norms)."""
    from epic.models.meter import lr_group_of, uses_weight_decay

    multipliers = {"backbone": 1.0, "fusion": lr_mult_fusion, "head": lr_mult_head}
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        mult = multipliers[lr_group_of(name)]
        no_decay = not uses_weight_decay(name)
        key = (mult, no_decay)
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
                    lr_mult_fusion: float = 1.0, lr_mult_head: float = 1.0, impl: str = "auto") -> torch.optim.AdamW:
    groups = build_param_groups(model.named_parameters(), lr, weight_decay, lr_mult_fusion, lr_mult_head)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             **adamw_kernel_options(impl))


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs")
        choices = sorted(os.listdir(here)) if os.path.isdir(here) else []
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
                         "METER's parameter groups and the configured schedule itself.")
    ds["gradient_clipping"] = float(grad_clip)
    if on_cpu and ds.get("fp16", {}).get("enabled"):
        raise SetupError("fp16 is not supported by DeepSpeed on CPU: use ds_configs/cpu_zero2.json (fp32) or "
                         "ds_configs/cpu_zero2_bf16.json")
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
