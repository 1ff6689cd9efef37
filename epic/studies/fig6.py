"""Fig. 6 (App. H): ratio of inconsistent samples and ITC accuracy on inconsistent tokens over training, per mask
ratio. Read from the EPIC runs' metrics.jsonl (epic/inconsistent_sentence_ratio, epic/itc_acc_inconsistent): the
runs are Table 6's pretraining runs (no fine-tuning is needed here)."""
from __future__ import annotations

from .common import (collect, curve_plot, format_cell, markdown_table, pretraining_units, read_jsonl, seed_bands,
                     settings_note, write_report)
from .table6 import VARIANTS

TITLE = "Fig. 6: inconsistent samples and ITC accuracy on inconsistent tokens, per mask ratio"
SERIES = (("inconsistent-sample ratio", "epic/inconsistent_sentence_ratio"),
          ("ITC acc. (inconsistent tokens)", "epic/itc_acc_inconsistent"),
          ("inconsistent-token ratio", "epic/inconsistent_token_ratio"))


def units(study):
    study.downstream = False
    return pretraining_units(study, VARIANTS)


def curves_of(result: dict, tag: str) -> list[tuple[float, float]]:
    from pathlib import Path

    rows = read_jsonl(Path(result["dir"]) / "metrics.jsonl")
    return [(row["step"], row[tag]) for row in rows if row.get(tag) is not None]


def report(study):
    study.downstream = False
    results = collect(study, VARIANTS)
    rows, failures = [], []
    for variant in VARIANTS:
        ok = [r for r in results if r["variant"] == variant.name and "error" not in r]
        failures += [f"- mask ratio {variant.name} seed {r['seed']}: {r['error']}" for r in results
                     if r["variant"] == variant.name and "error" in r]
        cells = []
        for _, tag in SERIES:
            finals = [c[-1][1] for c in (curves_of(r, tag) for r in ok) if c]
            cells.append(format_cell([100.0 * v for v in finals]))
        rows.append([variant.name, *cells, str(len(ok))])
    table = markdown_table(["Mask ratio", *(f"{label} (%, last log)" for label, _ in SERIES), "seeds"], rows)
    for label, tag in SERIES[:2]:
        bands, means = {}, {}
        for variant in VARIANTS:
            per_seed = [curves_of(r, tag) for r in results if r["variant"] == variant.name and "error" not in r]
            per_seed = [c for c in per_seed if c]
            bands[f"ratio {variant.name}"] = seed_bands(per_seed)
            means[f"ratio {variant.name}"] = [(x, m) for x, m, _ in bands[f"ratio {variant.name}"]]
        name = "inconsistent_samples" if "sample" in label else "itc_acc_inconsistent"
        curve_plot(study.out / f"fig6_{name}.png", means, "step", label, f"{label} (mean ± std over seeds)", bands)
    write_report(study.out, study.name, TITLE, table,
                 [settings_note(study), "Curves: fig6_inconsistent_samples.png, fig6_itc_acc_inconsistent.png "
                  "(logged every train.log_every steps).", *(["", "Missing or failed runs:", *failures]
                                                               if failures else [])], study.log)
    return table
