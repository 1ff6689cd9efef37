"""METER's downstream task models (meter/modules/meter_module.py, heads as METER names them).

Each task model *is* a METER (subclass) plus its head, so state-dict keys stay METER's: a fine-tuned model's
`to_official_state_dict` is the layout of METER's own fine-tuned checkpoints (`vqa_classifier.*`, ...), and the
parameter-group rules (x5 for `cross_modal*`, head multiplier for `*_classifier`) apply unchanged.

  retrieval  `rank_output` Linear(2H -> 1), initialised from the ITM head's "match" row (weight and bias, as METER);
             trained with a softmax over one positive and `num_negatives` negative captions per image (METER: 15
             random captions of the training set), optionally plus the ITM term (finetune.itm_weight).
  vqa        `vqa_classifier` 2H -> 2H -> LayerNorm -> GELU -> num_answers; BCE on VQA soft scores x num_answers.
  nlvr2      two fusion passes (second image with token type 2, a third token-type row copied from the image
             row), `nlvr2_classifier` on the concatenated cls_feats: 4H -> 2H -> LayerNorm -> GELU -> 2.
  snli_ve    `snli_classifier` 2H -> 2H -> LayerNorm -> GELU -> 3.

The pretraining heads the tasks do not use (`mlm_score`; `itm_score` everywhere, as METER freezes it for
retrieval too) are frozen, so they take no optimizer state.
"""
from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_meter import METERConfig
from epic.eval.snli_ve import SNLI_LABELS  # noqa: E402  (the metric owns the label order)

from .meter import METER, init_meter_weights

log = logging.getLogger(__name__)

TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve")
# Heads/engines of pretraining runs that a task model drops on load (EPIC's ITC head, and whatever a generator
# engine might put in the VLM's state dict).
PRETRAINING_ONLY_PREFIXES = ("itc_score.", "generator.")


def classifier_head(in_features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """METER's task head: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, num_classes))


class _TaskMETER(METER):
    task: str = ""

    def __init__(self, cfg: METERConfig):
        super().__init__(cfg)
        self.mlm_score.requires_grad_(False)
        self.itm_score.requires_grad_(False)

    def _new_head(self, head: nn.Module) -> nn.Module:
        head.apply(partial(init_meter_weights, std=self.config.initializer_range))
        return head


class METERForRetrieval(_TaskMETER):
    task = "retrieval"

    def __init__(self, cfg: METERConfig):
        super().__init__(cfg)
        self.rank_output = nn.Linear(cfg.hidden_size * 2, 1)
        self.init_rank_output_from_itm()

    @torch.no_grad()
    def init_rank_output_from_itm(self) -> None:
        """METER: rank_output.weight = itm_score.fc.weight[1:] (the "match" logit), same for the bias."""
        self.rank_output.weight.copy_(self.itm_score.fc.weight[1:])
        self.rank_output.bias.copy_(self.itm_score.fc.bias[1:])

    def pair_score(self, cls_feats: torch.Tensor) -> torch.Tensor:
        """[P, 2H] -> [P] ranking score (used by epic.eval.retrieval)."""
        return self.rank_output(cls_feats).squeeze(-1).float()


class METERForVQA(_TaskMETER):
    task = "vqa"

    def __init__(self, cfg: METERConfig, num_answers: int):
        super().__init__(cfg)
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}: give the VQA answer list")
        self.num_answers = num_answers
        self.vqa_classifier = self._new_head(classifier_head(2 * cfg.hidden_size, 2 * cfg.hidden_size, num_answers))

    def forward(self, pixel_values, input_ids, attention_mask, image_embeds=None) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values, image_embeds=image_embeds)
        return self.vqa_classifier(out["cls_feats"])


class METERForNLVR2(_TaskMETER):
    task = "nlvr2"

    def __init__(self, cfg: METERConfig):
        if cfg.num_token_types < 3:
            cfg = dataclasses.replace(cfg, num_token_types=3)  # the second image gets token type 2
        super().__init__(cfg)
        self.nlvr2_classifier = self._new_head(classifier_head(4 * cfg.hidden_size, 2 * cfg.hidden_size, 2))

    def forward(self, pixel_values_0, pixel_values_1, input_ids, attention_mask) -> torch.Tensor:
        """METER's pair formulation: (text, image 0) with token type 1 and (text, image 1) with token type 2."""
        batch = input_ids.shape[0]
        image_embeds = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))  # both images, one pass
        text_embeds = self.encode_text(input_ids, attention_mask)  # the text tower does not see the image
        first = self.infer(input_ids, attention_mask, image_embeds=image_embeds[:batch], text_embeds=text_embeds,
                           image_token_type_idx=1)
        second = self.infer(input_ids, attention_mask, image_embeds=image_embeds[batch:], text_embeds=text_embeds,
                            image_token_type_idx=2)
        return self.nlvr2_classifier(torch.cat([first["cls_feats"], second["cls_feats"]], dim=-1))


