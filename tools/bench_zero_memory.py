"""Per-rank memory of optimizer state + gradients under ZeRO-2 vs ZeRO-0 (plain data parallel), real METER sizes.

    deepspeed --num_gpus 2 tools/bench_zero_memory.py [--config meter_4m] [--json FILE]

Launch with 2 ranks (CPU ranks here; GPUs when present). Each rank builds the model from the config (random init),
wraps it in a DeepSpeed engine for each ZeRO stage, runs one optimizer step on a random batch and counts the bytes
held in the optimizer state (Adam moments and fp32 master copies) and in gradient buffers on this rank. The ideal
ZeRO-2 / ZeRO-0 ratio at N ranks is 1/N for both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(engine) -> tuple[int, int]:
    """(Adam moments, fp32 master partition that ZeRO keeps beside the module weights) on this rank."""
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    moments = tensor_bytes(v for state in inner.state.values() for v in state.values())
    masters = tensor_bytes(getattr(zero_opt, "single_partition_of_fp32_groups", []))
    return moments, masters


def gradient_bytes(engine) -> int:
    zero_opt = engine.optimizer
    partitions = getattr(zero_opt, "single_partition_of_fp32_groups", None)
    if partitions is not None:  # ZeRO-1/2: the reduced gradient partition of this rank
        return tensor_bytes(p.grad for p in partitions if p.grad is not None) or tensor_bytes(partitions)
    return tensor_bytes(p.grad for p in engine.module.parameters() if p.grad is not None)


def measure(stage: int, cfg, world: int) -> dict:
    import deepspeed

    from epic.engine.setup import build_optimizer
    from epic.models.meter import METER

    torch.manual_seed(0)
    model = METER.from_config(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, 1e-5, 0.01, (0.9, 0.98), 1e-8, 5.0, 5.0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000_000,
                                "allgather_bucket_size": 50_000_000},
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    size = cfg.model.image_size
    pixels = torch.randn(1, 3, size, size)
    ids = torch.randint(5, cfg.model.vocab_size, (1, cfg.model.max_text_len))
    out = engine.module.infer(ids, torch.ones_like(ids), pixel_values=pixels)
    loss = engine.module.mlm_score(out["text_feats"]).float().logsumexp(-1).mean() + out["cls_feats"].sum() * 0
    engine.backward(loss)
    grads = gradient_bytes(engine)  # before step: ZeRO-2 holds the reduced partition, ZeRO-0 full grads
    engine.step()
    moments, masters = optimizer_state_bytes(engine)
    result = {"stage": stage, "params": n_params, "adam_moment_bytes": moments, "master_partition_bytes": masters,
              "gradient_bytes": grads}
    del engine, model, optimizer
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="meter_4m")
    parser.add_argument("--json", default=None)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from epic.config import load_config
    from epic.dist import init_distributed

    overrides = ["model.vit_pretrained=null", "model.text_pretrained=null"] + args.overrides
    cfg = load_config(args.config, overrides)
    info = init_distributed()
    rows = [measure(stage, cfg, info.world_size) for stage in (0, 2)]
    if info.rank == 0:
        z0, z2 = rows
        gib = 2**30
        print(f"METER ({z0['params'] / 1e6:.1f}M params), {info.world_size} ranks, per-rank bytes after one step")
        print(f"{'':28s}{'ZeRO-0':>12s}{'ZeRO-2':>12s}{'ratio':>8s}")
        for key in ("adam_moment_bytes", "gradient_bytes", "master_partition_bytes"):
            ratio = f"{z2[key] / z0[key]:8.3f}" if z0[key] else f"{'-':>8s}"
            print(f"{key:28s}{z0[key] / gib:11.3f}G{z2[key] / gib:11.3f}G{ratio}")
        total0 = z0["adam_moment_bytes"] + z0["gradient_bytes"]
        total2 = z2["adam_moment_bytes"] + z2["gradient_bytes"]
        print(f"{'moments + gradients':28s}{total0 / gib:11.3f}G{total2 / gib:11.3f}G{total2 / total0:8.3f}"
              f"   (ideal {1 / info.world_size:.3f})")
        print("master_partition: ZeRO's flat fp32 copy of this rank's parameter partition (in fp16/bf16 training "
              "plain data parallel would hold a full fp32 master copy instead)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world_size": info.world_size, "zero0": z0, "zero2": z2}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
