"""X-VLM's pretraining recipe over tensors (zengyan-97/X-VLM models/xvlm.py, Pretrain.py).

Caption batches (image, caption): image-text contrastive over all-gathered in-batch features (no momentum encoder,
no queue), ITM with one hard negative text per image and one hard negative image per text (drawn from the softmax
similarities plus a floor), MLM on the fused text states (X-VLM's masking: epic.data.xvlm_masking).
Region batches (region of an image, its caption): the same three objectives on region features (the image tokens
with the pooled token recomputed over the box's patches, the fusion's cross-attention masked to the box) plus box
regression (L1 + GIoU, epic.objectives.box) of where the caption is in the whole image.

The model is reached through its methods only (encode_image, encode_text, fuse, region_embeds, image_features,
text_features, itm_score, mlm_score, bbox_score, temp); this module imports no model family.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .box import box_accuracy, box_regression_losses


# ------------------------------------------------------------------------------------------------ interleave
def is_region_step(step: int, iter_perc: float) -> bool:
    """Whether optimizer step ``step`` (0-based) trains on a region batch. X-VLM draws ``random() < iter_perc`` per
    step; here the choice is a pure function of the step (floor((s + 1) p) > floor(s p), an even spread with exactly
    the fraction ``iter_perc`` over any run), so a resumed run takes the same branch at every step."""
    if not 0.0 <= iter_perc <= 1.0:
        raise ValueError(f"iter_perc {iter_perc} must be in [0, 1] (X-VLM: regions.iter_perc 0.5)")
    if step < 0:
        raise ValueError(f"step {step} must be >= 0")
    return math.floor((step + 1) * iter_perc + 1e-9) > math.floor(step * iter_perc + 1e-9)


# --------------------------------------------------------------------------------------------- all-gather
class _GatherLocalGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward returns this rank's slice of the incoming gradient (X-VLM's AllGather:
    every rank computes the same loss over the gathered batch and data-parallel averaging combines the slices)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], rank
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rows * ctx.rank: ctx.rows * (ctx.rank + 1)]


def all_gather_features(x: torch.Tensor) -> torch.Tensor:
    """``x`` from every data-parallel rank, concatenated in rank order (``x`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherLocalGrad.apply(x)


# -------------------------------------------------------------------------------------------- contrastive
def contrastive_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
                     idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """X-VLM's image-text (or region-text) contrastive loss over the all-gathered batch: symmetric cross-entropy of
    ``image_feat @ text_feat.T / temp`` (features L2-normalised [B, D]). With ``idx`` [B] (e.g. image ids), every
    pair sharing an id is a positive and the target spreads uniformly over them."""
    image_all, text_all = all_gather_features(image_feat), all_gather_features(text_feat)
    logits = image_all @ text_all.t() / temp
    if idx is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    idx_all = all_gather_features(idx.view(-1, 1))
    positives = (idx_all == idx_all.t()).to(logits.dtype)
    targets = positives / positives.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (i2t + t2i) / 2


# --------------------------------------------------------------------------------------- matching (ITM)
def hard_negative_weights(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor,
                          idx: Optional[torch.Tensor] = None, floor: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling weights of hard negatives (local batch, no gradient): softmax of the similarities plus ``floor``, zero
    on positives (the diagonal, or every pair sharing ``idx``). Returns (image->text [B, B], text->image [B, B])."""
    with torch.no_grad():
        sim = image_feat @ text_feat.t() / temp
        w_i2t, w_t2i = F.softmax(sim, dim=1) + floor, F.softmax(sim.t(), dim=1) + floor
        positive = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device) if idx is None else \
            idx.view(-1, 1) == idx.view(1, -1)
        return w_i2t.masked_fill(positive, 0), w_t2i.masked_fill(positive, 0)


def sample_hard_negatives(weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One column per row drawn in proportion to ``weights`` [B, B] -> [B]. A row with no negative at all (a batch of
    one image) is an error: ITM needs at least two distinct images per rank."""
    if weights.is_meta:  # FLOP counting on the meta device: which negative is drawn does not change the FLOPs
        return torch.arange(weights.shape[0], device=weights.device).roll(1)
    if bool((weights.sum(dim=1) <= 0).any()):
        raise ValueError("a row has no negative to draw (every pair in the batch is positive); ITM with hard negatives "
                         "needs at least two distinct images per micro-batch")
    return torch.multinomial(weights.float().cpu(), 1, generator=generator).view(-1).to(weights.device)


def matching_loss(model, image_embeds: torch.Tensor, image_atts: torch.Tensor, image_feat: torch.Tensor,
                  text_embeds: torch.Tensor, text_atts: torch.Tensor, text_feat: torch.Tensor,
                  generator: Optional[torch.Generator] = None, idx: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's ITM: B positives, B (hard negative image, text) and B (image, hard negative text) pairs through the
    fusion layers; cross-entropy of the ITM head on the fused [CLS] (class 1 = matched). Returns (loss, accuracy)."""
    w_i2t, w_t2i = hard_negative_weights(image_feat, text_feat, model.temp, idx)
    neg_image = sample_hard_negatives(w_t2i, generator)  # for each text, a hard negative image
    neg_text = sample_hard_negatives(w_i2t, generator)  # for each image, a hard negative text
    images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], 0)
    atts = torch.cat([image_atts, image_atts[neg_image], image_atts], 0)
    texts = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], 0)
    text_masks = torch.cat([text_atts, text_atts, text_atts[neg_text]], 0)
    cls = model.fuse(texts, text_masks, images, atts)[:, 0]
    logits = model.itm_score(cls)
    bs = image_embeds.shape[0]
    labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


# ----------------------------------------------------------------------------------------------------- MLM
def masked_lm_loss(model, mlm_input_ids: torch.Tensor, text_atts: torch.Tensor, mlm_labels: torch.Tensor,
                   image_embeds: torch.Tensor, image_atts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the MLM head at the masked positions (``mlm_labels`` != -100) of the masked caption fused
    with the image (or region); the vocabulary logits are formed for those positions only. (loss, accuracy)."""
    text_embeds = model.encode_text(mlm_input_ids, text_atts)
    fused = model.fuse(text_embeds, text_atts, image_embeds, image_atts)
    if fused.is_meta:  # FLOP counting: the head over every position (an upper bound; real steps use the masked ones)
        logits = model.mlm_score(fused)
        return F.cross_entropy(logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100), logits.sum() * 0
    selected = mlm_labels != -100
    if not bool(selected.any()):
        zero = fused.sum() * 0
        return zero, zero.detach()
    logits = model.mlm_score(fused[selected])
    labels = mlm_labels[selected]
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


# ------------------------------------------------------------------------------------------------- batches
def _full_atts(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)


def caption_batch_losses(model, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None,
                         image_embeds: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """X-VLM's image-caption step: loss = contrastive + ITM + MLM (each weight 1). The image is encoded once."""
    if image_embeds is None:
        image_embeds = model.encode_image(batch["pixel_values"])
    image_atts = _full_atts(image_embeds)
    text_embeds = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image_feat, text_feat = model.image_features(image_embeds), model.text_features(text_embeds)
    contrastive = contrastive_loss(image_feat, text_feat, model.temp, batch.get("image_ids"))
    itm, itm_acc = matching_loss(model, image_embeds, image_atts, image_feat, text_embeds, batch["attention_mask"],
                                 text_feat, generator, batch.get("image_ids"))
    mlm, mlm_acc = masked_lm_loss(model, batch["mlm_input_ids"], batch["attention_mask"], batch["mlm_labels"],
                                  image_embeds, image_atts)
    loss = contrastive + itm + mlm
    return {"loss": loss, "contrastive": contrastive.detach(), "itm": itm.detach(), "mlm": mlm.detach(),
            "itm_accuracy": itm_acc.detach(), "mlm_accuracy": mlm_acc.detach()}


def region_batch_losses(model, batch: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None
                        ) -> Dict[str, torch.Tensor]:
    """X-VLM's region step (``ret_bbox_loss``): batch rows are (region, caption) pairs; ``image_index`` [B] names each
    row's image in ``pixel_values`` (encoded once), ``image_atts`` [B, 1 + N] its box's patches (all ones for a
    whole-image caption, ``is_image`` = 1), ``target_bbox`` [B, 4] (cx, cy, w, h) normalised. loss = contrastive +
    ITM + MLM on region features + L1 + GIoU of the box predicted from the whole image."""
    full = model.encode_image(batch["pixel_values"]).index_select(0, batch["image_index"])
    region = model.region_embeds(full, batch["image_atts"])
    image_atts, text_atts = batch["image_atts"], batch["attention_mask"]
    text_embeds = model.encode_text(batch["input_ids"], text_atts)
    image_feat, text_feat = model.image_features(region), model.text_features(text_embeds)
    contrastive = contrastive_loss(image_feat, text_feat, model.temp)
    itm, itm_acc = matching_loss(model, region, image_atts, image_feat, text_embeds, text_atts, text_feat, generator)
    mlm, mlm_acc = masked_lm_loss(model, batch["mlm_input_ids"], text_atts, batch["mlm_labels"], region, image_atts)
    pred = model.bbox_score(model.fuse(text_embeds, text_atts, full, _full_atts(full))[:, 0])
    l1, giou = box_regression_losses(pred, batch["target_bbox"], batch.get("is_image"))
    loss = contrastive + itm + mlm + l1 + giou
    boxes = batch.get("is_image")
    keep = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device) if boxes is None else boxes == 0
    accuracy = box_accuracy(pred[keep], batch["target_bbox"][keep]) if bool(keep.any()) else pred.new_zeros(())
    return {"loss": loss, "contrastive": contrastive.detach(), "itm": itm.detach(), "mlm": mlm.detach(),
            "bbox_l1": l1.detach(), "bbox_giou": giou.detach(), "itm_accuracy": itm_acc.detach(),
            "mlm_accuracy": mlm_acc.detach(), "box_accuracy": accuracy.detach()}


# ------------------------------------------------------------------------------------------ FLOPs and trainer
def _pass_flops(model, batch_size: int, text_len: int, masks_per_caption: int, region: bool) -> float:
    """FLOPs (forward + backward) of one X-VLM step's model passes for ``batch_size`` rows, counted on the meta
    device: image encoding once, text encoding of the caption and of the masked caption, fusion of the 3B ITM pairs
    and of the B masked captions, the MLM head at the masked positions, and on region steps the whole-image fusion
    for the box head. One image per row: an upper bound for region steps, whose rows share images (X-VLM: 128
    rows from at most 48 images)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    B, L = batch_size, text_len
    with torch.device("meta"):
        pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size)
        ids, atts = torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        image = model.encode_image(pixels)
        image_atts = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = model.encode_text(ids, atts)
        masked = model.encode_text(ids, atts)
        feats = model.image_features(image).sum() + model.text_features(text).sum()
        pairs = model.fuse(text.repeat(3, 1, 1), atts.repeat(3, 1), image.repeat(3, 1, 1), image_atts.repeat(3, 1))
        total = feats + model.itm_score(pairs[:, 0]).sum()
        fused = model.fuse(masked, atts, image, image_atts)
        total = total + model.mlm_score(fused[:, :masks_per_caption].reshape(-1, fused.shape[-1])).sum()
        if region:
            total = total + model.bbox_score(model.fuse(text, atts, image, image_atts)[:, 0]).sum()
        total.backward()
    return float(counter.get_total_flops())


def step_flops_per_sample(model_config, text_len: int, iter_perc: float, max_masks: int = 8, batch_size: int = 2,
                          model_cls=None) -> float:
    """Training FLOPs per sample (row) of X-VLM's recipe, caption and region steps weighted by ``iter_perc``.
    ``model_cls``: the family's model class (default: looked up in epic.models.registry by ``model_config.family``)."""
    import dataclasses

    if model_cls is None:
        from epic.models.registry import model_class  # the registry, never a family module

        model_cls = model_class(model_config.family)
    model_config = dataclasses.replace(model_config, vision_pretrained=None, text_pretrained=None)
    with torch.device("meta"):
        model = model_cls.from_config(model_config)
    caption = _pass_flops(model, batch_size, text_len, max_masks, region=False) / batch_size if iter_perc < 1 else 0.0
    region = _pass_flops(model, batch_size, text_len, max_masks, region=True) / batch_size if iter_perc > 0 else 0.0
    return (1 - iter_perc) * caption + iter_perc * region


class XVLMObjective:
    """X-VLM's recipe behind the trainer's objective protocol (docs/CONTRACTS.md): region steps
    (``is_region_step(step, iter_perc)``) train on batches of the region loader, the other steps on the trainer's
    caption batches.

    ``caption_objective``: who trains the caption steps (the wiring passes the run's objective: vanilla X-VLM's, or
    EPIC's, which then applies to caption steps only; its engines, logs and state pass through). None: X-VLM's caption
    losses here (``caption_batch_losses``). The trainer asks ``draw_batch(step)`` before it fetches a caption batch:
    on region steps it gets the region batch (and leaves its caption loader where it is); a caller that does not ask
    may pass any batch on a region step, the region batch is then drawn in ``losses``.

    The region loader's position is part of ``state_dict``, per rank (each rank reads its own region stream: the
    trainer keeps it with the rank's own state, not in DeepSpeed's client_state, which holds rank 0's), so a resumed
    run reads the same region batches. Hard negatives are drawn with the trainer's generator ``rng``."""

    def __init__(self, region_loader, iter_perc: float = 0.5, max_masks: int = 8, caption_objective=None):
        if not 0.0 <= iter_perc <= 1.0:
            raise ValueError(f"iter_perc {iter_perc} must be in [0, 1]")
        self.region_loader, self.iter_perc, self.max_masks = region_loader, iter_perc, max_masks
        self.caption_objective = caption_objective
        self._region_iter = None

    def uses_region_batch(self, step: int) -> bool:
        return self.region_loader is not None and is_region_step(step, self.iter_perc)

    def draw_batch(self, step: int) -> Optional[dict]:
        """The trainer's hook: this micro-batch's region batch on a region step, else None (the caption batch)."""
        if not self.uses_region_batch(step):
            return None
        if self._region_iter is None:
            self._region_iter = iter(self.region_loader)
        return next(self._region_iter)

    def extra_modules(self) -> dict:
        return self.caption_objective.extra_modules() if self.caption_objective is not None else {}

    def attach_engines(self, engines: dict) -> None:
        if self.caption_objective is not None and engines:
            self.caption_objective.attach_engines(engines)

    def extra_engines(self) -> dict:
        return self.caption_objective.extra_engines() if self.caption_objective is not None else {}

    def losses(self, model, batch: dict, rng: torch.Generator, step: int) -> dict:
        if self.uses_region_batch(step):
            if "target_bbox" not in batch:  # a caller that did not ask draw_batch: draw the region batch here
                region = self.draw_batch(step)
                device, dtype = batch["input_ids"].device, batch["pixel_values"].dtype
                batch = {k: (v.to(device, dtype if v.is_floating_point() else v.dtype)
                             if isinstance(v, torch.Tensor) else v) for k, v in region.items()}
            out = region_batch_losses(model, batch, rng)
            out["region_step"] = out["loss"].new_ones(()).detach()
            return out
        if self.caption_objective is not None:
            out = self.caption_objective.losses(model, batch, rng, step)
        else:
            out = caption_batch_losses(model, batch, rng)
        out["region_step"] = out["loss"].new_zeros(()).detach()
        return out

    def log_values(self, step: int) -> dict:
        values = self.caption_objective.log_values(step) if self.caption_objective is not None else {}
        if self.region_loader is not None:
            values.update({f"data/region_skipped_{k}": float(v)  # this rank's
                           for k, v in self.region_loader.skip_counts().items() if v})
        return values

    def images(self, step: int) -> dict:
        return self.caption_objective.images(step) if self.caption_objective is not None else {}

    def flops_per_sample(self, cfg) -> float:
        iter_perc = self.iter_perc if self.region_loader is not None else 0.0
        if self.caption_objective is None:
            return step_flops_per_sample(cfg.model, cfg.data.max_text_len, iter_perc, self.max_masks)
        caption = self.caption_objective.flops_per_sample(cfg)
        if iter_perc == 0:
            return caption
        region = step_flops_per_sample(cfg.model, cfg.data.max_text_len, 1.0, self.max_masks)
        return (1 - iter_perc) * caption + iter_perc * region

    def state_dict(self) -> dict:
        state = {"region_loader": self.region_loader.state_dict() if self.region_loader is not None else None}
        if self.caption_objective is not None:
            state["caption"] = self.caption_objective.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("region_loader") if state else None
        if saved is not None and self.region_loader is not None:
            self.region_loader.load_state_dict(saved)
            self._region_iter = None
        if self.caption_objective is not None and state and "caption" in state:
            self.caption_objective.load_state_dict(state["caption"])


def caption_recipe(model, batch: dict, image_embeds: torch.Tensor, rng: torch.Generator,
                   mlm_batch: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """X-VLM's image-caption losses in the recipe form of epic.objectives.recipes (what vanilla pretraining and the
    EPIC step call on shared image features): contrastive + hard-negative ITM + MLM. ``mlm_batch`` (EPIC's †CMLM)
    replaces the MLM inputs and labels. Region steps are XVLMObjective's (they need the region loader)."""
    if mlm_batch is not None:
        batch = {**batch, "mlm_input_ids": mlm_batch["mlm_input_ids"], "mlm_labels": mlm_batch["mlm_labels"]}
    return caption_batch_losses(model, batch, rng, image_embeds=image_embeds)
