#!/usr/bin/env python
"""Convert an official METER checkpoint (PyTorch-Lightning .ckpt) into our format.

    python tools/convert_meter_ckpt.py --src meter_clip16_288_roberta_pretrain.ckpt --out DIR [--meter-config cfg.json]

Every size is read from the tensor shapes; ``--meter-config`` (METERConfig fields as JSON) sets what shapes cannot
tell (``num_heads``, ``vit_heads``, ``text_heads`` when not width // 64, ``max_text_len``, ``image_size`` to resample
the position embedding). Writes DIR/model.safetensors and DIR/config.json, loadable with
``epic.models.meter.METER.from_pretrained(DIR)``. Checkpoints are pickles: convert only files you trust.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.models.meter import load_official_meter  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="official METER .ckpt (or a plain state-dict file)")
    parser.add_argument("--out", required=True, help="output folder for model.safetensors + config.json")
    parser.add_argument("--meter-config", default=None, help="JSON with METERConfig fields to override")
    parser.add_argument("--allow-missing-heads", action="store_true",
                        help="accept a fine-tuned checkpoint without mlm_score/itm_score (they stay randomly initialised)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not Path(args.src).is_file():
        raise SystemExit(f"--src {args.src} is not a file")
    model = load_official_meter(args.src, args.meter_config, allow_missing_heads=args.allow_missing_heads)
    model.save_pretrained(args.out)
    sizes = {k: v for k, v in dataclasses.asdict(model.config).items() if v is not None}
    print(f"wrote {args.out}/model.safetensors and config.json "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(" ".join(f"{k}={v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
