"""Vanilla pretraining (the family's base losses, METER: ITM + MLM) with every image encoded once and shared.

``SaliencyCMLM`` is the "†CMLM" variant of App. J (Table 8): the same step, with the MLM positions drawn from a
frozen teacher's saliency (Eq. 8) instead of uniformly; no generator, no ITC.

The official code runs the vision tower once per objective (and once more for ITM's negative images). Encoding
once and indexing the features for ITM's mismatched pairs gives the same losses and, because gradients from both
uses accumulate into the one shared activation, the same parameter gradients at ~3/4 of the FLOPs
(tools/bench_step.py measures it).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .itm import draw_itm_pairs, itm_loss
from .mlm import compute_mlm
from .recipes import BATCH_KEYS, base_losses, check_batch  # noqa: F401


def vanilla_losses(model, batch: dict, generator: torch.Generator, share_image_embeds: bool = True
                   ) -> Dict[str, torch.Tensor]:
    """``loss`` = the family's base losses (METER: L_ITM + L_MLM, unweighted), plus each term and accuracy, detached.

    ``share_image_embeds=False`` is METER's official way (the vision tower runs for each pass), for benchmarks.
    """
    check_batch(batch)
    pixel_values = batch["pixel_values"]
    if share_image_embeds:
        out = base_losses(model, batch, model.encode_image(pixel_values, generator=generator), generator)
    else:
        pairs = draw_itm_pairs(pixel_values.shape[0], generator, pixel_values.device)
        mlm = compute_mlm(model, batch, model.encode_image(pixel_values))
        itm = itm_loss(model, batch["input_ids"], batch["attention_mask"],
                       model.encode_image(pixel_values[pairs.image_index]), pairs.labels)
        out = {"loss": mlm["loss_mlm"] + itm["loss_itm"], **mlm, **itm}
    return {k: (v if k == "loss" else v.detach()) for k, v in out.items()}


class VanillaObjective:
    """The trainer's objective protocol (docs/CONTRACTS.md) for vanilla pretraining (the family's base losses with
    the image encoded once per step; ``cmlm``, a SaliencyCMLM: †CMLM); fine-tuning subclasses it."""

    def __init__(self, cmlm=None) -> None:
        self.cmlm = cmlm

    def extra_modules(self) -> dict:
        return {}  # no engine besides the VLM's

    def attach_engines(self, engines: dict) -> None:
        pass

    def extra_engines(self) -> dict:
        return {}

    def losses(self, model, batch: dict, rng: torch.Generator, step: int) -> dict:
        if self.cmlm is not None:
            return cmlm_losses(model, batch, rng, self.cmlm)
        return vanilla_losses(model, batch, rng, share_image_embeds=True)

    def log_values(self, step: int) -> dict:
        return {}

    def images(self, step: int) -> dict:
        return {}

    def flops_per_sample(self, cfg) -> float:
        flops = step_flops_per_sample(cfg.model, share_image_embeds=True, text_len=cfg.data.max_text_len)
        if self.cmlm is not None:
            from .epic_flops import teacher_flops_per_sample

            with torch.random.fork_rng(devices=[]):
                flops += teacher_flops_per_sample(self.cmlm.teacher.config, cfg.data.max_text_len)
        return flops

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SaliencyCMLM:
    """†CMLM (App. J): replaces a batch's ``mlm_input_ids`` / ``mlm_labels`` by saliency-masked ones.

    ``teacher``: an ``epic.models.teacher.SaliencyTeacher`` (frozen, inference mode); ``probability``: the MLM
    budget (data.mlm_probability, m = ceil(p * len)); ``replacement_ids``: BERT's random-replacement ids.
    """

    def __init__(self, teacher, probability: float, mask_token_id: int, replacement_ids: torch.Tensor):
        self.teacher, self.probability = teacher, probability
        self.mask_token_id, self.replacement_ids = mask_token_id, replacement_ids

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        from .saliency import saliency_mlm_inputs

        query, keys = self.teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        ids, labels, positions, alpha = saliency_mlm_inputs(batch, query.clone(), keys.clone(), self.probability,
                                                            self.mask_token_id, self.replacement_ids, generator)
        return {**batch, "mlm_input_ids": ids, "mlm_labels": labels, "cmlm_positions": positions,
                "cmlm_alpha": alpha}


def cmlm_losses(model, batch: dict, generator: torch.Generator, cmlm: SaliencyCMLM) -> Dict[str, torch.Tensor]:
    """†CMLM's step: L_ITM + L_MLM on saliency-masked captions; ``content_hit_rate`` when the batch has content_mask
    (the shapes world: share of masked positions on content words)."""
    masked = cmlm(batch, generator)
    out = vanilla_losses(model, masked, generator)
    if "content_mask" in batch:
        positions = masked["cmlm_positions"]
        hits = (positions & batch["content_mask"].to(positions.device)).sum()
        out["cmlm_content_hit_rate"] = (hits.float() / positions.sum().clamp(min=1)).detach()
    return out


def step_flops_per_sample(cfg, share_image_embeds: bool = True, text_len: Optional[int] = None,
                          batch_size: int = 2) -> float:
    """Training FLOPs (forward + backward) per sample of ``vanilla_losses`` for a model config's sizes.

    Counted by FlopCounterMode on the meta device: exact for these shapes, no memory, a few seconds for METER-B.
    Captions are taken at full length (``text_len``, default ``cfg.max_text_len``). For TFLOP/s and MFU logging.
    """
    from torch.utils.flop_counter import FlopCounterMode

    length = text_len or cfg.max_text_len
    meta = torch.device("meta")
    from .epic_flops import meta_model

    model = meta_model(cfg)
    ids = torch.zeros(batch_size, length, dtype=torch.long, device=meta)
    batch = {"pixel_values": torch.empty(batch_size, 3, cfg.image_size, cfg.image_size, device=meta),
             "input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids, "mlm_labels": ids}
    with FlopCounterMode(display=False) as counter:
        vanilla_losses(model, batch, torch.Generator(), share_image_embeds)["loss"].backward()
    return counter.get_total_flops() / batch_size
