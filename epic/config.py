"""Typed run configuration: packaged YAML files -> dataclasses, with `extends:` and dotted `key=value` overrides.

    cfg = load_config("shapes_tiny", overrides=["train.lr=2e-5", "data.micro_batch_size=8"])

A config file is YAML, read with `yaml.safe_load` only: a tag such as `!!python/object/apply:...` is a ConfigError
(never executed), and so is a syntax error, with the file and line. `extends: <name or path>` merges this file over
another one (recursively for sections). Names without a path are looked up in the packaged `epic/configs/` folder.
Unknown keys, values of the wrong type and missing files raise `ConfigError` at load time, naming the key and
the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem the user must fix (the message says what and how)."""


# ----------------------------------------------------------------------------------------------------------------
# The `model:` section: one dataclass per model family, chosen by `model.family`
# ----------------------------------------------------------------------------------------------------------------
DEFAULT_FAMILY = "meter"
# family -> a function returning its config dataclass. Filled by epic.models.registry (imported with the `epic`
# package), so this module stays a leaf: it never imports a model family.
_MODEL_CONFIGS: dict[str, Callable[[], type]] = {}


def register_model_config(family: str, config_class: Callable[[], type]) -> None:
    """Make ``model.family: <family>`` validate the ``model:`` section against ``config_class()``'s fields."""
    _MODEL_CONFIGS[family] = config_class


