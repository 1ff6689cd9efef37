"""The run wiring: config -> data paths, tokenizer, model (through the family registry), objective, its extra
engines (through the engine factory) and data loaders. The one module that knows all the others; the entry points
use it, nothing below imports it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import logging

import torch

from epic.config import Config, ConfigError
from epic.data.shards import epoch_length
from epic.engine.trainer import Trainer
from epic.models.teacher import load_saliency_teacher
from epic.objectives.vanilla import VanillaObjective  # noqa: F401  (the objective protocol's reference)
from epic.paths import expand_env

logger = logging.getLogger(__name__)


@dataclass
class DataPaths:
    sources: list[tuple[str, list[str], float]]  # (name, shard files, weight; "auto" weights resolved)
    val_shards: Optional[list[str]]
    tokenizer: str
    sample_unit: str = "caption"
    epoch_samples: Optional[int] = None  # one pass over all captions (images); None when a counts.json is missing
    region_sources: list = field(default_factory=list)  # (name, shard files, weight) of data.regions (X-VLM)


def expand_shards(spec: str, what: str) -> list[str]:
    """Env vars, then braces and globs (epic.data's spec rules: every listed shard must exist)."""
    from epic.data import expand_shard_spec

    try:
        return expand_shard_spec(expand_env(spec, what), name=what)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err


def resolve_data_paths(cfg: Config) -> DataPaths:
    data = cfg.data
    sources = [(s.name or f"source{i}", s.shards, s.weight) for i, s in enumerate(data.sources)]
    val, tokenizer = data.val_shards, data.tokenizer
    if data.root is not None:
        root = Path(expand_env(data.root, "data.root"))
        if not root.is_dir():
            raise ConfigError(f"data.root={root} does not exist. Generate the shapes world with "
                              f"`python tools/make_synthetic_shards.py --out {root} --train 2000 --val 200`.")
        if not sources:
            sources = [("shapes", str(root / "train" / "*.tar"), "auto")]
        val = val or str(root / "val" / "*.tar")
        tokenizer = tokenizer or str(root / "tokenizer")
    if not sources:
        raise ConfigError("no training data: set data.root (a shapes world) or data.sources "
                          "(list of {name, shards, weight})")
    if tokenizer is None:
        raise ConfigError("data.tokenizer is not set: give a local HF tokenizer folder (e.g. a saved roberta-base)")
    tokenizer = expand_env(tokenizer, "data.tokenizer")
    if not os.path.exists(tokenizer):
        raise ConfigError(f"data.tokenizer={tokenizer} does not exist")
    resolved = resolve_source_weights(
        [(name, expand_shards(spec, f"data source '{name}'"), weight) for name, spec, weight in sources],
        data.sample_unit)
    val_files = expand_shards(val, "data.val_shards") if val else None
    return DataPaths([(s.name, list(s.shards), s.weight) for s in resolved], val_files, tokenizer, data.sample_unit,
                     epoch_length(resolved, data.sample_unit), resolve_region_sources(cfg))


def resolve_region_sources(cfg: Config) -> list:
    """data.regions.sources (weights "auto" = image counts), or the shapes world's train shards (data.root), when
    region steps are on (data.regions.iter_perc > 0)."""
    regions = cfg.data.regions
    if regions.iter_perc == 0:
        return []
    specs = [(s.name or f"regions{i}", s.shards, s.weight) for i, s in enumerate(regions.sources)]
    if not specs and cfg.data.root is not None:
        specs = [("shapes_regions", str(Path(expand_env(cfg.data.root, "data.root")) / "train" / "*.tar"), "auto")]
    if not specs:
        raise ConfigError(f"data.regions.iter_perc={regions.iter_perc} trains on region batches, but there are no "
                          f"region shards: set data.regions.sources (tools/make_shards.py --regions) or data.root "
                          f"(a shapes world), or data.regions.iter_perc=0")
    resolved = resolve_source_weights(
        [(name, expand_shards(spec, f"data.regions source '{name}'"), weight) for name, spec, weight in specs], "image")
    return [(s.name, list(s.shards), s.weight) for s in resolved]


def resolve_source_weights(sources, sample_unit: str):
    """epic.data Sources with "auto" weights replaced by caption (image) counts; ConfigError when counts lack."""
    from epic.data.shards import MissingCountsError, parse_sources

    try:
        return parse_sources([{"name": n, "shards": files, "weight": w} for n, files, w in sources], sample_unit)
    except (MissingCountsError, ValueError) as err:
        raise ConfigError(f"data.sources: {err}") from err


def resolve_model_config(model_cfg, tokenizer):
    """Fill the sizes that come from the tokenizer (vocab, pad id) and the data (max text length)."""
    vocab = len(tokenizer)
    if model_cfg.vocab_size == 0:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
    elif model_cfg.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                          f"set model.vocab_size=0 to take it from the tokenizer")
    return dataclasses.replace(model_cfg, pad_token_id=tokenizer.pad_token_id)


