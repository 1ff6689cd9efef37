#!/usr/bin/env python
"""Train a tiny ALBEF on the shapes world (one process, plain AdamW, ALBEF's recipe: contrastive with momentum
distillation and queue, hard-negative ITM, MLM with soft labels, momentum update after each step), then measure
how often EPIC's saliency masking (Eq. 8 with ALBEF's query choices) hits content words, against uniform masking.

    python tools/albef_shapes_saliency.py --world DIR [--steps 600] [--batch 16] [--seed 0] [--json OUT]

DIR is a shapes world (tools/make_synthetic_shards.py); without --world one is generated in a temporary folder.
Prints the training losses and, per saliency choice (``fused_cls``, ``image_cls_cross``), the share of masked
tokens that are content words (saliency) next to its expectation under uniform masking of the same counts, on
the validation split, before and after training (the untrained model is the control).
This is a measurement tool for the model/saliency choice; full runs go through epic/pretrain.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from epic.data.loader import build_eval_loader, build_train_loader  # noqa: E402
from epic.models.albef import ALBEF, ALBEFConfig  # noqa: E402
from epic.objectives.albef_losses import albef_losses  # noqa: E402
from epic.objectives.saliency import real_text_tokens, saliency_masking  # noqa: E402

IMAGE_SIZE, MAX_TEXT_LEN, MASK_RATIO = 64, 32, 0.35


def tiny_config(vocab_size: int, pad_token_id: int, **overrides) -> ALBEFConfig:
    """albef_shapes_tiny's model section."""
    values = dict(image_size=IMAGE_SIZE, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                  vocab_size=vocab_size, pad_token_id=pad_token_id, hidden_size=64, num_hidden_layers=4,
                  fusion_layer=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=40,
                  encoder_width=64, max_text_len=MAX_TEXT_LEN, embed_dim=32, queue_size=256, alpha_ramp_steps=100,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.08)
    values.update(overrides)
    return ALBEFConfig(**values)


@torch.no_grad()
def content_hit_rates(model: ALBEF, val_batches, seed: int) -> dict:
    """Per saliency choice: masked content share under saliency masking vs its uniform expectation."""
    out = {}
    for choice in ("fused_cls", "image_cls_cross"):
        model.config = dataclasses.replace(model.config, saliency=choice)
        generator = torch.Generator().manual_seed(seed)
        hits = expected = masked_total = 0.0
        for batch in val_batches:
            real = real_text_tokens(batch)
            content = batch["content_mask"].bool() & real
            rows = content.any(1)
            query, keys = model.saliency_qk(batch["input_ids"], batch["attention_mask"],
                                            pixel_values=batch["pixel_values"])
            mask, _ = saliency_masking(query.float(), keys.float(), real, MASK_RATIO, generator)
            mask = mask & rows[:, None]
            share = content.sum(1).double() / real.sum(1).clamp_min(1).double()
            hits += (mask & content).sum().item()
            expected += (mask.sum(1).double() * share).sum().item()
            masked_total += mask.sum().item()
        out[choice] = {"saliency_content_share": hits / max(masked_total, 1),
                       "uniform_content_share": expected / max(masked_total, 1), "masked_tokens": masked_total}
    model.config = dataclasses.replace(model.config, saliency="fused_cls")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", help="shapes world folder (default: generate 512 train / 128 val images)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--save", help="save the trained model here (ALBEF.save_pretrained)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tmp = None
    world = args.world
    if world is None:
        from epic.data.synthetic import generate_shapes_world
        tmp = tempfile.TemporaryDirectory()
        world = str(generate_shapes_world(tmp.name, 512, 128, image_size=IMAGE_SIZE, seed=args.seed,
                                          samples_per_shard=128))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(f"{world}/tokenizer")
    train = build_train_loader(f"{world}/train/*.tar", tokenizer, image_size=IMAGE_SIZE, max_text_len=MAX_TEXT_LEN,
                               batch_size=args.batch, num_workers=0, seed=args.seed, rank=0, world_size=1)
    val = build_eval_loader(f"{world}/val/*.tar", tokenizer, image_size=IMAGE_SIZE, max_text_len=MAX_TEXT_LEN,
                            batch_size=32, all_captions=True)
    val_batches = [b for _, b in zip(range(args.val_batches), val)]
    model = ALBEF(tiny_config(len(tokenizer), tokenizer.pad_token_id))
    before = content_hit_rates(model.eval(), val_batches, args.seed)
    spec = model.param_groups_spec()
    decay = [p for n, p in model.named_parameters() if n in {x for g in spec.values() for x in g["decay"]}]
    no_decay = [p for n, p in model.named_parameters() if n in {x for g in spec.values() for x in g["no_decay"]}]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    log = []
    model.train()
    start = time.perf_counter()
    for step, batch in zip(range(args.steps), train):
        out = albef_losses(model, batch, None, generator)  # alpha ramped by model.momentum_step
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.after_optimizer_step()  # momentum update + step count
        if step % 50 == 0 or step == args.steps - 1:
            row = {"step": step, **{k: round(float(v.detach()), 4) for k, v in out.scalars().items()},
                   "temp": round(float(model.temp.detach()), 4), "seconds": round(time.perf_counter() - start, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    after = content_hit_rates(model.eval(), val_batches, args.seed)
    if args.save:
        model.save_pretrained(args.save)
    result = {"steps": args.steps, "batch": args.batch, "untrained": before, "trained": after, "log": log}
    print(json.dumps({"untrained": before, "trained": after}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
