"""Evaluate a checkpoint on retrieval, VQA, NLVR2 or SNLI-VE; prints one JSON object (rank 0).

    python epic/evaluate.py --task retrieval --ckpt RUN_DIR_OR_CHECKPOINT --data "DIR/val/*.tar" [key=value ...]
    python epic/evaluate.py --task retrieval --ckpt RUN --data coco_test.json --images /data/coco
    python epic/evaluate.py --task vqa --ckpt FINETUNE_RUN --data vqa_val.json --images /data/coco
    deepspeed --num_gpus 8 epic/evaluate.py --task retrieval --ckpt RUN --data ... eval.k_test=128

--ckpt: a run dir (its newest complete checkpoint), a step_* checkpoint, an export dir (tools/export.py), or
(retrieval only, with data.tokenizer=...) an official METER .ckpt. A pretraining checkpoint evaluates retrieval
zero-shot with its ITM head; VQA / NLVR2 / SNLI-VE need a checkpoint fine-tuned on that task (epic/finetune.py).
--data: eval shards (retrieval; one row per (image, caption)) or a METER/ALBEF JSON file with --images (a folder
or shards); default: the val file of the fine-tuning run's config. key=value overrides apply to the saved run
config (eval.k_test, eval.batch_size, eval.max_images, data.max_text_len, ...). Metrics also go to TensorBoard
(tags eval/<task>/<metric> at the checkpoint's step) under --tb (default: the run dir's tb/, or the export's).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # running as a script: do not let epic/*.py shadow top-level modules

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from epic.config import ConfigError, apply_override, one_line, parse_override
from epic.finetune_config import FINETUNE_TASKS, TaskConfig, build_dataclass

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_for_evaluation(ckpt: str, task: str, overrides: list[str] = ()) -> tuple[torch.nn.Module, TaskConfig, object]:
    """(model in eval mode, resolved TaskConfig, WeightSource) for `task` from any checkpoint kind."""
    from epic.models.downstream import load_pretrained_weights
    from epic.models.loading import load_official_file, locate, read_config_dict, read_weights, tokenizer_path
    from epic.models.registry import build_model, build_task_model

    parsed = [parse_override(text) for text in overrides]  # a bad override is reported before any file is read
    source = locate(ckpt)
    saved = read_config_dict(source)
    data = json.loads(json.dumps(saved)) if saved is not None else {}
    for path, value in parsed:
        apply_override(data, path, value)
    data.pop("epic", None)
    trained_task = data.get("finetune", {}).get("task", "")
    if trained_task and trained_task != task:
        raise ConfigError(f"{source.describe()} was fine-tuned for {trained_task!r}, not {task!r}")
    if not trained_task and task != "retrieval":
        raise ConfigError(f"{source.describe()} is a pretraining checkpoint: it has no {task} head. Fine-tune it "
                          f"first: python epic/finetune.py --task {task} --init {ckpt} ...")
    if source.kind == "official":
        model = load_official_file(source.path, data.get("model", {}).get("family"), allow_missing_heads=False)
        data["model"] = dataclasses.asdict(model.config)
        data.setdefault("data", {}).update(image_size=model.config.image_size)
    else:
        # the weights come from the checkpoint: clear the family's local tower paths (METER/ALBEF vit_pretrained,
        # X-VLM vision_pretrained, text_pretrained) without naming fields another family lacks
        data["model"] = {k: None if k.endswith("_pretrained") else v for k, v in data.get("model", {}).items()}
        if data["model"].get("image_size"):  # an export dir has no run config: its model's resolution
            data.setdefault("data", {}).setdefault("image_size", data["model"]["image_size"])
        tokenizer = tokenizer_path(source, saved)
        if tokenizer is not None:
            data.setdefault("data", {})["tokenizer"] = tokenizer
    data.setdefault("data", {})["root"] = None
    data["data"]["sources"] = []
    cfg = build_dataclass(TaskConfig, data)
    if cfg.data.tokenizer is None:
        raise ConfigError("no tokenizer known for this checkpoint: pass data.tokenizer=PATH")
    if source.kind != "official":
        if trained_task:
            model = build_task_model(trained_task, cfg.model, cfg.finetune.num_answers)
            if hasattr(model, "set_answer_list"):  # an answer decoder (ALBEF) ranks the answers' token sequences
                from epic.data import load_tokenizer
                from epic.finetune import task_answers

                model.set_answer_list(load_tokenizer(cfg.data.tokenizer), task_answers(cfg), k=cfg.eval.k_test)
        else:  # a pretraining checkpoint: EPIC's ITC head is pretraining-only (zero-shot scores use ITM)
            fields = {f.name for f in dataclasses.fields(cfg.model)}
            model_cfg = dataclasses.replace(cfg.model, consistency_head=False) if "consistency_head" in fields \
                else cfg.model
            model = build_model(model_cfg)
        report = load_pretrained_weights(model, read_weights(source))
        if report["new_heads"] and trained_task:
            raise ConfigError(f"{source.describe()} lacks the weights of {report['new_heads']}")
    return model.eval(), cfg, source


def build_loader(cfg: TaskConfig, task: str, tokenizer, data: Optional[str], images: Optional[str], rank: int,
                 world_size: int):
    from epic.data import build_eval_loader
    from epic.data.tasks import build_task_eval_loader, load_task_data
    from epic.finetune import task_answers

    if data is None:
        data = cfg.finetune.val_json
        if data is None:
            raise ConfigError("--data is required (eval shards for retrieval, or a JSON annotation file)")
    images = images or cfg.finetune.images
    if task == "retrieval" and not data.endswith(".json"):
        return build_eval_loader(data, tokenizer, image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len,
                                 batch_size=cfg.eval.batch_size, rank=rank, world_size=world_size,
                                 normalization=cfg.data.normalization)
    if images is None:
        raise ConfigError(f"--images is required with a JSON annotation file ({data}): the image folder or shards")
    cfg.finetune.task = task
    answers = task_answers(cfg) if task == "vqa" else ()
    task_data = load_task_data(task, data, images, answers, for_training=False)
    return build_task_eval_loader(task_data, tokenizer, image_size=cfg.data.image_size,
                                  max_text_len=cfg.data.max_text_len, batch_size=cfg.eval.batch_size, rank=rank,
                                  world_size=world_size, normalization=cfg.data.normalization)


def default_tb_dir(source) -> Optional[Path]:
    from epic.models.loading import run_dir_of

    if source.kind == "deepspeed":
        run = run_dir_of(source)
        return run / "tb" if run is not None else source.path / "tb"
    if source.kind == "export":
        return source.path / "tb"
    return None


def log_to_tensorboard(tb_dir: Path, task: str, step: int, metrics: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            writer.add_scalar(f"eval/{task}/{key}", float(value), step)
    writer.close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=FINETUNE_TASKS)
    parser.add_argument("--ckpt", required=True, help="run dir | step_* checkpoint | export dir | official .ckpt")
    parser.add_argument("--data", default=None, help="eval shards (retrieval) or a JSON annotation file")
    parser.add_argument("--images", default=None, help="image folder or shards for a JSON annotation file")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model dtype (fp32 on CPU)")
    parser.add_argument("--tb", default=None, help="TensorBoard dir ('none' to skip)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the saved config, e.g. eval.k_test=64")
    return parser.parse_intermixed_args(argv)  # options may follow the key=value overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    from epic.data import load_tokenizer
    from epic.dist import init_distributed
    from epic.models.loading import read_step
    from epic.finetune import evaluate_task

    try:
        model, cfg, source = load_for_evaluation(args.ckpt, args.task, args.overrides)
    except ConfigError as err:
        print(f"config error: {one_line(err)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if args.task == "nlvr2_ta":  # pairs drawn inside seeded batches of captions, not a per-example loader
            from epic.finetune import evaluate_text_assignment

            ft = cfg.finetune
            ft.task, ft.val_json, ft.images = args.task, args.data or ft.val_json, args.images or ft.images
            metrics = evaluate_text_assignment(model, cfg, tokenizer, "val", info.rank, info.world_size)
        else:
            loader = build_loader(cfg, args.task, tokenizer, args.data, args.images, info.rank, info.world_size)
            metrics = evaluate_task(model, args.task, loader, cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    step = read_step(source)
    if info.rank == 0:
        tb_dir = None if args.tb == "none" else (Path(args.tb) if args.tb else default_tb_dir(source))
        if tb_dir is not None:
            log_to_tensorboard(tb_dir, args.task, step, metrics)
        print(json.dumps({"task": args.task, "ckpt": str(source.path), "step": step, **metrics}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
