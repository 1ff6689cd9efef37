#!/usr/bin/env python
"""Export a pretraining or fine-tuning run: ZeRO-2 checkpoint -> plain files other code can read.

    python tools/export.py --ckpt RUN_DIR [--tag step_00100000] --out DIR

The checkpoint's module weights are consolidated with DeepSpeed's own zero_to_fp32 (fp32 master weights, any
world size). DIR then holds:

    model.safetensors           the VLM in our key layout (epic.models; task heads of a fine-tuned run included),
    config.yaml                 the run's resolved config (evaluate.py / finetune.py --init read it),
    config.json                 METERConfig, so that METER.from_pretrained(DIR) works (pretraining runs),
    tokenizer/                  the run's tokenizer (HF),
    text_encoder/               the text tower: transformers.AutoModel.from_pretrained(DIR/text_encoder) (+ tokenizer),
    vision_encoder.safetensors  the vision tower's timm weights, and vision_encoder.json: what timm itself reads to
                                rebuild it (a timm CLIP model name + overrides): timm.create_model(name,
                                pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs),
    meter.ckpt                  {"state_dict": ...} in the official METER layout (vit_model.visual.*, ...),
    generator/                  EPIC runs: the generator as a HF masked LM (AutoModelForMaskedLM) + tokenizer,
    export.json                 where it came from (checkpoint, step, world size) and the file list.

Not exported: EPIC's ITC head (pretraining only) and any optimizer state.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from epic.models.loading import (GENERATOR_ENGINE, WeightSource, has_engine, locate, read_config_dict,  # noqa: E402
                               read_deepspeed_weights, read_step, tokenizer_path)


# timm's OpenAI-CLIP image towers (QuickGELU, ln_pre, LayerNorm eps 1e-5, class token) by (patch, width, heads)
TIMM_CLIP_MODELS = {(16, 768, 12): "vit_base_patch16_clip_quickgelu_224",
                    (32, 768, 12): "vit_base_patch32_clip_quickgelu_224",
                    (14, 1024, 16): "vit_large_patch14_clip_quickgelu_224"}
TIMM_CLIP_FAMILY = "vit_base_patch16_clip_quickgelu_224"  # sizes outside the table: its entry point with sizes set
VISION_WEIGHTS = "vision_encoder.safetensors"


def vision_encoder_spec(model_cfg) -> dict:
    """What `timm.create_model` itself reads to rebuild the vision tower (written as vision_encoder.json).

    A released CLIP size is its timm model name plus the overrides METER needs: the image size, the depth (METER
    keeps 11 of CLIP's 12 blocks), no classifier and no pooling (ln_post on every token). Other sizes use the same
    CLIP entry point with patch_size / embed_dim / num_heads set too: timm's plain VisionTransformer constructor
    cannot express CLIP's LayerNorm eps (1e-5; its default is 1e-6) in JSON, its CLIP entry points fix it.
        timm.create_model(spec["model_name"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=DIR / spec["weights"]), **spec["kwargs"])
    The model's forward (= forward_features) then equals our `encode_image`.
    """
    import timm

    kwargs = dict(img_size=model_cfg.image_size, depth=model_cfg.vit_layers, num_classes=0, global_pool="")
    name = TIMM_CLIP_MODELS.get((model_cfg.patch_size, model_cfg.vit_width, model_cfg.vit_heads))
    if name is None:
        name = TIMM_CLIP_FAMILY
        kwargs.update(patch_size=model_cfg.patch_size, embed_dim=model_cfg.vit_width, num_heads=model_cfg.vit_heads)
    return {"library": "timm", "timm_version": timm.__version__, "model_name": name, "weights": VISION_WEIGHTS,
            "kwargs": kwargs,
            "usage": "timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=<this folder>/"
                     "weights), **kwargs); model(pixels) -> [B, 1 + grid^2, width], ln_post applied to every token"}


def resolve_source(ckpt: str, tag: str | None) -> WeightSource:
    path = Path(ckpt)
    if tag is not None:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        path = root / tag
        if not path.is_dir():
            raise FileNotFoundError(f"--tag {tag}: {path} does not exist (tags: "
                                    f"{sorted(p.name for p in root.glob('step_*'))})")
    source = locate(path)
    if source.kind != "deepspeed":
        raise ValueError(f"{ckpt} is a {source.kind} source, not a DeepSpeed run or checkpoint")
    return source


def export_generator(source: WeightSource, cfg, out: Path, tokenizer) -> str | None:
    if not has_engine(source, GENERATOR_ENGINE):
        return None
    if cfg.epic.generator_mode == "vlm_sas":
        print("note: the VLM(SAS) generator is a METER, not a masked LM: not exported to HF format", file=sys.stderr)
        return None
    from epic.models.generator import build_generator

    generator = build_generator(dataclasses.replace(cfg.epic.generator, pretrained=None), cfg.model,
                                conditioned=cfg.epic.generator_mode == "conditioned")
    generator.load_state_dict(read_deepspeed_weights(source.path, GENERATOR_ENGINE))
    generator.lm.save_pretrained(str(out / "generator"))
    tokenizer.save_pretrained(str(out / "generator"))
    if generator.image_projection is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in generator.image_projection.state_dict().items()},
                  str(out / "generator" / "image_projection.safetensors"))
    return "generator"


def export(ckpt: str, out: str, tag: str | None = None) -> dict:
    from safetensors.torch import save_file

    from epic.data import load_tokenizer
    from epic.finetune_config import TaskConfig, build_dataclass
    from epic.models.downstream import build_task_model, load_pretrained_weights
    from epic.models.interface import CONFIG_NAME
    from epic.models.meter import METER, to_official_state_dict

    source = resolve_source(ckpt, tag)
    saved = read_config_dict(source)
    saved["model"] = {**saved["model"], "vit_pretrained": None, "text_pretrained": None}
    cfg = build_dataclass(TaskConfig, saved)
    task = cfg.finetune.task
    model = build_task_model(task, cfg.model, cfg.finetune.num_answers) if task else METER(cfg.model)
    report = load_pretrained_weights(model, read_deepspeed_weights(source.path))
    if report["new_heads"]:
        raise ValueError(f"{source.path} lacks weights for {report['new_heads']}")
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    files.append("model.safetensors")
    tokenizer_dir = tokenizer_path(source, saved)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    saved["data"] = {**saved["data"], "tokenizer": None}  # the export's own tokenizer/ is used
    if task == "vqa" and cfg.finetune.answer_list:
        shutil.copyfile(cfg.finetune.answer_list, out / "answers.json")
        saved["finetune"] = {**saved["finetune"], "answer_list": str((out / "answers.json").resolve())}
        files.append("answers.json")
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    files += ["config.yaml", "tokenizer"]
    if not task:
        (out / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
        files.append(CONFIG_NAME)

    model.text_transformer.save_pretrained(str(out / "text_encoder"))
    tokenizer.save_pretrained(str(out / "text_encoder"))
    files.append("text_encoder")

    save_file({k: v.detach().contiguous() for k, v in model.vit_model.state_dict().items()}, str(out / VISION_WEIGHTS))
    (out / "vision_encoder.json").write_text(json.dumps(vision_encoder_spec(model.config), indent=2) + "\n")
    files += [VISION_WEIGHTS, "vision_encoder.json"]

    torch.save({"state_dict": to_official_state_dict(model)}, out / "meter.ckpt")
    files.append("meter.ckpt")

    generator = export_generator(source, cfg, out, tokenizer)
    if generator:
        files.append(generator)
    trainer_state = json.loads((source.path / "trainer_state.json").read_text())
    info = {"checkpoint": str(source.path.resolve()), "step": read_step(source), "task": task or "pretraining",
            "world_size": trainer_state.get("world_size"), "dropped": report["dropped"], "files": files}
    (out / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, or one step_* checkpoint")
    parser.add_argument("--tag", default=None, help="a checkpoint tag under the run (e.g. step_00100000)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        info = export(args.ckpt, args.out, args.tag)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
