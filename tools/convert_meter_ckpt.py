#!/usr/bin/env python
"""Convert an official METER checkpoint (PyTorch-Lightning .ckpt) into our format.

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
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epic.models.meter import load_official_meter  # noqa: E402


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
    if not Path(args.src).is_file():
        raise SystemExit(f"--src {args.src} is not a file")
    try:
        model = load_official_meter(args.src, args.meter_config, allow_missing_heads=args.allow_missing_heads)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    for source, report in model.official_config_report.items():
        print(f"{source}: used {', '.join(f'{k}->{v}' for k, v in report['used'].items()) or 'nothing'}; "
              f"ignored (training-only) {', '.join(report['ignored']) or 'nothing'}")
    model.save_pretrained(args.out)
    sizes = {k: v for k, v in dataclasses.asdict(model.config).items() if v is not None}
    print(f"wrote {args.out}/model.safetensors and config.json "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(" ".join(f"{k}={v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
