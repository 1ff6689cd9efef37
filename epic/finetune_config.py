"""Fine-tuning configuration: the run config (epic.config.Config) plus a `finetune:` section.

    cfg = load_finetune_config("finetune_vqa", overrides=["finetune.init=runs/meter_4m", "train.lr=5e-6"])

`TaskConfig` extends `Config` by one field, so the lead's loader, validation and `config_to_dict` apply unchanged
and the `finetune` section is saved with every checkpoint (evaluate.py and export.py read it back).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from epic.config import Config, ConfigError, build_dataclass, read_config_data, validate

FINETUNE_TASKS = ("retrieval", "vqa", "nlvr2", "snli_ve", "nlvr2_ta")  # nlvr2_ta: ALBEF's NLVR2 pre-step
RETRIEVAL_NEGATIVES = ("random", "hard", "in_batch")
TEXT_ASSIGNMENT_MIN_BATCH = 3
TEXT_ASSIGNMENT_PAIRS = ("hard", "uniform")


@dataclass
class FinetuneConfig:
    task: str = ""  # retrieval | vqa | nlvr2 | snli_ve | nlvr2_ta
    init: Optional[str] = None  # run dir, step_* checkpoint, export dir or official METER .ckpt (weights only)
    # Data: METER/ALBEF JSON annotation files and the images (a folder or a shard spec); see epic/data/tasks.py.
    # `shapes` (a shapes world with tasks, tools/make_synthetic_shards.py --tasks) fills the four below.
    shapes: Optional[str] = None
    train_json: Optional[str] = None
    val_json: Optional[str] = None
    test_json: Optional[str] = None
    images: Optional[str] = None
    # VQA: the answer list (JSON list; class index = position). None: built from train_json (min_answer_count).
    answer_list: Optional[str] = None
    min_answer_count: int = 1
    num_answers: int = 0  # resolved from the answer list; the VQA head's size
    # Retrieval (METER's irtr recipe): per image its caption + num_negatives negative captions, softmax over their
    # rank_output scores with the positive first. negatives: "random" = METER's draw_false_text, captions of other
    # images drawn uniformly from the whole training file by the loader; "hard" = from the other images of the
    # micro-batch, sampled by the first-stage similarity (ALBEF-style mining); "in_batch" = from the micro-batch,
    # uniformly.
    num_negatives: int = 15
    negatives: str = "random"
    # Weight of an ITM term (the frozen ITM head on matched / mismatched pairs) added to the rank loss. METER's irtr
    # configs list `itm: 0.5`, but its set_task keeps only losses with weight >= 1, so METER trains IR/TR with the
    # rank loss alone (the 0.5 only makes the ITM head exist, to initialise rank_output from); 0 reproduces that.
    itm_weight: float = 0.0
    # NLVR2 text assignment (ALBEF's nlvr2_ta): how the other image(s) of each caption are drawn from its micro-batch:
    # "hard" = by image similarity (Pretrain_nlvr.py), "uniform" = uniformly (easier; evaluation always is uniform)
    ta_pairs: str = "hard"
    hard_negatives: Optional[bool] = None  # deprecated (saved configs): true = negatives=hard, false = in_batch
    epochs: float = 0.0  # > 0: train.max_steps = ceil(epochs * train examples / global batch)


@dataclass
class TaskConfig(Config):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def validate_finetune(cfg: TaskConfig) -> None:
    validate(cfg)
    ft = cfg.finetune
    if ft.task not in FINETUNE_TASKS:
        raise ConfigError(f"'finetune.task' must be one of {FINETUNE_TASKS}, got {ft.task!r}")
    if ft.num_negatives < 1:
        raise ConfigError(f"'finetune.num_negatives' must be >= 1, got {ft.num_negatives}")
    if ft.hard_negatives is not None:  # an older saved config
        ft.negatives, ft.hard_negatives = ("hard" if ft.hard_negatives else "in_batch"), None
    if ft.negatives not in RETRIEVAL_NEGATIVES:
        raise ConfigError(f"'finetune.negatives' must be one of {RETRIEVAL_NEGATIVES}, got {ft.negatives!r}")
    if ft.itm_weight < 0:
        raise ConfigError(f"'finetune.itm_weight' must be >= 0, got {ft.itm_weight}")
    if ft.epochs < 0:
        raise ConfigError(f"'finetune.epochs' must be >= 0, got {ft.epochs}")
    if ft.ta_pairs not in TEXT_ASSIGNMENT_PAIRS:
        raise ConfigError(f"'finetune.ta_pairs' must be one of {TEXT_ASSIGNMENT_PAIRS}, got {ft.ta_pairs!r}")
    if ft.task == "nlvr2_ta":  # each caption is paired with two *other* images of its (micro-)batch
        for key, value in (("data.micro_batch_size", cfg.data.micro_batch_size), ("eval.batch_size",
                                                                                 cfg.eval.batch_size)):
            if value < TEXT_ASSIGNMENT_MIN_BATCH:
                raise ConfigError(f"'{key}' is {value} but the NLVR2 text-assignment pre-step draws two other images "
                                  f"per caption from its batch: set it >= {TEXT_ASSIGNMENT_MIN_BATCH}")


def task_config_from_dict(data: dict) -> TaskConfig:
    """A TaskConfig from a (saved) dict; a pretraining config gets an empty finetune section."""
    return build_dataclass(TaskConfig, data)


def load_finetune_config(name_or_path: Optional[str], overrides: Optional[list[str]] = None,
                         task: Optional[str] = None) -> TaskConfig:
    data = read_config_data(name_or_path, overrides)
    if task is not None:
        given = data.get("finetune", {}).get("task")
        if given and given != task:
            raise ConfigError(f"--task {task} but the config says finetune.task={given}; use the matching config")
        data.setdefault("finetune", {})["task"] = task
    cfg = build_dataclass(TaskConfig, data)
    validate_finetune(cfg)
    return cfg


def replace_section(cfg: TaskConfig, section: str, **changes) -> None:
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **changes))
