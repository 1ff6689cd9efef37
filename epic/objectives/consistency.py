"""EPIC (Sec. 4, App. B): the image-token consistency task (ITC) on captions corrupted by a co-trained generator.

One micro-batch (Algorithm 1 of App. B, with METER's own objectives):

    v_feats = VLM.encode_image(v)                        once, shared by the MLM, ITM and ITC passes
    M       = saliency masking from the frozen teacher   (Eq. 8; uniform for the ablation "ITC+LM")
    w_bar   = generator samples at M, L_GEN              (Eq. 3-5, 7; the generator engine steps here)
    T       = { t in M : w_bar_t != w_t }                (Eq. 6)
    L_ITC   = per-token BCE of D_i = sigmoid(beta^T h_i) on (w_bar, v), consistent = 1  (Eq. 1-2)
    loss    = L_ITM + L_MLM + lambda * L_ITC             (Eq. 9; L_GEN goes to the generator's own engine)

The trainer back-propagates ``loss`` into the VLM engine and steps it. The generator is its own DeepSpeed engine
(own optimizer, LR schedule and loss scaler, same gradient-accumulation steps), so an overflow in one engine never
skips or alters the other's step. Ablations (Tables 4-6, 8; App. G, J) are switches of ``epic.*``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from epic import faults
from epic.engine.setup import EngineSpec, SetupError, frozen_engine_ds_config, optimizer_spec  # noqa: F401
from epic.eval.epic_metrics import EpicMeasurements, render_saliency_figure, step_counts
from epic.kernels import token_consistency_loss
from epic.models.generator import select_positions
from epic.models.heads import new_consistency_head
from epic.models.interface import CONSISTENCY_HEAD
from epic.paths import expand_env

from .corruption import (consistency_labels, excluded_token_ids, inconsistent_positions, mask_tokens,
                         masked_count, masked_flat_indices, random_replacements, replace_at, sample_replacements)
from .recipes import base_losses
from .saliency import (cached_alpha_query_keys, real_text_tokens, saliency_masking, saliency_mlm_inputs,
                       uniform_masking)

logger = logging.getLogger(__name__)

HEAD_NAME = CONSISTENCY_HEAD  # the old name
#: what the EPIC step needs of the model's config (the wiring applies it before the model is built)
MODEL_CONFIG_REQUIREMENTS = {"consistency_head": True}
TRAINED_GENERATOR_MODES = ("finetune", "conditioned")
EPIC_BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "special_tokens_mask", "mlm_input_ids",
                   "mlm_labels")


# ----------------------------------------------------------------------------------------------------------------
# The ITC head beta and Eq. 1-2
# ----------------------------------------------------------------------------------------------------------------
def add_consistency_head(model: nn.Module) -> nn.Module:
    """Old way of giving a built model EPIC's head beta; build it with ``consistency_head: true`` in its config
    instead (epic.wiring does so for EPIC runs). Idempotent, same init and draws as the config switch."""
    if model.consistency_head() is None:
        reference = next(model.parameters())
        head = new_consistency_head(model.config.hidden_size, model.config.initializer_range)
        model.add_module(CONSISTENCY_HEAD, head.to(device=reference.device, dtype=reference.dtype))
        model.config = dataclasses.replace(model.config, consistency_head=True)
    return model


ITC_REDUCTIONS = {"token_mean": "mean", "pair_sum": "pair_sum"}  # epic.itc_reduction -> the kernel's reduction


def itc_loss(text_feats: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], inconsistent: torch.Tensor,
             real: torch.Tensor, reduction: str = "token_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-2 over tensors: (L_ITC, logits z_i [B, L]); per-token BCE(sigmoid(beta^T h_i + b), 1 - [i in T]) over
    real tokens; ``weight`` [H] and ``bias`` [1] are beta's.

    ``reduction`` (epic.itc_reduction): "token_mean" = mean over the micro-batch's real tokens (ELECTRA's
    convention; the default, see EpicConfig.itc_reduction); "pair_sum" = Eq. 2 as written, the sum over each
    pair's tokens, averaged over the pairs.
    """
    if reduction not in ITC_REDUCTIONS:
        raise ValueError(f"itc reduction {reduction!r}; use one of {sorted(ITC_REDUCTIONS)}")
    return token_consistency_loss(text_feats, weight, bias, consistency_labels(inconsistent), real,
                                  reduction=ITC_REDUCTIONS[reduction])


