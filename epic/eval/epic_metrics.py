"""EPIC's measurements (paper Fig. 4, Fig. 6, App. H) and the Fig. 4-style saliency figure.

Per micro-batch the objective adds counts (device tensors, no host synchronisation); ``EpicMeasurements.pop``
turns the sums since the last call into the ratios logged under ``epic/``:

    inconsistent_token_ratio      |T| / real tokens                      (Fig. 6a, per token)
    inconsistent_sentence_ratio   sentences with |T| >= 1 / sentences     (Fig. 6a, per sentence)
    itc_acc_inconsistent          ITC accuracy on the tokens in T         (Fig. 6b)
    itc_acc_consistent            ITC accuracy on the other real tokens
    gen_acc_masked                share of masked positions where the sampled token is the original (1 - |T|/|M|)
    saliency_entropy              mean entropy of alpha per sentence (nats); _normalized divides by log(len)
    content_hit_rate              share of masked positions on content words (shapes world only) ...
    content_hit_rate_uniform      ... and its expectation under uniform masking of the same sentences

Summaries of a finished run for the demo table:

    python -m epic.eval.epic_metrics --run RUN_DIR [--last 5]     # JSON of the epic/ values, last 5 logs averaged
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

COUNTS = ("real_tokens", "inconsistent_tokens", "sentences", "inconsistent_sentences", "masked", "gen_correct",
          "itc_correct_inconsistent", "itc_correct_consistent", "consistent_tokens", "entropy", "entropy_normalized",
          "entropy_sentences", "normalized_sentences", "content_masked", "content_expected_uniform",
          "content_rows_masked")


@torch.no_grad()
def step_counts(real: torch.Tensor, masked: torch.Tensor, inconsistent: torch.Tensor,
                itc_logits: Optional[torch.Tensor], alpha: torch.Tensor, content: Optional[torch.Tensor]
                ) -> torch.Tensor:
    """The COUNTS of one micro-batch as a float64 vector (same device, no sync).

    real, masked, inconsistent, content: [B, L] bool; itc_logits [B, L] (z_i, > 0 means consistent); alpha [B, L].
    """
    real, masked, inconsistent = real.bool(), masked.bool(), inconsistent.bool()
    lengths = real.sum(dim=1)
    consistent = real & ~inconsistent
    out = dict.fromkeys(COUNTS, torch.zeros((), device=real.device, dtype=torch.float64))
    out["real_tokens"] = lengths.sum()
    out["inconsistent_tokens"] = inconsistent.sum()
    out["sentences"] = (lengths > 0).sum()
    out["inconsistent_sentences"] = inconsistent.any(dim=1).sum()
    out["masked"] = masked.sum()
    out["gen_correct"] = (masked & ~inconsistent).sum()
    out["consistent_tokens"] = consistent.sum()
    if itc_logits is not None:
        predicted_consistent = itc_logits > 0  # D_i = sigmoid(z_i) > 1/2
        out["itc_correct_inconsistent"] = (inconsistent & ~predicted_consistent).sum()
        out["itc_correct_consistent"] = (consistent & predicted_consistent).sum()
    alpha = alpha.float()  # entropy of alpha per sentence (nats): log(len) when uniform, 0 when one-hot
    entropy = -(alpha * torch.where(real & (alpha > 0), alpha.clamp_min(1e-30).log(), torch.zeros_like(alpha))).sum(1)
    has_tokens, has_two = lengths > 0, lengths > 1
    out["entropy"] = torch.where(has_tokens, entropy, torch.zeros_like(entropy)).sum()
    out["entropy_sentences"] = has_tokens.sum()
    log_len = lengths.clamp_min(2).double().log()
    out["entropy_normalized"] = torch.where(has_two, entropy.double() / log_len, torch.zeros_like(log_len)).sum()
    out["normalized_sentences"] = has_two.sum()
    if content is not None:
        content = content.bool() & real
        rows = content.any(dim=1) & has_tokens
        masked_per_row = masked.sum(dim=1).double()
        out["content_masked"] = (masked & content & rows[:, None]).sum()
        out["content_rows_masked"] = torch.where(rows, masked_per_row, torch.zeros_like(masked_per_row)).sum()
        share = content.sum(dim=1).double() / lengths.clamp_min(1).double()  # uniform masking hits content w.p. share
        out["content_expected_uniform"] = torch.where(rows, masked_per_row * share, torch.zeros_like(share)).sum()
    return torch.stack([out[name].to(torch.float64) for name in COUNTS])


def ratios(sums: Sequence[float]) -> dict[str, float]:
    """COUNTS sums -> the logged ratios (a ratio with an empty denominator is left out)."""
    s = dict(zip(COUNTS, sums))

    def ratio(num: str, den: str) -> Optional[float]:
        return s[num] / s[den] if s[den] > 0 else None

    values = {
        "inconsistent_token_ratio": ratio("inconsistent_tokens", "real_tokens"),
        "inconsistent_sentence_ratio": ratio("inconsistent_sentences", "sentences"),
        "itc_acc_inconsistent": ratio("itc_correct_inconsistent", "inconsistent_tokens"),
        "itc_acc_consistent": ratio("itc_correct_consistent", "consistent_tokens"),
        "gen_acc_masked": ratio("gen_correct", "masked"),
        "saliency_entropy": ratio("entropy", "entropy_sentences"),
        "saliency_entropy_normalized": ratio("entropy_normalized", "normalized_sentences"),
        "content_hit_rate": ratio("content_masked", "content_rows_masked"),
        "content_hit_rate_uniform": ratio("content_expected_uniform", "content_rows_masked"),
    }
    return {k: v for k, v in values.items() if v is not None}


class EpicMeasurements:
    """Sums of ``step_counts`` since the last ``pop`` (kept on the device until then)."""

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None

    def add(self, counts: torch.Tensor) -> None:
        self.sums = counts.clone() if self.sums is None else self.sums + counts

    def pop(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        values = ratios(self.sums.tolist())
        self.sums = None
        return values

    def state_dict(self) -> dict:
        return {"sums": None if self.sums is None else self.sums.tolist()}

    def load_state_dict(self, state: dict) -> None:
        sums = state.get("sums")
        self.sums = None if sums is None else torch.tensor(sums, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Fig. 4: the caption's tokens as bars of alpha
# ----------------------------------------------------------------------------------------------------------------
CONTENT_COLOUR, FILLER_COLOUR, INCONSISTENT_COLOUR = (40, 90, 200), (150, 150, 150), (210, 40, 40)


def render_saliency_figure(rows: Sequence[dict], slot_width: int = 64, bar_height: int = 90) -> np.ndarray:
    """An HWC uint8 image: one panel per caption, one bar per real token with height alpha_i / max alpha.

    Each row: ``tokens`` (str), ``alpha`` (float), optional ``content`` (bool: blue bar, else grey),
    ``replaced`` (str or None: the generator's token shown in red under the original) and ``p_inconsistent``
    (float: the VLM's 1 - D_i on the corrupted caption, a red tick at that height).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    panel_height = bar_height + 44
    width = max(len(r["tokens"]) for r in rows) * slot_width + 20
    image = Image.new("RGB", (max(width, 200), panel_height * len(rows) + 10), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for index, row in enumerate(rows):
        top = 5 + index * panel_height
        peak = max(max(row["alpha"]), 1e-12)
        draw.line([(10, top + bar_height), (width - 10, top + bar_height)], fill=(0, 0, 0))
        for slot, token in enumerate(row["tokens"]):
            left = 10 + slot * slot_width
            height = int(round(bar_height * row["alpha"][slot] / peak))
            content = bool(row.get("content", [False] * len(row["tokens"]))[slot])
            draw.rectangle([left + 8, top + bar_height - height, left + slot_width - 8, top + bar_height],
                           fill=CONTENT_COLOUR if content else FILLER_COLOUR)
            draw.text((left + 2, top + bar_height + 3), token[:9], fill=(0, 0, 0), font=font)
            replaced = (row.get("replaced") or [None] * len(row["tokens"]))[slot]
            if replaced is not None:
                draw.text((left + 2, top + bar_height + 17), replaced[:9], fill=INCONSISTENT_COLOUR, font=font)
            p_inconsistent = (row.get("p_inconsistent") or [None] * len(row["tokens"]))[slot]
            if p_inconsistent is not None:
                y = top + bar_height - int(round(bar_height * float(p_inconsistent)))
                draw.line([(left + 4, y), (left + slot_width - 4, y)], fill=INCONSISTENT_COLOUR, width=3)
    return np.asarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Run summaries
# ----------------------------------------------------------------------------------------------------------------
def summarize_run(run_dir: str | Path, last: int = 5) -> dict:
    """Mean of each ``epic/`` value (and the EPIC losses) over the last ``last`` log rows of ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run.dir of epic/pretrain.py (rank 0 writes "
                                f"metrics.jsonl there)?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    wanted = lambda key: key.startswith("epic/") or key in ("train/loss_itc", "train/loss_gen")  # noqa: E731
    rows = [r for r in rows if any(wanted(k) for k in r)]
    if not rows:
        raise ValueError(f"{path} has no epic/ values: was the run an EPIC run (epic.enabled=true)?")
    window = rows[-last:]
    summary: dict = {"run": str(run_dir), "step": window[-1]["step"], "log_rows_averaged": len(window)}
    keys = sorted({k for r in window for k in r if wanted(k)})
    for key in keys:
        values = [r[key] for r in window if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run.dir of an EPIC pretraining run")
    parser.add_argument("--last", type=int, default=5, help="average the last N log rows (default 5)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(summarize_run(args.run, args.last), indent=1))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
