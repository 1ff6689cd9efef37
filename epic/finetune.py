"""Fine-tune a pretrained METER / EPIC-METER on retrieval, VQA, NLVR2 or SNLI-VE under DeepSpeed ZeRO-2.

    deepspeed --num_gpus 8 epic/finetune.py --task vqa --init runs/epic_meter_4m --config finetune_vqa \
        --ds_config ds_configs/zero2_bf16.json finetune.train_json=... finetune.images=... run.dir=runs/vqa
    python epic/finetune.py --task nlvr2 --init EXPORT_DIR --config finetune_shapes \
        --ds_config ds_configs/cpu_zero2.json finetune.shapes=DIR run.dir=RUN

`--init` is a pretraining (or fine-tuning) run dir, one of its step_* checkpoints, an export dir
(tools/export.py) or an official METER .ckpt: only the module weights are read (DeepSpeed's zero_to_fp32, so any
world size), the optimizer state is ignored. The architecture (`model.*`) comes from that checkpoint's saved
config; `model.*` keys given here override it (e.g. a larger `model.image_size`: the position embedding is
resampled). The run then behaves like pretraining: its own ZeRO-2 engine, checkpoints under run.dir, automatic
resume (`--resume none` refuses, `--resume PATH` picks one), TensorBoard, periodic evaluation on the val file
(`train.eval_every`), and a final evaluation printed as one JSON object.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # running as a script: do not let epic/*.py shadow top-level modules

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import torch

from epic.config import (ConfigError, _read_yaml_with_extends, apply_override, one_line, parse_override,
                         resolve_config_path)
from epic.finetune_config import FINETUNE_TASKS, TaskConfig, build_dataclass, validate_finetune

# model fields a checkpoint fixes (shapes); the rest (image_size, dropout, max_text_len) may be changed
LOCAL_PATH_FIELDS = ("vit_pretrained", "text_pretrained")
# model fields of the pretraining run that a task model does not take over: EPIC's consistency head beta; ALBEF's
# distillation ramp, a schedule of the run (ALBEF ramps alpha over the first *fine-tuning* epoch: set
# model.alpha_ramp_steps to its length in optimizer steps; 0, the default, = alpha from the first step)
PRETRAINING_ONLY_FIELDS = ("consistency_head", "alpha_ramp_steps")


# ------------------------------------------------------------------------------------------------ configuration
def _raw_config(name: Optional[str], overrides: list[str]) -> dict:
    data = _read_yaml_with_extends(resolve_config_path(name)) if name else {}
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return data


def resolve_finetune_config(config: Optional[str], overrides: list[str], task: str,
                            init: Optional[str] = None) -> TaskConfig:
    """YAML + overrides, with the architecture and tokenizer taken from the init checkpoint's own config.

    When run.dir already holds a checkpoint of this fine-tuning run, its saved config provides them instead (a
    resumed run does not need --init again).
    """
    from epic.paths import expand_env
    from epic.models.loading import locate, read_config_dict, tokenizer_path

    data = _raw_config(config, overrides)
    ft = data.setdefault("finetune", {})
    if ft.get("task") and ft["task"] != task:
        raise ConfigError(f"--task {task} but the config says finetune.task={ft['task']}")
    ft["task"] = task
    if init is not None:
        ft["init"] = init
    source_config = _saved_run_config(data)
    if source_config is None:
        if not ft.get("init"):
            raise ConfigError("fine-tuning needs --init RUN_DIR | CHECKPOINT | EXPORT_DIR | meter.ckpt "
                              "(the pretrained weights)")
        source = locate(expand_env(ft["init"], "finetune.init"))
        source_config = read_config_dict(source) or {}
        tokenizer = tokenizer_path(source, source_config)
        if tokenizer and not data.get("data", {}).get("tokenizer"):
            data.setdefault("data", {})["tokenizer"] = tokenizer
    model = {k: v for k, v in source_config.get("model", {}).items()
             if k not in LOCAL_PATH_FIELDS + PRETRAINING_ONLY_FIELDS and not k.endswith("_pretrained")}
    data["model"] = {**model, **data.get("model", {})}
    if task == "nlvr2" and _has_model_field(data["model"], "num_token_types"):
        data["model"]["num_token_types"] = 3  # the second image's token type (METER, ViLT; ALBEF has none)
    if not data.setdefault("data", {}).get("tokenizer"):
        data["data"]["tokenizer"] = source_config.get("data", {}).get("tokenizer")
    data["data"].setdefault("image_size", data["model"].get("image_size", 288))
    if source_config.get("data", {}).get("normalization"):  # the pixels the weights were trained on, unless given
        data["data"].setdefault("normalization", source_config["data"]["normalization"])
    if data["model"].get("max_text_len"):  # the checkpoint's text length, unless the user sets one
        data["data"].setdefault("max_text_len", data["model"]["max_text_len"])
    data["data"]["root"] = None  # pretraining data is not read here
    data["data"]["sources"] = []
    data.pop("epic", None)  # fine-tuning trains no generator and reads no teacher
    cfg = build_dataclass(TaskConfig, data)
    from epic.models.loading import without_local_weights

    cfg.model = without_local_weights(cfg.model)  # the weights come from --init
    fill_task_paths(cfg)
    validate_finetune(cfg)
    family = getattr(cfg.model, "family", "meter")
    if task == "nlvr2_ta":
        from epic.objectives.recipes import task_recipe

        if task_recipe(family, task) is None:
            raise ConfigError(f"--task nlvr2_ta is ALBEF's NLVR2 text-assignment pre-step; the {family} family has "
                              f"none (fine-tune --task nlvr2 directly)")
    if cfg.data.tokenizer is None:
        raise ConfigError("no tokenizer: set data.tokenizer (the init checkpoint's config names none)")
    if cfg.data.image_size != cfg.model.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but model.image_size={cfg.model.image_size}: "
                          f"set both (the position embedding is resampled to model.image_size)")
    return cfg


def _has_model_field(model: dict, name: str) -> bool:
    import dataclasses

    from epic.models.registry import config_class

    return name in {f.name for f in dataclasses.fields(config_class(model.get("family", "meter")))}


def _saved_run_config(data: dict) -> Optional[dict]:
    """The config saved in run.dir's newest checkpoint of a fine-tuning run, if any."""
    from epic.engine.checkpoint import find_checkpoint, read_trainer_state

    run_dir = data.get("run", {}).get("dir")
    found = find_checkpoint(run_dir) if run_dir and Path(run_dir).exists() else None
    if found is None:
        return None
    saved = read_trainer_state(found)["config"]
    return saved if saved.get("finetune", {}).get("task") else None


