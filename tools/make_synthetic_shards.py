#!/usr/bin/env python
"""Generate the shapes world: webdataset shards (img2dataset layout) + a trained tokenizer + manifest.json.

    python tools/make_synthetic_shards.py --out DIR --train N --val M [--image-size 96] [--seed 0]
        [--samples-per-shard 1000] [--vocab-size 2000] [--world-version 1|2] [--tasks]

Writes DIR/train/NNNNN.tar, DIR/val/NNNNN.tar (disjoint), DIR/tokenizer (HF format) and DIR/manifest.json.
Same arguments, identical bytes. See epic/data/synthetic.py for what the images and captions contain.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.data.synthetic import generate_shapes_world  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, required=True, help="number of training images")
    parser.add_argument("--val", type=int, required=True, help="number of validation images")
    parser.add_argument("--image-size", type=int, default=96, help="side in pixels (the train transform resizes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--vocab-size", type=int, default=2000, help="BPE vocabulary size cap")
    parser.add_argument("--world-version", type=int, default=1, choices=(1, 2),
                        help="1 (default) or 2: no text leaks of content words (epic/data/synthetic.py)")
    parser.add_argument("--tasks", action="store_true",
                        help="also write OUT/tasks: shapes-world retrieval, VQA, NLVR2 and SNLI-VE (epic.data.tasks)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_shapes_world(args.out, args.train, args.val, image_size=args.image_size, seed=args.seed,
                                    samples_per_shard=args.samples_per_shard, vocab_size=args.vocab_size,
                                    version=args.world_version)
        if args.tasks:
            from epic.data.tasks import generate_shapes_tasks

            generate_shapes_tasks(args.out, args.train, args.val, image_size=args.image_size, seed=args.seed,
                                  version=args.world_version)
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"out": str(out), "train": args.train, "val": args.val,
                      "train_shards": len(manifest["splits"]["train"]["shards"]),
                      "val_shards": len(manifest["splits"]["val"]["shards"]), "tasks": args.tasks,
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
