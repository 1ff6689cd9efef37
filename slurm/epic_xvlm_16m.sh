#!/bin/bash
# EPIC-X-VLM on 16M images (xvlm_16m + EPIC; generator bert-base-uncased), X-VLM's settings:
# 3 nodes x 8 GPUs = 24, batch 128 x 24 = 3072, 200k steps (configs/Pretrain_XVLM_base_16m.yaml).
#   EPIC_DATA=/data/shards EPIC_RUNS=/scratch/runs EPIC_PRETRAINED=/models EPIC_TEACHER=/scratch/runs/xvlm_4m \
#       sbatch slurm/epic_xvlm_16m.sh [key=value ...]          (from the repository root; see slurm/launch.sh and docs/cluster.md)
# EPIC_PRETRAINED holds bert-base-uncased/ and swin_base_patch4_window7_224_22k.pth; EPIC_DATA the caption shards
# (coco vg sbu cc3m cc12m coco_val) and the region shards (coco_objs vg_objs vg_regions, tools/make_shards.py --regions).
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/epic_xvlm_16m. Resize on the command line, e.g.
# sbatch --nodes=2 slurm/epic_xvlm_16m.sh for a new run (the global batch stays 3072: accumulation absorbs it; a checkpoint
# resumes only at the world size that wrote it).
#SBATCH --job-name=epic_xvlm_16m
#SBATCH --nodes=3
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
EPIC_RUN_CONFIG=epic_xvlm_16m exec bash "$L" "$@"
