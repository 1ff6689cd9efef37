#!/bin/bash
# EPIC-ViLT on 4M images (COCO, VG, SBU, CC3M), paper settings (generator BERT-base, mask ratio 0.35, lambda 8).
# 4 nodes x 8 A100 80G = 32 GPUs, global batch 4096 (accumulation fills it), 100k steps.
#   EPIC_DATA=/data/shards EPIC_RUNS=/scratch/runs EPIC_PRETRAINED=/models EPIC_TEACHER=/scratch/runs/vilt_4m \
#       sbatch slurm/epic_vilt_4m.sh [key=value ...]          (from the repository root; see slurm/launch.sh and docs/cluster.md)
# Precision: bf16 by default (ds_configs/vilt_zero2_bf16.json: fp32's exponent range, so none of the fp16
# overflows that made the EPIC authors' ViLT go NaN, App. F); EPIC_DS_CONFIG=ds_configs/vilt_zero2_fp32.json
# runs their fp32. $EPIC_PRETRAINED holds bert-base-uncased/ (tokenizer, generator) and vit_base_patch32_384.safetensors.
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/epic_vilt_4m.
#SBATCH --job-name=epic_vilt_4m
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
[ "${EPIC_SMOKE_CPU:-0}" = 1 ] || export EPIC_DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/vilt_zero2_bf16.json}"
EPIC_RUN_CONFIG=epic_vilt_4m exec bash "$L" "$@"
