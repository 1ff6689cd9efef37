#!/usr/bin/env python
"""FLOPs and wall time of one training step of METER, image features shared vs re-encoded per objective; with
``--family NAME`` (any registered family but METER) the family's vanilla step against its EPIC step.

    python tools/bench_step.py [--config meter_4m] [--batch-size 2] [--image-size 288] [--json FILE]
    python tools/bench_step.py --family albef [--config albef_4m] [--epic-config epic_albef_4m] [--no-timing]

``--family`` (default meter) counts, at the packaged ``FAMILY_4m`` / ``epic_FAMILY_4m`` sizes unless
``--config`` / ``--epic-config`` name others, the training FLOPs per sample of the step the trainer runs: the
vanilla step (the family's recipe with the image encoded once: for ALBEF ITA + hard-negative ITM + MLM, the
momentum model's forward included) and the EPIC step (teacher + generator + VLM passes, as
``EpicObjective.flops_per_sample``), with and without the saliency cache, and the EPIC / vanilla ratio. Timing
there covers the vanilla step only (tools/bench_epic_step.py times EPIC's passes for METER).

FLOPs come from torch.utils.flop_counter.FlopCounterMode over forward + backward, counted on the meta device
(shapes only: exact, fast, no memory). Wall time runs the real architecture (random init) on this machine's CPU
or GPU; on a shared 2-core CPU only the ratio means much. Each step kind is a function
(model, batch, generator) -> losses in STEP_KINDS, so an EPIC step (teacher, generator, VLM passes) is one more entry.

For TFLOP/s and MFU logging: ``step_flops_per_sample(cfg, kind)`` here (any step kind) or, importable from the
package, ``epic.objectives.vanilla.step_flops_per_sample(cfg)``, the same meta-device count for the vanilla step. (FlopCounterMode has no formula for PyTorch's CPU flash-attention
kernel, so counting a real step on the CPU misses the attention FLOPs; the meta count includes them.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.models.configuration_meter import METERConfig  # noqa: E402
from epic.models.meter import METER  # noqa: E402
from epic.objectives.vanilla import vanilla_losses  # noqa: E402

MASK_TOKEN_ID = 3  # any id works for counting and timing
StepFn = Callable[[METER, dict, torch.Generator], Dict[str, torch.Tensor]]

STEP_KINDS: Dict[str, StepFn] = {
    "vanilla_shared": lambda model, batch, gen: vanilla_losses(model, batch, gen, share_image_embeds=True),
    "vanilla_reencoded": lambda model, batch, gen: vanilla_losses(model, batch, gen, share_image_embeds=False),
}


def synthetic_batch(cfg: METERConfig, batch_size: int, text_len: int, device, seed: int = 0) -> dict:
    """Full-length captions (the worst case METER pads to), 15% of the tokens masked for MLM."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (batch_size, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    labels[chosen] = ids[chosen]
    batch = {"pixel_values": torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g),
             "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "mlm_input_ids": torch.where(chosen, torch.full_like(ids, MASK_TOKEN_ID), ids), "mlm_labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def count_flops(model: METER, batch: dict, step: StepFn) -> int:
    """FLOPs of forward + backward of one step on ``batch``."""
    with FlopCounterMode(display=False) as counter:
        step(model, batch, torch.Generator().manual_seed(0))["loss"].backward()
    return counter.get_total_flops()


def meta_model(cfg: METERConfig) -> METER:
    with torch.device("meta"):
        return METER(dataclasses.replace(cfg, vit_pretrained=None, text_pretrained=None))


