#!/usr/bin/env python
"""Size a pretraining run before queueing it: FLOPs, wall-clock, per-GPU memory under ZeRO-2, data-loader rate.

    python tools/plan_run.py --config epic/configs/epic_meter_16m.yaml --gpus 32 --gpu a100-80g [--mfu 0.4]
        [--measured gpu_check_out/gpu_check.txt]
        [--micro-batch 32] [--ds-config ds_configs/zero2_bf16.json] [--gpus-per-node 8] [--job-hours 48] [--json F]

FLOPs per sample are counted with torch's FlopCounterMode on the meta device (shapes only: exact for the matmuls,
no memory, seconds on a CPU). The VLM's ITM + MLM step is the trainer's own count
(`epic.objectives.vanilla.step_flops_per_sample`, logged as `perf/flops_per_sample`). An EPIC step adds the
teacher's saliency pass (forward to the penultimate fusion layer), the generator's masked-LM pass and the main
VLM's consistency (ITC) pass on the corrupted caption; these three are counted here, on the same meta model.

Memory is an estimate: ZeRO-2 keeps the half-precision weights on every GPU and splits gradients, fp32 master
weights and Adam moments across the N data-parallel ranks (ZeRO paper, Sec. 5: 2P + (2 + 12)P/N bytes), plus the
DeepSpeed communication buckets, the activations saved for backward (summed with saved-tensor hooks on the meta
device, in the engine's precision), the frozen teacher and the generator's own ZeRO-2 engine, and a fixed allowance
for the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3


@dataclass(frozen=True)
class GPUSpec:
    memory_gib: float
    peak_tflops: float  # dense bf16/fp16 tensor-core peak


GPUS = {
    "a100-80g": GPUSpec(80, 312.0), "a100-40g": GPUSpec(40, 312.0), "h100-80g": GPUSpec(80, 989.0),
    "h200": GPUSpec(141, 989.0), "v100-32g": GPUSpec(32, 125.0), "a10-24g": GPUSpec(24, 125.0),
    "l40s-48g": GPUSpec(48, 362.0),
}
CUDA_OVERHEAD_GIB = 3.0  # CUDA context + NCCL buffers + allocator fragmentation (typical, not measured here)


# ---------------------------------------------------------------------------------------------------------------
# Counting on the meta device
# ---------------------------------------------------------------------------------------------------------------
def _count(fn) -> tuple[int, int]:
    """(FLOPs, bytes saved for backward) of `fn()` on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return counter.get_total_flops(), saved[0]


def meta_model_and_batch(model_cfg, dtype: torch.dtype, batch_size: int, text_len: int = 0):
    """A METER on the meta device (no memory) and a full-length batch, as the trainer's FLOP count builds them."""
    from epic.models.meter import METER

    meta = torch.device("meta")
    with meta:
        model = METER(dataclasses.replace(model_cfg, vit_pretrained=None, text_pretrained=None)).to(dtype)
    ids = torch.zeros(batch_size, text_len or model_cfg.max_text_len, dtype=torch.long, device=meta)
    size = model_cfg.image_size
    batch = {"pixel_values": torch.empty(batch_size, 3, size, size, device=meta, dtype=dtype), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids, "mlm_labels": ids}
    return model, batch


