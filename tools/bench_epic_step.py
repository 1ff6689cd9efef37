#!/usr/bin/env python
"""FLOPs and wall time of one EPIC training step, by pass (teacher, generator, VLM), against the vanilla METER step.

    python tools/bench_epic_step.py [--config epic_meter_4m] [--batch-size 2] [--image-size 288] [--no-timing]
        [--dtype fp32|bf16|fp16] [--device cuda] [--json FILE]

FLOPs are counted with FlopCounterMode on the meta device (epic.objectives.epic_flops: shapes only, exact, no
memory). "naive EPIC" is what the step would cost done the straightforward way: every VLM pass re-encodes its
images (MLM, ITM negatives, ITC: three vision passes instead of one) and the teacher runs its whole forward. The
issue's goal: EPIC <= 1.2 x the naive vanilla step (naive EPIC is about 1.7 x); with the saliency cache
(epic.saliency_cache, tools/precompute_saliency.py) the teacher leaves the step: goal <= 1.05 x.

Wall time runs the real modules (random init) on this machine: the teacher's saliency + masking, the generator's
forward/backward with Eq. 4/5/7, the VLM's passes with shared image features, each alone, and the vanilla steps of
tools/bench_step.py for the ratio. The DeepSpeed engines' optimizer steps are not included. On a shared 2-core CPU
only the ratios mean much.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402  (tools/bench_step.py: vanilla step kinds, synthetic batch, vision FLOPs)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_epic_config(name: str, image_size: int | None):
    for var, value in (("EPIC_DATA", "/data"), ("EPIC_PRETRAINED", "/models"), ("EPIC_TEACHER", "/teacher")):
        os.environ.setdefault(var, value)  # the packaged configs name paths through these; nothing is read
    from epic.config import load_config

    cfg = load_config(name, ["epic.generator.pretrained=null", "epic.teacher=/teacher"])  # sizes only, no files
    model = dataclasses.replace(cfg.model, vit_pretrained=None, text_pretrained=None,
                                vocab_size=cfg.model.vocab_size or 50265)
    if image_size:
        model = dataclasses.replace(model, image_size=image_size)
    cfg.model = model
    cfg.data.image_size = model.image_size
    return cfg


def naive_extra_flops(cfg, batch_size: int = 2) -> float:
    """Per sample: what the naive EPIC step adds to ours (two more vision passes, the teacher's remaining layers)."""
    from epic.objectives.epic_flops import _meta_meter, meta_epic_batch

    vision = bench_step.vision_flops_per_sample(cfg.model, batch_size)
    teacher = _meta_meter(cfg.model)
    batch = meta_epic_batch(cfg.model, batch_size, cfg.data.max_text_len, cfg.epic.mask_ratio)
    counts = []
    for stop in (False, True):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = teacher.infer(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                                return_saliency_qk=True, stop_before_last_layer=stop)
            if not stop:
                teacher.mlm_score(out["text_feats"]), teacher.itm_score(out["cls_feats"])
        counts.append(counter.get_total_flops() / batch_size)
    return 2 * vision + counts[0] - counts[1]


def count(cfg, batch_size: int) -> dict:
    from epic.objectives.epic_flops import epic_step_flops_per_sample
    from epic.objectives.vanilla import step_flops_per_sample

    text_len = cfg.data.max_text_len
    from epic.objectives.consistency import epic_vlm_passes

    epic = epic_step_flops_per_sample(cfg, batch_size=batch_size, vlm_passes=epic_vlm_passes)
    flops = {f"epic {k}": v for k, v in epic.items()}
    flops["epic (saliency cache)"] = epic_step_flops_per_sample(cfg, batch_size=batch_size, vlm_passes=epic_vlm_passes,
                                                                saliency_cache=True)["total"]
    flops["naive epic"] = epic["total"] + naive_extra_flops(cfg, batch_size)
    flops["vanilla shared"] = step_flops_per_sample(cfg.model, True, text_len, batch_size)
    flops["vanilla re-encoded"] = step_flops_per_sample(cfg.model, False, text_len, batch_size)
    return flops


def epic_pass_functions(cfg, device, dtype, batch_size: int):
    """(name -> fn()) for the three EPIC passes on real (random-init) modules, and the batch they read."""
    from epic.models.generator import build_generator
    from epic.models.meter import METER
    from epic.models.teacher import SaliencyTeacher
    from epic.objectives.consistency import add_consistency_head, epic_vlm_passes
    from epic.objectives.corruption import inconsistent_positions, mask_tokens, replace_at, sample_replacements
    from epic.objectives.saliency import real_text_tokens, saliency_masking

    torch.manual_seed(0)
    model = add_consistency_head(METER(cfg.model)).to(device, dtype).train()
    teacher = SaliencyTeacher(METER(cfg.model)).to(device, dtype)
    generator = build_generator(cfg.epic.generator, cfg.model).to(device, dtype).train()
    batch = bench_step.synthetic_batch(cfg.model, batch_size, cfg.data.max_text_len, device)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    special = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    batch["special_tokens_mask"] = special
    real = real_text_tokens(batch)
    rng = torch.Generator().manual_seed(0)
    state = {}

    def teacher_pass():
        query, keys = teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        state["positions"], _ = saliency_masking(query, keys, real, cfg.epic.mask_ratio, rng)

    def generator_pass():
        if "positions" not in state:
            teacher_pass()
        positions = state["positions"]
        flat = positions.flatten().nonzero().squeeze(1)
        targets = batch["input_ids"].flatten().index_select(0, flat)
        states = generator(mask_tokens(batch["input_ids"], positions, bench_step.MASK_TOKEN_ID),
                           batch["attention_mask"], flat)
        embedding, bias = generator.output_embedding()
        samples, loss = sample_replacements(states, embedding, bias, targets, [0, 1, 2, 3], rng)
        loss.backward()
        state["corrupted"] = replace_at(batch["input_ids"], positions, samples)

    def vlm_pass():
        if "corrupted" not in state:
            generator_pass()
        inconsistent = inconsistent_positions(batch["input_ids"], state["corrupted"], state["positions"])
        image_embeds = model.encode_image(batch["pixel_values"])
        out = epic_vlm_passes(model, batch, image_embeds, state["corrupted"], inconsistent, real, rng,
                              cfg.epic.lambda_itc)
        out["loss"].float().backward()

    def vanilla(kind):
        return lambda: bench_step.STEP_KINDS[kind](model, batch, rng)["loss"].float().backward()

    return {"epic teacher": teacher_pass, "epic generator": generator_pass, "epic vlm": vlm_pass,
            "vanilla shared": vanilla("vanilla_shared"), "vanilla re-encoded": vanilla("vanilla_reencoded")}


def time_passes(functions: dict, device, warmup: int, repeats: int) -> dict:
    """Median seconds of each pass; passes alternate within each round so machine load hits all alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        for name, fn in functions.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians["epic total"] = medians["epic teacher"] + medians["epic generator"] + medians["epic vlm"]
    return medians


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="epic_meter_4m", help="packaged EPIC config name or YAML")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=None, help="override the config's image size (288)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and images for timing")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true", help="count FLOPs only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_epic_config(args.config, args.image_size)
    m = cfg.model
    print(f"EPIC-METER ({args.config}): ViT {m.vit_layers}x{m.vit_width} @ {m.image_size}px, text {m.text_model_type} "
          f"{m.text_layers}x{m.text_hidden_size}, fusion {m.num_fusion_layers}x{m.hidden_size}, vocab {m.vocab_size}, "
          f"{cfg.data.max_text_len} tokens, mask ratio {cfg.epic.mask_ratio}, generator {cfg.epic.generator_mode}, "
          f"masking {cfg.epic.masking}; batch {args.batch_size}, device {args.device}")
    flops = count(cfg, args.batch_size)
    results = {"config": args.config, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
               "gflops_per_sample": {k: v / 1e9 for k, v in flops.items()}}
    naive_vanilla = flops["vanilla re-encoded"]
    results["flop_ratio_epic_over_naive_vanilla"] = flops["epic total"] / naive_vanilla
    results["flop_ratio_epic_cache_over_naive_vanilla"] = flops["epic (saliency cache)"] / naive_vanilla
    results["flop_ratio_naive_epic_over_naive_vanilla"] = flops["naive epic"] / naive_vanilla
    results["flop_ratio_epic_over_vanilla_shared"] = flops["epic total"] / flops["vanilla shared"]
    seconds = {}
    if not args.no_timing:
        device = torch.device(args.device)
        functions = epic_pass_functions(cfg, device, DTYPES[args.dtype], args.batch_size)
        seconds = time_passes(functions, device, args.warmup, args.repeats)
        results["seconds_per_step"] = seconds
        results["time_ratio_epic_over_vanilla_reencoded"] = seconds["epic total"] / seconds["vanilla re-encoded"]
        results["time_ratio_epic_over_vanilla_shared"] = seconds["epic total"] / seconds["vanilla shared"]

    print(f"\n{'pass':<22}{'GFLOP/sample':>14}{'s/step':>10}")
    for name in ("epic teacher", "epic generator", "epic vlm", "epic total", "epic (saliency cache)", "naive epic",
                 "vanilla shared", "vanilla re-encoded"):
        timing = f"{seconds[name]:>10.3f}" if name in seconds else ""
        print(f"{name:<22}{flops[name] / 1e9:>14.1f}{timing}")
    print(f"\nFLOPs  EPIC / naive vanilla:       {results['flop_ratio_epic_over_naive_vanilla']:.3f}  (goal <= 1.2)")
    print(f"FLOPs  EPIC (saliency cache) / naive vanilla: {results['flop_ratio_epic_cache_over_naive_vanilla']:.3f}"
          f"  (goal <= 1.05; the teacher runs once, in tools/precompute_saliency.py)")
    print(f"FLOPs  naive EPIC / naive vanilla: {results['flop_ratio_naive_epic_over_naive_vanilla']:.3f}")
    print(f"FLOPs  EPIC / vanilla shared:      {results['flop_ratio_epic_over_vanilla_shared']:.3f}")
    if seconds:
        print(f"time   EPIC / vanilla re-encoded:  {results['time_ratio_epic_over_vanilla_reencoded']:.3f}")
        print(f"time   EPIC / vanilla shared:      {results['time_ratio_epic_over_vanilla_shared']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
