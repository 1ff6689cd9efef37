"""Sec. 3 "Under-utilization of unmasked tokens" (Fig. 2b, App. A): with the VLM and LM of the modality-bias study,
corrupt a further τ of the unmasked tokens and measure the relative CMLM / MLM accuracy drop against the measured
corruption ratio.

App. A: round 1 masks 15% of the tokens (the val masking of the loader); round 2 masks τ of the tokens that round 1
left unmasked, and a masked LM (App. A: roberta-base; here the modality-bias study's independent text-only
"sampler" LM) fills them in by sampling. Some are recovered (the sample equals the original), some are not. The
corruption ratio is the mean over the sentences of (# tokens not recovered) / (# tokens of the sentence). The
corrupted, round-1-masked sentence goes to the VLM (with its image) and the LM; their accuracy on the round-1
positions, relative to the clean sentence's, gives the drop.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import Unit, _stage, analysis_dir, curve_plot, format_cell, markdown_table, mean_std, write_report
from .modality_bias_study import seed_dir

TITLE = "Sec. 3 / Fig. 2b: relative accuracy drop of CMLM (VLM) and MLM (LM) when unmasked tokens are corrupted"
TAUS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
IGNORE_INDEX = -100


def real_tokens(batch: dict) -> torch.Tensor:
    """[B, L] bool: the sentence's tokens (attention mask without <s>, </s> and padding)."""
    return batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()


def second_round_positions(labels: torch.Tensor, real: torch.Tensor, tau: float,
                           generator: torch.Generator) -> torch.Tensor:
    """[B, L] bool: per sentence, round(τ · n) of its n real tokens that round 1 left unmasked, uniformly."""
    candidates = real & (labels == IGNORE_INDEX)
    scores = torch.rand(labels.shape, generator=generator).masked_fill(~candidates, 2.0)
    order = scores.argsort(dim=1)
    counts = torch.round(tau * candidates.sum(1).float()).long()
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(labels.shape[1]).expand_as(order))
    return (rank < counts[:, None]) & candidates


def sample_replacements(sampler, batch: dict, round2: torch.Tensor, exclude_ids: Sequence[int],
                        mask_token_id: int, generator: torch.Generator) -> torch.Tensor:
    """Round-1-masked ids with the round-2 positions masked too and then filled in by sampling from the sampler
    LM (never a special token)."""
    masked = batch["mlm_input_ids"].masked_fill(round2, mask_token_id)
    with torch.no_grad():
        logits = sampler(input_ids=masked, attention_mask=batch["attention_mask"]).logits.float()
    logits[..., list(exclude_ids)] = float("-inf")
    probs = logits[round2].softmax(-1)
    corrupted = batch["mlm_input_ids"].clone()
    if probs.numel():
        corrupted[round2] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return corrupted


def corruption_ratio(original_ids: torch.Tensor, corrupted_ids: torch.Tensor, round2: torch.Tensor,
                     real: torch.Tensor) -> float:
    """App. A: mean over sentences of (# round-2 tokens not recovered) / (# tokens of the sentence)."""
    not_recovered = (round2 & (corrupted_ids != original_ids)).sum(1).float()
    length = real.sum(1).float()
    keep = length > 0
    return float((not_recovered[keep] / length[keep]).mean()) if keep.any() else 0.0


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    masked = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & masked).sum()), int(masked.sum())


def measure(vlm, lm, sampler, batches: list[dict], tokenizer, taus: Sequence[float], seed: int) -> list[dict]:
    """Per τ: measured corruption ratio, CMLM and MLM accuracy on the round-1 positions, relative drops."""
    from .modality_bias import lm_logits, vlm_logits

    exclude = sorted(set(tokenizer.all_special_ids))
    rows = []
    for tau in taus:
        generator = torch.Generator().manual_seed(seed * 1000 + int(round(tau * 100)))
        ratios, weights, vlm_ok, lm_ok, total = [], [], 0, 0, 0
        for batch in batches:
            real = real_tokens(batch)
            round2 = second_round_positions(batch["mlm_labels"], real, tau, generator)
            corrupted = sample_replacements(sampler, batch, round2, exclude, tokenizer.mask_token_id, generator)
            ratios.append(corruption_ratio(batch["input_ids"], corrupted, round2, real))
            weights.append(int((real.sum(1) > 0).sum()))
            view = {**batch, "mlm_input_ids": corrupted}
            with torch.no_grad():
                c, n = _accuracy(vlm_logits(vlm, view), batch["mlm_labels"])
                vlm_ok, total = vlm_ok + c, total + n
                lm_ok += _accuracy(lm_logits(lm, view), batch["mlm_labels"])[0]
        ratio = sum(r * w for r, w in zip(ratios, weights)) / max(1, sum(weights))
        rows.append({"tau": tau, "corruption_ratio": ratio, "vlm_acc": vlm_ok / max(1, total),
                     "lm_acc": lm_ok / max(1, total), "masked_tokens": total})
    clean = rows[0] if taus[0] == 0.0 else None
    for row in rows:
        for model in ("vlm", "lm"):
            base = clean[f"{model}_acc"] if clean else None
            row[f"{model}_rel_drop"] = (base - row[f"{model}_acc"]) / base if base else None
    return rows


