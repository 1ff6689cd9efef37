#!/bin/bash
# Fine-tune a pretrained (EPIC-)ViLT on VQAv2 (config finetune_vqa_vilt: ViLT's fine-tuning recipe), 1 node x 8 GPUs.
#   EPIC_RUNS=/scratch/runs EPIC_INIT=/scratch/runs/epic_vilt_4m sbatch slurm/finetune_vqa_vilt.sh \
#       finetune.train_json=... finetune.val_json=... finetune.images=...      (from the repository root)
# Resubmitting (or the automatic requeue) resumes from $EPIC_RUNS/finetune_vqa_vilt; EPIC_RUN_NAME names another run.
#SBATCH --job-name=finetune_vqa_vilt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
L="${EPIC_REPO:-$SLURM_SUBMIT_DIR}/slurm/launch.sh"
[ -f "$L" ] || { echo "cannot find $L: run sbatch from the repository root or export EPIC_REPO" >&2; exit 1; }
[ "${EPIC_SMOKE_CPU:-0}" = 1 ] || export EPIC_DS_CONFIG="${EPIC_DS_CONFIG:-ds_configs/vilt_zero2_bf16.json}"
EPIC_RUN_CONFIG=finetune_vqa_vilt EPIC_FINETUNE_TASK=vqa exec bash "$L" "$@"