def expand_model_paths(model_cfg):
    """The family's local pretrained-weight paths (config fields named ``*_pretrained``), expanded and checked."""
    for name in [f.name for f in dataclasses.fields(model_cfg) if f.name.endswith("_pretrained")]:
        value = getattr(model_cfg, name)
        if value is not None:
            path = expand_env(value, f"model.{name}")
            if not os.path.exists(path):
                raise ConfigError(f"model.{name}={path} does not exist (pretrained weights are loaded from local "
                                  f"files; set it to null for random initialisation)")
            model_cfg = dataclasses.replace(model_cfg, **{name: path})
    return model_cfg


def load_run_tokenizer(path: str):
    """The run's tokenizer, or a ConfigError naming data.tokenizer (a file, an empty or foreign folder)."""
    from epic.data import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={path}: {err}") from err


def objective_model_requirements(cfg: Config) -> dict:
    """Model-config values the run's objective needs (EPIC: the consistency head beta, Eq. 1, trained with the VLM,
    so it exists before the optimizer is built)."""
    if not cfg.epic.enabled:
        return {}
    from epic.objectives.consistency import MODEL_CONFIG_REQUIREMENTS

    return dict(MODEL_CONFIG_REQUIREMENTS)


def build_model(cfg: Config, paths: DataPaths):
    """(model, tokenizer): the ``model.family``'s model (epic.models.registry) at the resolved sizes."""
    from epic.models.registry import build_model as build_family_model

    tokenizer = load_run_tokenizer(paths.tokenizer)
    model_cfg = expand_model_paths(resolve_model_config(cfg.model, tokenizer))
    if model_cfg.max_text_len < cfg.data.max_text_len:
        raise ConfigError(f"data.max_text_len={cfg.data.max_text_len} exceeds model.max_text_len="
                          f"{model_cfg.max_text_len}")
    required = objective_model_requirements(cfg)
    unknown = sorted(set(required) - {f.name for f in dataclasses.fields(model_cfg)})
    if unknown:
        raise ConfigError(f"model.family={model_cfg.family}: its config has no {unknown}, which this objective "
                          f"needs (see docs/CONTRACTS.md, 'How a family joins')")
    model_cfg = dataclasses.replace(model_cfg, **required)
    cfg.model = model_cfg  # the resolved sizes are saved with the checkpoint
    model = build_family_model(model_cfg)
    apply_fast_path(model, cfg.train)
    return model, tokenizer


def apply_fast_path(model, train_cfg) -> None:
    """``train.activation_checkpointing`` and ``train.compile`` on a freshly built model (before its optimizer)."""
    from epic.models.fast_path import compile_parts, set_activation_checkpointing

    if train_cfg.activation_checkpointing:
        parts = set_activation_checkpointing(model)
        logger.info("train.activation_checkpointing: %s", ", ".join(parts))
    if train_cfg.compile:
        parts = model.compile_parts() if hasattr(model, "compile_parts") else {}
        if not parts:
            logger.warning("train.compile: %s names no parts to compile; it runs eagerly", type(model).__name__)
        backend = os.environ.get("EPIC_COMPILE_BACKEND", "inductor")  # e.g. aot_eager: graph capture only (CPU)
        model.compile_guards = compile_parts(parts, backend=backend)
        logger.info("train.compile (%s): %d parts (%s) compile at their first call; one that fails runs eagerly, "
                    "with a warning", backend, len(parts), ", ".join(parts))


