#!/usr/bin/env python
"""Convert an official METER checkpoint (PyTorch-Lightning .ckpt) into our format: ``tools/convert_official.py
--family meter`` under METER's own flag names.

    python tools/convert_meter_ckpt.py --src meter_clip16_288_roberta_pretrain.ckpt --out DIR [--meter-config FILE]

Every size is read from the tensor shapes. What shapes cannot tell (``num_heads``, ``max_text_len``, ``drop_rate``,
the text tower type, ``image_size`` to resample the position embedding) comes from the checkpoint's own Lightning
``hyper_parameters`` when it has them, then from ``--meter-config``: METER's own config as JSON or YAML (the keys
of meter/config.py as they are, e.g. ``{"hidden_size": 768, "num_top_layer": 6, "num_heads": 12, "vit":
"ViT-B/16", "tokenizer": "roberta-base", "max_text_len": 50, "image_size": 288, "drop_rate": 0.1, ...}``, or
Lightning's hparams.yaml), and/or METERConfig fields (``vit_heads``, ``text_heads``, ...). Training-only keys are
ignored; the keys used and ignored are printed. Writes DIR/model.safetensors and DIR/config.json, loadable with
``epic.models.meter.METER.from_pretrained(DIR)``. Checkpoints are pickles: convert only files you trust.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convert_official  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="official METER .ckpt (or a plain state-dict file)")
    parser.add_argument("--out", required=True, help="output folder for model.safetensors + config.json")
    parser.add_argument("--meter-config", default=None,
                        help="METER's own config (JSON/YAML, meter/config.py keys) and/or METERConfig fields")
    parser.add_argument("--allow-missing-heads", action="store_true",
                        help="accept a fine-tuned checkpoint without mlm_score/itm_score (they stay randomly initialised)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    forwarded = ["--family", "meter", "--src", args.src, "--out", args.out]
    if args.meter_config:
        forwarded += ["--config", args.meter_config]
    if args.allow_missing_heads:
        forwarded += ["--option", "allow_missing_heads=true"]
    convert_official.main(forwarded)


if __name__ == "__main__":
    main()