class METERForSNLIVE(_TaskMETER):
    task = "snli_ve"

    def __init__(self, cfg: METERConfig):
        super().__init__(cfg)
        self.snli_classifier = self._new_head(classifier_head(2 * cfg.hidden_size, 2 * cfg.hidden_size,
                                                              len(SNLI_LABELS)))

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        out = self.infer(input_ids, attention_mask, pixel_values=pixel_values)
        return self.snli_classifier(out["cls_feats"])


TASK_MODELS = {"retrieval": METERForRetrieval, "vqa": METERForVQA, "nlvr2": METERForNLVR2,
               "snli_ve": METERForSNLIVE}


def build_task_model(task: str, cfg: METERConfig, num_answers: int = 0) -> METER:
    if task not in TASK_MODELS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if task == "vqa":
        return METERForVQA(cfg, num_answers)
    return TASK_MODELS[task](cfg)


# ------------------------------------------------------------------------------------------------ weight loading
def _resize_position_embedding(weight: torch.Tensor, model: METER) -> torch.Tensor:
    """Pretrained at one resolution, fine-tuned at another (METER: 288 -> 384/576): resample bicubically."""
    from timm.layers import resample_abs_pos_embed

    target = model.vit_model.pos_embed
    if weight.shape == target.shape:
        return weight
    grid = model.vit_model.patch_embed.grid_size
    log.info("resampling the position embedding %s -> %s", tuple(weight.shape), tuple(target.shape))
    return resample_abs_pos_embed(weight, new_size=list(grid), num_prefix_tokens=1, interpolation="bicubic",
                                  antialias=False)


