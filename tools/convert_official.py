#!/usr/bin/env python
"""Convert an official checkpoint of any registered model family into our format.

    python tools/convert_official.py --family meter --src meter_clip16_288_roberta_pretrain.ckpt --out DIR
    python tools/convert_official.py --family vilt --src vilt_200k_mlm_itm.ckpt --config vilt_config.json --out DIR

The family's converter (epic/models/registry.py, beside its model) reads the file, infers every size it can from
the tensor shapes and takes the rest from ``--config`` (the family's own config values as JSON); unknown or missing
tensor keys are an error listing them. ``--option KEY=VALUE`` passes a converter switch (METER:
``allow_missing_heads=true`` for a fine-tuned checkpoint). Writes DIR/model.safetensors and DIR/config.json,
loadable with the family's ``from_pretrained(DIR)`` and as ``epic.teacher`` / ``--init``. Checkpoints are
pickles: convert only files you trust.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from epic.models.registry import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--src", required=True, help="the official checkpoint file")
    parser.add_argument("--out", required=True, help="output folder for model.safetensors + config.json")
    parser.add_argument("--config", default=None, help="JSON with the family's config values (what shapes cannot tell)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a converter option (value parsed as YAML), e.g. allow_missing_heads=true")
    return parser.parse_args(argv)


def parse_options(pairs: list[str]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--option {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        options[key] = yaml.safe_load(value)
    return options


def convert(family: str, src: str, out: str, config=None, **options):
    from epic.models.registry import load_official

    if not Path(src).is_file():
        raise SystemExit(f"--src {src} is not a file")
    model = load_official(family, src, config, **options)  # converter errors (keys, sizes) raise before writing
    model.save_pretrained(out)
    return model


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model = convert(args.family, args.src, args.out, args.config, **parse_options(args.option))
    except (ValueError, OSError, KeyError) as err:
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    for source, report in getattr(model, "official_config_report", {}).items():  # what a converter read, if it says
        print(f"{source}: used {', '.join(f'{k}->{v}' for k, v in report['used'].items()) or 'nothing'}; "
              f"ignored (training-only) {', '.join(report['ignored']) or 'nothing'}")
    sizes = {k: v for k, v in dataclasses.asdict(model.config).items() if v is not None}
    print(f"wrote {args.out}/model.safetensors and config.json ({args.family}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    print(" ".join(f"{k}={v}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