def consistency_loss(text_feats: torch.Tensor, head: nn.Linear, inconsistent: torch.Tensor, real: torch.Tensor,
                     reduction: str = "token_mean") -> tuple[torch.Tensor, torch.Tensor]:
    """``itc_loss`` with beta given as its Linear(H, 1)."""
    return itc_loss(text_feats, head.weight.view(-1), head.bias, inconsistent, real, reduction)


def epic_vlm_loss(loss_base: torch.Tensor, loss_itc: torch.Tensor, lambda_itc: float) -> torch.Tensor:
    """Eq. 9 without L_GEN (which trains only the generator, in its own engine): the family's base losses
    (METER: L_ITM + L_MLM) + lambda * L_ITC."""
    return loss_base + lambda_itc * loss_itc


def epic_vlm_passes(model, batch: dict, image_embeds: torch.Tensor, corrupted_ids: torch.Tensor,
                    inconsistent: torch.Tensor, real: torch.Tensor, rng: torch.Generator, lambda_itc: float,
                    mlm_batch: Optional[dict] = None, itc_reduction: str = "token_mean") -> dict:
    """The family's base losses (its recipe) and ITC on one set of image features; ``loss`` is Eq. 9 without L_GEN.

    ``mlm_batch`` (†CMLM) replaces the batch's MLM inputs/labels; ITC reads w_bar = ``corrupted_ids``.
    """
    base = base_losses(model, batch, image_embeds, rng, mlm_batch=mlm_batch)
    fused = model.infer(input_ids=corrupted_ids, attention_mask=batch["attention_mask"], image_embeds=image_embeds)
    loss_itc, itc_logits = consistency_loss(fused["text_feats"], model.consistency_head(), inconsistent, real,
                                            itc_reduction)
    out = {k: v for k, v in base.items() if k != "loss"}
    out.update(loss=epic_vlm_loss(base["loss"], loss_itc, lambda_itc), loss_itc=loss_itc, itc_logits=itc_logits)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The generator's engine: declared here (EngineSpec), made by the engine factory (epic.engine.setup.create_engine)
# ----------------------------------------------------------------------------------------------------------------
def generator_ds_config(cfg, vlm_ds_config: dict, batch_math, on_cpu: bool) -> dict:
    """The generator engine's resolved DeepSpeed config: ``epic.generator.ds_config`` under the same rules as the
    VLM's (an fp16 JSON on CPU is an error), or the VLM's when unset."""
    from epic.engine.setup import engine_ds_config

    spec = EngineSpec(module=None, optimizer=optimizer_spec(cfg.train), ds_config=cfg.epic.generator.ds_config)
    return engine_ds_config(spec, vlm_ds_config, batch_math, cfg.train.grad_clip, on_cpu)


