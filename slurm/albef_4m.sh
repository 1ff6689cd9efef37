#!/bin/bash
# ALBEF on 4M images (COCO, VG, SBU, CC3M), ALBEF's recipe: 1 node x 8 GPUs, 64 per GPU = global batch 512, 30 epochs.
#   EPIC_DATA=/data/shards EPIC_RUNS=/scratch/runs EPIC_PRETRAINED=/models sbatch slurm/albef_4m.sh [key=value ...]
# (from the repository root; EPIC_PRETRAINED holds deit_base_patch16_224-b5f2ef4d.pth and bert-base-uncased/; see
# slurm/launch.sh and docs/cluster.md). Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/albef_4m,
# momentum encoders and feature queues included. On 16 GPUs: sbatch --nodes=2 slurm/albef_4m.sh
# data.micro_batch_size=32 (the global batch stays 512; hard negatives are then drawn from 32 per GPU, not 64).
#SBATCH --job-name=albef_4m
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
EPIC_RUN_CONFIG=albef_4m exec bash "$L" "$@"
