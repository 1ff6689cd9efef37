#!/usr/bin/env python
"""Run the frozen EPIC teacher once over the shards and cache alpha (Eq. 8) per (sample key, caption index).

    python tools/precompute_saliency.py --teacher T --shards "/data/cc3m/{00000..00331}.tar" [more specs]
        --tokenizer DIR --out CACHE_DIR [--image-size 288] [--max-text-len 50] [--batch-size 128] [--num-workers 8]
        [--dtype auto|fp16|bf16|fp32]
    deepspeed --num_gpus 8 tools/precompute_saliency.py ...      (or torchrun / srun: shards split across ranks)

then train with ``epic.saliency_cache=CACHE_DIR``: the loader attaches alpha to each batch and the EPIC step skips
the teacher (a missing entry falls back to the teacher for that micro-batch and is counted,
``epic/saliency_cache_misses``). The format is in ``epic/data/saliency_cache.py``: one fp16 array per caption,
one sidecar file per shard, written atomically; a rerun skips the shards already done (resumable). Every caption of
every sample is cached, each on the un-augmented image (METER's eval transform), each image encoded once.

``--teacher`` takes what ``epic.teacher`` takes (run / checkpoint / export dir, official METER .ckpt). The
tokenizer, image size and text length must be the training run's (``data.tokenizer``, ``data.image_size``,
``data.max_text_len``): the trainer checks the cache's manifest against them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epic.data.saliency_cache import (FORMAT, MANIFEST, SaliencyCacheError, entries_done,  # noqa: E402
                                      sidecar_path, write_sidecar)


class ShardRows(IterableDataset):
    """Per worker, its share of the shards; yields chunks of up to ``batch_size`` (sample, caption) rows with each
    image once (``image_of_row`` indexes ``pixel_values``) and ``last=True`` on a shard's final chunk."""

    def __init__(self, shards, tokenizer, image_size: int, max_text_len: int, batch_size: int):
        self.shards, self.tokenizer = list(shards), tokenizer
        self.image_size, self.max_text_len, self.batch_size = image_size, max_text_len, batch_size

    def __iter__(self):
        from collections import Counter

        from epic.data.shards import decode_sample, iter_raw_samples
        from epic.data.text import tokenize_captions
        from epic.data.transforms import eval_transform

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        transform = eval_transform(self.image_size)
        for url in self.shards[worker::workers]:
            skips = Counter()
            rows, images = [], []

            def chunk(last: bool) -> dict:
                keys, captions, caption_index, image_of_row = zip(*rows) if rows else ((), (), (), ())
                out = {"shard": url, "last": last, "keys": list(keys), "caption_index": list(caption_index),
                       "skips": dict(skips)}
                if rows:
                    first = image_of_row[0]
                    out["pixel_values"] = torch.stack(images[first:image_of_row[-1] + 1])
                    out["image_of_row"] = torch.tensor(image_of_row) - first
                    out.update(tokenize_captions(self.tokenizer, list(captions), [None] * len(captions),
                                                 self.max_text_len))
                return out

            for raw in iter_raw_samples(url, skips):
                sample = decode_sample(raw)
                if isinstance(sample, str):
                    skips[sample] += 1
                    continue
                images.append(transform(sample.image))
                for index, caption in enumerate(sample.captions):
                    if len(rows) == self.batch_size:
                        yield chunk(last=False)
                        rows = []
                        images = images[-1:]  # the current image is still needed by its later captions
                    rows.append((sample.key, caption, index, len(images) - 1))
            yield chunk(last=True)


def teacher_alpha(teacher, chunk: dict, device, ratio: float = 0.35) -> list:
    """alpha over each row's real tokens (fp32 numpy), as the EPIC step computes it from the teacher."""
    from epic.objectives.saliency import real_text_tokens, saliency_masking

    dtype = next(teacher.parameters()).dtype
    ids, mask = chunk["input_ids"].to(device), chunk["attention_mask"].to(device)
    with torch.inference_mode():
        embeds = teacher.vlm.encode_image(chunk["pixel_values"].to(device, dtype))
        out = teacher.vlm.infer(input_ids=ids, attention_mask=mask, image_embeds=embeds[chunk["image_of_row"].to(device)],
                                return_saliency_qk=True, stop_before_last_layer=True)
        real = real_text_tokens({"attention_mask": mask, "special_tokens_mask": chunk["special_tokens_mask"].to(device)})
        _, alpha = saliency_masking(out["saliency_query"], out["saliency_keys"], real, ratio, None)
    alpha, real = alpha.float().cpu(), real.cpu()
    return [alpha[i][real[i]].numpy() for i in range(len(alpha))]