def sas_refresh_due(step: int, every_steps: int, every_epochs: int, samples_per_step: int,
                    epoch_samples: Optional[int]) -> bool:
    """VLM(SAS), App. G: refresh at the start of optimizer step ``step`` (``step`` steps done)?

    By steps (every_steps > 0): when step is a multiple of it. By epochs: when the samples of the steps done,
    step * samples_per_step, crossed the end of a k-th epoch during the last step.
    """
    if step <= 0:
        return False
    if every_steps > 0:
        return step % every_steps == 0
    period = every_epochs * epoch_samples
    return (step * samples_per_step) // period > ((step - 1) * samples_per_step) // period


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class EpicObjective:
    """The EPIC step for the trainer (see epic/wiring.py ``build_objective`` for the contract)."""

    def __init__(self, cfg, engine, tokenizer, ds_config: Optional[dict] = None, batch_math=None, paths=None,
                 device="cpu") -> None:
        """The generator's engine is declared by ``extra_modules()`` and handed in by ``attach_engines`` (epic.wiring
        does both through the engine factory). Old callers that pass ``ds_config`` and ``batch_math`` get it made
        here, by the same factory."""
        self.cfg, self.epic = cfg, cfg.epic
        self.engine, self.tokenizer, self.paths = engine, tokenizer, paths
        self.device = torch.device(device)
        self.rank = _rank()
        model = engine.module
        if model.consistency_head() is None:
            raise SetupError("the VLM has no consistency head beta: build it with model.consistency_head=true "
                             "(epic.wiring.build_model does so when epic.enabled) before the optimizer exists")
        self.mask_token_id = tokenizer.mask_token_id
        self._replacement_ids = None  # BERT's random-replacement ids (†CMLM), made on first use
        vocab_size = cfg.model.vocab_size
        self.exclude_ids = excluded_token_ids(tokenizer, vocab_size)
        excluded = set(self.exclude_ids)
        self.allowed_ids = torch.tensor([i for i in range(vocab_size) if i not in excluded], device=self.device)
        self.teacher = self._build_teacher() if self.epic.masking == "saliency" else None
        self.samples_per_step = batch_math.global_batch_size
        self.epoch_samples = self._sas_epoch_samples(paths)
        self.generator: Optional[nn.Module] = None  # the module that corrupts (None: random tokens)
        self.gen_engine = None  # the generator's DeepSpeed engine (trained, or checkpoint-only for VLM(SAS))
        self._build_generator()
        if ds_config is not None and batch_math is not None:
            from epic.engine.setup import create_engine

            self.attach_engines({name: create_engine(spec, ds_config, batch_math, cfg.train.grad_clip,
                                                     self.device.type == "cpu")
                                 for name, spec in self.extra_modules().items()})
        self.measurements = EpicMeasurements()
        self.sas_refreshes: list[int] = []  # steps at which VLM(SAS) was refreshed (this process)
        self.saliency_cache_misses = 0  # (sample, caption) rows without a cached alpha; their micro-batch ran the teacher
        self._last_step_seen: Optional[int] = None
        self._step = 0  # the optimizer steps done when the current micro-batch started
        self._last_image_bucket = 0
        self._figure_batch: Optional[dict] = None

    # -- construction ------------------------------------------------------------------------------------------
    def _build_teacher(self):
        from epic.models.teacher import load_saliency_teacher

        return load_saliency_teacher(self.cfg, self.tokenizer, self.device)

    def _sas_epoch_samples(self, paths) -> Optional[int]:
        """Samples per epoch for VLM(SAS)'s per-epoch refresh; None when it refreshes by steps or is off."""
        if self.epic.generator_mode != "vlm_sas" or self.epic.sas_refresh_every > 0:
            return None
        epoch = getattr(paths, "epoch_samples", None)
        if not epoch:
            from epic.engine.setup import SetupError

            raise SetupError("epic.generator_mode=vlm_sas refreshes the auxiliary VLM every epic.sas_refresh_epochs "
                             "epochs, but the epoch length is unknown: the shards lack counts.json (write it with "
                             "`python tools/count_shards.py DIR`), or refresh by steps with epic.sas_refresh_every=N")
        return int(epoch)

    def _frozen_dtype(self) -> torch.dtype:
        from epic.models.teacher import resolve_teacher_dtype

        return resolve_teacher_dtype(self.epic.teacher_dtype, self.device)

    def _build_generator(self) -> None:
        from epic.models.generator import build_generator, freeze

        epic = self.epic
        if epic.corruption == "random":
            return
        mode = epic.generator_mode
        gen_cfg = epic.generator
        if gen_cfg.pretrained:
            gen_cfg = dataclasses.replace(gen_cfg, pretrained=expand_env(gen_cfg.pretrained, "epic.generator.pretrained"))
        if mode == "pretrained_fixed":
            from epic.models.generator import check_fitted_generator

            self.generator_info = check_fitted_generator(gen_cfg.pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.run.seed + 1)  # the same initial generator on every rank, without touching
            if mode == "vlm_sas":                     # the trainer's random streams
                self.generator = self._new_sas_vlm()
            else:
                self.generator = build_generator(gen_cfg, self.cfg.model, conditioned=mode == "conditioned")
        if mode not in TRAINED_GENERATOR_MODES:  # VLM(SAS): frozen, but checkpointed as an engine (its weights
            freeze(self.generator, self._frozen_dtype(), self.device)  # change at each refresh); fixed ones are
            # rebuilt identically from seed or files, nothing to checkpoint

    def extra_modules(self) -> dict:
        """The modules that need their own DeepSpeed engine: {"generator": EngineSpec} (own AdamW, schedule, loss
        scaler and DeepSpeed JSON ``epic.generator.ds_config``), or a never-stepped one for VLM(SAS)."""
        mode, gen_cfg = self.epic.generator_mode, self.epic.generator
        if self.generator is None or mode not in TRAINED_GENERATOR_MODES + ("vlm_sas",):
            return {}
        if mode == "vlm_sas":
            return {"generator": EngineSpec(self.generator, optimizer=None)}
        spec = optimizer_spec(self.cfg.train, lr=gen_cfg.lr, weight_decay=gen_cfg.weight_decay, lr_mults={})
        return {"generator": EngineSpec(self.generator, optimizer=spec, ds_config=gen_cfg.ds_config)}

    def attach_engines(self, engines: dict) -> None:
        """Receive the engines of ``extra_modules()`` (made by the engine factory)."""
        if "generator" in engines:
            self.gen_engine = engines["generator"]
            self.generator = self.gen_engine.module

    def _new_sas_vlm(self) -> nn.Module:
        """VLM(SAS) (App. G): a frozen VLM of the same family, first a copy of the freshly initialised VLM
        (without beta), refreshed every k steps."""
        from epic.models.loading import without_local_weights

        vlm = self.engine.module
        sas = type(vlm).from_config(without_local_weights(dataclasses.replace(vlm.config, consistency_head=False)))
        sas.load_state_dict(self._vlm_weights_for(sas))
        return sas

    def _vlm_weights_for(self, target: nn.Module) -> dict:
        wanted = target.state_dict()
        return {k: v for k, v in self.engine.module.state_dict().items() if k in wanted}

    def extra_engines(self) -> dict:
        return {"generator": self.gen_engine} if self.gen_engine is not None else {}

    # -- one micro-batch ---------------------------------------------------------------------------------------
    def losses(self, model, batch: dict, rng: torch.Generator, step: int) -> dict:
        missing = [k for k in EPIC_BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"the EPIC step needs batch keys {missing} (has {sorted(batch)}); epic.data loaders "
                           f"yield them")
        self._step = step
        if step != self._last_step_seen:  # first micro-batch of an optimizer step
            self._last_step_seen = step
            self._maybe_refresh_sas(step)
        if self._figure_batch is None and self.epic.log_saliency_every and self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # reading val images must not move the training RNG
                self._figure_batch = self._pick_figure_batch(batch)
        real = real_text_tokens(batch)
        image_embeds = model.encode_image(batch["pixel_values"], generator=rng)  # once per micro-batch, shared by
        # all VLM passes (the objective's stream: a family with random patch sampling draws from it, METER does not)
        query_keys = self._saliency_query_keys(batch)
        positions, alpha = self._masking(query_keys, real, self.epic.mask_ratio, rng)
        corrupted, loss_gen = self._corrupt(batch, positions, image_embeds, rng)
        inconsistent = inconsistent_positions(batch["input_ids"], corrupted, positions)  # Eq. 6
        mlm_batch = self._cmlm_batch(batch, query_keys, rng) if self.cfg.data.mlm_masking == "saliency" else None
        vlm = epic_vlm_passes(model, batch, image_embeds, corrupted, inconsistent, real, rng, self.epic.lambda_itc,
                              mlm_batch, self.epic.itc_reduction)
        itc_logits = vlm.pop("itc_logits")
        self.measurements.add(step_counts(real, positions, inconsistent, itc_logits, alpha, batch.get("content_mask")))
        out = {k: (v if k == "loss" else v.detach()) for k, v in vlm.items()}
        if loss_gen is not None:
            out["loss_gen"] = loss_gen
        return out

    def _saliency_query_keys(self, batch: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Eq. 8's inputs: from the saliency cache when every row of the micro-batch has its alpha there (the
        teacher does not run), else from the teacher (a missing entry is counted, never an error)."""
        if self.teacher is not None and self.epic.saliency_cache:
            misses = batch.get("saliency_misses")  # a Python int set by the loader: no device sync to branch
            if misses == 0 and "saliency_alpha" in batch:
                return cached_alpha_query_keys(batch["saliency_alpha"])
            self.saliency_cache_misses += int(misses) if misses is not None else len(batch["input_ids"])
        return self._teacher_query_keys(batch)

    def _teacher_query_keys(self, batch: dict) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.teacher is None:
            return None
        query, keys = self.teacher.query_keys(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return query.clone(), keys.clone()  # out of inference mode

    def _masking(self, query_keys, real: torch.Tensor, ratio: float, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """M and alpha: Eq. 8 + sampling from the teacher, or uniform ("ITC+LM")."""
        if query_keys is None:
            return uniform_masking(real, ratio, rng)
        return saliency_masking(query_keys[0], query_keys[1], real, ratio, rng)

    def _corrupt(self, batch: dict, positions: torch.Tensor, image_embeds: torch.Tensor, rng
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(w_bar, detached L_GEN or None). A trained generator takes its backward and step here."""
        input_ids = batch["input_ids"]
        num_masked = masked_count(batch, positions, self.epic.mask_ratio)  # M, known on the host
        flat = masked_flat_indices(positions, num_masked)  # the M masked positions, row-major, without a host sync
        targets = input_ids.flatten().index_select(0, flat)
        if self.generator is None:  # "ITC (rand.)"
            return replace_at(input_ids, flat, random_replacements(num_masked, self.allowed_ids, rng)), None
        masked_ids = mask_tokens(input_ids, positions, self.mask_token_id)  # Eq. 3
        mode = self.epic.generator_mode
        if mode == "vlm_sas":
            samples, loss_gen = self._sas_samples(batch, masked_ids, flat, targets, rng)
        elif mode in TRAINED_GENERATOR_MODES:
            image_cls = image_embeds[:, 0].detach() if mode == "conditioned" else None
            states = self.gen_engine(masked_ids, batch["attention_mask"], flat, image_cls)
            embedding, bias = self.generator.output_embedding()
            samples, loss_gen = sample_replacements(states, embedding, bias, targets, self.exclude_ids, rng)
            loss_gen = faults.poison("generator", self._step + 1, loss_gen)  # EPIC_FAULT drills only
            self.gen_engine.backward(loss_gen)  # L_GEN (Eq. 7) trains only the generator
            self.gen_engine.step()
            loss_gen = loss_gen.detach()
        else:  # "LM (fixed)" / "LM (trained)": frozen
            with torch.no_grad():
                states = self.generator(masked_ids, batch["attention_mask"], flat)
                embedding, bias = self.generator.output_embedding()
                samples, loss_gen = sample_replacements(states, embedding, bias, targets, self.exclude_ids, rng)
        return replace_at(input_ids, flat, samples), loss_gen

    def _sas_samples(self, batch, masked_ids, positions, targets, rng):
        """VLM(SAS): the auxiliary VLM's own cross-modal MLM on (w^mask, v) proposes the replacements."""
        sas = self.generator
        with torch.no_grad():
            dtype = next(sas.parameters()).dtype
            fused = sas.infer(input_ids=masked_ids, attention_mask=batch["attention_mask"],
                              pixel_values=batch["pixel_values"].to(dtype))
            states = sas.mlm_transform(select_positions(fused["text_feats"], positions))
            embedding, bias = sas.mlm_output_embedding()
            return sample_replacements(states, embedding, bias, targets, self.exclude_ids, rng)

    def _maybe_refresh_sas(self, step: int) -> None:
        if self.epic.generator_mode != "vlm_sas" or self.generator is None:
            return
        if sas_refresh_due(step, self.epic.sas_refresh_every, self.epic.sas_refresh_epochs, self.samples_per_step,
                           self.epoch_samples):
            self.generator.load_state_dict(self._vlm_weights_for(self.generator))
            self.sas_refreshes.append(step)

    def _cmlm_batch(self, batch: dict, query_keys, rng) -> dict:
        """†CMLM inside EPIC (App. J, last sentences): the MLM's positions drawn from alpha, as in vanilla †CMLM."""
        from epic.data.text import replacement_token_ids

        if self._replacement_ids is None:
            self._replacement_ids = replacement_token_ids(self.tokenizer).to(self.device)
        ids, labels, _, _ = saliency_mlm_inputs(batch, query_keys[0], query_keys[1], self.cfg.data.mlm_probability,
                                                self.mask_token_id, self._replacement_ids, rng)
        return {**batch, "mlm_input_ids": ids, "mlm_labels": labels}

    def flops_per_sample(self, cfg) -> float:
        """Training FLOPs per sample of the whole EPIC step (teacher + generator + VLM), counted on meta."""
        from .epic_flops import epic_step_flops_per_sample

        teacher_cfg = self.teacher.config if self.teacher is not None else None
        with torch.random.fork_rng(devices=[]):  # called after a resume restored the RNG: leave it untouched
            return epic_step_flops_per_sample(cfg, teacher_cfg, vlm_passes=epic_vlm_passes,
                                              saliency_cache=bool(cfg.epic.saliency_cache))["total"]

    # -- logging -----------------------------------------------------------------------------------------------
    def log_values(self, step: int) -> dict:
        values = {f"epic/{k}": v for k, v in self.measurements.pop().items()}
        if self.epic.saliency_cache:
            values["epic/saliency_cache_misses"] = float(self.saliency_cache_misses)
        if self.gen_engine is not None and self.gen_engine.optimizer is not None:
            from epic.engine.setup import loss_scale_of

            values["epic/gen_lr"] = self.gen_engine.lr_scheduler.get_last_lr()[0]
            values["epic/gen_skipped_steps"] = float(self.gen_engine.skipped_steps)
            scale = loss_scale_of(self.gen_engine)
            if scale is not None:
                values["epic/gen_loss_scale"] = scale
        return values

    def images(self, step: int) -> dict:
        """Every ``epic.log_saliency_every`` steps (rank 0): {"epic/saliency": HWC uint8}, a Fig. 4-style figure."""
        every = self.epic.log_saliency_every
        if not every or self.rank != 0 or step // every <= self._last_image_bucket or self._figure_batch is None:
            return {}
        self._last_image_bucket = step // every
        return {"epic/saliency": self.saliency_figure(self.engine.module)}

    def _pick_figure_batch(self, batch: dict, rows: int = 4) -> dict:
        """A fixed batch for the figure: the first val images (first caption), else this first training batch."""
        if self.paths is not None and self.paths.val_shards:
            from epic.data import build_eval_loader

            try:
                loader = build_eval_loader(self.paths.val_shards, self.tokenizer, image_size=self.cfg.data.image_size,
                                           max_text_len=self.cfg.data.max_text_len, batch_size=rows,
                                           all_captions=False, normalization=self.cfg.data.normalization)
                batch = next(iter(loader))
            except (StopIteration, OSError, ValueError) as err:  # a figure is not worth failing the run
                logger.warning("saliency figure: no val batch (%s); using the first training batch", err)
        dtype = batch["pixel_values"].dtype
        return {k: (v[:rows].to(self.device, dtype if v.is_floating_point() else v.dtype)
                    if isinstance(v, torch.Tensor) else v[:rows]) for k, v in batch.items()}

    @torch.no_grad()
    def saliency_figure(self, model) -> "object":
        """Bars of alpha per token; red: the generator's replacement and the VLM's P(inconsistent) on w_bar."""
        batch, was_training = self._figure_batch, model.training
        gen_training = self.generator.training if self.generator is not None else False
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model.eval()
            if self.generator is not None:
                self.generator.eval()
            try:
                rng = torch.Generator(device="cpu").manual_seed(0)
                real = real_text_tokens(batch)
                query_keys = self._teacher_query_keys(batch)
                positions, alpha = self._masking(query_keys, real, self.epic.mask_ratio, rng)
                corrupted = self._figure_corruption(batch, positions, model, rng)
                fused = model.infer(input_ids=corrupted, attention_mask=batch["attention_mask"],
                                    pixel_values=batch["pixel_values"])
                head = model.consistency_head()
                logits = fused["text_feats"].float() @ head.weight.float().view(-1) + head.bias.float()
            finally:
                model.train(was_training)
                if self.generator is not None:
                    self.generator.train(gen_training)
        rows = []
        content = batch.get("content_mask", torch.zeros_like(real))
        for i in range(real.shape[0]):
            index = real[i].nonzero().flatten().tolist()
            if not index:
                continue
            original = batch["input_ids"][i]
            tokens = [_show(t) for t in self.tokenizer.convert_ids_to_tokens(original[index].tolist())]
            replaced = [(_show(self.tokenizer.convert_ids_to_tokens(int(corrupted[i, j])))
                         if int(corrupted[i, j]) != int(original[j]) else None) for j in index]
            rows.append({"tokens": tokens, "alpha": alpha[i, index].tolist(), "content": content[i, index].tolist(),
                         "replaced": replaced, "p_inconsistent": torch.sigmoid(-logits[i, index]).tolist()})
        return render_saliency_figure(rows)

    def _figure_corruption(self, batch, positions, model, rng) -> torch.Tensor:
        input_ids = batch["input_ids"]
        targets = input_ids[positions]
        if self.generator is None:
            return replace_at(input_ids, positions, random_replacements(len(targets), self.allowed_ids, rng))
        masked_ids = mask_tokens(input_ids, positions, self.mask_token_id)
        if self.epic.generator_mode == "vlm_sas":
            samples, _ = self._sas_samples(batch, masked_ids, positions, targets, rng)
        else:
            image_cls = None
            if self.epic.generator_mode == "conditioned":
                image_cls = model.encode_image(batch["pixel_values"])[:, 0]
            states = self.generator(masked_ids, batch["attention_mask"], positions, image_cls)
            embedding, bias = self.generator.output_embedding()
            samples, _ = sample_replacements(states, embedding, bias, targets, self.exclude_ids, rng)
        return replace_at(input_ids, positions, samples)

    # -- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"measurements": self.measurements.state_dict(), "last_image_bucket": self._last_image_bucket,
                "saliency_cache_misses": self.saliency_cache_misses}

    def load_state_dict(self, state: dict) -> None:
        if "measurements" in state:
            self.measurements.load_state_dict(state["measurements"])
            if self.measurements.sums is not None:
                self.measurements.sums = self.measurements.sums.to(self.device)
        self._last_image_bucket = int(state.get("last_image_bucket", 0))
        self.saliency_cache_misses = int(state.get("saliency_cache_misses", 0))


def _show(token: str) -> str:
    """A BPE token for display: byte-level BPE marks a leading space with 'Ġ' (a bare space shows as '_')."""
    shown = token.replace("Ġ", "").replace("▁", "")
    return shown if shown.isprintable() and shown.strip() else "_"
