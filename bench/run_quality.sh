#!/usr/bin/env bash
# The SST-2 quality table of bench/RESULTS_QUALITY.md: all-MiniLM-L6-v2, dense full finetune vs FineGates
# vs PEFT LoRA r=8, the same step budget and batch, trained on the 60,614 sentences of GLUE SST-2's
# training set and evaluated on its 872 validation sentences: SST2_DIR names a folder holding them as
# train.tsv and test.tsv (sentence<TAB>label, with a header row).
# Outputs (metrics.json, logs) under bench/out/quality/. Usage: bench/run_quality.sh [STEPS]
# (the runs are independent: they can also be started one by one, as for the recorded table)
set -euo pipefail
STEPS=${1:-500}
DATA=${SST2_DIR:?set SST2_DIR to a folder with SST-2 train.tsv (training set) and test.tsv (validation set)}
OUT=$(dirname "$0")/out/quality
COMMON=(--task sst2 --train-file "$DATA/train.tsv" --validation-file "$DATA/test.tsv"
        --max-steps "$STEPS" --batch-size 16 --max-length 64 --seed 42 --overwrite
        --lr-scheduler constant --warmup-steps 0 --pooling cls --sparsity-ramp linear)  # the settings of that table
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
finegates finetune "${COMMON[@]}" --method dense --learning-rate 1e-4 --output-dir "$OUT/dense"
finegates finetune "${COMMON[@]}" --method lora --lora-rank 8 --head-lr 2e-3 --output-dir "$OUT/lora"
# FineGates with the then defaults of `finegates finetune` (LoRA r=8, alpha 8, inside the gates, target sparsity 0.22, ...);
# bench/quality_table.py is the successor (the current defaults, several seeds)
finegates finetune "${COMMON[@]}" --method finegates --lora-alpha 8 --output-dir "$OUT/finegates"