def load_pretrained_weights(model: METER, state_dict: dict[str, torch.Tensor]) -> dict:
    """Load pretraining (or fine-tuning) weights in our key layout into a METER or task model.

    Allowed differences, each reported: heads the source lacks (new task heads keep their init; a retrieval
    model's rank_output is re-initialised from the loaded ITM head), pretraining-only heads the model lacks
    (EPIC's ITC head), a third token-type row for NLVR2 (copied from the image row, as METER does) and a
    position embedding for another image size (resampled). Any other missing or unexpected key is an error.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith(PRETRAINING_ONLY_PREFIXES)}
    dropped = sorted({k.split(".")[0] for k in state_dict if k.startswith(PRETRAINING_ONLY_PREFIXES)})
    own = model.state_dict()
    token_types = state.get("token_type_embeddings.weight")
    if token_types is not None and token_types.shape[0] < own["token_type_embeddings.weight"].shape[0]:
        extra = own["token_type_embeddings.weight"].shape[0] - token_types.shape[0]
        state["token_type_embeddings.weight"] = torch.cat([token_types] + [token_types[1:2]] * extra)
    if "vit_model.pos_embed" in state:
        state["vit_model.pos_embed"] = _resize_position_embedding(state["vit_model.pos_embed"], model)
    adapt = getattr(model, "adapt_loaded_state", None)  # a family's own rules (ViLT: its position-grid resampling)
    if adapt is not None:
        state = adapt(state)
    head_names = ("rank_output", "vqa_classifier", "nlvr2_classifier", "snli_classifier", "mlm_score", "itm_score")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    new_heads = sorted({k.split(".")[0] for k in missing if k.split(".")[0] in head_names})
    other_missing = [k for k in missing if k.split(".")[0] not in head_names]
    foreign_heads = sorted({k.split(".")[0] for k in unexpected if k.split(".")[0] in head_names})
    other_unexpected = [k for k in unexpected if k.split(".")[0] not in head_names]
    if other_missing or other_unexpected:
        raise ValueError(f"the weights do not fit {type(model).__name__}: missing {other_missing[:10]}"
                         f"{' …' if len(other_missing) > 10 else ''}, unexpected {other_unexpected[:10]}"
                         f"{' …' if len(other_unexpected) > 10 else ''} (was the checkpoint written with another "
                         f"architecture? the model config is taken from the checkpoint's own config)")
    shape_errors = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and v.shape != own[k].shape]
    if shape_errors:
        raise ValueError(f"shape mismatch loading into {type(model).__name__}: {shape_errors[:5]} (a VQA head "
                         f"trained with another answer list? set finetune.answer_list to the one it used)")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if hasattr(model, "init_rank_output_from_itm") and "rank_output" in new_heads and "itm_score" not in new_heads:
        model.init_rank_output_from_itm()
    report = {"new_heads": new_heads, "dropped": dropped + foreign_heads}
    log.info("loaded weights into %s: %s", type(model).__name__, report)
    return report


# ------------------------------------------------------------------------------------------------ losses
def vqa_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """METER: binary cross-entropy against the soft scores, times the number of answers (fp32)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target_scores.float()) * target_scores.shape[1]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def choose_negative_texts(similarity: torch.Tensor, same_image: torch.Tensor, num_negatives: int, hard: bool,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, num_negatives] indices of other captions in the batch, never one of the image's own captions.

    hard=True samples them in proportion to softmax(similarity) (ALBEF's hard-negative mining, here on the cheap
    first-stage similarity); hard=False uniformly (METER draws random captions from the dataset).
    """
    available = (~same_image).sum(dim=1)
    if int(available.min()) < num_negatives:
        raise ValueError(f"retrieval fine-tuning needs {num_negatives} negative captions per image from the other "
                         f"images of the micro-batch, but one image has only {int(available.min())}: raise "
                         f"data.micro_batch_size or lower finetune.num_negatives")
    logits = similarity.float() if hard else torch.zeros_like(similarity, dtype=torch.float32)
    weights = logits.masked_fill(same_image, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights.cpu(), num_negatives, replacement=False, generator=generator).to(
        similarity.device)


def rank_loss(scores: torch.Tensor) -> torch.Tensor:
    """METER's IR/TR loss (objectives.compute_irtr): cross-entropy over each image's [positive, negatives] rank
    scores [B, 1 + n], the positive at index 0 (fp32)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def rank_scores(model: METERForRetrieval, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                input_ids: torch.Tensor, attention_mask: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """[B, 1 + n] rank_output scores of image b with the captions texts[b] (rows of the text arrays); the towers'
    outputs are indexed, only the fusion runs per (image, caption) pair."""
    images = torch.arange(texts.shape[0], device=texts.device).view(-1, 1).expand_as(texts).flatten()
    rows = texts.flatten()
    out = model.infer(input_ids[rows], attention_mask[rows], image_embeds=image_embeds[images],
                      text_embeds=text_embeds[rows])
    return model.pair_score(out["cls_feats"]).view(texts.shape)


def retrieval_rank_loss(model: METERForRetrieval, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, image_ids: torch.Tensor, num_negatives: int, hard: bool,
                        generator: Optional[torch.Generator] = None, negatives: Optional[torch.Tensor] = None) -> dict:
    """The rank loss with negatives from the micro-batch (finetune.negatives=hard | in_batch).

    Row b of the batch is (image b, its caption b); the negatives of image b are other rows' captions
    (`negatives` [B, n] when given, else chosen by `choose_negative_texts`). Each image and each caption goes
    through its tower once; only the fusion runs per (image, caption) pair.
    """
    image_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(input_ids, attention_mask)
    if negatives is None:
        negatives = _negatives_for(model, image_embeds, text_embeds, attention_mask, image_ids, num_negatives, hard,
                                   generator)
    batch = input_ids.shape[0]
    texts = torch.cat([torch.arange(batch, device=input_ids.device).view(-1, 1), negatives], dim=1)  # [B, 1+n]
    scores = rank_scores(model, image_embeds, text_embeds, input_ids, attention_mask, texts)
    return {"loss": rank_loss(scores), "rank_acc": (scores.argmax(dim=1) == 0).float().mean(),
            "image_embeds": image_embeds, "text_embeds": text_embeds, "input_ids": input_ids,
            "attention_mask": attention_mask}


def retrieval_rank_loss_with_texts(model: METERForRetrieval, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                                   attention_mask: torch.Tensor, negative_input_ids: torch.Tensor,
                                   negative_attention_mask: torch.Tensor) -> dict:
    """METER's recipe (finetune.negatives=random): per image its caption and the n captions the loader drew from
    the training set ([B, n, L]). Every caption goes through the text tower (as in METER), each image once."""
    batch, count = negative_input_ids.shape[:2]
    ids = torch.cat([input_ids.unsqueeze(1), negative_input_ids], dim=1).flatten(0, 1)  # [B(1+n), L]
    mask = torch.cat([attention_mask.unsqueeze(1), negative_attention_mask], dim=1).flatten(0, 1)
    image_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(ids, mask)
    texts = torch.arange(batch * (count + 1), device=ids.device).view(batch, count + 1)
    scores = rank_scores(model, image_embeds, text_embeds, ids, mask, texts)
    return {"loss": rank_loss(scores), "rank_acc": (scores.argmax(dim=1) == 0).float().mean(),
            "image_embeds": image_embeds, "text_embeds": text_embeds[texts[:, 0]], "input_ids": ids[texts[:, 0]],
            "attention_mask": mask[texts[:, 0]]}


def mismatched_images(image_ids: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple:
    """METER's ITM pairs (objectives.compute_itm): B // 2 captions keep their image, at random positions; the
    others get a uniformly drawn image of another row with a different image (METER: a random dataset image).
    Returns (labels [B] 1 = matched, image_index [B])."""
    batch = image_ids.shape[0]
    other = image_ids.view(-1, 1) != image_ids.view(1, -1)
    if not bool(other.any(dim=1).all()):
        raise ValueError("the ITM term needs an image of another example in every micro-batch: raise "
                         "data.micro_batch_size or set finetune.itm_weight=0")
    labels = torch.cat([torch.ones(batch // 2, dtype=torch.long), torch.zeros(batch - batch // 2, dtype=torch.long)])
    labels = labels[torch.randperm(batch, generator=generator, device="cpu")].to(image_ids.device)
    drawn = torch.multinomial(other.float().cpu(), 1, generator=generator).view(-1).to(image_ids.device)
    return labels, torch.where(labels == 1, torch.arange(batch, device=image_ids.device), drawn)


def retrieval_itm_loss(model: METER, image_embeds: torch.Tensor, text_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, image_ids: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> dict:
    """The ITM term of METER's irtr config (loss_names itm > 0), through the frozen ITM head, on (caption b,
    image b or a mismatched one), reusing the towers' outputs."""
    labels, image_index = mismatched_images(image_ids, generator)
    out = model.infer(input_ids, attention_mask, image_embeds=image_embeds[image_index], text_embeds=text_embeds)
    logits = model.itm_score(out["cls_feats"]).float()
    return {"loss": F.cross_entropy(logits, labels), "itm_acc": (logits.argmax(dim=1) == labels).float().mean()}


def retrieval_losses(model: METERForRetrieval, batch: dict, *, negatives: str, num_negatives: int,
                     itm_weight: float, generator: Optional[torch.Generator] = None) -> dict:
    """Fine-tuning loss for IR/TR: L_rank + itm_weight * L_ITM (see finetune.negatives / finetune.itm_weight)."""
    if negatives == "random":
        if "negative_input_ids" not in batch:
            raise KeyError("finetune.negatives=random needs batches with negative_input_ids (build the loader with "
                           "num_negative_texts=finetune.num_negatives)")
        rank = retrieval_rank_loss_with_texts(model, batch["pixel_values"], batch["input_ids"],
                                              batch["attention_mask"], batch["negative_input_ids"],
                                              batch["negative_attention_mask"])
    else:
        rank = retrieval_rank_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                   batch["image_ids"], num_negatives, negatives == "hard", generator)
    out = {"loss": rank["loss"], "loss_irtr": rank["loss"].detach(), "rank_acc": rank["rank_acc"].detach()}
    if itm_weight > 0:
        itm = retrieval_itm_loss(model, rank["image_embeds"], rank["text_embeds"], rank["input_ids"],
                                 rank["attention_mask"], batch["image_ids"], generator)
        out.update(loss=rank["loss"] + itm_weight * itm["loss"], loss_itm=itm["loss"].detach(),
                   itm_acc=itm["itm_acc"].detach())
    return out


@torch.no_grad()
def _negatives_for(model, image_embeds, text_embeds, attention_mask, image_ids, num_negatives, hard, generator):
    image_vec, text_vec = (F.normalize(v.float(), dim=-1)
                           for v in model.retrieval_embeddings(image_embeds, text_embeds, attention_mask))
    same_image = image_ids.view(-1, 1) == image_ids.view(1, -1)
    return choose_negative_texts(image_vec @ text_vec.T, same_image, num_negatives, hard, generator)
