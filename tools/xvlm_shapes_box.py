#!/usr/bin/env python
"""Shapes-world check of X-VLM's region objectives before the trainer knows the family: a tiny X-VLM trained with
X-VLM's recipe (caption steps and region steps interleaved by epic.objectives.xvlm.is_region_step, plain AdamW with
the family's parameter groups) and its box accuracy (IoU > 0.5, region caption -> box in the whole image) on the
validation images, printed before and during training.

    python tools/xvlm_shapes_box.py --data DIR [--steps 300] [--eval-every 100] [--seed 0] [--save MODEL_DIR]

DIR is a shapes world from tools/make_synthetic_shards.py (generated there at 64 px when it does not exist).
Prints one JSON line per evaluation: {"step", "box_accuracy", "mean_iou", losses of the last step}.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from epic.data.regions import collate_region_batch, decode_region_sample, normalise_box, region_example  # noqa: E402
from epic.data.text import load_tokenizer, tokenize_captions  # noqa: E402
from epic.data.transforms import eval_transform  # noqa: E402
from epic.data.xvlm_masking import mask_batch, word_starts  # noqa: E402
from epic.models.xvlm import XVLM, XVLMConfig  # noqa: E402
from epic.objectives.box import box_cxcywh_to_xyxy, paired_box_iou  # noqa: E402
from epic.objectives.xvlm import caption_batch_losses, is_region_step, region_batch_losses  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "epic" / "configs" / "xvlm_shapes_tiny.yaml"
#: region-step settings of the shapes world: data.regions of xvlm_shapes_tiny.yaml (what epic/pretrain.py uses)
_REGIONS = yaml.safe_load(CONFIG.read_text())["data"]["regions"]
REGION_SETTINGS = {"region_iter_perc": _REGIONS["iter_perc"], "region_micro_batch_size": _REGIONS["micro_batch_size"],
                   "max_images": _REGIONS["max_images"], "max_regions": _REGIONS["max_regions"],
                   "min_perc_in_image": _REGIONS["min_perc_in_image"]}


def read_split(root: Path, split: str) -> list:
    """[(key, PIL image, regions, captions)] of a shapes-world split."""
    samples = []
    for shard in sorted((root / split).glob("*.tar")):
        raw: dict = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                raw.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        for key, sample in raw.items():
            decoded = decode_region_sample(sample)
            if not isinstance(decoded, str):
                samples.append((key, *decoded))
    return samples


def tiny_model(vocab_size: int, seed: int) -> XVLM:
    values = yaml.safe_load(CONFIG.read_text())["model"]
    values.pop("family")
    values["vocab_size"] = vocab_size
    torch.manual_seed(seed)
    return XVLM(XVLMConfig(**values))


def optimizer(model: XVLM, lr: float, mult: float, weight_decay: float) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    groups = []
    for group, parts in model.param_groups_spec().items():
        scale = 1.0 if group == "backbone" else mult
        groups.append({"params": [params[n] for n in parts["decay"]], "lr": lr * scale, "weight_decay": weight_decay})
        groups.append({"params": [params[n] for n in parts["no_decay"]], "lr": lr * scale, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)


@torch.no_grad()
def box_accuracy(model: XVLM, samples: list, tokenizer, max_text_len: int, size: int) -> tuple[float, float]:
    """Fraction of region captions whose predicted box (whole image) has IoU > 0.5 with the truth; mean IoU."""
    model.eval()
    to_tensor = eval_transform(size)
    ious = []
    for start in range(0, len(samples), 32):
        chunk = samples[start:start + 32]
        images = torch.stack([to_tensor(image) for _, image, _, _ in chunk])
        index = torch.tensor([i for i, (_, _, regions, _) in enumerate(chunk) for _ in regions])
        captions = [r["caption"] for _, _, regions, _ in chunk for r in regions]
        targets = torch.tensor([normalise_box(*r["bbox"], image.size[0], image.size[1])
                                for _, image, regions, _ in chunk for r in regions])
        text = tokenize_captions(tokenizer, captions, [None] * len(captions), max_text_len)
        pred = model.predict_bbox(text["input_ids"], text["attention_mask"],
                                  image_embeds=model.encode_image(images), image_index=index)
        ious.append(paired_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(targets))[0])
    model.train()
    iou = torch.cat(ious)
    return float((iou > 0.5).float().mean()), float(iou.mean())


def caption_batch(samples, rng, tokenizer, max_text_len, batch_size, to_tensor):
    chosen = rng.sample(samples, batch_size)
    captions = [rng.choice(caps) for _, _, _, caps in chosen]
    text = tokenize_captions(tokenizer, captions, [None] * batch_size, max_text_len)
    starts = torch.tensor([word_starts(tokenizer.convert_ids_to_tokens(ids)) for ids in text["input_ids"].tolist()])
    mlm_ids, mlm_labels = mask_batch(text["input_ids"], text["special_tokens_mask"], rng, tokenizer.mask_token_id,
                                     len(tokenizer), word_start=starts)
    return {"pixel_values": torch.stack([to_tensor(image) for _, image, _, _ in chosen]), **text,
            "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}


def region_batch(samples, rng, tokenizer, max_text_len, images, rows, size, grid, to_tensor, max_regions, min_perc):
    examples = []
    for _, image, regions, captions in rng.sample(samples, images):
        crop, region_rows = region_example(image, regions, captions, rng, size, grid, max_regions, min_perc, hflip=False)
        examples.append((to_tensor(crop), region_rows))
    return collate_region_batch(examples, tokenizer, max_text_len, rng, rows)


def run(data: Path, steps: int, eval_every: int, seed: int, log=print, save: Path = None) -> list:
    if not (data / "manifest.json").is_file():
        from epic.data.synthetic import generate_shapes_world

        generate_shapes_world(data, n_train=512, n_val=64, image_size=64, seed=seed, samples_per_shard=256)
    cfg = yaml.safe_load(CONFIG.read_text())
    d, t = cfg["data"], cfg["train"]
    d.update(REGION_SETTINGS)
    size, max_len = d["image_size"], d["max_text_len"]
    tokenizer = load_tokenizer(data / "tokenizer")
    train, val = read_split(data, "train"), read_split(data, "val")
    model = tiny_model(len(tokenizer), seed)
    opt = optimizer(model, t["lr"], t["lr_mult_head"], t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, int(0.05 * steps)))
                                              * max(0.0, (steps - s) / steps))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    to_tensor = eval_transform(size)  # shapes: no flips, no colour changes; the region crop is the augmentation
    grid = model.config.image_grid
    history = []
    accuracy, mean_iou = box_accuracy(model, val, tokenizer, max_len, size)
    history.append({"step": 0, "box_accuracy": accuracy, "mean_iou": mean_iou})
    log(json.dumps(history[-1]))
    for step in range(steps):
        if is_region_step(step, d["region_iter_perc"]):
            batch = region_batch(train, rng, tokenizer, max_len, d["max_images"], d["region_micro_batch_size"], size,
                                 grid, to_tensor, d["max_regions"], d["min_perc_in_image"])
            out = region_batch_losses(model, batch, gen)
        else:
            out = caption_batch_losses(model, caption_batch(train, rng, tokenizer, max_len, d["micro_batch_size"],
                                                            to_tensor), gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            accuracy, mean_iou = box_accuracy(model, val, tokenizer, max_len, size)
            history.append({"step": step + 1, "box_accuracy": accuracy, "mean_iou": mean_iou,
                            **{f"train_{k}": round(float(v.detach()), 4) for k, v in out.items()}})
            log(json.dumps(history[-1]))
    if save is not None:
        model.save_pretrained(str(save))
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="shapes-world folder (made when missing)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the trained model here (save_pretrained)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(args.data, args.steps, args.eval_every, args.seed, save=args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
