"""Config -> the objects of a run: data paths, tokenizer, model, objective, data loaders."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from epic.config import Config, ConfigError
from epic.data.shards import epoch_length

_ENV_VAR = re.compile(r"\$\{([^}]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class DataPaths:
    sources: list[tuple[str, list[str], float]]  # (name, shard files, weight; "auto" weights resolved)
    val_shards: Optional[list[str]]
    tokenizer: str
    sample_unit: str = "caption"
    epoch_samples: Optional[int] = None  # one pass over all captions (images); None when a counts.json is missing


def expand_env(text: str, what: str) -> str:
    """`${EPIC_DATA}/cc3m` -> `/data/cc3m`; an unset variable is an error naming it."""
    def substitute(match):
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ConfigError(f"{what}: environment variable ${name} is not set (used in '{text}'). "
                              f"Export it, e.g. `export {name}=/path/...`, or give the path directly.")
        return os.environ[name]

    return _ENV_VAR.sub(substitute, text)


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
                     epoch_length(resolved, data.sample_unit))


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
    for name in ("vit_pretrained", "text_pretrained"):
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


def build_model(cfg: Config, paths: DataPaths):
    from epic.models.meter import METER

    tokenizer = load_run_tokenizer(paths.tokenizer)
    model_cfg = expand_model_paths(resolve_model_config(cfg.model, tokenizer))
    if model_cfg.max_text_len < cfg.data.max_text_len:
        raise ConfigError(f"data.max_text_len={cfg.data.max_text_len} exceeds model.max_text_len="
                          f"{model_cfg.max_text_len}")
    cfg.model = model_cfg  # the resolved sizes are saved with the checkpoint
    model = METER.from_config(model_cfg)
    if cfg.epic.enabled:  # EPIC's head beta (Eq. 1) is trained with the VLM: add it before the optimizer exists
        from epic.objectives.consistency import add_consistency_head

        add_consistency_head(model)
    return model, tokenizer


def build_train_data(cfg: Config, paths: DataPaths, tokenizer, rank: int, world_size: int, state=None):
    from epic.data import build_train_loader

    sources = [{"name": name, "shards": files, "weight": weight} for name, files, weight in paths.sources]
    return build_train_loader(sources, tokenizer, image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                              batch_size=cfg.data.micro_batch_size, num_workers=cfg.data.num_workers,
                              seed=cfg.run.seed, rank=rank, world_size=world_size,
                              mlm_probability=cfg.data.mlm_probability, randaugment=cfg.data.randaugment, state=state,
                              sample_unit=cfg.data.sample_unit, streams=cfg.data.streams or None)


class VanillaObjective:
    """METER's objectives: ITM + MLM with the image encoded once per step; ``cmlm`` (a SaliencyCMLM): †CMLM."""

    def __init__(self, cmlm=None) -> None:
        from epic.objectives.vanilla import cmlm_losses, vanilla_losses

        self.cmlm = cmlm
        self._losses = vanilla_losses
        self._cmlm_losses = cmlm_losses

    def extra_engines(self) -> dict:
        return {}

    def losses(self, model, batch: dict, rng: torch.Generator, step: int) -> dict:
        if self.cmlm is not None:
            return self._cmlm_losses(model, batch, rng, self.cmlm)
        return self._losses(model, batch, rng, share_image_embeds=True)

    def log_values(self, step: int) -> dict:
        return {}

    def images(self, step: int) -> dict:
        return {}

    def flops_per_sample(self, cfg: Config) -> float:
        from epic.objectives.vanilla import step_flops_per_sample

        flops = step_flops_per_sample(cfg.model, share_image_embeds=True, text_len=cfg.data.max_text_len)
        if self.cmlm is not None:
            from epic.objectives.epic_flops import teacher_flops_per_sample

            with torch.random.fork_rng(devices=[]):
                flops += teacher_flops_per_sample(self.cmlm.teacher.config, cfg.data.max_text_len)
        return flops

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_saliency_teacher(cfg: Config, tokenizer, device):
    """The frozen teacher of epic.teacher (EPIC's saliency masking, †CMLM), checked against the data's sizes."""
    from epic.models.teacher import check_teacher_fits, load_teacher

    teacher = load_teacher(expand_env(cfg.epic.teacher, "epic.teacher"), device, cfg.epic.teacher_dtype)
    check_teacher_fits(teacher, tokenizer, cfg.data.image_size, cfg.data.max_text_len)
    return teacher


def build_objective(cfg: Config, engine, tokenizer, ds_config: dict, batch_math, paths: DataPaths, device):
    if not cfg.epic.enabled:
        if cfg.data.mlm_masking == "saliency":  # †CMLM (App. J): METER with saliency-masked MLM
            from epic.data.text import replacement_token_ids
            from epic.objectives.vanilla import SaliencyCMLM

            teacher = load_saliency_teacher(cfg, tokenizer, torch.device(device))
            return VanillaObjective(SaliencyCMLM(teacher, cfg.data.mlm_probability, tokenizer.mask_token_id,
                                                 replacement_token_ids(tokenizer)))
        return VanillaObjective()
    from epic.objectives.consistency import EpicObjective

    return EpicObjective(cfg, engine, tokenizer, ds_config, batch_math, paths, device)


def evaluate_retrieval_during_training(cfg: Config, paths: DataPaths, model, tokenizer, rank: int,
                                       world_size: int, device, dtype) -> dict:
    if not paths.val_shards:
        return {}
    from epic.data import build_eval_loader
    from epic.eval.retrieval import evaluate_retrieval

    loader = build_eval_loader(paths.val_shards, tokenizer, image_size=cfg.data.image_size,
                               max_text_len=cfg.data.max_text_len, batch_size=cfg.eval.batch_size,
                               rank=rank, world_size=world_size)
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
    if cfg.epic.enabled and cfg.epic.generator_mode == "pretrained_fixed":
        from epic.models.generator import check_fitted_generator

        check_fitted_generator(expand_env(cfg.epic.generator.pretrained, "epic.generator.pretrained"))
