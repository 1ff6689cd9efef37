#!/bin/bash
# Vanilla METER on 4M images: the EPIC teacher and the baseline. 4 nodes x 8 A100 80G, global batch 4096, 100k steps.
#   EPIC_DATA=/data/shards EPIC_RUNS=/scratch/runs EPIC_PRETRAINED=/models \
#       sbatch slurm/meter_vanilla_4m.sh [key=value ...]          (from the repository root; see slurm/launch.sh and docs/cluster.md)
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/meter_4m. Resize on the command line, e.g.
# sbatch --nodes=2 slurm/meter_vanilla_4m.sh for a new run (the global batch stays 4096: accumulation absorbs it; a checkpoint
# resumes only at the world size that wrote it).
#SBATCH --job-name=meter_4m
#SBATCH --nodes=4
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
EPIC_RUN_CONFIG=meter_4m exec bash "$L" "$@"
