#!/usr/bin/env python
"""Reproduce one of the paper's analyses or ablations: train the variants over seeds, evaluate, write the table.

    python tools/study.py STUDY [--family meter] [--seeds 3] [--scale tiny|ablation] [--slurm] [--smoke]
                                [--out DIR] [--runs DIR] [--jobs N] [--world DIR]

Studies: modality-bias (Sec. 3, Fig. 2a), unmasked-use (Fig. 2b), table4, table5, table6, table8, fig6 (App. H),
gradcam (Fig. 5); ablations runs tables 4, 5, 6, 8 and fig6 together (each shared run once, seed by seed; the
reports in OUT/table4, ...). Each writes OUT/STUDY.md (a table in the paper's layout, mean ± std over the seeds and
their number), PNG plots and results.json into OUT (default studies_out/STUDY; studies_out/STUDY_FAMILY for another
--family than meter), and prints the table.

  --family F        meter (default), vilt, albef, xvlm: the family's tiny shapes-world configs (FAMILY_shapes_tiny
                    and epic_FAMILY_shapes_tiny; X-VLM's include its region data, data.regions). Every study takes
                    every family; one without task models in the registry reports zero-shot retrieval only

  --scale tiny      the shapes world (version 2, generated once under --world) on CPU, minutes per variant
  --scale ablation  the paper's ablation recipe: meter_4m_ablation / epic_meter_4m_ablation (CLIP-B/32, 224 px,
                    50k steps on 4M), NLVR2 and Flickr30K fine-tuning configs; data and weights from EPIC_DATA /
                    EPIC_PRETRAINED as for every real run; deepspeed on the local GPUs, or --slurm
  --smoke           a few steps, one seed, a small world: the same files in a minute or two
  --slurm           the runs as Slurm job arrays through slurm/launch.sh (--sbatch-arg adds header options),
                    then the report once they are done
  --runs DIR        where the runs live (default studies_out/runs): finished stages are reused, so studies that
                    share a variant share its runs and a stopped study continues

Every variant is a pretraining config plus key=value overrides, run with the user-facing entry points
(epic/pretrain.py, epic/finetune.py, epic/evaluate.py); see epic/studies/.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUDIES = {"modality-bias": "modality_bias_study", "unmasked-use": "unmasked_use", "table4": "table4",
           "table5": "table5", "table6": "table6", "table8": "table8", "fig6": "fig6", "gradcam": "gradcam",
           "ablations": "ablations"}

def families() -> tuple[str, ...]:
    from epic.models.registry import FAMILIES

    return tuple(FAMILIES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--family", default="meter",
                        help="model family of epic/models/registry.py (meter, vilt, albef, xvlm): its tiny "
                             "shapes-world configs FAMILY_shapes_tiny / epic_FAMILY_shapes_tiny")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ... N-1)")
    parser.add_argument("--scale", default="tiny", choices=("tiny", "ablation"))
    parser.add_argument("--smoke", action="store_true", help="a few steps and one seed (CI)")
    parser.add_argument("--slurm", action="store_true", help="submit the runs as Slurm job arrays, then collect")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH option (repeatable)")
    parser.add_argument("--out", default=None, help="output folder [studies_out/STUDY, studies_out/STUDY_FAMILY]")
    parser.add_argument("--runs", default=None, help="runs folder, shared between studies [studies_out/runs]")
    parser.add_argument("--world", default=None, help="shapes world folder [studies_out/world_SCALE]")
    parser.add_argument("--jobs", type=int, default=1, help="units run in parallel (local runs)")
    parser.add_argument("--gpus", type=int, default=0, help="ablation scale: GPUs per run (0 = all visible)")
    parser.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the scale's default)")
    parser.add_argument("--ft-steps", type=int, default=0,
                        help="fine-tuning steps of NLVR2 and retrieval (0: the scale's defaults)")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs only")
    parser.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # PHASE:INDEX, a Slurm array task
    return parser.parse_args(argv)


def build_study(args):
    from epic.studies.common import Study, ensure_world, make_scale

    if args.family not in families():
        raise SystemExit(f"error: --family {args.family} is not a registered family; families: "
                         f"{', '.join(families())} (epic/models/registry.py)")
    scale_name = "smoke" if args.smoke else args.scale
    root = Path("studies_out")
    world = None
    if scale_name in ("tiny", "smoke"):
        world = Path(args.world or root / f"world_{scale_name}").resolve()
    try:
        scale = make_scale(scale_name, world, args.gpus, args.family)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    if world is not None:
        ensure_world(world, scale_name)  # the world carries X-VLM's region data (every object a region) too
    if args.steps:
        scale.pretrain_steps = scale.modality_steps = args.steps
    if args.ft_steps:
        scale.nlvr2_steps = scale.retrieval_steps = args.ft_steps
    seeds = range(1 if args.smoke else args.seeds)
    default_out = root / (args.study if args.family == "meter" else f"{args.study}_{args.family}")
    out = Path(args.out or default_out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs or root / "runs").resolve()
    return Study(args.study, scale, out, runs, seeds, jobs=args.jobs, in_slurm=args.unit is not None)


def without_options(argv, flags, valued) -> list[str]:
    """argv without the `flags` and the `valued` options (`--opt V` and `--opt=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags or any(arg.startswith(f"{v}=") for v in valued):
            continue
        elif arg in valued:
            skip = True
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    module = importlib.import_module(f"epic.studies.{STUDIES[args.study]}")
    study = build_study(args)
    units = module.units(study)
    if args.unit is not None:  # one array task of --slurm
        phase, index = (int(x) for x in args.unit.split(":"))
        mine = [u for u in units if u.phase == phase]
        study.log(f"[{study.name}] array task {args.unit}: {mine[index].label}")
        mine[index].run()
        return 0
    if args.slurm and not args.report_only:
        from epic.studies.slurm import submit_arrays, wait_for

        forwarded = without_options(argv if argv is not None else sys.argv[1:], ("--slurm",),
                                    ("--out", "--runs", "--world"))
        forwarded += ["--out", str(study.out), "--runs", str(study.runs)]  # absolute: array tasks run in the repo
        if study.scale.world is not None:
            forwarded += ["--world", str(study.scale.world)]
        phases = {p: sum(u.phase == p for u in units) for p in (0, 1)}
        jobs = submit_arrays(study.name, phases, forwarded, study.out, study.scale.name, args.sbatch_arg)
        study.log(f"[{study.name}] submitted job arrays {jobs} (scripts in {study.out / 'slurm'})")
        wait_for(jobs, log=study.log)
    elif not args.report_only:
        from epic.studies.common import run_units

        run_units(study, units)
    module.report(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
