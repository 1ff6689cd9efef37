#!/usr/bin/env python
"""Write counts.json (images and captions per shard) beside shards that have none, e.g. img2dataset's.

    python tools/count_shards.py DIR [DIR ...] [--pattern '*.tar']

The training loader takes a source's weight `auto` (its caption count, or image count with data.sample_unit=image)
and the epoch length from these files; tools/make_shards.py and tools/make_synthetic_shards.py write them already.
Counting reads every shard once (captions only, images are not decoded). Samples the loader would skip (no image,
no caption) are not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.data.shards import count_shard, write_shard_counts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders of .tar shards")
    parser.add_argument("--pattern", default="*.tar", help="shard file pattern inside each folder")
    parser.add_argument("--workers", type=int, default=1, help="shards counted in parallel")
    args = parser.parse_args(argv)
    for folder in map(Path, args.folders):
        shards = sorted(folder.glob(args.pattern))
        if not shards:
            print(f"error: no shards matching {args.pattern} in {folder}", file=sys.stderr)
            return 2
        if args.workers > 1:
            with Pool(args.workers) as pool:
                counted = pool.map(count_shard, [str(s) for s in shards])
        else:
            counted = [count_shard(str(s)) for s in shards]
        counts = {s.name: c for s, c in zip(shards, counted)}
        path = write_shard_counts(folder, counts)
        print(json.dumps({"counts": str(path), "shards": len(shards), "images": sum(c["images"] for c in counted),
                          "captions": sum(c["captions"] for c in counted),
                          "skipped": sum(c["skipped"] for c in counted)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
