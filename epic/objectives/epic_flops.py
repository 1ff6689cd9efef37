"""Training FLOPs per sample of the EPIC step, by pass, counted with FlopCounterMode on the meta device.

Shapes only: exact for the matmuls and attention at these sizes, no memory, seconds for METER-B. Captions are
full length (``data.max_text_len``: the worst case METER pads to), so each sentence has ``max_text_len - 2`` real
tokens and m = ceil(mask_ratio * that) masked positions.

    teacher     the frozen teacher's forward up to the penultimate fusion layer (Eq. 8's inputs); no backward;
                0 with the saliency cache (alpha precomputed by tools/precompute_saliency.py)
    generator   the generator's forward + backward on w^mask, and Eq. 4/5/7 over the vocabulary at the M positions
                (the streaming kernel's backward recomputes the logits: one GEMM of 2*M*d*V more than eager);
                forward only for a fixed generator or VLM(SAS) (a full METER forward); 0 for "ITC (rand.)"
    vlm         the main VLM: one vision pass shared by MLM, ITM and ITC, forward + backward
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from epic.kernels.saliency_mask import num_positions_to_mask
from epic.kernels.vocab_sample import vocab_sample_and_loss_eager

META = torch.device("meta")


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_model(model_cfg, **changes):
    """The family's model at ``model_cfg``'s sizes on the meta device (no memory), through the registry."""
    from epic.models.loading import without_local_weights
    from epic.models.registry import build_model

    with META:
        return build_model(without_local_weights(dataclasses.replace(model_cfg, **changes)))


_meta_meter = meta_model  # the old name


def meta_epic_batch(model_cfg, batch_size: int, text_len: int, mask_ratio: float) -> dict:
    """Full-length captions on the meta device, plus the flat indices of the M masked positions."""
    ids = torch.zeros(batch_size, text_len, dtype=torch.long, device=META)
    special = torch.zeros(batch_size, text_len, dtype=torch.bool, device=META)
    m = int(num_positions_to_mask(torch.tensor([text_len - 2]), mask_ratio)) * batch_size
    return {"pixel_values": torch.empty(batch_size, 3, model_cfg.image_size, model_cfg.image_size, device=META),
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "special_tokens_mask": special,
            "mlm_input_ids": ids, "mlm_labels": ids, "masked_flat": torch.zeros(m, dtype=torch.long, device=META)}


def _vocabulary_flops(states, embedding, bias, targets, backward: bool) -> int:
    """Eq. 4/5/7 over the vocabulary, as the streaming kernel does them (eager count + the recomputed GEMM)."""
    def run():
        _, loss = vocab_sample_and_loss_eager(states, embedding, bias, targets)
        if backward:
            loss.backward()

    recompute = 2 * states.shape[0] * states.shape[1] * embedding.shape[0] if backward else 0
    return _count(run) + recompute


def generator_flops(cfg, batch: dict) -> int:
    """FLOPs of the generator pass for ``cfg.epic`` (see the module docstring)."""
    from epic.models.generator import EpicGenerator, GENERATOR_FAMILIES, generator_hf_config

    epic = cfg.epic
    if epic.corruption == "random":
        return 0
    flat, ids = batch["masked_flat"], batch["input_ids"]
    targets = torch.zeros(flat.shape[0], dtype=torch.long, device=META)
    if epic.generator_mode == "vlm_sas":
        sas = _meta_meter(cfg.model, consistency_head=False)

        def forward_only():
            with torch.no_grad():
                feats = sas.infer(input_ids=ids, attention_mask=batch["attention_mask"],
                                  pixel_values=batch["pixel_values"])["text_feats"]
                return sas.mlm_transform(feats.flatten(0, 1).index_select(0, flat))

        flops = _count(forward_only)
        with torch.no_grad():
            states = torch.empty(flat.shape[0], cfg.model.hidden_size, device=META)
            embedding, bias = sas.mlm_output_embedding()
            return flops + _vocabulary_flops(states, embedding, bias, targets, False)
    config_class, model_class = GENERATOR_FAMILIES[cfg.model.text_model_type]
    hf_config = generator_hf_config(epic.generator, cfg.model)
    if epic.generator.pretrained:
        from epic.paths import expand_env

        try:  # the pretrained generator's own sizes (config.json only)
            hf_config = config_class.from_pretrained(expand_env(epic.generator.pretrained, "epic.generator.pretrained"))
        except (OSError, ValueError):  # an EPIC run dir, an unset variable, not readable here: the configured sizes
            pass
    conditioned = epic.generator_mode == "conditioned"
    with META:
        generator = EpicGenerator(model_class(hf_config), cfg.model.vit_width if conditioned else None)
    trained = epic.generator_mode in ("finetune", "conditioned")
    image_cls = torch.empty(ids.shape[0], cfg.model.vit_width, device=META) if conditioned else None
    holder = {}

    def encoder():
        with torch.set_grad_enabled(trained):
            holder["states"] = generator(ids, batch["attention_mask"], flat, image_cls)

    flops = _count(encoder)
    embedding, bias = generator.output_embedding()
    states = holder["states"]
    if not trained:
        with torch.no_grad():
            return flops + _vocabulary_flops(states, embedding, bias, targets, False)
    return flops + _vocabulary_flops(states, embedding, bias, targets, True)  # backward through the encoder too


def teacher_flops(teacher_cfg, batch: dict) -> int:
    """The frozen teacher's forward up to its saliency layer (Eq. 8's inputs, ``saliency_qk``), for the batch."""
    teacher = _meta_meter(teacher_cfg)

    def saliency():
        with torch.no_grad():
            teacher.saliency_qk(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])

    return _count(saliency)


def teacher_flops_per_sample(teacher_cfg, text_len: int, batch_size: int = 2) -> float:
    """Per sample, at full-length captions (†CMLM adds this to the vanilla step)."""
    return teacher_flops(teacher_cfg, meta_epic_batch(teacher_cfg, batch_size, text_len, 0.15)) / batch_size


def epic_step_flops_per_sample(cfg, teacher_cfg=None, batch_size: int = 2, text_len: Optional[int] = None,
                               vlm_passes=None, saliency_cache: bool = False) -> dict[str, float]:
    """{"teacher", "generator", "vlm", "total"}: training FLOPs per sample of one EPIC step at ``cfg``'s sizes.

    ``teacher_cfg``: the teacher's model config (default: the VLM's). ``vlm_passes``: the VLM's part of the step
    (``epic.objectives.consistency.epic_vlm_passes``; handed in, so that this counter imports no objective).
    ``saliency_cache``: alpha comes from ``epic.saliency_cache`` (every entry found), so the teacher costs nothing.
    """
    if vlm_passes is None:
        raise TypeError("epic_step_flops_per_sample needs vlm_passes=epic.objectives.consistency.epic_vlm_passes")
    epic_vlm_passes = vlm_passes
    text_len = text_len or cfg.data.max_text_len
    batch = meta_epic_batch(cfg.model, batch_size, text_len, cfg.epic.mask_ratio)
    real = ~batch["special_tokens_mask"]
    flops = {"teacher": 0, "generator": generator_flops(cfg, batch)}
    if cfg.epic.masking == "saliency" and not saliency_cache:
        flops["teacher"] = teacher_flops(teacher_cfg or cfg.model, batch)
    model = _meta_meter(cfg.model, consistency_head=True)

    def vlm_step():
        image_embeds = model.encode_image(batch["pixel_values"])
        out = epic_vlm_passes(model, batch, image_embeds, batch["input_ids"], torch.zeros_like(real), real,
                              torch.Generator(), cfg.epic.lambda_itc)
        out["loss"].backward()

    flops["vlm"] = _count(vlm_step)
    per_sample = {name: value / batch_size for name, value in flops.items()}
    per_sample["total"] = sum(per_sample.values())
    return per_sample