def count_step(model_cfg, epic: bool, dtype: torch.dtype, text_len: int, batch_size: int = 2) -> dict:
    """Per-sample FLOPs and saved-activation bytes of one training step, by pass.

    The VLM pass's FLOPs are the trainer's own figure (`epic.objectives.vanilla.step_flops_per_sample`, what
    VanillaObjective.flops_per_sample logs); the EPIC passes are counted here on the same meta model.
    """
    from epic.objectives.vanilla import step_flops_per_sample, vanilla_losses

    model, batch = meta_model_and_batch(model_cfg, dtype, batch_size, text_len)
    passes = {}

    def vlm_step():  # ITM + MLM, every image encoded once
        vanilla_losses(model, batch, torch.Generator(), share_image_embeds=True)["loss"].float().backward()

    _, saved = _count(vlm_step)
    passes["vlm (ITM + MLM)"] = (step_flops_per_sample(model_cfg, True, text_len) * batch_size, saved)
    if epic:
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def teacher():  # Eq. 8: saliency from the penultimate fusion layer, no gradients
            with torch.no_grad():
                model.infer(ids, mask, pixel_values=batch["pixel_values"], return_saliency_qk=True,
                            stop_before_last_layer=True)

        def generator():  # Eq. 3-7: a text-only masked LM of the text tower's size, forward + backward
            model.mlm_score(model.encode_text(batch["mlm_input_ids"], mask)).float().sum().backward()

        def consistency():  # Eq. 1-2: the VLM on the corrupted caption, image features shared (a leaf here)
            image = torch.empty(batch_size, (model_cfg.image_size // model_cfg.patch_size) ** 2 + 1,
                                model_cfg.vit_width, device="meta", dtype=dtype, requires_grad=True)
            model.infer(ids, mask, image_embeds=image)["text_feats"].float().sum().backward()

        passes["teacher saliency"] = _count(teacher)
        passes["generator MLM"] = _count(generator)
        passes["ITC pass"] = _count(consistency)
    return {name: {"flops": flops / batch_size, "saved_bytes": saved / batch_size}
            for name, (flops, saved) in passes.items()}


def count_params(model_cfg) -> dict:
    model, _ = meta_model_and_batch(model_cfg, torch.float32, 1)
    text = sum(p.numel() for n, p in model.named_parameters() if n.startswith("text_transformer"))
    return {"vlm": sum(p.numel() for p in model.parameters()), "text_tower": text,
            "mlm_head": sum(p.numel() for n, p in model.named_parameters() if n.startswith("mlm_score"))}


# ---------------------------------------------------------------------------------------------------------------
# Measured MFU (the table of tools/gpu_check.sh)
# ---------------------------------------------------------------------------------------------------------------
def read_measured_mfu(path: str, dtype: torch.dtype) -> tuple[float, str]:
    """(MFU, where it comes from) for the VLM precision ``dtype`` from tools/gpu_check.py's table (.txt) or JSON.

    The row is the EPIC-METER run whose VLM engine had this precision ("VLM bf16" / "VLM fp16").
    """
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "bf16")
    text = Path(path).read_text()
    device = text.splitlines()[0].split("|")[0].replace("GPU check:", "").strip() if text else "?"
    if path.endswith(".json"):
        data = json.loads(text)
        device = data.get("meta", {}).get("device", "?")
        value = data.get("runs", {}).get(f"epic_{precision}", {}).get("mfu")
    else:
        value, columns = None, None
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
            if not cells:
                columns = None
                continue
            if "MFU" in cells:
                columns = cells
            elif columns and f"VLM {precision}" in cells[0]:
                shown = cells[columns.index("MFU")]
                value = None if shown in ("-", "") else float(shown)
                break
    if value is None or not 0 < value <= 1:
        raise SystemExit(f"--measured {path}: no measured MFU for the VLM in {precision} (the run's row is missing or "
                         f"empty: see its phase line in the table); rerun tools/gpu_check.sh or pass --mfu")
    return float(value), f"measured on {device} ({path}, EPIC-METER, VLM {precision})"


# ---------------------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------------------
def zero2_state_bytes(params: int, world: int, weight_bytes: int = 2) -> dict:
    """ZeRO-2 with mixed-precision Adam: weights replicated; gradients, fp32 master weights, Adam m and v split."""
    return {"weights": weight_bytes * params, "gradients": weight_bytes * params / world,
            "master + adam": 12 * params / world}


def bucket_bytes(ds: dict, weight_bytes: int) -> float:
    """DeepSpeed ZeRO-2's reduce (x2: double-buffered with overlap_comm) and all-gather buckets, in elements."""
    zero = ds.get("zero_optimization", {})
    reduce = float(zero.get("reduce_bucket_size", 5e8)) * (2 if zero.get("overlap_comm") else 1)
    return (reduce + float(zero.get("allgather_bucket_size", 5e8))) * weight_bytes