def fill_task_paths(cfg: TaskConfig) -> None:
    """`finetune.shapes` -> the shapes-world task files; VQA: the answer list and num_answers."""
    from epic.data.tasks import answers_from_training_file, shapes_task_paths
    from epic.paths import expand_env

    ft = cfg.finetune
    for key in ("init", "shapes", "train_json", "val_json", "test_json", "images", "answer_list"):
        if getattr(ft, key):
            setattr(ft, key, expand_env(getattr(ft, key), f"finetune.{key}"))
    if ft.shapes:
        for key, value in shapes_task_paths(ft.shapes, data_task(ft.task)).items():
            if getattr(ft, key) is None:
                setattr(ft, key, value)
    if ft.task == "vqa":
        if ft.answer_list is None:
            if ft.train_json is None:
                raise ConfigError("VQA needs finetune.answer_list or finetune.train_json to build one from")
            answers = answers_from_training_file(ft.train_json, ft.min_answer_count)
        else:
            answers = read_answer_list(ft.answer_list)
        if ft.num_answers and ft.num_answers != len(answers):
            raise ConfigError(f"finetune.num_answers={ft.num_answers} but the answer list has {len(answers)}")
        ft.num_answers = len(answers)


def read_answer_list(path: str) -> list[str]:
    if not Path(path).is_file():
        raise ConfigError(f"finetune.answer_list={path} does not exist (a JSON list of answers)")
    answers = json.loads(Path(path).read_text())
    if not isinstance(answers, list) or not answers:
        raise ConfigError(f"finetune.answer_list={path} must be a non-empty JSON list of answers")
    return [str(a) for a in answers]