def step_flops_per_sample(cfg: METERConfig, kind: str = "vanilla_shared", text_len: int | None = None,
                          batch_size: int = 2) -> float:
    """Training FLOPs (forward + backward) per sample of a ``kind`` step at ``cfg``'s sizes, counted on meta."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; choose one of {sorted(STEP_KINDS)}")
    batch = synthetic_batch(cfg, batch_size, text_len or cfg.max_text_len, "meta")
    return count_flops(meta_model(cfg), batch, STEP_KINDS[kind]) / batch_size


def vision_flops_per_sample(cfg: METERConfig, batch_size: int = 2) -> float:
    """Forward + backward FLOPs of one pass of the vision tower, per image."""
    model = meta_model(cfg)
    pixels = torch.empty(batch_size, 3, cfg.image_size, cfg.image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.encode_image(pixels).sum().backward()
    return counter.get_total_flops() / batch_size


def time_one_step(model: METER, batch: dict, step: StepFn, seed: int) -> float:
    """Seconds of one forward + backward (gradients zeroed first)."""
    model.zero_grad(set_to_none=True)
    if batch["pixel_values"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model, batch, torch.Generator().manual_seed(seed))["loss"].backward()
    if batch["pixel_values"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(model: METER, batch: dict, kinds: list, warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per step of each kind; kinds alternate within each round so machine load hits all alike."""
    times = {kind: [] for kind in kinds}
    for round_index in range(warmup + repeats):
        for kind in kinds:
            seconds = time_one_step(model, batch, STEP_KINDS[kind], round_index)
            if round_index >= warmup:
                times[kind].append(seconds)
    return {kind: statistics.median(values) for kind, values in times.items()}


def load_model_config(name: str | None, image_size: int | None) -> METERConfig:
    if name is None:
        cfg = METERConfig()  # METER-CLIP-ViT-B/16-RoBERTa at 288
    else:
        from epic.config import load_config

        cfg = load_config(name).model
    cfg = dataclasses.replace(cfg, vit_pretrained=None, text_pretrained=None)
    return dataclasses.replace(cfg, image_size=image_size) if image_size else cfg


def load_run_config(name: str, overrides=()):
    """A packaged run config (or YAML) for its sizes only: path variables get placeholders, nothing is read."""
    import os

    for var, value in (("EPIC_DATA", "/data"), ("EPIC_PRETRAINED", "/models"), ("EPIC_TEACHER", "/teacher")):
        os.environ.setdefault(var, value)
    from epic.config import load_config

    return load_config(name, list(overrides))


def family_run_configs(family: str, config: str | None, epic_config: str | None, image_size: int | None,
                       vocab_size: int | None = None):
    """(vanilla run config, EPIC run config) of ``family``, each checked to be that family's. ``vocab_size``
    replaces the config's (needed where the config takes it from the tokenizer: model.vocab_size 0)."""
    from epic.config import ConfigError
    from epic.models.registry import FAMILIES

    if family not in FAMILIES:
        raise SystemExit(f"--family {family!r} is not a registered family; choose one of {sorted(FAMILIES)} "
                         f"(epic/models/registry.py)")
    configs = []
    sizes_only = ("epic.generator.pretrained=null", "epic.teacher=/teacher")  # no file is read
    for name, overrides in ((config or f"{family}_4m", ()), (epic_config or f"epic_{family}_4m", sizes_only)):
        try:
            cfg = load_run_config(name, overrides)
        except ConfigError as err:
            raise SystemExit(f"--family {family}: config {name!r} does not load ({err}); name one with --config / "
                             f"--epic-config") from err
        if cfg.model.family != family:
            raise SystemExit(f"config {name!r} is family {cfg.model.family!r}, not --family {family!r}")
        if image_size:
            cfg.model = dataclasses.replace(cfg.model, image_size=image_size)
            cfg.data.image_size = image_size
        if vocab_size:
            cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
        if not cfg.model.vocab_size:
            raise SystemExit(f"config {name!r} takes model.vocab_size from the tokenizer (0); give --vocab-size")
        configs.append(cfg)
    vanilla, epic = configs
    if epic.epic.enabled is not True:
        raise SystemExit(f"--epic-config {epic_config or f'epic_{family}_4m'!r} has epic.enabled false; name an "
                         f"EPIC config")
    return vanilla, epic