def model_config_class(family: str, where: str = "model.family") -> type:
    if family not in _MODEL_CONFIGS:
        close = difflib.get_close_matches(str(family), list(_MODEL_CONFIGS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"'{where}' is {family!r}, not a registered model family.{hint} Registered: "
                          f"{', '.join(sorted(_MODEL_CONFIGS)) or 'none'} (epic/models/registry.py)")
    return _MODEL_CONFIGS[family]()


class ModelSection:
    """Annotation of ``Config.model``: the dataclass of the family that ``model.family`` names (default METER)."""


def default_model_config():
    return model_config_class(DEFAULT_FAMILY)()


def build_model_section(value: Any, where: str):
    if not isinstance(value, dict):
        raise ConfigError(f"'{where}' must be a section (mapping), got {value!r}")
    family = value.get("family", DEFAULT_FAMILY)
    cls = model_config_class(family, where + ".family")
    if "family" not in {f.name for f in dataclasses.fields(cls)}:
        value = {k: v for k, v in value.items() if k != "family"}
    return build_dataclass(cls, value, where + ".")


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints, TensorBoard logs and the resolved config live here
    name: str = "epic"
    seed: int = 0
    # a collective that does not complete within this many seconds (a dead or stalled rank) ends every rank with
    # a message naming the rank, so that the scheduler can requeue (gloo: the process-group timeout; NCCL: also
    # TORCH_NCCL_ASYNC_ERROR_HANDLING). Env EPIC_COLLECTIVE_TIMEOUT_S overrides it.
    collective_timeout_s: float = 900.0


@dataclass
class SourceConfig:
    shards: str = ""  # brace spec, e.g. /data/cc3m/{00000..00331}.tar
    # Sampling weight in the mixture. "auto": the source's caption count (image count with data.sample_unit=image)
    # from the counts.json beside its shards (tools/make_shards.py writes it; tools/count_shards.py for others).
    weight: Union[float, str] = "auto"
    name: str = ""


@dataclass
class DataConfig:
    # `root` is a folder written by tools/make_synthetic_shards.py (train/, val/, tokenizer/). When set, it fills
    # `sources`, `val_shards` and `tokenizer` where those are left empty.
    root: Optional[str] = None
    sources: list[SourceConfig] = field(default_factory=list)
    val_shards: Optional[str] = None
    tokenizer: Optional[str] = None  # local HF tokenizer folder (e.g. a saved roberta-base tokenizer)
    image_size: int = 288
    max_text_len: int = 50
    micro_batch_size: int = 32  # per rank, per forward/backward
    eval_batch_size: int = 64
    num_workers: int = 4
    mlm_probability: float = 0.15
    randaugment: bool = True
    # number of data streams, fixed for the run (saved with its checkpoints): global micro-batch j comes from
    # stream j % streams, whatever the number of ranks. 0: world size x max(1, num_workers) of the first launch.
    # Resuming on M ranks needs streams % (M x max(1, num_workers)) == 0: pick a number with many divisors.
    streams: int = 0
    # Which tokens METER's MLM masks (mlm_probability of each caption's tokens): "random" (BERT/METER: each token
    # with probability p) | "saliency" ("†CMLM", App. J, Table 8: ceil(p * len) positions drawn from the frozen
    # teacher's saliency alpha, Eq. 8, teacher = epic.teacher; same 80/10/10 corruption). Works with or without EPIC.
    mlm_masking: str = "random"
    # ViLT's MLM selects whole words (of the tokenizer's pre-tokenizer: WordPiece '##' pieces and BPE pieces of one
    # word go together; epic/data/wwm.py) instead of independent tokens; with mlm_masking=random only.
    whole_word_masking: bool = False
    # What a training sample is. "caption" (METER / ALBEF): an (image, caption) pair; auto weights are caption
    # counts and an epoch is one pass over all captions. "image": an image with one caption drawn per visit;
    # auto weights are image counts.
    sample_unit: str = "caption"
    # Per-channel mean/std the image pipeline normalises with, in training and evaluation (and fine-tuning, which
    # takes it from the --init run unless given): "clip" (OpenAI CLIP's: METER, ALBEF, X-VLM) | "imagenet"
    # (torchvision's) | "inception" (0.5 / 0.5: ViLT's pixelbert transform, what its ViT-B/32 weights expect).
    normalization: str = "clip"


@dataclass
class TrainConfig:
    max_steps: int = 100_000  # optimizer steps (one step = one global batch)
    stop_at_step: int = 0  # >0: save and exit at this step (chunked runs); the schedule still spans max_steps
    global_batch_size: int = 4096
    lr: float = 1e-5
    lr_mult_fusion: float = 5.0  # METER: x5 for cross_modal_* layers
    lr_mult_head: float = 5.0  # METER: x5 for the task heads
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    schedule: str = "linear"  # "linear" (METER: warm-up then linear decay to 0) | "tri_stage" (EPIC App. F)
    warmup_ratio: float = 0.1
    hold_ratio: float = 0.8  # tri_stage only
    final_lr_scale: float = 0.01  # tri_stage: exponential decay down to lr * final_lr_scale; cosine: its floor
    warmup_start_scale: float = 0.0  # cosine only: the warm-up starts at lr * warmup_start_scale (ALBEF: 0.1)
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 50
    save_every: int = 2000
    keep_last: int = 3
    eval_every: int = 0  # 0: no periodic evaluation
    deterministic: bool = False  # CPU exact-resume mode: deterministic algorithms, fixed thread count
    peak_tflops: float = 0.0  # per device, for MFU; 0 = guess from the device name (none on CPU)
    # GPU fast path (each switch computes the same losses and gradients as the plain path)
    activation_checkpointing: bool = False  # recompute each ViT block / text layer / fusion layer in backward
    compile: bool = False  # torch.compile the towers and each fusion layer (a part that fails runs eagerly)
    optimizer_impl: str = "auto"  # AdamW kernel: auto (fused on CUDA, foreach elsewhere) | fused | foreach | for_loop
    max_nonfinite_steps: int = 25  # this many optimizer steps in a row with a non-finite loss: save and stop (0: never)
    record_samples: bool = False  # write each micro-batch's sample keys to run.dir/samples/rank_R.jsonl (audits)


@dataclass
class EvalConfig:
    k_test: int = 0  # retrieval: 0 = exhaustive ITM over all pairs, else shortlist size per query
    max_images: int = 0  # 0 = all
    batch_size: int = 64


@dataclass
class GeneratorConfig:
    """The auxiliary BERT-like language model of EPIC (Sec. 4.3); same family as the VLM's text encoder."""

    pretrained: Optional[str] = None  # local HF folder (roberta-base for real runs); None = random init from sizes
    hidden_size: int = 0  # 0 = same as the VLM's text encoder
    layers: int = 0
    heads: int = 0
    intermediate_size: int = 0
    lr: float = 1e-5
    weight_decay: float = 0.01
    ds_config: Optional[str] = None  # its own DeepSpeed JSON (fp16 on GPU); None = derived from the VLM's


@dataclass
class EpicConfig:
    enabled: bool = False
    teacher: Optional[str] = None  # run dir, checkpoint dir, export dir or official METER .ckpt
    teacher_dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp16 | bf16 | fp32
    mask_ratio: float = 0.35
    lambda_itc: float = 8.0  # Eq. 9
    # How L_ITC (Eq. 2) is reduced over a micro-batch. "token_mean" (default): mean BCE over all real tokens, as
    # ELECTRA reduces its per-token discriminator loss; with it lambda = 8 puts lambda*L_ITC (~8 x 0.3 once
    # trained) on the scale of L_MLM + L_ITM, which is what App. I says lambda is for ("to balance the ITC loss and
    # losses in METER"). "pair_sum": Eq. 2 literally, summed over a pair's ~15-40 tokens and averaged over pairs;
    # lambda = 8 would then weigh ITC ~100-300x the MLM term, so pair_sum needs lambda ~ 8 / mean tokens per pair.
    itc_reduction: str = "token_mean"
    masking: str = "saliency"  # "saliency" (Sec. 4.4) | "uniform" (ablation "ITC+LM")
    corruption: str = "generator"  # "generator" | "random" (ablation "ITC (rand.)": uniform vocabulary tokens)
    generator_mode: str = "finetune"  # finetune | fixed | pretrained_fixed | conditioned | vlm_sas (Table 5)
    # vlm_sas (App. G): the auxiliary VLM is the new VLM at first, then refreshed from the main VLM at the end of
    # every k-th epoch (an epoch = one pass over all captions, data.sample_unit; needs the shards' counts.json), or,
    # when sas_refresh_every > 0, every that many optimizer steps instead.
    sas_refresh_epochs: int = 1
    sas_refresh_every: int = 0
    cmlm_saliency: bool = False  # replaced by data.mlm_masking=saliency (kept so that older saved configs load)
    log_saliency_every: int = 0  # every N steps, a Fig. 4-style image of the saliency of a fixed val batch
    saliency_cache: Optional[str] = None  # dir of tools/precompute_saliency.py: alpha read from it, teacher skipped
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=default_model_config)  # the family's config (model.family)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    epic: EpicConfig = field(default_factory=EpicConfig)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def resolve_config_path(name: str, relative_to: Optional[Path] = None) -> Path:
    """A config name (`shapes_tiny`), a packaged file name (`shapes_tiny.yaml`) or a path."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    packaged = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(Path(name).stem, packaged, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config file '{name}' not found (looked in {[str(c) for c in candidates]}).{hint} "
                      f"Packaged configs: {', '.join(packaged)}.")


def one_line(message: object) -> str:
    """A message on one line (entry points print `config error: <one line>`)."""
    return " ".join(str(message).split())


def _yaml_error(err: yaml.YAMLError, where: str, line_offset: int = 0) -> ConfigError:
    """A YAML syntax error or an unsupported tag as a ConfigError naming `where` and the line (1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    at = f"{where}:{mark.line + 1 + line_offset}:{mark.column + 1}" if mark is not None else where
    problem = getattr(err, "problem", None) or str(err)
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("tag", 1)[1].strip(" :'\"")
        return ConfigError(one_line(
            f"{at}: unsupported YAML tag '{tag}': config files are read with yaml.safe_load, which constructs no "
            f"Python objects and runs nothing; write a plain value (string, number, list, mapping) instead"))
    context = getattr(err, "context", None)
    return ConfigError(one_line(f"{at}: invalid YAML: {problem}" + (f" ({context})" if context else "")
                                + "; fix the syntax there (indentation, quotes, a missing ':')"))


def _load_yaml_text(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _yaml_error(err, where) from None


def _read_yaml_with_extends(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError(f"circular 'extends' chain: {' -> '.join(map(str, seen + (path,)))}")
    where = str(path) + (f" (extended by {seen[-1]})" if seen else "")
    try:
        data = _load_yaml_text(path.read_text(), str(path)) or {}
    except ConfigError as err:
        raise ConfigError(f"{err} [reached through 'extends' from {seen[-1]}]" if seen else str(err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {where}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml_with_extends(resolve_config_path(parent, path.parent), seen + (path,))
    return deep_merge(base, data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-5` -> (['train', 'lr'], 2e-05). The value is parsed as YAML (`null`, lists, numbers)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.lr=2e-5)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    value = _load_yaml_text(raw, f"override '{text}' (value)") if raw != "" else ""
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def _unknown_key_error(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{where}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'.{hint} Valid keys here: {', '.join(valid)}")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a type annotation, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is ModelSection:
        return build_model_section(value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"'{where}': unsupported value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a section (mapping), got {value!r}")
        return build_dataclass(annotation, value, where + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `2e-5` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"'{where}' must be an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"'{where}': unsupported annotation {annotation!r}")


def build_dataclass(cls: type, data: dict, where: str = ""):
    """Build `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(where, str(key), valid)
        kwargs[key] = _coerce(value, hints[key], where + key)
    return cls(**kwargs)


def read_config_data(name_or_path: Optional[str], overrides: Optional[list[str]] = None) -> dict:
    """The raw mapping of a config file (its `extends` chain merged) with dotted overrides applied."""
    data: dict = {}
    if name_or_path is not None:
        data = _read_yaml_with_extends(resolve_config_path(name_or_path))
    for text in overrides or []:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return data


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a packaged or local YAML config (or the defaults when None) and apply dotted overrides."""
    cfg = build_dataclass(Config, read_config_data(name_or_path, overrides))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a resolved config (e.g. the one saved with a checkpoint)."""
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


_CHOICES = {
    "train.schedule": ("linear", "tri_stage", "cosine"),
    "data.sample_unit": ("caption", "image"),
    "data.normalization": ("clip", "imagenet", "inception"),  # epic.data.transforms.NORMALIZATIONS
    "data.mlm_masking": ("random", "saliency"),
    "epic.masking": ("saliency", "uniform"),
    "epic.corruption": ("generator", "random"),
    "epic.generator_mode": ("finetune", "fixed", "pretrained_fixed", "conditioned", "vlm_sas"),
    "epic.teacher_dtype": ("auto", "fp16", "bf16", "fp32"),
    "train.optimizer_impl": ("auto", "fused", "foreach", "for_loop"),
    "epic.itc_reduction": ("token_mean", "pair_sum"),
    "model.text_model_type": ("roberta", "bert"),
}


def validate_micro_batch(cfg: Config) -> None:
    """A model config may declare ``min_micro_batch_size`` (class attribute) with ``min_micro_batch_reason``: ALBEF's
    hard-negative ITM draws each sample's negative from the *other* samples of its micro-batch. Fine-tuning tasks
    other than retrieval do not draw negatives, so the check applies to pretraining and retrieval only."""
    minimum = getattr(cfg.model, "min_micro_batch_size", 1)
    task = getattr(getattr(cfg, "finetune", None), "task", "")
    if task not in ("", "retrieval") or cfg.data.micro_batch_size >= minimum:
        return
    family = getattr(cfg.model, "family", "model")
    reason = getattr(cfg.model, "min_micro_batch_reason", "")
    raise ConfigError(f"'data.micro_batch_size' is {cfg.data.micro_batch_size} but {family} needs >= {minimum}"
                      f"{': ' + reason if reason else ''}; raise data.micro_batch_size (train.global_batch_size "
                      f"stays, fewer accumulation steps)")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        if not hasattr(getattr(cfg, section), key):  # a key of another model family
            continue
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"'{dotted}' must be one of {choices}, got {value!r}")
    positive = {"train.max_steps": cfg.train.max_steps, "train.global_batch_size": cfg.train.global_batch_size,
                "data.micro_batch_size": cfg.data.micro_batch_size, "data.image_size": cfg.data.image_size,
                "data.max_text_len": cfg.data.max_text_len, "train.log_every": cfg.train.log_every,
                "train.save_every": cfg.train.save_every, "train.keep_last": cfg.train.keep_last}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {value}")
    if not 0.0 < cfg.epic.mask_ratio <= 1.0:
        raise ConfigError(f"'epic.mask_ratio' must be in (0, 1], got {cfg.epic.mask_ratio}")
    if not 0.0 <= cfg.train.warmup_ratio <= 1.0 or cfg.train.warmup_ratio + (
            cfg.train.hold_ratio if cfg.train.schedule == "tri_stage" else 0.0) > 1.0:
        raise ConfigError("'train.warmup_ratio' (+ 'train.hold_ratio' for tri_stage) must lie in [0, 1]")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"'train.betas' must have two values, got {cfg.train.betas}")
    validate_ranges(cfg)
    validate_micro_batch(cfg)
    for i, src in enumerate(cfg.data.sources):
        if not src.shards:
            raise ConfigError(f"'data.sources[{i}].shards' is empty: give a shard spec like /data/cc3m/{{00000..00331}}.tar")
        if isinstance(src.weight, str) and src.weight != "auto":
            raise ConfigError(f"'data.sources[{i}].weight' must be a number > 0 or 'auto' (its caption count), "
                              f"got {src.weight!r}")
        if not isinstance(src.weight, str) and src.weight <= 0:
            raise ConfigError(f"'data.sources[{i}].weight' must be > 0, got {src.weight}")
    if cfg.epic.enabled and cfg.epic.teacher is None and cfg.epic.masking == "saliency":
        raise ConfigError("EPIC saliency masking needs a teacher: set epic.teacher=<run dir | checkpoint | "
                          "official METER .ckpt>, or epic.masking=uniform")
    if cfg.epic.cmlm_saliency:
        raise ConfigError("'epic.cmlm_saliency' is replaced by data.mlm_masking=saliency (†CMLM, with or without "
                          "EPIC; the teacher is epic.teacher)")
    if cfg.data.whole_word_masking and cfg.data.mlm_masking == "saliency":
        raise ConfigError("data.whole_word_masking and data.mlm_masking=saliency (†CMLM) both choose the MLM "
                          "positions: set one of them")
    if cfg.data.mlm_masking == "saliency":
        if cfg.epic.teacher is None:
            raise ConfigError("data.mlm_masking=saliency (†CMLM) draws the MLM positions from a teacher's saliency: "
                              "set epic.teacher=<run dir | checkpoint | official METER .ckpt>")
        if cfg.epic.enabled and cfg.epic.masking != "saliency":
            raise ConfigError("data.mlm_masking=saliency (†CMLM) inside EPIC reuses its saliency: it needs "
                              "epic.masking=saliency")
    validate_epic(cfg.epic)


def _walk(node, where: str = ""):
    """(dotted key, value) of every leaf of a config section, lists included."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _walk(getattr(node, f.name), f"{where}{f.name}" if not where else f"{where}.{f.name}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{where}[{i}]")
    else:
        yield where, node


def _check_range(key: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        bounds = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise ConfigError(f"'{key}' must be {bounds}, got {value}")


# (low, high, low_open, high_open) per key; sizes and counts elsewhere in validate()
_RANGES = {
    "run.seed": (0, None, False, False), "run.collective_timeout_s": (0, None, True, False),
    "data.eval_batch_size": (1, None, False, False), "data.num_workers": (0, None, False, False),
    "data.streams": (0, None, False, False), "data.mlm_probability": (0, 1, False, False),
    "data.max_text_len": (3, None, False, False),
    "train.stop_at_step": (0, None, False, False), "train.lr": (0, None, False, False),
    "train.lr_mult_fusion": (0, None, False, False), "train.lr_mult_head": (0, None, False, False),
    "train.weight_decay": (0, None, False, False), "train.eps": (0, None, True, False),
    "train.hold_ratio": (0, 1, False, False), "train.final_lr_scale": (0, 1, True, False),
    "train.grad_clip": (0, None, False, False), "train.eval_every": (0, None, False, False),
    "train.peak_tflops": (0, None, False, False), "train.max_nonfinite_steps": (0, None, False, False),
    "eval.k_test": (0, None, False, False), "eval.max_images": (0, None, False, False),
    "eval.batch_size": (1, None, False, False),
    "epic.generator.lr": (0, None, False, False), "epic.generator.weight_decay": (0, None, False, False),
    "model.vocab_size": (0, None, False, False), "model.dropout": (0, 1, False, True),
    "model.text_layer_norm_eps": (0, None, True, False), "model.layer_norm_eps": (0, None, True, False),
    "model.initializer_range": (0, None, True, False),
}
_MODEL_SIZES = ("image_size", "patch_size", "vit_width", "vit_layers", "vit_heads", "text_hidden_size", "text_layers",
                "text_heads", "text_intermediate_size", "text_max_position_embeddings", "text_type_vocab_size",
                "max_text_len", "hidden_size", "num_heads", "num_fusion_layers", "mlp_ratio", "num_token_types")


def validate_ranges(cfg) -> None:
    """Numbers that are finite, sizes > 0, ratios in [0, 1], strings without NUL (a path with one cannot exist)."""
    for key, value in _walk(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"'{key}' must be a finite number, got {value}")
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(f"'{key}' contains a NUL character")
    for key, (low, high, low_open, high_open) in _RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            _check_range(key, node, low, high, low_open, high_open)
    for i, beta in enumerate(cfg.train.betas):
        _check_range(f"train.betas[{i}]", beta, 0, 1, False, True)
    model = getattr(cfg, "model", None)
    if model is not None:
        for name in _MODEL_SIZES:
            if getattr(model, name, 1) < 1:
                raise ConfigError(f"'model.{name}' must be > 0, got {getattr(model, name)}")
        for width, heads in (("vit_width", "vit_heads"), ("text_hidden_size", "text_heads"),
                             ("hidden_size", "num_heads")):  # each family's config has its own subset of these
            if not (hasattr(model, width) and hasattr(model, heads)):
                continue
            if getattr(model, width) % getattr(model, heads):
                raise ConfigError(f"'model.{width}'={getattr(model, width)} is not divisible by "
                                  f"'model.{heads}'={getattr(model, heads)}")
        image_size, patch_size = getattr(model, "image_size", None), getattr(model, "patch_size", None)
        if image_size and patch_size and image_size % patch_size:
            raise ConfigError(f"'model.image_size'={image_size} is not a multiple of "
                              f"'model.patch_size'={patch_size}")
        max_text_len = getattr(model, "max_text_len", None)
        if max_text_len is not None and cfg.data.max_text_len > max_text_len:
            raise ConfigError(f"'data.max_text_len'={cfg.data.max_text_len} exceeds "
                              f"'model.max_text_len'={max_text_len}")


def validate_epic(epic: EpicConfig) -> None:
    """Combinations of the EPIC switches that cannot work."""
    if epic.lambda_itc < 0:
        raise ConfigError(f"'epic.lambda_itc' must be >= 0, got {epic.lambda_itc}")
    if epic.sas_refresh_every < 0:
        raise ConfigError(f"'epic.sas_refresh_every' must be >= 0 (0 = refresh by epochs), got {epic.sas_refresh_every}")
    if epic.sas_refresh_every == 0 and epic.sas_refresh_epochs < 1:
        raise ConfigError(f"'epic.sas_refresh_epochs' must be >= 1 (or set epic.sas_refresh_every=<steps>), got "
                          f"{epic.sas_refresh_epochs}")
    if epic.log_saliency_every < 0:
        raise ConfigError(f"'epic.log_saliency_every' must be >= 0 (0 = no figure), got {epic.log_saliency_every}")
    if epic.saliency_cache is not None and epic.masking != "saliency":
        raise ConfigError("'epic.saliency_cache' holds the teacher's saliency for epic.masking=saliency; with "
                          f"epic.masking={epic.masking} it would be unused: unset it")
    if epic.corruption == "random" and epic.generator_mode != "finetune":
        raise ConfigError(f"'epic.generator_mode={epic.generator_mode}' has no effect with epic.corruption=random "
                          f"(uniform vocabulary tokens, no generator); use epic.corruption=generator")
    if epic.generator_mode == "pretrained_fixed" and not epic.generator.pretrained:
        raise ConfigError("'epic.generator_mode=pretrained_fixed' (\"LM (trained)\": fitted on the captions before, "
                          "then fixed) needs epic.generator.pretrained=<HF folder or EPIC run dir>")
    for name in ("hidden_size", "layers", "heads", "intermediate_size"):
        if getattr(epic.generator, name) < 0:
            raise ConfigError(f"'epic.generator.{name}' must be >= 0 (0 = the VLM's text tower), got "
                              f"{getattr(epic.generator, name)}")