def run_seed(study, seed: int) -> dict:
    out = analysis_dir(study, "unmasked-use") / f"seed{seed}.json"

    def compute() -> dict:
        from epic.data import build_eval_loader

        from .modality_bias import load_trained

        trained = seed_dir(study, seed)
        if not (trained / "summary.json").is_file():
            raise FileNotFoundError(f"{trained} has no finished modality-bias run (run the modality-bias study)")
        vlm, lm, sampler, tokenizer, info = load_trained(trained)
        data = info["data"]
        batches = [b for _, b in zip(range(2 if study.scale.name == "smoke" else 8), build_eval_loader(
            info["val_shards"], tokenizer, image_size=data["image_size"], max_text_len=data["max_text_len"],
            batch_size=data["eval_batch_size"], normalization=data.get("normalization", "clip")))]
        return {"seed": seed, "rows": measure(vlm, lm, sampler, batches, tokenizer, TAUS, seed)}

    # the run it reads (its folder names its settings): a run with other settings is measured again, never reused
    return _stage(out, compute, study.collect_only, settings=[str(seed_dir(study, seed))])


def units(study):
    from .modality_bias_study import run_seed as train_seed

    return ([Unit(f"modality-bias seed {s}", 0, lambda s=s: train_seed(study, s)) for s in study.seeds]
            + [Unit(f"unmasked-use seed {s}", 1, lambda s=s: run_seed(study, s)) for s in study.seeds])


def report(study):
    study.collect_only = True
    per_seed = []
    for s in study.seeds:
        try:
            per_seed.append(run_seed(study, s)["rows"])
        except Exception:  # noqa: BLE001  (reported as missing below)
            pass
    rows, curves = [], {"VLM (CMLM)": [], "LM (MLM)": []}
    for i, tau in enumerate(TAUS):
        at = [seed_rows[i] for seed_rows in per_seed]

        def cell(key, scale=100.0):
            return format_cell([scale * r[key] for r in at if r.get(key) is not None])

        rows.append([f"{tau:.2f}", cell("corruption_ratio"), cell("vlm_acc"), cell("vlm_rel_drop"), cell("lm_acc"),
                     cell("lm_rel_drop"), str(len(at))])
        x = mean_std([r["corruption_ratio"] for r in at])[0]
        for model, label in (("vlm", "VLM (CMLM)"), ("lm", "LM (MLM)")):
            y = mean_std([r[f"{model}_rel_drop"] for r in at if r.get(f"{model}_rel_drop") is not None])[0]
            if x is not None and y is not None:
                curves[label].append((100.0 * x, 100.0 * y))
    table = markdown_table(["τ", "corruption ratio (%)", "VLM CMLM acc. (%)", "VLM rel. drop (%)",
                            "LM MLM acc. (%)", "LM rel. drop (%)", "seeds"], rows)
    curve_plot(study.out / "fig2b.png", curves, "corruption ratio (%)", "relative accuracy drop (%)",
               "Fig. 2b: corrupting unmasked tokens")
    notes = ["Models: the modality-bias study's VLM and LM of each seed; the corrupting MLM is its independent "
             "text-only sampler LM (App. A uses roberta-base). Accuracy on the round-1 (15%) positions of the val "
             "captions; relative drop = (clean − corrupted) / clean.",
             f"Seeds with results: {len(per_seed)} of {len(list(study.seeds))}."]
    write_report(study.out, study.name, TITLE, table, notes, study.log)
    return table
