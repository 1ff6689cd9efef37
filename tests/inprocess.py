"""The trainer's construction in the test process (one CPU DeepSpeed rank, the `gloo_rank` fixture): a teacher
export with one eval batch, and a VLM engine with its EPIC objective as epic/engine/trainer.py builds them."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export_teacher_and_eval_batch(cfg, teacher_dir, batch_size: int, seed: int = 123):
    """Save an (untrained) model of cfg's family to teacher_dir as EPIC's teacher; return (paths, tokenizer, one
    shapes-world eval batch of batch_size)."""
    from epic.data import build_eval_loader
    from epic.wiring import build_model, resolve_data_paths

    paths = resolve_data_paths(cfg)
    torch.manual_seed(seed)
    teacher, tokenizer = build_model(cfg, paths)
    teacher.save_pretrained(str(teacher_dir))
    loader = build_eval_loader(paths.val_shards, tokenizer, image_size=cfg.data.image_size,
                               max_text_len=cfg.data.max_text_len, batch_size=batch_size, all_captions=False)
    return paths, tokenizer, next(iter(loader))


def build_engine(cfg, paths, micro_batch: int, accum: int = 1, seed: int = 0):
    """Trainer.setup for one rank: the VLM engine (ZeRO-2, cpu config) and the objective epic.wiring picks for cfg
    (EPIC's, with its generator engine, when epic.enabled), `accum` micro-batches of `micro_batch` per optimizer
    step. Returns (engine, objective)."""
    from epic.engine.schedule import build_lr_scheduler
    from epic.engine.setup import (build_optimizer, derive_batch_math, initialize_engine, load_ds_config,
                                   resolve_ds_config)
    from epic.wiring import build_model, build_objective

    torch.manual_seed(seed)
    model, tokenizer = build_model(cfg, paths)  # with the ITC head beta (epic.enabled)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.eps,
                                cfg.train.lr_mult_fusion, cfg.train.lr_mult_head)
    scheduler = build_lr_scheduler(optimizer, cfg.train.schedule, cfg.train.max_steps, cfg.train.warmup_ratio)
    batch_math = derive_batch_math(micro_batch * accum, micro_batch, 1)
    ds = resolve_ds_config(load_ds_config(str(ROOT / "ds_configs/cpu_zero2.json")), batch_math, 1.0, on_cpu=True)
    engine = initialize_engine(model, optimizer, scheduler, ds)
    return engine, build_objective(cfg, engine, tokenizer, ds, batch_math, paths, "cpu")
