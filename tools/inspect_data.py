#!/usr/bin/env python
"""Look at what the training pipeline makes of some shards.

    python tools/inspect_data.py --shards SPEC [--shards SPEC2 ...] --tokenizer DIR [--image-size 288]
        [--batch-size 8] [--num-batches 3] [--max-text-len 50] [--num-workers 0] [--seed 0]

Builds the real training loader (epic.data.build_train_loader; each --shards is one source, equal weights) and
prints one JSON line per batch (tensor shapes and dtypes, per caption its real-token, content-token and
MLM-selected counts, the first keys), then a final JSON line with the skip counters by reason.
Exit status: 0 when at least one batch was produced; 2 for bad arguments (no such shards, no tokenizer);
1 when the pipeline produced no batch (e.g. every sample is unreadable; the message says why).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def describe_batch(index: int, batch: dict) -> dict:
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
               for k, v in batch.items() if hasattr(v, "shape")}
    return {
        "batch": index,
        "tensors": tensors,
        "caption_tokens": batch["attention_mask"].sum(1).tolist(),
        "content_tokens": batch["content_mask"].sum(1).tolist(),
        "mlm_selected": (batch["mlm_labels"] != -100).sum(1).tolist(),
        "keys": batch["keys"][:4],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", action="append", required=True, help="shard spec (brace pattern / glob); repeat for more sources")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer folder")
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=3)
    parser.add_argument("--max-text-len", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-skips", type=int, default=10_000, help="give up after this many unusable samples in a row")
    args = parser.parse_args(argv)

    from epic.data import build_train_loader

    sources = [{"shards": spec, "name": f"source{i}", "weight": 1.0} for i, spec in enumerate(args.shards)]
    try:
        loader = build_train_loader(sources, args.tokenizer, image_size=args.image_size, max_text_len=args.max_text_len,
                                    batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed, rank=0,
                                    world_size=1, max_consecutive_skips=args.max_skips)
    except (FileNotFoundError, ValueError, TypeError, OSError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    produced = 0
    try:
        for batch in loader:
            print(json.dumps(describe_batch(produced, batch)), flush=True)
            produced += 1
            if produced >= args.num_batches:
                break
    except RuntimeError as exn:
        print(f"error: the pipeline stopped after {produced} batch(es): {exn}", file=sys.stderr)
    print(json.dumps({"batches": produced, "skips": loader.skip_counts()}), flush=True)
    if produced == 0:
        print("error: no batch was produced (see the skip counters above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
