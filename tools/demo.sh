#!/usr/bin/env bash
# The README's demo: on the embedded shapes world (generated here, nothing downloaded), with small models, on CPU
# when there is no GPU:
#   1. generate the shapes world (images of coloured shapes + captions + an offline tokenizer) and inspect it;
#   2. pretrain a vanilla METER (ITM + MLM) with 2 ranks under DeepSpeed ZeRO-2  -> the teacher;
#   3. pretrain EPIC-METER from that teacher (saliency masking, co-trained generator, ITC);
#   4. retrieval on val for the untrained model, METER and EPIC-METER, and the EPIC measurements, as one table.
# Environment: DEMO_OUT (default demo_out/), DEMO_STEPS (vanilla steps), DEMO_EPIC_STEPS, DEMO_RANKS (default 2),
#   DEMO_FAMILY (meter | vilt: ViLT -> EPIC-ViLT with vilt_shapes_tiny / epic_vilt_shapes_tiny | albef: ALBEF ->
#   EPIC-ALBEF with albef_shapes_tiny / epic_albef_shapes_tiny; default meter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
OUT="${DEMO_OUT:-$ROOT/demo_out}"
STEPS="${DEMO_STEPS:-1500}"
EPIC_STEPS="${DEMO_EPIC_STEPS:-1500}"
RANKS="${DEMO_RANKS:-2}"
DATA="$OUT/shapes"
FAMILY="${DEMO_FAMILY:-meter}"
case "$FAMILY" in
  meter) VANILLA_CONFIG=shapes_tiny; EPIC_CONFIG=epic_shapes_tiny; NAME=METER
         VANILLA_RUN="$OUT/runs/meter"; EPIC_RUN="$OUT/runs/epic" ;;
  vilt) VANILLA_CONFIG=vilt_shapes_tiny; EPIC_CONFIG=epic_vilt_shapes_tiny; NAME=ViLT
        VANILLA_RUN="$OUT/runs/vilt"; EPIC_RUN="$OUT/runs/epic_vilt" ;;
  albef) VANILLA_CONFIG=albef_shapes_tiny; EPIC_CONFIG=epic_albef_shapes_tiny; NAME=ALBEF
         VANILLA_RUN="$OUT/runs/albef"; EPIC_RUN="$OUT/runs/epic_albef" ;;
  *) echo "DEMO_FAMILY=$FAMILY: use meter, vilt or albef" >&2; exit 2 ;;
esac
if [ -n "$(command -v nvidia-smi)" ] && nvidia-smi -L >/dev/null 2>&1; then
  DS_CONFIG=ds_configs/zero2_bf16.json; LAUNCH=(deepspeed --num_gpus 1)
else
  DS_CONFIG=ds_configs/cpu_zero2.json; LAUNCH=(deepspeed --num_gpus "$RANKS")
fi
T0=$(date +%s)

echo "== 1/4 shapes world -> $DATA"
if [ ! -f "$DATA/manifest.json" ]; then
  python tools/make_synthetic_shards.py --out "$DATA" --train 4000 --val 100 --seed 0
fi
python tools/inspect_data.py --shards "$DATA/train/*.tar" --tokenizer "$DATA/tokenizer" --image-size 64 \
  --batch-size 16 --num-batches 2

echo "== 2/4 vanilla $NAME (the teacher): $STEPS steps, ${LAUNCH[*]}, $DS_CONFIG"
"${LAUNCH[@]}" epic/pretrain.py --ds_config "$DS_CONFIG" --config "$VANILLA_CONFIG" \
  data.root="$DATA" run.dir="$VANILLA_RUN" train.max_steps="$STEPS" train.save_every="$STEPS"

echo "== 3/4 EPIC-$NAME from that teacher: $EPIC_STEPS steps"
"${LAUNCH[@]}" epic/pretrain.py --ds_config "$DS_CONFIG" --config "$EPIC_CONFIG" \
  data.root="$DATA" run.dir="$EPIC_RUN" epic.teacher="$VANILLA_RUN" \
  train.max_steps="$EPIC_STEPS" train.save_every="$EPIC_STEPS"

echo "== 4/4 retrieval on val + EPIC measurements"
python tools/demo_report.py --data "$DATA" --vanilla "$VANILLA_RUN" --epic "$EPIC_RUN"
echo "demo finished in $(( $(date +%s) - T0 )) s"