def task_answers(cfg: TaskConfig) -> list[str]:
    from epic.data.tasks import answers_from_training_file

    ft = cfg.finetune
    if ft.task != "vqa":
        return []
    return read_answer_list(ft.answer_list) if ft.answer_list else answers_from_training_file(ft.train_json,
                                                                                               ft.min_answer_count)


# ------------------------------------------------------------------------------------------------ model
def build_finetune_model(cfg: TaskConfig, load_init: bool = True):
    """The task model, with the init checkpoint's weights loaded (unless resuming, when DeepSpeed loads them)."""
    from epic.paths import expand_env
    from epic.models.loading import locate, read_weights
    from epic.models.downstream import load_pretrained_weights
    from epic.models.loading import load_official_file
    from epic.models.registry import build_task_model

    model = build_task_model(cfg.finetune.task, cfg.model, cfg.finetune.num_answers)
    if hasattr(model, "set_answer_list"):  # an answer decoder (ALBEF) ranks the answers' token sequences
        from epic.data import load_tokenizer

        model.set_answer_list(load_tokenizer(cfg.data.tokenizer), task_answers(cfg), k=cfg.eval.k_test)
    if load_init:
        source = locate(expand_env(cfg.finetune.init, "finetune.init"))
        if source.kind == "official":  # the family's converter gives our key layout
            weights = load_official_file(source.path, cfg.model.family, allow_missing_heads=True).state_dict()
        else:
            weights = read_weights(source)
        load_pretrained_weights(model, weights)
    return model


# ------------------------------------------------------------------------------------------------ objective
from epic.objectives.vanilla import VanillaObjective  # noqa: E402


class TaskObjective(VanillaObjective):
    """The trainer's objective protocol (docs/CONTRACTS.md) for one downstream task; the protocol's other methods
    (extra engines, images, state) keep the vanilla objective's defaults."""

    def __init__(self, cfg: TaskConfig):
        self.cfg, self.task = cfg, cfg.finetune.task

    def losses(self, model, batch: dict, rng: torch.Generator, step: int) -> dict:
        from epic.eval.nlvr2 import correct_count
        from epic.eval.vqa import vqa_score_sum
        from epic.models.downstream import classification_loss, retrieval_losses, vqa_loss
        from epic.objectives.recipes import task_recipe

        own = task_recipe(getattr(self.cfg.model, "family", "meter"), self.task)  # e.g. ALBEF's ITA + ITM
        if own is not None:
            return own(model, batch, rng, self.task, self.cfg.finetune)
        if self.task == "retrieval":
            ft = self.cfg.finetune
            return retrieval_losses(model, batch, negatives=ft.negatives, num_negatives=ft.num_negatives,
                                    itm_weight=ft.itm_weight, generator=rng)
        if self.task == "vqa":
            logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            score = vqa_score_sum(logits.detach(), batch["target_scores"]) / logits.shape[0]
            return {"loss": vqa_loss(logits, batch["target_scores"]), "vqa_score": 100.0 * score}
        if self.task == "nlvr2":
            logits = model(batch["pixel_values_0"], batch["pixel_values_1"], batch["input_ids"],
                           batch["attention_mask"])
        else:
            logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        accuracy = 100.0 * correct_count(logits.detach(), batch["labels"]) / logits.shape[0]
        return {"loss": classification_loss(logits, batch["labels"]), "accuracy": accuracy}

    def flops_per_sample(self, cfg) -> float:
        return 0.0  # not counted for fine-tuning: perf/tflops and MFU are not logged


