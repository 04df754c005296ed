#!/usr/bin/env bash
# Every GPU check of the speed targets, in one run of a few minutes (issue 18):
# cuDNN attention against ours, then the train step of the 1B dense and the
# 1B-active MoE configs at 8 x 4096 in bfloat16 (MFU against the vendor peak).
# Needs no TensorFlow (synthetic batches). Usage, from the repository root:
#     bash benchmarks/gpu_checks.sh [python]
set -euo pipefail
PYTHON="${1:-python}"
"$PYTHON" benchmarks/attention_check.py
"$PYTHON" benchmarks/train_step.py --config=configs/bench_1b.py:gpu --steps=5 --warmup=2
"$PYTHON" benchmarks/train_step.py --config=configs/bench_1b.py:gpu,moe --steps=5 --warmup=2