def plan(cfg, ds: dict, gpus: int, gpu: GPUSpec, mfu: float, micro_batch: int, gpus_per_node: int,
         job_hours: float) -> dict:
    from epic.engine.setup import derive_batch_math, engine_dtype

    dtype = engine_dtype(ds)
    if dtype == torch.float32:
        dtype = torch.bfloat16  # fp32 configs are for CPUs; size the GPU run in bf16
    weight_bytes = 2
    batch = derive_batch_math(cfg.train.global_batch_size, micro_batch, gpus)
    model_cfg = dataclasses.replace(cfg.model, vit_pretrained=None, text_pretrained=None)
    if not model_cfg.vocab_size:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=50265)
    passes = count_step(model_cfg, cfg.epic.enabled, dtype, cfg.data.max_text_len)
    params = count_params(model_cfg)

    flops_per_sample = sum(p["flops"] for p in passes.values())
    step_flops = flops_per_sample * batch.global_batch_size
    run_flops = step_flops * cfg.train.max_steps
    achieved = gpus * gpu.peak_tflops * 1e12 * mfu
    step_seconds = step_flops / achieved
    run_hours = run_flops / achieved / 3600

    memory = {f"vlm {k}": v for k, v in zero2_state_bytes(params["vlm"], gpus, weight_bytes).items()}
    memory["comm buckets"] = bucket_bytes(ds, weight_bytes)
    memory["activations"] = micro_batch * sum(p["saved_bytes"] for p in passes.values())
    if cfg.epic.enabled:
        generator = params["text_tower"] + params["mlm_head"]
        memory["teacher (frozen)"] = weight_bytes * params["vlm"]
        memory.update({f"generator {k}": v for k, v in zero2_state_bytes(generator, gpus, weight_bytes).items()})
    memory["cuda/nccl/fragmentation"] = CUDA_OVERHEAD_GIB * GIB
    total = sum(memory.values())
    per_sample_act = memory["activations"] / micro_batch
    fixed = total - memory["activations"]
    max_micro = int((gpu.memory_gib * GIB * 0.95 - fixed) // per_sample_act) if per_sample_act else None

    samples_per_s = cfg.train.global_batch_size / step_seconds
    nodes = math.ceil(gpus / gpus_per_node)
    return {
        "gpus": gpus, "nodes": nodes, "mfu": mfu, "peak_tflops": gpu.peak_tflops, "dtype": str(dtype),
        "batch": dataclasses.asdict(batch), "params": params,
        "flops": {"per_sample_by_pass": {k: v["flops"] for k, v in passes.items()},
                  "per_sample": flops_per_sample, "per_step": step_flops, "run": run_flops},
        "time": {"step_s": step_seconds, "run_hours": run_hours, "run_days": run_hours / 24,
                 "jobs_of_hours": job_hours, "jobs": math.ceil(run_hours / job_hours)},
        "memory_gib": {k: v / GIB for k, v in memory.items()}, "memory_total_gib": total / GIB,
        "gpu_memory_gib": gpu.memory_gib, "max_micro_batch": max_micro,
        "data": {"samples_per_s": samples_per_s, "per_gpu": samples_per_s / gpus, "per_node": samples_per_s / nodes,
                 "per_worker": samples_per_s / gpus / max(1, cfg.data.num_workers),
                 "num_workers": cfg.data.num_workers},
    }


def report(name: str, gpu_name: str, out: dict, max_steps: int) -> str:
    b, f, t, d = out["batch"], out["flops"], out["time"], out["data"]
    lines = [
        f"plan: {name} on {out['gpus']} x {gpu_name} ({out['nodes']} nodes), peak {out['peak_tflops']:.0f} TFLOP/s "
        f"per GPU, MFU {out['mfu']:.2f}, {out['dtype']}",
        f"params: VLM {out['params']['vlm'] / 1e6:.1f} M (text tower {out['params']['text_tower'] / 1e6:.1f} M)",
        f"batch: global {b['global_batch_size']} = micro {b['micro_batch_size']} x accumulation "
        f"{b['grad_accum_steps']} x {b['world_size']} GPUs",
        "FLOPs per sample (forward + backward, FlopCounterMode on meta):",
        *[f"  {k:<28} {v / 1e9:10.1f} GFLOP" for k, v in f["per_sample_by_pass"].items()],
        f"  {'total':<28} {f['per_sample'] / 1e9:10.1f} GFLOP",
        f"FLOPs per optimizer step: {f['per_step'] / 1e15:.2f} PFLOP; whole run ({max_steps} steps): "
        f"{f['run'] / 1e18:.1f} EFLOP",
        f"time: {t['step_s']:.2f} s per step -> {t['run_hours']:.1f} h = {t['run_days']:.2f} days "
        f"({t['jobs']} job(s) of {t['jobs_of_hours']:g} h, chained by the requeue)",
        f"memory per GPU (ZeRO-2, estimate): {out['memory_total_gib']:.1f} GiB of {out['gpu_memory_gib']:g} GiB",
        *[f"  {k:<28} {v:8.2f} GiB" for k, v in out["memory_gib"].items()],
        f"  largest micro batch that fits (95% of memory): {out['max_micro_batch']}",
        f"data: the loaders must sustain {d['samples_per_s']:.0f} samples/s in all = {d['per_gpu']:.1f} per GPU = "
        f"{d['per_node']:.0f} per node = {d['per_worker']:.1f} per worker ({d['num_workers']} workers per GPU)",
    ]
    if out["memory_total_gib"] > out["gpu_memory_gib"]:
        lines.append(f"WARNING: the estimate exceeds the GPU's memory: use data.micro_batch_size="
                     f"{out['max_micro_batch']} or less (accumulation grows to keep the global batch)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="packaged config name or YAML path")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu", default="a100-80g", choices=sorted(GPUS))
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
    parser.add_argument("--measured", default=None,
                        help="take the MFU from tools/gpu_check.sh's table (gpu_check.txt or .json) instead of --mfu")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the config's data.micro_batch_size")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2_bf16.json"))
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--job-hours", type=float, default=48.0, help="time limit of one Slurm job")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"--mfu must be in (0, 1], got {args.mfu}")
    os.environ.setdefault("EPIC_DATA", "/data")  # the configs name paths through these; nothing is read
    os.environ.setdefault("EPIC_PRETRAINED", "/models")
    os.environ.setdefault("EPIC_TEACHER", "/teacher")
    from epic.config import load_config
    from epic.engine.setup import load_ds_config

    cfg = load_config(args.config, args.overrides)
    ds = load_ds_config(args.ds_config)
    micro = args.micro_batch or cfg.data.micro_batch_size
    mfu, mfu_source = args.mfu, "assumed (--mfu)"
    if args.measured:
        from epic.engine.setup import engine_dtype

        dtype = engine_dtype(ds)
        mfu, mfu_source = read_measured_mfu(args.measured, torch.bfloat16 if dtype == torch.float32 else dtype)
    out = plan(cfg, ds, args.gpus, GPUS[args.gpu], mfu, micro, args.gpus_per_node, args.job_hours)
    out["mfu_source"] = mfu_source
    print(report(cfg.run.name, args.gpu, out, cfg.train.max_steps))
    print(f"MFU {mfu:.3f}: {mfu_source}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
