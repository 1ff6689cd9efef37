"""The modality-bias study's driver: one joint VLM + LM training per seed (epic.studies.modality_bias, run as a
subprocess with the scale's vanilla config), then Fig. 2a (accuracy over training) and the table."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .common import (Unit, _stage, analysis_dir, curve_plot, format_cell, markdown_table, read_jsonl, row_label,
                     run_command, seed_bands, write_report)

TITLE = "Sec. 3 / Fig. 2a: modality bias, CMLM accuracy of a VLM vs MLM accuracy of a text-only LM (same masks)"
COLUMNS = (("all", "acc"), ("content words", "acc_content"), ("filler words", "acc_filler"))


def settings(study) -> list[str]:
    """The joint training's arguments, except the seed and the output folder."""
    scale = study.scale
    overrides = [f"data.root={scale.world}", "data.num_workers=0"] if scale.world is not None else []
    batch = ["data.micro_batch_size=32"] if scale.world is not None else []
    every = max(1, scale.modality_steps // 10)
    return ["--config", scale.vanilla_config, "--steps", str(scale.modality_steps), "--eval-every", str(every),
            "--eval-batches", "2" if scale.name == "smoke" else "8", *overrides, *batch]


def seed_dir(study, seed: int) -> Path:
    """RUNS/<scale>/modality-bias/<steps>-steps-<digest of the settings>/seed<N>: a run with other settings (another
    --steps, world or config) gets its own folder, so neither this report nor unmasked-use reads a stale one."""
    digest = hashlib.sha1(json.dumps(settings(study)).encode()).hexdigest()[:8]
    return analysis_dir(study, "modality-bias") / f"{study.scale.modality_steps}-steps-{digest}" / f"seed{seed}"


def command(study, seed: int) -> list[str]:
    return [sys.executable, "-m", "epic.studies.modality_bias", "--out", str(seed_dir(study, seed)),
            *settings(study), f"run.seed={seed}"]


def run_seed(study, seed: int) -> dict:
    out = seed_dir(study, seed)
    return _stage(out / "summary.json", lambda: json.loads(run_command(command(study, seed), out / "log.txt")),
                  study.collect_only)


def units(study):
    return [Unit(f"modality-bias seed {s}", 0, lambda s=s: run_seed(study, s)) for s in study.seeds]


def report(study):
    study.collect_only = True
    finished = [s for s in study.seeds if (seed_dir(study, s) / "summary.json").is_file()]
    curves = {s: read_jsonl(seed_dir(study, s) / "curve.jsonl") for s in study.seeds}
    # a run that has not finished (stopped, or still going) is reported at its last evaluation, and said so
    partial = {s: curves[s][-1]["step"] for s in study.seeds if s not in finished and len(curves[s]) > 1}
    finished += sorted(partial)
    final = {s: curves[s][-1] for s in finished if curves[s]}
    rows = []
    for model, label in (("vlm", "VLM (CMLM, sees the image)"), ("lm", "LM (MLM, text only)")):
        rows.append([label, *[format_cell([100.0 * final[s][f"{model}_{key}"] for s in final
                                           if final[s].get(f"{model}_{key}") is not None]) for _, key in COLUMNS],
                     str(len(final))])
    rows.append(["chance on content words (uniform within the word's category)", "—",
                 format_cell([100.0 * final[s]["content_chance"] for s in final if final[s].get("content_chance")]),
                 "—", str(len(final))])
    table = markdown_table(["Model", *(f"{c} acc. (%)" for c, _ in COLUMNS), "seeds"], rows)
    for _, key in COLUMNS:
        means, bands = {}, {}
        for model, label in (("vlm", "VLM (CMLM)"), ("lm", "LM (MLM)")):
            per_seed = [[(r["step"], r[f"{model}_{key}"]) for r in curves[s] if r.get(f"{model}_{key}") is not None]
                        for s in finished]
            bands[label] = seed_bands([p for p in per_seed if p])
            means[label] = [(x, m) for x, m, _ in bands[label]]
        chances = [final[s]["content_chance"] for s in final if final[s].get("content_chance")]
        hline = (sum(chances) / len(chances), "chance (content words)") if chances and key == "acc_content" else None
        curve_plot(study.out / f"fig2a_{key}.png", means, "training step", f"masked-token accuracy ({key})",
                   f"Fig. 2a, {key}: val accuracy at the same masked positions", bands, hline)
    missing = [s for s in study.seeds if s not in final]
    if partial:
        notes_partial = [f"Not finished: seed {s} is reported at its last evaluation, step {step} of "
                         f"{study.scale.modality_steps}." for s, step in sorted(partial.items())]
    else:
        notes_partial = []
    scale = study.scale
    recipe = {"meter": "ITM + CMLM", "vilt": "ITM + WPA + CMLM", "albef": "ITA + ITM + CMLM, momentum distillation",
              "xvlm": "ITC + ITM + CMLM on caption batches only (no region steps)"}.get(scale.family, "its base losses")
    notes = [f"Scale `{scale.name}`: `{scale.vanilla_config}`, {scale.modality_steps} steps of "
             f"joint training (the VLM: {scale.label}'s pretraining step, {recipe}; the LM: a masked LM of the "
             f"VLM's text family, as wide as its text side and as deep as its text tower plus fusion, text only), "
             f"the same masked captions (the config's masking), accuracy on the val shards at the end; "
             f"mean ± std over seeds. Curves: fig2a_acc.png, fig2a_acc_content.png, fig2a_acc_filler.png.",
             "Shapes world version 2 (epic/data/synthetic.py): no filler word gives a content word away."]
    notes += notes_partial
    if missing:
        notes.append(f"Seeds without any evaluation: {missing}.")
    write_report(study.out, study.name, row_label(TITLE, scale), table, notes, study.log)
    return table