# ------------------------------------------------------------------------------------------------ data
def random_negative_texts(cfg: TaskConfig) -> int:
    """Captions the retrieval loader draws per example (finetune.negatives=random, METER's draw_false_text)."""
    ft = cfg.finetune
    return ft.num_negatives if ft.task == "retrieval" and ft.negatives == "random" else 0


def data_task(task: str) -> str:
    """The annotation format a task reads: ALBEF's NLVR2 text-assignment pre-step (nlvr2_ta) trains on image-caption
    pairs, the retrieval files' format (Pretrain_nlvr.py reads the pretraining captions)."""
    return "retrieval" if task == "nlvr2_ta" else task


def load_split(cfg: TaskConfig, split: str, for_training: bool):
    from epic.data.tasks import load_task_data

    ft = cfg.finetune
    annotation = {"train": ft.train_json, "val": ft.val_json, "test": ft.test_json}[split]
    if annotation is None:
        raise ConfigError(f"finetune.{split}_json is not set (or use finetune.shapes=DIR for the shapes world)")
    return load_task_data(data_task(ft.task), annotation, ft.images, task_answers(cfg), for_training=for_training)


def evaluate_split(model, cfg: TaskConfig, tokenizer, split: str, rank: int, world_size: int) -> dict:
    """Task metrics of `model` on a split (all ranks take part; every rank gets the same dict)."""
    from epic.data.tasks import build_task_eval_loader

    if cfg.finetune.task == "nlvr2_ta":
        return evaluate_text_assignment(model, cfg, tokenizer, split, rank, world_size)
    data = load_split(cfg, split, for_training=False)
    loader = build_task_eval_loader(data, tokenizer, image_size=cfg.data.image_size,
                                    max_text_len=cfg.data.max_text_len, batch_size=cfg.eval.batch_size, rank=rank,
                                    world_size=world_size, normalization=cfg.data.normalization)
    return evaluate_task(model, cfg.finetune.task, loader, cfg)


@torch.no_grad()
def evaluate_text_assignment(model, cfg: TaskConfig, tokenizer, split: str, rank: int, world_size: int) -> dict:
    """Text-assignment accuracy (chance 33.3) on a split's captions: batches of eval.batch_size in a fixed order, the
    pairs drawn from a fixed seed with the model in eval mode (ALBEF's recipe then draws the other images uniformly:
    the same pairs for every model). ALBEF's Pretrain_nlvr.py evaluates nothing; this shows the pre-step learnt."""
    from epic.data.tasks import build_shuffled_eval_loader
    from epic.objectives.recipes import task_recipe

    family = getattr(cfg.model, "family", "meter")
    recipe = task_recipe(family, "nlvr2_ta")  # ALBEF's: epic.objectives.albef_tasks.text_assignment_losses
    if recipe is None:
        raise ConfigError(f"the {family} family has no NLVR2 text-assignment pre-step (ALBEF's nlvr2_ta)")
    loader = build_shuffled_eval_loader(load_split(cfg, split, for_training=True), tokenizer,
                                        image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                                        batch_size=cfg.eval.batch_size, seed=0, rank=rank, world_size=world_size,
                                        normalization=cfg.data.normalization)
    was_training, rng = model.training, torch.Generator().manual_seed(0)
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # correct, total
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        size = batch["input_ids"].shape[0]
        correct = float(recipe(model, batch, rng, "nlvr2_ta", cfg.finetune)["accuracy"]) * size / 100.0
        counts += torch.tensor([correct, size], dtype=torch.float64, device=device)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    return {"accuracy": 100.0 * float(counts[0] / counts[1].clamp(min=1)), "num_examples": int(counts[1])}


