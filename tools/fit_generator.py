#!/usr/bin/env python
"""Fit EPIC's generator on the pretraining captions before pretraining: the "LM (trained)" ablation (Table 5).

    python tools/fit_generator.py --config epic_meter_4m --out $EPIC_RUNS/lm_trained --steps 20000 \
        [--shards SPEC ...] [--batch-size 512] [--micro-batch-size 64] [--lr 1e-4] \
        [--ds_config ds_configs/generator_fp16.json] [key=value ...]
    deepspeed --num_gpus 8 tools/fit_generator.py ...          # several ranks (or srun / torchrun)

then pretrain with `epic.generator_mode=pretrained_fixed epic.generator.pretrained=$EPIC_RUNS/lm_trained`.

What it does: text-only masked language modelling on the captions of the given shards (default: the config's
`data.sources`; every caption of every image is a sample, images are never decoded), with the pretraining MLM
masking of epic.data (`data.mlm_probability` of the real tokens, 80% <mask> / 10% random / 10% kept), the
generator the config describes (`epic.generator`: `pretrained` = a local HF folder such as roberta-base to start
from, else a random init of the given sizes) in a DeepSpeed engine with AdamW and a linear warm-up/decay schedule,
and L_GEN (Eq. 7) through the streaming vocabulary kernel as in EPIC. It writes OUT as an HF folder
(`save_pretrained`: config.json + weights, in fp32 from the optimizer's master copy, and the tokenizer) plus
`epic_generator.json`, the marker that tells a fitted generator from an untouched base LM: it records the base,
the shards, the steps, the batch, the learning rate, the masking and the last losses. `pretrained_fixed` refuses
an HF folder without it (that would silently be "LM (fixed)").

Captions are read in seeded shard permutations (one per pass); with at least as many shards as ranks each rank
reads its own shards, else every rank reads all and keeps every world_size-th caption. The tool has no resume:
rerun it (it is short next to pretraining).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def caption_stream(urls: list[str], seed: int, rank: int, world_size: int):
    """This rank's captions, forever: per pass a seeded shard permutation, each shard's captions shuffled."""
    from collections import Counter

    from epic.data.shards import iter_raw_samples, read_captions

    skips: Counter = Counter()
    split_shards = len(urls) >= world_size
    for epoch in range(10**9):
        order = np.random.default_rng([seed, 17, epoch]).permutation(len(urls))
        mine = order[rank::world_size] if split_shards else order
        emitted = False
        index = 0
        for shard in mine:
            captions = []
            for raw in iter_raw_samples(urls[shard], skips):
                text = read_captions(raw)
                if not isinstance(text, str):
                    captions.extend(text[0])
            random.Random(f"{seed}/{epoch}/{shard}").shuffle(captions)
            for caption in captions:
                index += 1
                if split_shards or (index - 1) % world_size == rank:
                    emitted = True
                    yield caption
        if not emitted:
            raise RuntimeError(f"no captions in the shards given to rank {rank} (skips: {dict(skips)})")


def masked_batch(tokenizer, captions, max_text_len, probability, replacement_ids, generator) -> dict:
    """Tokenise and mask as the pretraining collator does (epic.data.text)."""
    from epic.data.text import mask_tokens_for_mlm, tokenize_captions

    batch = tokenize_captions(tokenizer, captions, [None] * len(captions), max_text_len)
    batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens_for_mlm(
        batch["input_ids"], batch["special_tokens_mask"], tokenizer.mask_token_id, replacement_ids, probability,
        generator)
    return batch


def fp32_parameters(engine) -> dict:
    """{name: fp32 tensor} of every parameter: the optimizer's master copy under ZeRO / mixed precision, else the
    module's own (tied weights appear once, as in named_parameters). Collective: call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    values = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        values[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (data sources, tokenizer, epic.generator, model)")
    parser.add_argument("--out", required=True, help="output folder (HF save_pretrained + epic_generator.json)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--shards", nargs="+", default=None, help="shard specs (default: the config's data.sources)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (captions per step)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="per rank and forward (0: batch / world)")
    parser.add_argument("--lr", type=float, default=0.0, help="peak learning rate (0: epic.generator.lr)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--ds_config", "--ds-config", default="ds_configs/cpu_zero2.json",
                        help="DeepSpeed JSON (batch sizes are derived; e.g. ds_configs/generator_fp16.json on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from epic.config import ConfigError, load_config
    from epic.dist import init_distributed

    try:
        cfg = load_config(args.config, args.overrides)
        if args.steps < 1 or args.batch_size < 1:
            raise ConfigError("--steps and --batch-size must be >= 1")
        info = init_distributed()
        return fit(cfg, args, info)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


def fit(cfg, args, info) -> int:
    import dataclasses

    from epic.data import load_tokenizer
    from epic.data.text import replacement_token_ids
    from epic.engine.build import expand_env, expand_shards, resolve_data_paths, resolve_model_config
    from epic.engine.schedule import build_lr_scheduler
    from epic.engine.setup import derive_batch_math, initialize_engine, load_ds_config, resolve_ds_config
    from epic.models.generator import FITTED_MARKER, FITTED_FORMAT, build_generator, generator_param_groups
    from epic.objectives.corruption import excluded_token_ids, sample_replacements

    rank, world = info.rank, info.world_size
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    paths = resolve_data_paths(cfg) if args.shards is None or cfg.data.tokenizer is None else None
    tokenizer_path = expand_env(cfg.data.tokenizer, "data.tokenizer") if cfg.data.tokenizer else paths.tokenizer
    if args.shards is not None:
        urls = [u for spec in args.shards for u in expand_shards(spec, "--shards")]
    else:
        urls = [u for _, files, _ in paths.sources for u in files]
    tokenizer = load_tokenizer(tokenizer_path)
    model_cfg = resolve_model_config(cfg.model, tokenizer)
    gen_cfg = cfg.epic.generator
    if gen_cfg.pretrained:
        gen_cfg = dataclasses.replace(gen_cfg, pretrained=expand_env(gen_cfg.pretrained, "epic.generator.pretrained"))
    lr = args.lr or gen_cfg.lr
    micro = args.micro_batch_size or max(1, args.batch_size // world)
    batch_math = derive_batch_math(args.batch_size, micro, world)
    ds_path = args.ds_config if os.path.isabs(args.ds_config) or os.path.exists(args.ds_config) else str(REPO / args.ds_config)
    ds = resolve_ds_config(load_ds_config(ds_path), batch_math, cfg.train.grad_clip, on_cpu=device.type == "cpu")

    torch.manual_seed(args.seed)  # the same initial generator on every rank
    generator = build_generator(gen_cfg, model_cfg)
    optimizer = torch.optim.AdamW(generator_param_groups(generator, lr, gen_cfg.weight_decay), lr=lr,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    scheduler = build_lr_scheduler(optimizer, "linear", args.steps, args.warmup_ratio)
    engine = initialize_engine(generator, optimizer, scheduler, ds)
    dtype = next(engine.module.parameters()).dtype
    replacement_ids = replacement_token_ids(tokenizer)
    exclude_ids = excluded_token_ids(tokenizer, model_cfg.vocab_size)
    captions = caption_stream(urls, args.seed, rank, world)
    sample_rng = torch.Generator(device=device).manual_seed(args.seed * 1009 + rank)
    losses, accuracies, start = [], [], time.perf_counter()
    micro_index = 0
    for step in range(args.steps):
        for _ in range(batch_math.grad_accum_steps):
            mask_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 65_537 + micro_index)
            micro_index += 1
            batch = masked_batch(tokenizer, [next(captions) for _ in range(micro)], cfg.data.max_text_len,
                                 cfg.data.mlm_probability, replacement_ids, mask_rng)
            labels = batch["mlm_labels"].to(device)
            flat = (labels.flatten() != -100).nonzero().squeeze(1)
            states = engine(batch["mlm_input_ids"].to(device), batch["attention_mask"].to(device), flat)
            embedding, bias = engine.module.output_embedding()
            targets = labels.flatten().index_select(0, flat)
            samples, loss = sample_replacements(states, embedding, bias, targets, exclude_ids, sample_rng)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            accuracies.append(float((samples == targets).float().mean()) if len(targets) else 0.0)
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            window = max(1, args.log_every * batch_math.grad_accum_steps)
            print(json.dumps({"step": step + 1, "loss_gen": round(float(np.mean(losses[-window:])), 4),
                              "gen_acc_masked": round(float(np.mean(accuracies[-window:])), 4),
                              "lr": scheduler.get_last_lr()[0], "s": round(time.perf_counter() - start, 1)}),
                  flush=True)

    values = fp32_parameters(engine)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        module = engine.module.float()
        with torch.no_grad():
            for name, param in module.named_parameters():  # tied weights share the Parameter: set once
                param.copy_(values[name].to(param.device))
        lm = module.lm
        lm.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        window = max(1, min(len(losses), args.log_every * batch_math.grad_accum_steps))
        marker = {"format": FITTED_FORMAT, "tool": "tools/fit_generator.py",
                  "base": gen_cfg.pretrained or "random init (epic.generator sizes)", "family": lm.config.model_type,
                  "config": args.config, "shards": urls, "steps": args.steps, "global_batch_size": args.batch_size,
                  "captions_seen": args.steps * args.batch_size, "lr": lr, "warmup_ratio": args.warmup_ratio,
                  "mlm_probability": cfg.data.mlm_probability, "max_text_len": cfg.data.max_text_len,
                  "seed": args.seed, "world_size": world, "ds_dtype": str(dtype),
                  "final_loss_gen": float(np.mean(losses[-window:])),
                  "final_gen_acc_masked": float(np.mean(accuracies[-window:]))}
        (out / FITTED_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        print(json.dumps({"out": str(out), "steps": args.steps, "final_loss_gen": round(marker["final_loss_gen"], 4)}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
