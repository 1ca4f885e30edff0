#!/usr/bin/env bash
# The converged CIFAR-10 sweep of issue 12, point 7, as one script for a GPU machine (not yet run: no GPU
# has been lent to this project so far, so neither its time nor its accuracies are known).
#
#   DATA=~/data/cifar10 OUT=runs/c10-gpu benchmarks/cifar10_gpu.sh
#   DRY=1 benchmarks/cifar10_gpu.sh     # the same two commands, tiny (digits, 1 epoch), on CPU: checks the plumbing
#
# ResNet-20 at full width (16-32-64), the full 50,000 training images, 40 epochs (cosine, lr 0.2 at batch
# 256), the GPU engine (data and augmentation on the GPU, bf16 autocast, channels_last); first the dense
# network (which must reach 90%), then random, SNIP, SynFlow and GMP at 90/95/98/99%, SP and IP: 32 runs,
# WORKERS of them at once on the one GPU (a ResNet-20 step leaves most of a large GPU idle). The budget is
# under 10 minutes of GPU time; if a first try overruns, lower EPOCHS or raise WORKERS and say so.
set -euo pipefail
OUT=${OUT:-runs/c10-gpu}
WORKERS=${WORKERS:-8}
EPOCHS=${EPOCHS:-40}
SEEDS=${SEEDS:-0}
if [[ "${DRY:-0}" == "1" ]]; then
  DATA_ARGS=(--data digits --device cpu --threads 1) EPOCHS=1 WORKERS=2 OUT=${OUT}-dry
else
  DATA=${DATA:?set DATA to the CIFAR-10 folder (DIR/train/<class>/, DIR/test/<class>/) or torchvision\'s format}
  DATA_ARGS=(--data cifar10 --data-root "$DATA" --device cuda)
fi
COMMON=(--model resnet20 --width 16 "${DATA_ARGS[@]}" --epochs "$EPOCHS" --batch-size 256 --lr 0.2
        --seeds "$SEEDS" --no-progress)
start=$(date +%s)
ipfx compare "${COMMON[@]}" --methods random --sparsities 0 --spaces sp --out "$OUT/dense"
ipfx compare "${COMMON[@]}" --methods random,snip,synflow,gmp --sparsities 0.9,0.95,0.98,0.99 --spaces sp,ip \
    --workers "$WORKERS" --out "$OUT/sweep"
echo "sweep finished in $(( $(date +%s) - start )) s; tables in $OUT/dense/results.md and $OUT/sweep/results.md"