def evaluate_task(model, task: str, loader, cfg) -> dict:
    from epic.data.tasks import NLVR2_KINDS
    from epic.eval.nlvr2 import evaluate_nlvr2
    from epic.eval.retrieval import evaluate_retrieval
    from epic.eval.snli_ve import evaluate_snli_ve
    from epic.eval.vqa import evaluate_vqa

    if task == "retrieval":
        return evaluate_retrieval(model, loader, k_test=cfg.eval.k_test, max_images=cfg.eval.max_images,
                                  batch_size=cfg.eval.batch_size)
    if task == "vqa":
        return evaluate_vqa(model, loader)
    if task == "nlvr2":
        return evaluate_nlvr2(model, loader, kinds=NLVR2_KINDS)
    return evaluate_snli_ve(model, loader)


# ------------------------------------------------------------------------------------------------ trainer
def _trainer_class():
    from epic.engine.logger import log_console
    from epic.engine.trainer import Trainer

    class FinetuneTrainer(Trainer):
        """The pretraining loop, checkpoints and logging, with the task's model, data and objective."""

        def resolve_paths(self):
            return None  # task data come from finetune.* (JSON + images, or a shapes world)

        def build_model(self):
            from epic.data import load_tokenizer

            cfg = self.cfg
            self.train_data = load_split(cfg, "train", for_training=True)
            if cfg.finetune.epochs > 0:  # before the schedule is built from max_steps
                cfg.train.max_steps = max(1, math.ceil(cfg.finetune.epochs * len(self.train_data.examples)
                                                       / cfg.train.global_batch_size))
            return build_finetune_model(cfg, load_init=self.resume_from is None), load_tokenizer(cfg.data.tokenizer)

        def build_objective(self):
            return TaskObjective(self.cfg)

        def build_loader(self, data_state):
            from epic.data.tasks import build_task_train_loader

            cfg = self.cfg
            loader = build_task_train_loader(
                self.train_data, self.tokenizer, image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                batch_size=cfg.data.micro_batch_size, seed=cfg.run.seed, rank=self.rank,
                world_size=self.world_size, randaugment=cfg.data.randaugment, num_workers=cfg.data.num_workers,
                num_negative_texts=random_negative_texts(cfg), normalization=cfg.data.normalization)
            if data_state is not None:
                loader.load_state_dict(data_state)
            return loader

        def evaluate(self, split: str = "val") -> dict:
            metrics = evaluate_split(self.engine.module, self.cfg, self.tokenizer, split, self.rank,
                                     self.world_size)
            self.engine.module.train()
            return metrics

        def _evaluate(self) -> None:
            if self.cfg.finetune.val_json is None:
                return
            metrics = self.evaluate("val")
            self.logger.scalars(self.step, {f"eval/{self.cfg.finetune.task}/{k}": float(v)
                                            for k, v in metrics.items()})
            log_console(f"eval step {self.step}: " + json.dumps(metrics), self.rank)

    return FinetuneTrainer


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=FINETUNE_TASKS)
    parser.add_argument("--init", default=None, help="pretrained weights: run dir | step_* | export dir | .ckpt")
    parser.add_argument("--config", default=None, help="finetune YAML (e.g. finetune_vqa, finetune_shapes)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True)
    parser.add_argument("--resume", default="auto", help="auto (default) | none | PATH")
    parser.add_argument("--no-final-eval", action="store_true", help="skip the evaluation on the val file at the end")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-6 finetune.images=DIR")
    return parser.parse_intermixed_args(argv)  # options may follow the key=value overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    from epic.engine.checkpoint import CheckpointError
    from epic.engine.setup import SetupError

    try:
        cfg = resolve_finetune_config(args.config, args.overrides, args.task, args.init)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"config error: {one_line(err)}", file=sys.stderr)
        return 2
    from epic.dist import init_distributed

    info = init_distributed()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        trainer = _trainer_class()(cfg, args.ds_config, info, resume=args.resume)
        trainer.setup()
    except (ConfigError, SetupError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = trainer.train()
    summary = {"task": cfg.finetune.task, "final_step": result.step, "checkpoint": result.checkpoint,
               "preempted": result.preempted, "last_loss": result.losses[-1] if result.losses else None}
    if not args.no_final_eval and not result.preempted and cfg.finetune.val_json:
        summary["val"] = trainer.evaluate("val")
    if info.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
