#!/usr/bin/env python
"""Data-pipeline throughput: samples/s of the training loader (train transform) for 1 and 2 loader workers.

    python tools/bench_data.py --shards SPEC --tokenizer DIR [--image-size 288] [--batch-size 32] [--batches 20]
        [--workers 1,2] [--max-text-len 50]

The first batch of each run (worker start-up, shard opening) is timed separately and excluded from samples/s.
Prints one JSON line per worker count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(shards: str, tokenizer, *, num_workers: int, image_size: int, batch_size: int, batches: int, max_text_len: int) -> dict:
    from epic.data import build_train_loader

    loader = build_train_loader(shards, tokenizer, image_size=image_size, max_text_len=max_text_len, batch_size=batch_size,
                                num_workers=num_workers, seed=0, rank=0, world_size=1)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return {"num_workers": num_workers, "image_size": image_size, "batch_size": batch_size, "batches": batches,
            "first_batch_s": round(first, 3), "samples_per_s": round(batches * batch_size / elapsed, 1),
            "skips": sum(loader.skip_counts().values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", default="1,2", help="comma-separated loader worker counts")
    parser.add_argument("--max-text-len", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from epic.data import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    for workers in (int(w) for w in args.workers.split(",")):
        print(json.dumps(bench(args.shards, tokenizer, num_workers=workers, image_size=args.image_size,
                               batch_size=args.batch_size, batches=args.batches, max_text_len=args.max_text_len)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
