"""Sec. 3 "Identifying modality bias" (Fig. 2a, App. A): a VLM trained with CMLM and a text-only LM trained with
MLM on the same captions and the same masked positions, simultaneously; their accuracy over training, overall and
split into content and filler words.

    python -m epic.studies.modality_bias --config shapes_tiny --out DIR [--steps N] [--eval-every K] [key=value ...]

Every mini-batch of the pretraining loader (images, captions, BERT-masked captions with 15% of the tokens
selected, content_mask) goes to both models: the VLM (the config's model.family, any registered family; its
family's pretraining losses, METER: ITM + CMLM, or CMLM alone with --vlm-objective cmlm; X-VLM trains on caption
batches only, without region steps) reads the masked caption and the image, the LM (a masked LM of the VLM's
text family, RoBERTa or BERT, as deep as the VLM's text tower plus its fusion layers, same width) only the masked
caption. A third, independent
text-only LM (the "sampler") is trained the same way; it stands in for App. A's roberta-base in the
unmasked-use study (corrupting unmasked tokens). Accuracy is measured on the val shards (their masking is fixed,
so every evaluation scores the same positions) every `--eval-every` steps and written to DIR/curve.jsonl; the
models go to DIR/{vlm,lm,sampler}.pt with DIR/models.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------ models
def text_side_depth(model_cfg) -> int:
    """Layers between a caption token and the VLM's MLM head: the text tower plus the fusion layers.

    Read through the names every family's config gives the EPIC generator (``text_layers``) and, where the
    fusion layers are separate from them, ``num_fusion_layers``: METER (text tower + co-attention layers), ALBEF
    (BERT layers before ``fusion_layer`` + the fusion layers). X-VLM's ``text_layers`` is its whole BERT, fusion
    included, and ViLT's the joint transformer, so they have no separate count."""
    separate = getattr(model_cfg, "num_fusion_layers", 0)
    whole = getattr(model_cfg, "num_hidden_layers", None)
    if whole is not None and model_cfg.text_layers == whole:
        separate = 0  # text_layers already counts the fusion layers
    return model_cfg.text_layers + separate


def text_only_lm(model_cfg, seed: int) -> torch.nn.Module:
    """A masked LM of the VLM's text family (RoBERTa for METER, BERT for ViLT, ALBEF, X-VLM) with its text side's
    width and depth (`text_side_depth`): it never sees pixels."""
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    classes = {"roberta": (RobertaConfig, RobertaForMaskedLM), "bert": (BertConfig, BertForMaskedLM)}
    config_class, model_class = classes[model_cfg.text_model_type]
    torch.manual_seed(seed)
    config = config_class(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.text_hidden_size,
                          num_hidden_layers=text_side_depth(model_cfg), num_attention_heads=model_cfg.text_heads,
                          intermediate_size=model_cfg.text_intermediate_size,
                          max_position_embeddings=model_cfg.max_text_len + 2, pad_token_id=model_cfg.pad_token_id,
                          hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout,
                          initializer_range=model_cfg.initializer_range)
    return model_class(config)