def family_step_flops(vanilla_cfg, epic_cfg, text_len: int | None, batch_size: int) -> dict:
    """GFLOP per sample of the family's vanilla step and of its EPIC step, as the trainer's objectives count them
    (the teacher at the VLM's sizes: EPIC's teacher is a vanilla run of the same config)."""
    from epic.objectives.consistency import epic_vlm_passes
    from epic.objectives.epic_flops import epic_step_flops_per_sample
    from epic.objectives.vanilla import step_flops_per_sample as vanilla_step_flops

    vanilla = vanilla_step_flops(vanilla_cfg.model, text_len=text_len or vanilla_cfg.data.max_text_len,
                                 batch_size=batch_size)
    results = {"vanilla": {"gflops_per_sample": vanilla / 1e9}}
    for name, cached in (("epic", False), ("epic_saliency_cache", True)):
        parts = epic_step_flops_per_sample(epic_cfg, batch_size=batch_size, text_len=text_len,
                                           vlm_passes=epic_vlm_passes, saliency_cache=cached)
        results[name] = {"gflops_per_sample": parts["total"] / 1e9,
                         **{f"{part}_gflops_per_sample": value / 1e9 for part, value in parts.items()
                            if part != "total"}}
    return results


def run_family(args) -> dict:
    """``--family`` other than METER: the vanilla step against the EPIC step (see the module docstring)."""
    from epic.models.registry import build_model
    from epic.models.loading import without_local_weights
    from epic.objectives.vanilla import vanilla_losses as family_vanilla_losses

    vanilla_cfg, epic_cfg = family_run_configs(args.family, args.config, args.epic_config, args.image_size,
                                                 args.vocab_size)
    model_cfg = vanilla_cfg.model
    text_len = args.text_len or vanilla_cfg.data.max_text_len
    print(f"{args.family}: {vanilla_cfg.run.name} / {epic_cfg.run.name}, {model_cfg.image_size}px, {text_len} "
          f"text tokens, batch {args.batch_size}, device {args.device}")
    results = {"family": args.family, "config": vanilla_cfg.run.name, "epic_config": epic_cfg.run.name,
               "batch_size": args.batch_size, "text_len": text_len, "device": args.device,
               "kinds": family_step_flops(vanilla_cfg, epic_cfg, args.text_len, args.batch_size)}
    kinds = results["kinds"]
    if not args.no_timing:
        torch.manual_seed(0)
        model = build_model(without_local_weights(model_cfg)).to(args.device).train()
        batch = synthetic_batch(model_cfg, args.batch_size, text_len, args.device)
        step = lambda m, b, g: family_vanilla_losses(m, b, g, share_image_embeds=True)  # noqa: E731
        times = [time_one_step(model, batch, step, i) for i in range(args.warmup + args.repeats)][args.warmup:]
        seconds = statistics.median(times)
        vanilla = kinds["vanilla"]
        vanilla.update(seconds_per_step=seconds, samples_per_second=args.batch_size / seconds,
                       achieved_tflops=vanilla["gflops_per_sample"] * args.batch_size / seconds / 1e3)
    print(f"{'step':<22}{'GFLOP/sample':>14}  parts")
    for kind, entry in kinds.items():
        parts = ", ".join(f"{k[:-len('_gflops_per_sample')]} {v:.1f}" for k, v in entry.items()
                          if k.endswith("_gflops_per_sample"))
        timing = f"  {entry['seconds_per_step']:.3f} s/step" if "seconds_per_step" in entry else ""
        print(f"{kind:<22}{entry['gflops_per_sample']:>14.1f}  {parts}{timing}")
    for kind in ("epic", "epic_saliency_cache"):
        ratio = kinds[kind]["gflops_per_sample"] / kinds["vanilla"]["gflops_per_sample"]
        results[f"flop_ratio_{kind}_over_vanilla"] = ratio
        print(f"FLOP ratio {kind} / vanilla: {ratio:.3f}")
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="meter", help="model family (epic/models/registry.py); other than "
                        "meter: its vanilla step against its EPIC step")
    parser.add_argument("--config", default=None, help="packaged config name or YAML (its model section); "
                        "default: METER-CLIP-ViT-B/16-RoBERTa, or FAMILY_4m with --family")
    parser.add_argument("--epic-config", default=None, help="with --family: the EPIC config (epic_FAMILY_4m)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None, help="override the config's image size (288)")
    parser.add_argument("--vocab-size", type=int, default=None, help="with --family: replace the config's "
                        "vocabulary size (required where it is 0, taken from the tokenizer)")
    parser.add_argument("--text-len", type=int, default=None, help="caption length (default: max_text_len)")
    parser.add_argument("--kinds", default=",".join(STEP_KINDS), help="comma-separated step kinds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true", help="count FLOPs only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.family != "meter":
        results = run_family(args)
    else:
        results = run_meter(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


def run_meter(args) -> dict:
    if args.epic_config:
        raise SystemExit("--epic-config is for --family other than meter (tools/bench_epic_step.py: EPIC-METER)")
    cfg = load_model_config(args.config, args.image_size)
    text_len = args.text_len or cfg.max_text_len
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in STEP_KINDS]
    if unknown:
        raise SystemExit(f"unknown step kinds {unknown}; choose from {sorted(STEP_KINDS)}")
    image_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    print(f"METER: ViT {cfg.vit_layers}x{cfg.vit_width} @ {cfg.image_size}px ({image_tokens} tokens), "
          f"text {cfg.text_model_type} {cfg.text_layers}x{cfg.text_hidden_size} ({text_len} tokens), "
          f"fusion {cfg.num_fusion_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}; batch {args.batch_size}, "
          f"device {args.device}")
    results = {"config": dataclasses.asdict(cfg), "batch_size": args.batch_size, "text_len": text_len,
               "device": args.device, "vision_gflops_per_sample": vision_flops_per_sample(cfg) / 1e9, "kinds": {}}
    for kind in kinds:
        results["kinds"][kind] = {"gflops_per_sample": step_flops_per_sample(cfg, kind, text_len) / 1e9}

    if not args.no_timing:
        torch.manual_seed(0)
        model = METER(cfg).to(args.device).train()
        batch = synthetic_batch(cfg, args.batch_size, text_len, args.device)
        for kind, seconds in time_steps(model, batch, kinds, args.warmup, args.repeats).items():
            entry = results["kinds"][kind]
            entry.update(seconds_per_step=seconds, samples_per_second=args.batch_size / seconds,
                         achieved_tflops=entry["gflops_per_sample"] * args.batch_size / seconds / 1e3)

    print(f"\nvision tower, forward + backward: {results['vision_gflops_per_sample']:.1f} GFLOP per image")
    print(f"{'step':<20}{'GFLOP/sample':>14}{'s/step':>10}{'samples/s':>11}{'TFLOP/s':>9}")
    for kind, entry in results["kinds"].items():
        timing = (f"{entry['seconds_per_step']:>10.3f}{entry['samples_per_second']:>11.2f}"
                  f"{entry['achieved_tflops']:>9.3f}" if "seconds_per_step" in entry else "")
        print(f"{kind:<20}{entry['gflops_per_sample']:>14.1f}{timing}")
    if {"vanilla_shared", "vanilla_reencoded"} <= set(results["kinds"]):
        shared, reencoded = results["kinds"]["vanilla_shared"], results["kinds"]["vanilla_reencoded"]
        results["flop_ratio_shared_over_reencoded"] = shared["gflops_per_sample"] / reencoded["gflops_per_sample"]
        print(f"\nFLOP ratio shared / re-encoded: {results['flop_ratio_shared_over_reencoded']:.3f}")
        if "seconds_per_step" in shared:
            results["time_ratio_shared_over_reencoded"] = shared["seconds_per_step"] / reencoded["seconds_per_step"]
            print(f"time ratio shared / re-encoded: {results['time_ratio_shared_over_reencoded']:.3f}")
    return results


if __name__ == "__main__":
    main()