def build_train_data(cfg: Config, paths: DataPaths, tokenizer, rank: int, world_size: int, state=None):
    from epic.data import build_train_loader

    sources = [{"name": name, "shards": files, "weight": weight} for name, files, weight in paths.sources]
    on_cuda = torch.cuda.is_available()  # pinned host memory makes the trainer's non_blocking copies asynchronous
    loader = build_train_loader(sources, tokenizer, image_size=cfg.data.image_size,
                                max_text_len=cfg.data.max_text_len, batch_size=cfg.data.micro_batch_size,
                                num_workers=cfg.data.num_workers, seed=cfg.run.seed, rank=rank, world_size=world_size,
                                mlm_probability=cfg.data.mlm_probability, randaugment=cfg.data.randaugment,
                                state=state, sample_unit=cfg.data.sample_unit,
                                whole_word_masking=cfg.data.whole_word_masking, streams=cfg.data.streams or None,
                                mlm_masking="xvlm" if cfg.data.mlm_masking == "xvlm" else "random",
                                mlm_max_masks=cfg.data.mlm_max_masks,
                                normalization=cfg.data.normalization,
                                pin_memory=on_cuda,
                                prefetch_factor=4 if on_cuda else 2)
    if cfg.epic.enabled and cfg.epic.saliency_cache:
        from epic.data.saliency_cache import SaliencyCacheLoader

        loader = SaliencyCacheLoader(loader, open_saliency_cache(cfg, tokenizer))
    return loader


def open_saliency_cache(cfg: Config, tokenizer):
    """``epic.saliency_cache`` checked against the run's image size, text length and tokenizer."""
    from epic.data.saliency_cache import SaliencyCache, SaliencyCacheError, check_manifest_fits

    directory = expand_env(cfg.epic.saliency_cache, "epic.saliency_cache")
    try:
        cache = SaliencyCache(directory)
        check_manifest_fits(cache.manifest, cfg.data.image_size, cfg.data.max_text_len, len(tokenizer))
    except SaliencyCacheError as err:
        raise ConfigError(str(err)) from err
    return cache


def build_objective(cfg: Config, engine, tokenizer, ds_config: dict, batch_math, paths: DataPaths, device,
                    rank: int = 0, world_size: int = 1):
    """The run's objective, with the engines of the extra modules it declares made by the engine factory; with
    data.regions.iter_perc > 0, wrapped in the region-step interleave (X-VLM) over the region loader."""
    import torch

    from epic.engine.setup import create_engine

    if not cfg.epic.enabled and cfg.data.mlm_masking == "saliency":  # †CMLM (App. J): saliency-masked MLM
        from epic.data.text import replacement_token_ids
        from epic.objectives.vanilla import SaliencyCMLM

        teacher = load_saliency_teacher(cfg, tokenizer, torch.device(device))
        objective = VanillaObjective(SaliencyCMLM(teacher, cfg.data.mlm_probability, tokenizer.mask_token_id,
                                                  replacement_token_ids(tokenizer)))
    elif not cfg.epic.enabled:
        objective = VanillaObjective()
    else:
        from epic.objectives.consistency import EpicObjective

        objective = EpicObjective(cfg, engine, tokenizer, batch_math=batch_math, paths=paths, device=device)
    on_cpu = str(device).startswith("cpu")
    objective.attach_engines({name: create_engine(spec, ds_config, batch_math, cfg.train.grad_clip, on_cpu)
                              for name, spec in objective.extra_modules().items()})
    if cfg.data.regions.iter_perc > 0:
        objective = with_region_steps(cfg, objective, engine.module, tokenizer, paths, rank, world_size)
    return objective


REGION_SEED_OFFSET = 7919  # the region stream's shard order differs from the caption stream's over the same shards


