"""The demo's closing table: retrieval on the val shards for the untrained model, vanilla METER and EPIC-METER, and
the EPIC measurements of the EPIC run.

    python tools/demo_report.py --data DEMO/shapes --meter RUNS/meter [--epic RUNS/epic] [--json FILE]

"untrained" is the METER of the vanilla run's config at its initialisation (same seed as the trainer's step 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def retrieval_of(model, cfg, val_spec: str, tokenizer) -> dict:
    from epic.data import build_eval_loader
    from epic.eval.retrieval import evaluate_retrieval

    loader = build_eval_loader(val_spec, tokenizer, image_size=cfg.data.image_size,
                               max_text_len=cfg.data.max_text_len, batch_size=cfg.eval.batch_size,
                               normalization=cfg.data.normalization)
    with torch.no_grad():
        return evaluate_retrieval(model.eval(), loader, k_test=0, batch_size=cfg.eval.batch_size)


def untrained_like(cfg):
    from epic.models.registry import build_model

    torch.manual_seed(cfg.run.seed)  # the trainer's initialisation
    return build_model(cfg.model)  # the run's model family (model.family)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes world folder (val/ and tokenizer/)")
    parser.add_argument("--meter", "--vanilla", dest="meter", required=True,
                        help="run dir of the vanilla model (METER, or the family of DEMO_FAMILY)")
    parser.add_argument("--epic", default=None, help="run dir of the EPIC model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from epic.data import load_tokenizer
    from epic.engine.checkpoint import load_model_from_checkpoint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    val_spec = str(Path(args.data) / "val" / "*.tar")
    tokenizer = load_tokenizer(Path(args.data) / "tokenizer")
    meter, meter_cfg, _ = load_model_from_checkpoint(args.meter)
    name = {"meter": "METER", "vilt": "ViLT", "albef": "ALBEF"}.get(meter_cfg.model.family, meter_cfg.model.family)
    rows = {"untrained": retrieval_of(untrained_like(meter_cfg), meter_cfg, val_spec, tokenizer),
            name: retrieval_of(meter, meter_cfg, val_spec, tokenizer)}
    report = {"retrieval": rows}
    if args.epic:
        epic, epic_cfg, _ = load_model_from_checkpoint(args.epic)
        rows[f"EPIC-{name}"] = retrieval_of(epic, epic_cfg, val_spec, tokenizer)
        from epic.eval.epic_metrics import summarize_run

        report["epic_measurements"] = summarize_run(args.epic)

    print(f"\nretrieval on {val_spec} (ITM over all image x caption pairs, %)")
    print(f"{'model':12s}" + "".join(f"{m:>8s}" for m in METRICS))
    for name, metrics in rows.items():
        print(f"{name:12s}" + "".join(f"{metrics[m]:8.1f}" for m in METRICS))
    if "epic_measurements" in report:
        print("\nEPIC measurements (last logged values of the EPIC run)")
        for key, value in report["epic_measurements"].items():
            print(f"  {key:34s} {value:.4f}" if isinstance(value, float) else f"  {key:34s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
