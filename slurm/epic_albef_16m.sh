#!/bin/bash
# EPIC-ALBEF on 16M images (4M + CC12M), ALBEF's recipe plus EPIC: 1 node x 8 GPUs, 64 per GPU = global batch 512.
#   EPIC_DATA=/data/shards EPIC_RUNS=/scratch/runs EPIC_PRETRAINED=/models EPIC_TEACHER=/models/ALBEF.pth \
#       sbatch slurm/epic_albef_16m.sh [key=value ...]     (from the repository root; see slurm/launch.sh)
# EPIC_TEACHER: an ALBEF checkpoint, ours (a run dir of slurm/albef_4m.sh) or the official ALBEF_4M.pth / ALBEF.pth.
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/epic_albef_16m. 30 epochs of 16M take many
# 48-hour allocations: the job requeues itself at each time limit and resumes at the step it saved.
#SBATCH --job-name=epic_albef_16m
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
L="${EPIC_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
[ -f "$L" ] || { echo "cannot find $L: run sbatch from the repository root or export EPIC_REPO" >&2; exit 1; }
EPIC_RUN_CONFIG=epic_albef_16m exec bash "$L" "$@"