def expected_manifest(args, teacher, tokenizer) -> dict:
    return {"format": FORMAT, "teacher": os.path.abspath(args.teacher), "image_size": args.image_size,
            "max_text_len": args.max_text_len, "tokenizer_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "teacher_dtype": str(next(teacher.parameters()).dtype), "alpha_dtype": "float16",
            "transform": "eval (bicubic resize + centre crop, no augmentation)"}


def check_or_write_manifest(out: Path, manifest: dict, rank: int) -> None:
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        keys = ("format", "image_size", "max_text_len", "tokenizer_size", "pad_token_id")
        wrong = {k: (found.get(k), manifest[k]) for k in keys if found.get(k) != manifest[k]}
        if wrong:
            raise SaliencyCacheError(f"{path} was written with other settings ({wrong}: cache, now); use another "
                                     f"--out or delete it")
        if found.get("teacher") != manifest["teacher"]:
            print(f"warning: {path} names teacher {found.get('teacher')}, this run {manifest['teacher']}",
                  file=sys.stderr)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="what epic.teacher takes")
    parser.add_argument("--shards", required=True, nargs="+", help="shard specs (braces, globs), one or more")
    parser.add_argument("--tokenizer", required=True, help="the run's data.tokenizer (a local HF tokenizer folder)")
    parser.add_argument("--out", required=True, help="the cache directory (epic.saliency_cache)")
    parser.add_argument("--image-size", type=int, default=0, help="the run's data.image_size (default: the teacher's)")
    parser.add_argument("--max-text-len", type=int, default=50, help="the run's data.max_text_len")
    parser.add_argument("--batch-size", type=int, default=128, help="(sample, caption) rows per teacher forward")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                        help="teacher precision (auto: fp16 on CUDA, fp32 on CPU; as epic.teacher_dtype)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    from epic.data import expand_shard_spec, load_tokenizer
    from epic.dist import init_distributed
    from epic.models.teacher import check_teacher_fits, load_teacher

    info = init_distributed()
    rank, world = info.rank, info.world_size
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    shards = expand_shard_spec(args.shards, name="--shards")
    tokenizer = load_tokenizer(args.tokenizer)
    teacher = load_teacher(args.teacher, device, args.dtype)
    args.image_size = args.image_size or teacher.config.image_size
    check_teacher_fits(teacher, tokenizer, args.image_size, args.max_text_len)
    out = Path(args.out)
    check_or_write_manifest(out, expected_manifest(args, teacher, tokenizer), rank)

    mine = shards[rank::world]
    done = set(entries_done(out, mine))
    todo = [url for url in mine if url not in done]
    if rank == 0:
        print(f"saliency cache {out}: {len(shards)} shards, {world} rank(s); this rank: {len(mine)} shards, "
              f"{len(done)} already done, {len(todo)} to do; teacher {args.teacher} on {device}", flush=True)
    dataset = ShardRows(todo, tokenizer, args.image_size, args.max_text_len, args.batch_size)
    workers = min(args.num_workers, len(todo))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    pending: dict[str, tuple[list, list, list]] = {}
    entries = skipped = 0
    start = time.time()
    with tqdm(total=len(todo), desc=f"saliency rank {rank}", unit="shard", disable=rank != 0 and world > 1,
              dynamic_ncols=True) as bar:
        for chunk in loader if todo else ():
            keys, captions, alphas = pending.setdefault(chunk["shard"], ([], [], []))
            if chunk["keys"]:
                keys.extend(chunk["keys"])
                captions.extend(chunk["caption_index"])
                alphas.extend(teacher_alpha(teacher, chunk, device))
                entries += len(chunk["keys"])
            if chunk["last"]:
                skipped += sum(chunk["skips"].values())
                write_sidecar(sidecar_path(out, chunk["shard"]), keys, captions, alphas, chunk["shard"])
                del pending[chunk["shard"]]
                bar.update(1)
                bar.set_postfix(entries=entries)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    summary = {"rank": rank, "shards_written": len(todo), "shards_skipped_done": len(done), "entries": entries,
               "samples_skipped": skipped, "seconds": round(time.time() - start, 1),
               "entries_per_s": round(entries / max(time.time() - start, 1e-9), 1)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
