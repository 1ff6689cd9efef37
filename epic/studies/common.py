"""What the studies share: scales, running one variant x seed through the user-facing entry points, collecting
the metrics, writing the table (mean ± std over seeds) and the plots.

A *variant* is a pretraining config of the scale (vanilla or EPIC) plus `key=value` overrides: exactly the command
a user would run. A *unit* is a variant at one seed; its pipeline is

    pretrain   python epic/pretrain.py --config C --ds_config D [scale overrides] [variant overrides] run.dir=...
               (EPIC variants: epic.teacher = the vanilla unit of the same seed)
    nlvr2      python epic/finetune.py --task nlvr2 --init RUN ...            -> NLVR2 dev accuracy
    ret_ft     python epic/finetune.py --task retrieval --init RUN ...        -> TR@1 / IR@1 fine-tuned
    ret_zs     python epic/evaluate.py --task retrieval --ckpt RUN ...        -> TR@1 / IR@1 zero-shot

each stage in its own folder under RUNS/<scale>/<variant slug>-<hash of the command>/seed<S>/, with its result in
a JSON file: a finished stage is never rerun, so studies that share a variant (EPIC at mask ratio 0.35 is in
Tables 4, 5 and 6) share its runs, and an interrupted study continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
DOWNSTREAM = ("nlvr2", "ret_ft", "ret_zs")


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """One row of a table: `kind` picks the scale's vanilla or EPIC config; `overrides` are key=value strings."""

    name: str
    kind: str = "epic"  # vanilla | epic
    overrides: tuple[str, ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return self.kind == "epic" or any(o.startswith("data.mlm_masking=saliency") for o in self.overrides)

    @property
    def needs_fitted_lm(self) -> bool:
        return "epic.generator_mode=pretrained_fixed" in self.overrides


VANILLA = Variant("METER (vanilla)", "vanilla")  # "METER" is the family's label in tables (Scale.label)
# the reference every downstream column needs: the same fine-tuning from the random init (one pretraining step at
# lr 0 writes the init through the same entry points, so every later stage is the pretrained variants')
UNTRAINED = Variant("random init (no pretraining)", "vanilla", ("train.lr=0", "train.max_steps=1",
                                                                 "train.save_every=1"))
FAMILY_LABELS = {"meter": "METER", "vilt": "ViLT", "albef": "ALBEF", "xvlm": "X-VLM"}


def row_label(name: str, scale: "Scale") -> str:
    """A variant's name or a title with the scale's family in place of METER."""
    return name.replace("METER", scale.label)


# ------------------------------------------------------------------------------------------------ scales
@dataclass
class Scale:
    """Configs and lengths of a study scale. tiny/smoke: the shapes world on CPU; ablation: the paper's recipe."""

    name: str
    vanilla_config: str
    epic_config: str
    ds_config: str
    pretrain_steps: int
    nlvr2_steps: int
    retrieval_steps: int
    world: Optional[Path] = None  # the shapes world (tiny, smoke)
    nlvr2_lr: Optional[float] = None  # NLVR2 fine-tuning's base lr (None: the fine-tuning config's)
    modality_steps: int = 1000
    gpus: int = 0  # ablation: ranks per run (deepspeed --num_gpus), 0 = all visible
    family: str = "meter"  # model.family of both configs (epic/models/registry.py)
    # shapes-world retrieval: images scored (x their ~4 captions, every pair through the ITM head) and negatives
    # per caption in fine-tuning; these passes, not pretraining, dominate a tiny unit's cost (see make_scale)
    eval_images: int = 50
    retrieval_negatives: int = 3

    @property
    def label(self) -> str:
        """The family's name as the paper writes it (row labels: "ViLT (vanilla)")."""
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def finetunes(self) -> bool:
        """Whether the family has task models for epic/finetune.py (NLVR2, retrieval); without them a study reports
        zero-shot retrieval only."""
        from epic.models.registry import get_family

        return get_family(self.family).tasks is not None

    def pretrain_overrides(self) -> list[str]:
        if self.world is None:
            return []
        every = max(1, min(50, self.pretrain_steps // 4))
        return [f"data.root={self.world}", f"train.max_steps={self.pretrain_steps}",
                f"train.save_every={self.pretrain_steps}", f"train.log_every={every}", "epic.log_saliency_every=0"]

    def config_of(self, variant: Variant) -> str:
        return self.vanilla_config if variant.kind == "vanilla" else self.epic_config

    def finetune_args(self, task: str) -> list[str]:
        """--config and overrides of a fine-tuning run of `task` (nlvr2 | retrieval)."""
        if self.world is not None:
            steps = self.nlvr2_steps if task == "nlvr2" else self.retrieval_steps
            if task == "retrieval":
                extra = [f"eval.max_images={self.eval_images}", f"finetune.num_negatives={self.retrieval_negatives}"]
            else:
                extra = [] if self.nlvr2_lr is None else [f"train.lr={self.nlvr2_lr}"]
            return ["--config", "finetune_shapes", f"finetune.shapes={self.world / 'tasks'}",
                    f"train.max_steps={steps}", f"train.save_every={steps}", f"train.log_every={max(1, steps // 5)}",
                    *extra]
        return ["--config", "finetune_nlvr2" if task == "nlvr2" else "finetune_retrieval_f30k"]

    def zero_shot_data(self) -> tuple[str, str]:
        """(annotation JSON, images) of the zero-shot retrieval evaluation (the fine-tuned one's val split)."""
        if self.world is not None:
            tasks = self.world / "tasks"
            return str(tasks / "retrieval" / "val.json"), str(tasks / "images")
        from epic.config import read_config_data
        from epic.paths import expand_env

        ft = read_config_data("finetune_retrieval_f30k").get("finetune", {})
        return expand_env(ft["val_json"], "finetune.val_json"), expand_env(ft["images"], "finetune.images")

    def python_launch(self) -> list[str]:
        """How a training script is started locally: one CPU process (tiny) or deepspeed on the GPUs."""
        if self.world is not None:
            return [sys.executable]
        launcher = ["deepspeed"] + (["--num_gpus", str(self.gpus)] if self.gpus else [])
        return launcher


WORLD_SIZES = {"tiny": dict(n_train=4000, n_val=200, tasks_train=2000, tasks_val=400),
               "smoke": dict(n_train=128, n_val=32, tasks_train=32, tasks_val=16)}
# the generators' revision a study world was made with (in its marker: a world from an older revision is made
# again). 2: NLVR2 statements without the language shortcut of "both images have ..." (epic.data.tasks)
WORLD_REVISION = 2


def family_configs(family: str, scale: str) -> tuple[str, str]:
    """(vanilla, EPIC) pretraining configs of `family` at a scale: the registry's tiny shapes-world config and its
    epic_ twin (tiny, smoke); the paper's ablation recipe exists for METER only."""
    from epic.models.registry import get_family

    tiny = get_family(family).tiny_config
    if scale in ("tiny", "smoke"):
        from epic.config import read_config_data

        epic = f"epic_{tiny}"
        read_config_data(epic)  # a clear error when the family has no EPIC twin of its tiny config
        return tiny, epic
    if family != "meter":
        raise ValueError(f"--scale ablation is the paper's METER ablation recipe (meter_4m_ablation / "
                         f"epic_meter_4m_ablation); there is no {family}_4m_ablation config. Use --scale tiny for "
                         f"--family {family}, or add {family}_4m_ablation.yaml and epic_{family}_4m_ablation.yaml")
    return "meter_4m_ablation", "epic_meter_4m_ablation"


def make_scale(name: str, world: Optional[Path] = None, gpus: int = 0, family: str = "meter") -> Scale:
    if name in ("tiny", "smoke", "ablation"):
        vanilla, epic = family_configs(family, name)
    if name == "tiny":
        # Lengths. At 300 pretraining steps image-text matching has not started (train ITM accuracy 0.48-0.51)
        # and no column separates any variant from the random init; at 1500 (the demo's length) retrieval is
        # clearly above chance. NLVR2 fine-tuning: 600 steps at 5e-5 (x5 fusion, x10 head); 200 steps at 2e-4
        # ended every run at loss ln 2 (one class predicted). Chosen once for every variant, on a held-out fifth
        # of the NLVR2 *train* pairs (their images recur in the other four fifths), from the seed-0 vanilla run
        # only: 52.8 (200 at 2e-4) -> 71.5 (600 at 5e-5; 68.0 at 2e-4 without the multipliers); with the same
        # recipe the random init gets 53.0 and the 300-step run 52.0.
        # Cost (2 cores, two units side by side): pretraining ~15 (vanilla) to ~22 (EPIC) core-minutes, NLVR2
        # ~6, retrieval fine-tuning (100 steps, 3 negatives) and both evaluations (50 val images x ~4 captions,
        # every pair through the ITM head) ~3; a step is compute (backward 80%, forward 13%, optimizer 6%,
        # waiting for data <1%).
        return Scale("tiny", vanilla, epic, "ds_configs/cpu_zero2.json", pretrain_steps=1500,
                     nlvr2_steps=600, retrieval_steps=100, world=world, nlvr2_lr=5e-5, modality_steps=1000,
                     family=family)
    if name == "smoke":
        return Scale("smoke", vanilla, epic, "ds_configs/cpu_zero2.json", pretrain_steps=4,
                     nlvr2_steps=2, retrieval_steps=2, world=world, modality_steps=4, family=family)
    if name == "ablation":
        return Scale("ablation", vanilla, epic, "ds_configs/zero2_bf16.json",
                     pretrain_steps=50000, nlvr2_steps=0, retrieval_steps=0, world=None, modality_steps=20000,
                     gpus=gpus, family=family)
    raise ValueError(f"unknown scale {name!r}; choose tiny, ablation (or --smoke)")


def ensure_world(path: Path, scale: str) -> Path:
    """The shapes world (version 2: no text leaks of content words) with its tasks, generated once."""
    from epic.data.synthetic import generate_shapes_world
    from epic.data.tasks import generate_shapes_tasks

    sizes = {**WORLD_SIZES[scale], "revision": WORLD_REVISION}
    marker = path / "study_world.json"
    if marker.is_file() and json.loads(marker.read_text()) == sizes:
        return path
    generate_shapes_world(path, sizes["n_train"], sizes["n_val"], image_size=64, seed=0, version=2)
    generate_shapes_tasks(path, sizes["tasks_train"], sizes["tasks_val"], image_size=64, seed=0, version=2)
    marker.write_text(json.dumps(sizes) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Study:
    """Where a study runs and how: shared by every unit."""

    name: str
    scale: Scale
    out: Path
    runs: Path
    seeds: Sequence[int]
    downstream: bool = True
    jobs: int = 1
    fitted_lm: Optional[str] = None  # "LM (trained)": tools/fit_generator.py output (made once per seed if None)
    log: Callable[[str], None] = print
    collect_only: bool = False  # never run a stage: report the missing ones (after a --slurm job array)
    in_slurm: bool = False  # inside a job-array task: trainers go through slurm/launch.sh (srun, requeue)
    _locks: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def unit_dir(self, variant: Variant, seed: int) -> Path:
        command = json.dumps([self.scale.name, self.scale.config_of(variant), list(variant.overrides),
                              self.scale.pretrain_overrides()], sort_keys=True)
        digest = hashlib.sha1(command.encode()).hexdigest()[:8]
        # named by what it runs, not by its row label: tables that share a variant share its runs
        described = " ".join([variant.kind, *(o.split(".", 1)[-1] for o in variant.overrides)])
        slug = re.sub(r"[^a-z0-9.]+", "-", described.lower()).strip("-")[:60]
        return self.runs / self.scale.name / f"{slug}-{digest}" / f"seed{seed}"

    def lock_for(self, path: Path) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(str(path), threading.Lock())


def run_command(cmd: list[str], log_path: Path, env: Optional[dict] = None, want_json: bool = True) -> str:
    """Run a command (cwd: the repository), its output to `log_path`; stdout's last JSON line is returned."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {}))
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)} (log: {log_path})")
    if not want_json:
        return "{}"
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return line
    raise RuntimeError(f"no JSON result line from {shlex.join(cmd)} (log: {log_path})")


class StageMissing(RuntimeError):
    pass


def _stage(path: Path, run: Callable[[], dict], collect_only: bool = False,
           settings: Optional[Sequence[str]] = None) -> dict:
    """A cached stage: path holds its JSON result once it has finished. With ``settings`` (the stage's own
    arguments, e.g. the fine-tuning overrides), the file records them and a result made with other settings is
    stale: it is computed again (never reused silently), or, when only collecting, reported missing."""
    wanted = None if settings is None else [str(a) for a in settings]
    if path.is_file():
        result = json.loads(path.read_text())
        made_with = result.pop(SETTINGS_KEY, None)
        if wanted is None or made_with == wanted:
            return result
        if collect_only:
            raise StageMissing(f"{path} was made with other settings ({made_with}, now {wanted}); run the study "
                               "again without collecting to recompute it")
    elif collect_only:
        raise StageMissing(f"{path} is missing (the stage did not finish; see the log beside it)")
    result = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result if wanted is None else {**result, SETTINGS_KEY: wanted}, indent=1) + "\n")
    tmp.replace(path)
    return result


SETTINGS_KEY = "_stage_settings"


def masking_overrides(scale: Scale, variant: Variant) -> list[str]:
    """A variant that draws the MLM positions from saliency (†CMLM) replaces the family's own position choice:
    ViLT's config masks whole words (data.whole_word_masking), which would pick the positions twice."""
    if not any(o.startswith("data.mlm_masking=saliency") for o in variant.overrides):
        return []
    from epic.config import load_config

    return ["data.whole_word_masking=false"] if load_config(scale.config_of(variant)).data.whole_word_masking else []


def pretrain_overrides(study: Study, variant: Variant, seed: int, teacher: Optional[Path],
                       fitted_lm: Optional[str]) -> list[str]:
    extra = masking_overrides(study.scale, variant)
    extra += [f"epic.teacher={teacher}"] if teacher is not None else []
    if fitted_lm is not None:
        extra.append(f"epic.generator.pretrained={fitted_lm}")
    return [*study.scale.pretrain_overrides(), *variant.overrides, *extra, f"run.seed={seed}"]


def pretrain_command(study: Study, variant: Variant, seed: int, teacher: Optional[Path],
                     fitted_lm: Optional[str]) -> list[str]:
    scale = study.scale
    return [*scale.python_launch(), "epic/pretrain.py", "--ds_config", scale.ds_config, "--config",
            scale.config_of(variant), *pretrain_overrides(study, variant, seed, teacher, fitted_lm),
            f"run.dir={study.unit_dir(variant, seed)}"]


def finetune_command(study: Study, run_dir: Path, task: str, seed: int) -> list[str]:
    scale = study.scale
    return [*scale.python_launch(), "epic/finetune.py", "--task", task, "--init", str(run_dir), "--ds_config",
            scale.ds_config, *scale.finetune_args(task), f"run.dir={run_dir / ('ft_' + task)}", f"run.seed={seed}"]


def launcher_command(study: Study, config: str, run_dir: Path, overrides: list[str],
                     finetune_task: Optional[str] = None, init: Optional[Path] = None) -> tuple[list[str], dict]:
    """The same run through the shared Slurm launcher (inside a job-array task): slurm/launch.sh puts it in
    $EPIC_RUNS/$EPIC_RUN_NAME = run_dir, runs one srun task per allocated slot, requeues on SIGUSR1. At the shapes
    world scales it uses its CPU smoke mode (EPIC_SMOKE_CPU=1, EPIC_DATA = the world)."""
    env = {"EPIC_RUN_CONFIG": config, "EPIC_RUNS": str(run_dir.parent), "EPIC_RUN_NAME": run_dir.name,
           "EPIC_DS_CONFIG": study.scale.ds_config, "EPIC_REPO": str(REPO), "EPIC_PYTHON": sys.executable}
    if study.scale.world is not None:
        env.update(EPIC_SMOKE_CPU="1", EPIC_DATA=str(study.scale.world))
    if finetune_task is not None:
        env.update(EPIC_FINETUNE_TASK=finetune_task, EPIC_INIT=str(init))
    return ["bash", "slurm/launch.sh", *overrides], env


def zero_shot_settings(study: Study) -> list[str]:
    """What the zero-shot stage evaluates on, besides the checkpoint."""
    data, images = study.scale.zero_shot_data()
    extra = [f"eval.max_images={study.scale.eval_images}"] if study.scale.world is not None else []
    return ["--data", data, "--images", images, "--tb", "none", *extra]


def task_data_fingerprint(scale: Scale, task: str) -> list[str]:
    """The shapes world's task annotations come from code that can change: a downstream stage records a hash of the
    files it trains and scores on, so a result on other data is recomputed, never reused (the ablation scale's
    data are the user's files, named by the configs)."""
    if scale.world is None:
        return []
    folder = scale.world / "tasks" / task
    digest = hashlib.sha1(b"".join((folder / f"{split}.json").read_bytes() for split in ("train", "val")))
    return [f"data:{task}={digest.hexdigest()[:12]}"]


def zero_shot_command(study: Study, run_dir: Path) -> list[str]:
    return [sys.executable, "epic/evaluate.py", "--task", "retrieval", "--ckpt", str(run_dir),
            *zero_shot_settings(study)]


def fit_lm_command(study: Study, seed: int, out: Path, teacher: Path) -> list[str]:
    """"LM (trained)": tools/fit_generator.py on the pretraining captions (text only), half the pretraining steps.
    (The EPIC config it reads is validated whole, so it names the run's teacher too; the fit does not use it.)"""
    scale = study.scale
    steps = max(2, scale.pretrain_steps // 2)
    return [*scale.python_launch(), "tools/fit_generator.py", "--config", scale.epic_config, "--out", str(out),
            "--steps", str(steps), "--ds_config", scale.ds_config, *scale.pretrain_overrides(),
            f"epic.teacher={teacher}", f"run.seed={seed}"]


def _pretrain_stage(study: Study, variant: Variant, seed: int, teacher, fitted) -> dict:
    unit = study.unit_dir(variant, seed)
    if study.in_slurm:
        overrides = pretrain_overrides(study, variant, seed, teacher, fitted)
        cmd, env = launcher_command(study, study.scale.config_of(variant), unit, overrides)
        return json.loads(run_command(cmd, unit / "pretrain.log", env))
    return json.loads(run_command(pretrain_command(study, variant, seed, teacher, fitted), unit / "pretrain.log"))


def _finetune_stage(study: Study, unit: Path, task: str, seed: int) -> dict:
    key = "nlvr2" if task == "nlvr2" else "ret_ft"
    if study.in_slurm:
        args = study.scale.finetune_args(task)
        config, overrides = args[1], [*args[2:], f"run.seed={seed}"]
        cmd, env = launcher_command(study, config, unit / f"ft_{task}", overrides, finetune_task=task, init=unit)
        return json.loads(run_command(cmd, unit / f"{key}.log", env)).get("val", {})
    return json.loads(run_command(finetune_command(study, unit, task, seed), unit / f"{key}.log")).get("val", {})


def run_unit(study: Study, variant: Variant, seed: int) -> dict:
    """Pretrain one variant at one seed, then its downstream stages; every stage cached (see the module doc)."""
    unit = study.unit_dir(variant, seed)
    collect = study.collect_only
    with study.lock_for(unit):
        teacher = None
        if variant.needs_teacher:
            teacher = study.unit_dir(VANILLA, seed)
            with study.lock_for(teacher):  # units of one seed run in parallel (--jobs): the teacher is made once
                if not (teacher / "pretrain.json").is_file():
                    _stage(teacher / "pretrain.json", lambda: _pretrain_stage(study, VANILLA, seed, None, None),
                           collect)
        fitted = None
        if variant.needs_fitted_lm:
            fitted = study.fitted_lm or str(study.runs / study.scale.name / "lm-trained" / f"seed{seed}")
            if study.fitted_lm is None:
                with study.lock_for(Path(fitted)):
                    _stage(Path(fitted + ".json"), lambda: {"out": fitted, **json.loads(run_command(
                        fit_lm_command(study, seed, Path(fitted), teacher), Path(fitted + ".log"),
                        want_json=False))}, collect)
        result = {"variant": variant.name, "seed": seed, "dir": str(unit)}
        if not (unit / "pretrain.json").is_file() and not collect:
            study.log(f"[{study.name}] {variant.name} seed {seed}: pretraining -> {unit}")
        result["pretrain"] = _stage(unit / "pretrain.json",
                                    lambda: _pretrain_stage(study, variant, seed, teacher, fitted), collect)
        if study.downstream:
            for task in (("nlvr2", "retrieval") if study.scale.finetunes else ()):
                key = "nlvr2" if task == "nlvr2" else "ret_ft"
                if not (unit / f"{key}.json").is_file() and not collect:
                    study.log(f"[{study.name}] {variant.name} seed {seed}: fine-tuning {task}")
                result[key] = _stage(unit / f"{key}.json", lambda t=task: _finetune_stage(study, unit, t, seed),
                                     collect, settings=[*study.scale.finetune_args(task), f"run.seed={seed}",
                                                        *task_data_fingerprint(study.scale, task)])
            result["ret_zs"] = _stage(unit / "ret_zs.json", lambda: json.loads(run_command(
                zero_shot_command(study, unit), unit / "ret_zs.log")), collect,
                                      settings=[*zero_shot_settings(study),
                                                *task_data_fingerprint(study.scale, "retrieval")])
        return result


def run_all(study: Study, variants: Sequence[Variant]) -> list[dict]:
    """Every variant x seed (vanilla teachers first); a failed unit is reported, not hidden: its row says so."""
    units = [(v, s) for v in variants for s in study.seeds]
    order = sorted(units, key=lambda u: (not u[0].kind == "vanilla", u[1]))

    def one(unit):
        variant, seed = unit
        try:
            return run_unit(study, variant, seed)
        except Exception as err:  # noqa: BLE001  (the table shows the failure; the log has the details)
            study.log(f"[{study.name}] {variant.name} seed {seed} FAILED: {err}")
            return {"variant": variant.name, "seed": seed, "error": str(err)}

    if study.jobs > 1:
        with ThreadPoolExecutor(study.jobs) as pool:
            return list(pool.map(one, order))
    return [one(u) for u in order]


# ------------------------------------------------------------------------------------------------ collecting
def result_at(result: dict, path: str):
    """What a dotted path into a unit's result holds (e.g. 'nlvr2.by_kind'); None where it is missing."""
    value = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def metric(result: dict, path: str) -> Optional[float]:
    """A number at a dotted path into a unit's result (e.g. 'nlvr2.accuracy', 'ret_zs.tr_r1'); None where it is
    missing or not finite."""
    value = result_at(result, path)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float], int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def format_cell(values: Sequence[Optional[float]], digits: int = 1) -> str:
    """'m ± s' over the seeds that produced a value; '—' when none did."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ------------------------------------------------------------------------------------------------ writing
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, study: str, title: str, table: str, notes: Sequence[str] = (), log=print) -> Path:
    """OUT/STUDY.md: title, the table, notes (settings, seeds, failures); the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\n{table}\n\n" + "".join(f"{n}\n" for n in notes)
    path = out / f"{study}.md"
    path.write_text(text)
    log(text)
    return path


def results_by_variant(results: Sequence[dict], variants: Sequence[Variant]) -> dict[str, list[dict]]:
    grouped = {v.name: [] for v in variants}
    for r in results:
        grouped.setdefault(r["variant"], []).append(r)
    return grouped


DOWNSTREAM_COLUMNS = (("NLVR2 dev", "nlvr2.accuracy"), ("ft TR@1", "ret_ft.tr_r1"), ("ft IR@1", "ret_ft.ir_r1"),
                      ("zs TR@1", "ret_zs.tr_r1"), ("zs IR@1", "ret_zs.ir_r1"))


def downstream_table(results: Sequence[dict], variants: Sequence[Variant], first_column: str,
                     scale: Scale) -> tuple[str, list]:
    """The paper's ablation layout: one row per variant, NLVR2 dev, retrieval fine-tuned / zero-shot R@1."""
    grouped = results_by_variant(results, variants)
    failures = [f"- {v.name} seed {r['seed']}: {r['error']}" for v in variants for r in grouped[v.name] if "error" in r]
    return variant_table(results, variants, first_column, DOWNSTREAM_COLUMNS, scale), failures


def variant_table(results: Sequence[dict], variants: Sequence[Variant], first_column: str,
                  columns: Sequence[tuple[str, str]], scale: Scale) -> str:
    """One row per variant: each (header, dotted result path) column as mean ± std over its finished seeds."""
    grouped = results_by_variant(results, variants)
    rows = []
    for variant in variants:
        ok = [r for r in grouped[variant.name] if "error" not in r]
        rows.append([row_label(variant.name, scale), *[format_cell([metric(r, path) for r in ok])
                                                        for _, path in columns], str(len(ok))])
    return markdown_table([first_column, *[c for c, _ in columns], "seeds"], rows)


def nlvr2_kind_table(results: Sequence[dict], variants: Sequence[Variant], scale: Scale) -> list[str]:
    """Report lines: NLVR2 dev accuracy per statement kind (epic.data.tasks.NLVR2_KINDS), one row per variant;
    none where no run recorded the breakdown (results of an earlier version, or data of no shapes world)."""
    from epic.data.tasks import NLVR2_KINDS

    if not any(isinstance(result_at(r, "nlvr2.by_kind"), dict) for r in results):
        return []
    columns = [(kind, f"nlvr2.by_kind.{kind}") for kind in NLVR2_KINDS]
    return ["", "NLVR2 dev accuracy (%) per statement kind (chance 50; the fine-grained kinds have few dev pairs):",
            "", variant_table(results, variants, "", columns, scale)]


def bar_plot(path: Path, results: Sequence[dict], variants: Sequence[Variant], title: str, scale: Scale) -> Path:
    """One panel per downstream column: mean over seeds with a ±std error bar, every seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = results_by_variant(results, variants)
    fig, axes = plt.subplots(1, len(DOWNSTREAM_COLUMNS), figsize=(3.2 * len(DOWNSTREAM_COLUMNS), 3.6))
    names = [v.name for v in variants]
    for ax, (column, key) in zip(axes, DOWNSTREAM_COLUMNS):
        for i, name in enumerate(names):
            values = [metric(r, key) for r in grouped[name] if "error" not in r]
            values = [v for v in values if v is not None]
            mean, std, n = mean_std(values)
            if n:
                ax.bar(i, mean, yerr=std, capsize=3, color=f"C{i}", alpha=0.7)
                ax.scatter([i] * n, values, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([row_label(n, scale) for n in names], rotation=45, ha="right", fontsize=7)
        ax.set_title(column, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_plot(path: Path, curves: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               title: str, bands: Optional[dict[str, list[tuple[float, float, float]]]] = None,
               hline: Optional[tuple[float, str]] = None) -> Path:
    """Lines (x, y) per label; `bands` adds a mean ± std band per label: (x, mean, std); `hline` a dashed
    reference line (y, label), e.g. chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, (label, points) in enumerate(curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, color=f"C{i}", marker="o", markersize=3)
        if bands and bands.get(label):
            xs, means, stds = zip(*bands[label])
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=f"C{i}", alpha=0.2)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle="--", linewidth=1, label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_bands(per_seed: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean, std) at the x values every seed has."""
    common = set.intersection(*[{x for x, _ in s} for s in per_seed]) if per_seed else set()
    out = []
    for x in sorted(common):
        values = [y for s in per_seed for xx, y in s if xx == x and y is not None]
        mean, std, _ = mean_std(values)
        if mean is not None:
            out.append((x, mean, std))
    return out


def analysis_dir(study: Study, name: str) -> Path:
    """RUNS/<scale>/<name> of an analysis (modality-bias, unmasked-use, gradcam); <name>-<family> for another
    family than METER (whose folders keep their plain names)."""
    folder = name if study.scale.family == "meter" else f"{name}-{study.scale.family}"
    return study.runs / study.scale.name / folder


def elapsed(start: float) -> str:
    return f"{time.time() - start:.0f} s"


# ------------------------------------------------------------------------------------------------ units
@dataclass
class Unit:
    """One job of a study (a variant at a seed, or a seed of an analysis): phase 1 units need the phase 0 ones
    (EPIC's teacher is the vanilla run of its seed)."""

    label: str
    phase: int
    run: Callable[[], dict]
    key: str = ""  # what the unit makes (its run folder): studies run together run a shared unit once
    seed: int = 0


def pretraining_units(study: Study, variants: Sequence[Variant]) -> list[Unit]:
    return [Unit(f"{v.name} seed {s}", 0 if v.kind == "vanilla" and not v.needs_teacher else 1,
                 lambda v=v, s=s: run_unit(study, v, s), key=str(study.unit_dir(v, s)), seed=s)
            for s in study.seeds for v in variants]  # seed-major


def run_units(study: Study, units: Sequence[Unit]) -> None:
    """Run every unit, phase by phase (in parallel with study.jobs > 1); failures are logged and kept going."""
    for phase in (0, 1):
        todo = [u for u in units if u.phase == phase]

        def one(unit: Unit):
            try:
                unit.run()
            except Exception as err:  # noqa: BLE001  (the report shows the failure; the log has the details)
                study.log(f"[{study.name}] {unit.label} FAILED: {err}")

        if study.jobs > 1 and len(todo) > 1:
            with ThreadPoolExecutor(study.jobs) as pool:
                list(pool.map(one, todo))
        else:
            for unit in todo:
                one(unit)


def collect(study: Study, variants: Sequence[Variant]) -> list[dict]:
    """Every variant x seed's cached results (nothing is run); a missing or failed stage becomes an error row."""
    study.collect_only = True
    results = []
    for v in variants:
        for s in study.seeds:
            try:
                results.append(run_unit(study, v, s))
            except Exception as err:  # noqa: BLE001
                results.append({"variant": v.name, "seed": s, "error": str(err)})
    return results


def settings_note(study: Study) -> str:
    scale = study.scale
    return (f"Scale `{scale.name}`: pretraining `{scale.vanilla_config}` / `{scale.epic_config}` "
            f"({scale.pretrain_steps} steps), seeds {list(study.seeds)}; cells are mean ± std over the seeds that "
            f"finished (column `seeds`).")


def finetune_note(scale: Scale) -> str:
    """' (N steps at lr X)' of the shapes-world NLVR2 fine-tuning; '' where the configs' own recipes run."""
    if scale.world is None:
        return ""
    lr = "the config's lr" if scale.nlvr2_lr is None else f"lr {scale.nlvr2_lr:g}"
    return f" ({scale.nlvr2_steps} steps at {lr}, finetune_shapes)"


def text_prior_note(study: Study) -> list[str]:
    """The NLVR2 column's floor on the shapes world: what the statements' words alone predict."""
    if study.scale.world is None or not study.scale.finetunes:
        return []
    from .text_prior import nlvr2_text_prior

    return [f"NLVR2 text-only prior: {nlvr2_text_prior(study.scale.world / 'tasks'):.1f}% on dev (a logistic "
            "regression on the statements' words and word pairs, no image; chance 50): the floor of that column."]


def downstream_report(study: Study, variants: Sequence[Variant], title: str, first_column: str,
                      notes: Sequence[str] = ()) -> str:
    """Collect, write OUT/STUDY.md (the paper's ablation layout) and OUT/STUDY.png; returns the table."""
    results = collect(study, variants)
    title = row_label(title, study.scale)
    table, failures = downstream_table(results, variants, first_column, study.scale)
    bar_plot(study.out / f"{study.name}.png", results, variants, title, study.scale)
    (study.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    no_tasks = [] if study.scale.finetunes else [
        f"{study.scale.label} has no task models for epic/finetune.py yet (epic/models/registry.py: tasks), so "
        f"the fine-tuned columns are empty (—); zero-shot retrieval scores the pretraining runs."]
    write_report(study.out, study.name, title, table,
                 [settings_note(study), f"NLVR2: accuracy on the shapes-world NLVR2 dev split after fine-tuning"
                  f"{finetune_note(study.scale)}; ft / zs: retrieval R@1 (text / image retrieval) fine-tuned / "
                  "zero-shot (ITM score), %.",
                  *text_prior_note(study), *no_tasks, *notes, *nlvr2_kind_table(results, variants, study.scale),
                  *(["", "Missing or failed runs:", *failures] if failures else [])], study.log)
    return table