def with_region_steps(cfg: Config, objective, model, tokenizer, paths: DataPaths, rank: int, world_size: int):
    """X-VLM's region steps around ``objective`` (which keeps the caption steps: vanilla X-VLM, or EPIC, which then
    applies to caption steps only), their batches from the per-rank region loader over data.regions."""
    from epic.data.region_loader import build_region_loader
    from epic.objectives.xvlm import XVLMObjective

    regions = cfg.data.regions
    lacking = [name for name in ("region_embeds", "bbox_score") if not hasattr(model, name)]
    if lacking or not hasattr(model.config, "image_grid"):
        raise ConfigError(f"data.regions.iter_perc={regions.iter_perc}: region steps need region features and a box "
                          f"head (X-VLM); model.family={model.config.family} has none. Set data.regions.iter_perc=0")
    sources = [{"name": name, "shards": files, "weight": weight} for name, files, weight in paths.region_sources]
    loader = build_region_loader(sources, tokenizer, image_size=cfg.data.image_size, grid=model.config.image_grid,
                                 max_text_len=cfg.data.max_text_len,
                                 batch_size=regions.micro_batch_size or cfg.data.micro_batch_size,
                                 max_images=regions.max_images, max_regions=regions.max_regions,
                                 min_perc_in_image=regions.min_perc_in_image, hflip=regions.hflip,
                                 mask_prob=cfg.data.mlm_probability, max_masks=cfg.data.mlm_max_masks,
                                 num_workers=cfg.data.num_workers, seed=cfg.run.seed + REGION_SEED_OFFSET, rank=rank,
                                 world_size=world_size, normalization=cfg.data.normalization)
    return XVLMObjective(loader, regions.iter_perc, cfg.data.mlm_max_masks, caption_objective=objective)


def evaluate_retrieval_during_training(cfg: Config, paths: DataPaths, model, tokenizer, rank: int,
                                       world_size: int, device, dtype) -> dict:
    if not paths.val_shards:
        return {}
    from epic.data import build_eval_loader
    from epic.eval.retrieval import evaluate_retrieval

    loader = build_eval_loader(paths.val_shards, tokenizer, image_size=cfg.data.image_size,
                               max_text_len=cfg.data.max_text_len, batch_size=cfg.eval.batch_size,
                               rank=rank, world_size=world_size, normalization=cfg.data.normalization)
    return evaluate_retrieval(model, loader, k_test=cfg.eval.k_test, max_images=cfg.eval.max_images,
                              batch_size=cfg.eval.batch_size)


def check_run_inputs(trainer) -> None:
    """--check-only: everything a run needs, without building engines. Raises ConfigError on a problem."""
    cfg = trainer.cfg
    tokenizer = load_run_tokenizer(trainer.paths.tokenizer)
    expand_model_paths(resolve_model_config(cfg.model, tokenizer))
    if cfg.data.streams:
        from epic.data.loader import check_streams

        try:
            check_streams(cfg.data.streams, trainer.world_size, cfg.data.num_workers)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if (cfg.epic.enabled or cfg.data.mlm_masking == "saliency") and cfg.epic.teacher is not None:
        teacher = expand_env(cfg.epic.teacher, "epic.teacher")
        if not os.path.exists(teacher):
            raise ConfigError(f"epic.teacher={teacher} does not exist (a run dir, checkpoint dir, export dir or "
                              f"official METER .ckpt)")
    if cfg.epic.enabled and cfg.epic.saliency_cache:
        open_saliency_cache(cfg, tokenizer)
    if cfg.epic.enabled and cfg.epic.generator_mode == "pretrained_fixed":
        from epic.models.generator import check_fitted_generator

        check_fitted_generator(expand_env(cfg.epic.generator.pretrained, "epic.generator.pretrained"))


class PretrainTrainer(Trainer):
    """The pretraining run: the engine's loop with this wiring's model, objective, data and evaluation."""

    def resolve_paths(self):
        return resolve_data_paths(self.cfg)

    def build_model(self):
        return build_model(self.cfg, self.paths)

    def build_objective(self):
        return build_objective(self.cfg, self.engine, self.tokenizer, self.ds_config, self.batch, self.paths,
                               self.device, self.rank, self.world_size)

    def build_loader(self, data_state):
        return build_train_data(self.cfg, self.paths, self.tokenizer, self.rank, self.world_size, data_state)

    def evaluate_during_training(self) -> dict:
        return evaluate_retrieval_during_training(self.cfg, self.paths, self.engine.module, self.tokenizer,
                                                  self.rank, self.world_size, self.device, self.dtype)