def lm_logits(lm, batch: dict) -> torch.Tensor:
    """MLM logits [B, L, V] of the text-only LM: it reads the masked caption and its attention mask, nothing else."""
    return lm(input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"]).logits


def vlm_logits(vlm, batch: dict) -> torch.Tensor:
    """CMLM logits [B, L, V] of the VLM on (masked caption, image)."""
    out = vlm.infer(input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    return vlm.mlm_score(out["text_feats"])


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, content_mask: torch.Tensor) -> dict[str, int]:
    """Correct / total predictions at the masked positions (labels != -100): all, content words, filler words."""
    masked = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & masked
    content = content_mask.bool()
    return {"correct": int(correct.sum()), "total": int(masked.sum()),
            "correct_content": int((correct & content).sum()), "total_content": int((masked & content).sum()),
            "correct_filler": int((correct & ~content).sum()), "total_filler": int((masked & ~content).sum())}


def accuracies(counts: dict[str, int]) -> dict[str, Optional[float]]:
    def ratio(num, den):
        return counts[num] / counts[den] if counts[den] else None

    return {"acc": ratio("correct", "total"), "acc_content": ratio("correct_content", "total_content"),
            "acc_filler": ratio("correct_filler", "total_filler")}


def content_chance(labels: torch.Tensor, content_mask: torch.Tensor, tokenizer) -> Optional[float]:
    """Accuracy of a predictor that knows each masked content word's category (colour, shape, ...) but not the
    image: the mean of 1/|category| over the masked content tokens whose word has a category."""
    from epic.data.synthetic import WORD_CATEGORIES

    size_of = {word: len(words) for words in WORD_CATEGORIES.values() for word in words}
    ids = labels[(labels != IGNORE_INDEX) & content_mask.bool()].tolist()
    sizes = [size_of.get(tokenizer.decode([i]).strip()) for i in ids]
    sizes = [s for s in sizes if s]
    return sum(1.0 / s for s in sizes) / len(sizes) if sizes else None


# ------------------------------------------------------------------------------------------------ one step
def joint_step(vlm, lm, batch: dict, rng: torch.Generator, vlm_objective: str = "base") -> dict:
    """Losses of both models on one mini-batch: the VLM's (its family's pretraining losses, METER: ITM + CMLM; or
    CMLM alone) and the LM's MLM, on the very same masked captions (batch["mlm_input_ids"], batch["mlm_labels"]);
    the LM gets no image. ("meter" is the old name of "base".)"""
    if vlm_objective in ("base", "meter"):
        from epic.objectives.vanilla import vanilla_losses

        vlm_loss = vanilla_losses(vlm, batch, rng)["loss"]
    elif vlm_objective == "cmlm":
        vlm_loss = masked_lm_loss(vlm_logits(vlm, batch), batch["mlm_labels"])
    else:
        raise ValueError(f"vlm_objective must be 'base' (the family's pretraining losses) or 'cmlm', got "
                         f"{vlm_objective!r}")
    return {"vlm": vlm_loss, "lm": masked_lm_loss(lm_logits(lm, batch), batch["mlm_labels"])}


@torch.no_grad()
def evaluate(vlm, lm, batches: list[dict], tokenizer) -> dict:
    """Val accuracies of both models (all / content / filler) and the content words' category chance."""
    was = vlm.training, lm.training
    vlm.eval(), lm.eval()
    totals = {"vlm": {}, "lm": {}}
    chance_sum, chance_n = 0.0, 0
    for batch in batches:
        for name, logits in (("vlm", vlm_logits(vlm, batch)), ("lm", lm_logits(lm, batch))):
            for key, value in accuracy_counts(logits, batch["mlm_labels"], batch["content_mask"]).items():
                totals[name][key] = totals[name].get(key, 0) + value
        chance = content_chance(batch["mlm_labels"], batch["content_mask"], tokenizer)
        if chance is not None:
            n = int(((batch["mlm_labels"] != IGNORE_INDEX) & batch["content_mask"].bool()).sum())
            chance_sum, chance_n = chance_sum + chance * n, chance_n + n
    vlm.train(was[0]), lm.train(was[1])
    out = {f"{name}_{k}": v for name in ("vlm", "lm") for k, v in accuracies(totals[name]).items()}
    out["content_chance"] = chance_sum / chance_n if chance_n else None
    out["masked_tokens"] = totals["vlm"].get("total", 0)
    return out


# ------------------------------------------------------------------------------------------------ training
def _wiring():
    """The config -> objects helpers."""
    from epic import wiring

    return wiring


def linear_schedule(optimizer, steps: int, warmup_ratio: float):
    warmup = max(1, int(math.ceil(warmup_ratio * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(config: str, overrides: list[str], out: Path, steps: int, eval_every: int, eval_batches: int,
          vlm_objective: str = "base", log=print) -> dict:
    from epic.config import load_config
    from epic.data import build_eval_loader

    build = _wiring()
    cfg = load_config(config, overrides)
    if cfg.epic.enabled:
        raise ValueError("the modality-bias study trains a vanilla VLM: use a config without epic.enabled")
    torch.manual_seed(cfg.run.seed)
    paths = build.resolve_data_paths(cfg)
    if not paths.val_shards:
        raise ValueError("the modality-bias study measures on val shards: set data.val_shards (or data.root)")
    vlm, tokenizer = build.build_model(cfg, paths)
    lm, sampler = text_only_lm(cfg.model, cfg.run.seed + 1), text_only_lm(cfg.model, cfg.run.seed + 2)
    loader = build.build_train_data(cfg, paths, tokenizer, 0, 1)
    val = list(b for _, b in zip(range(eval_batches), build_eval_loader(
        paths.val_shards, tokenizer, image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
        batch_size=cfg.data.eval_batch_size, normalization=cfg.data.normalization)))
    models = {"vlm": vlm, "lm": lm, "sampler": sampler}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
                  for k, m in models.items()}
    schedules = {k: linear_schedule(o, steps, cfg.train.warmup_ratio) for k, o in optimizers.items()}
    rng = torch.Generator().manual_seed(cfg.run.seed)
    out.mkdir(parents=True, exist_ok=True)
    curve_path = out / "curve.jsonl"
    curve_path.write_text("")
    start = time.time()
    for m in models.values():
        m.train()

    def save_models() -> None:  # at every evaluation, so that a stopped run still serves unmasked-use
        for name, model in models.items():
            torch.save(model.state_dict(), out / f"{name}.pt.tmp")
            (out / f"{name}.pt.tmp").replace(out / f"{name}.pt")

    def record(step: int) -> dict:
        row = {"step": step, **evaluate(vlm, lm, val, tokenizer)}
        with open(curve_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"[modality-bias] step {step}/{steps} ({time.time() - start:.0f} s): "
            + " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
        return row

    # written before training: a stopped run's saved models still serve unmasked-use
    (out / "models.json").write_text(json.dumps({"config": config, "overrides": overrides,
                                                 "model": dataclasses.asdict(cfg.model), "steps": steps,
                                                 "tokenizer": paths.tokenizer, "val_shards": paths.val_shards,
                                                 "vlm_objective": vlm_objective,
                                                 "data": {"image_size": cfg.data.image_size,
                                                          "max_text_len": cfg.data.max_text_len,
                                                          "eval_batch_size": cfg.data.eval_batch_size,
                                                          "normalization": cfg.data.normalization}},
                                                indent=1) + "\n")
    last = record(0)
    for step, batch in zip(range(1, steps + 1), loader):
        losses = joint_step(vlm, lm, batch, rng, vlm_objective)
        losses["sampler"] = masked_lm_loss(lm_logits(sampler, batch), batch["mlm_labels"])
        for name, loss in losses.items():
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(models[name].parameters(), cfg.train.grad_clip)
            optimizers[name].step()
            schedules[name].step()
        after_step = getattr(vlm, "after_optimizer_step", None)  # ALBEF: momentum update (as the trainer does)
        if after_step is not None:
            after_step()
        if step % eval_every == 0 or step == steps:
            last = record(step)
            save_models()
    (out / "summary.json").write_text(json.dumps(last, indent=1) + "\n")
    return last


def load_trained(out: Path):
    """(vlm, lm, sampler, tokenizer, info) saved by `train` in `out`."""
    from epic.data import load_tokenizer
    from epic.models.loading import model_config_from_dict
    from epic.models.registry import build_model

    info = json.loads((out / "models.json").read_text())
    model_cfg = model_config_from_dict(info["model"], str(out / "models.json"))
    vlm = build_model(model_cfg)
    vlm.load_state_dict(torch.load(out / "vlm.pt", map_location="cpu"))
    lm, sampler = text_only_lm(model_cfg, 0), text_only_lm(model_cfg, 0)
    lm.load_state_dict(torch.load(out / "lm.pt", map_location="cpu"))
    sampler.load_state_dict(torch.load(out / "sampler.pt", map_location="cpu"))
    for m in (vlm, lm, sampler):
        m.eval()
    return vlm, lm, sampler, load_tokenizer(info["tokenizer"]), info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a vanilla pretraining config (shapes_tiny, meter_4m_ablation)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: the config's train.max_steps)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=8, help="val batches per evaluation")
    parser.add_argument("--vlm-objective", choices=("base", "meter", "cmlm"), default="base",
                        help="base: the family's pretraining losses (meter: its old name); cmlm: CMLM alone")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from epic.config import ConfigError, load_config, one_line

    try:
        steps = args.steps or load_config(args.config, args.overrides).train.max_steps
        torch.set_num_threads(max(1, torch.get_num_threads()))
        summary = train(args.config, args.overrides, Path(args.out), steps, args.eval_every, args.eval_batches,
                        args.vlm_objective)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
