#!/usr/bin/env bash
# Issue 18 on the GPU machine (one or two GPUs): CUDA tests of the head-map kernel, tuning of
# its launch settings, and the op/module benchmarks with the chosen settings. Each stage
# writes into $OUT; run as `bash scripts/headmap_gpu.sh tests tune bench`.
set -uo pipefail
export PYTHONPATH=src:benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/headmap-gpu}
WORK=/tmp/headmap-work
mkdir -p "$OUT" "$WORK"
LOG=$OUT/all.log
second=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
nvidia-smi -L >>"$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$LOG" 2>&1

for stage in "$@"; do
  echo "== $stage $(date +%T)" >>"$LOG"
  case $stage in
    tests)  # CUDA-only tests, on the second GPU, in the background (waited for by 'tune')
      CUDA_VISIBLE_DEVICES=$second python -m pytest -q -p no:cacheprovider -rs \
        tests/core/test_headmap_attention.py tests/core/test_ops.py \
        tests/benchmarks/test_benchmark_headmap_attention.py >"$OUT/tests.log" 2>&1 &
      tests_pid=$! ;;
    tune)
      shards=$(( $(nproc) > 8 ? $(nproc) - 6 : 2 ))
      for i in $(seq 0 $((shards - 1))); do
        CUDA_VISIBLE_DEVICES=0 python benchmarks/headmap_tune.py --phase compile \
          --shard "$i" --shards "$shards" 2>>"$LOG" &
        pids="${pids:-} $!"
      done
      wait $pids
      echo "compiled $(date +%T)" >>"$LOG"
      [ -n "${tests_pid:-}" ] && { wait "$tests_pid"; echo "tests rc=$?" >>"$LOG"; }
      CUDA_VISIBLE_DEVICES=0 python benchmarks/headmap_tune.py --dims 64 \
        --out "$WORK/tune_64.json" >/dev/null 2>>"$WORK/tune.log" &
      p1=$!
      CUDA_VISIBLE_DEVICES=$second python benchmarks/headmap_tune.py --dims 32 128 \
        --out "$WORK/tune_32_128.json" >/dev/null 2>>"$WORK/tune.log" &
      wait $p1 $!
      python benchmarks/headmap_tune.py --merge "$WORK"/tune_*.json \
        --out "$OUT/headmap_tune_h200.json" >>"$LOG" 2>&1 ;;
    bench)
      tiles=(); [ -f "$OUT/headmap_tune_h200.json" ] && tiles=(--tiles-from "$OUT/headmap_tune_h200.json")
      CUDA_VISIBLE_DEVICES=0 python benchmarks/headmap_attention.py "${tiles[@]}" \
        --out "$OUT/headmap_attention_h200.json" >/dev/null 2>>"$LOG" &
      p1=$!
      CUDA_VISIBLE_DEVICES=$second python benchmarks/attention.py "${tiles[@]}" \
        --schemes gqa mha kdgqa kdgqa-ps dgqa-ema dgqa-diff calibrated \
        --expand-method auto headmap --out "$OUT/attention_headmap_h200.json" \
        >/dev/null 2>>"$LOG" &
      wait $p1 $! ;;
    profile)  # kernel tables: where the module's time goes with each path
      tiles=(); [ -f "$OUT/headmap_tune_h200.json" ] && tiles=(--tiles-from "$OUT/headmap_tune_h200.json")
      for shape in vit_b vit_l; do
        CUDA_VISIBLE_DEVICES=0 python benchmarks/profile_attention.py "${tiles[@]}" \
          --schemes gqa kdgqa --expand-method auto headmap --shape $shape --rows 12 \
          >>"$OUT/profile.txt" 2>>"$LOG"
      done ;;
    model)  # whole ViT-B/16 224 px, batch 256: eager on GPU 0, compiled split over both
      m=(python benchmarks/model.py --models vit_b --batch 256 --baselines timm --modes train,infer)
      ( CUDA_VISIBLE_DEVICES=0 "${m[@]}" --compile off --expand-methods auto,gather \
          --schemes gqa,kdgqa,kdgqa-ps,dgqa-ema,dgqa-diff,calibrated \
          --out "$OUT/model_vit_b_224_headmap_eager_h200.json" >/dev/null 2>>"$LOG"
        CUDA_VISIBLE_DEVICES=0 "${m[@]}" --compile on --expand-methods auto,gather \
          --schemes gqa,kdgqa --out "$OUT/model_vit_b_224_headmap_compiled_h200.json" \
          >/dev/null 2>>"$LOG" ) &
      p1=$!
      CUDA_VISIBLE_DEVICES=$second "${m[@]}" --compile on \
        --schemes kdgqa-ps,dgqa-ema,dgqa-diff,calibrated \
        --out "$OUT/model_vit_b_224_headmap_compiled_b_h200.json" >/dev/null 2>>"$LOG"
      CUDA_VISIBLE_DEVICES=$second python benchmarks/launch_cost.py \
        >"$OUT/launch_cost_h200.json" 2>>"$LOG"
      wait $p1 ;;
    final)  # the eager launch path: tests + op benchmarks on GPU 0, module and model on GPU 1
      ( CUDA_VISIBLE_DEVICES=0 python -m pytest -q -p no:cacheprovider -rs \
          tests/core/test_headmap_attention.py tests/core/test_ops.py tests/core/test_cuda.py \
          tests/conversion/test_cuda_groups.py >"$OUT/tests.log" 2>&1
        echo "tests rc=$?" >>"$LOG"
        CUDA_VISIBLE_DEVICES=0 python benchmarks/launch_cost.py >"$OUT/launch_cost_h200.json" 2>>"$LOG"
        CUDA_VISIBLE_DEVICES=0 python benchmarks/headmap_attention.py \
          --out "$OUT/headmap_attention_h200.json" >/dev/null 2>>"$LOG" ) &
      p1=$!
      CUDA_VISIBLE_DEVICES=$second python benchmarks/attention.py \
        --schemes gqa mha kdgqa kdgqa-ps dgqa-ema dgqa-diff calibrated \
        --expand-method auto gather split --out "$OUT/attention_headmap_h200.json" \
        >/dev/null 2>>"$LOG"
      m=(python benchmarks/model.py --models vit_b --batch 256 --baselines timm --modes train,infer)
      CUDA_VISIBLE_DEVICES=$second "${m[@]}" --compile off \
        --schemes gqa,kdgqa,kdgqa-ps,dgqa-ema,dgqa-diff,calibrated \
        --out "$OUT/model_vit_b_224_headmap_eager_h200.json" >/dev/null 2>>"$LOG"
      CUDA_VISIBLE_DEVICES=$second "${m[@]}" --compile on --schemes calibrated \
        --out "$OUT/model_vit_b_224_headmap_compiled_c_h200.json" >/dev/null 2>>"$LOG"
      wait $p1 ;;
    final1)  # the same on one GPU, in order of need (the op benchmark left out)
      CUDA_VISIBLE_DEVICES=0 python -m pytest -q -p no:cacheprovider -rs -k "cuda or headmap" \
        tests/core/test_headmap_attention.py tests/core/test_ops.py \
        tests/conversion/test_cuda_groups.py >"$OUT/tests.log" 2>&1
      echo "tests rc=$?" >>"$LOG"
      python benchmarks/launch_cost.py >"$OUT/launch_cost_h200.json" 2>>"$LOG"
      python benchmarks/attention.py --schemes gqa mha kdgqa kdgqa-ps dgqa-ema dgqa-diff \
        calibrated --expand-method auto gather split \
        --out "$OUT/attention_headmap_h200.json" >/dev/null 2>>"$LOG"
      python benchmarks/model.py --models vit_b --batch 256 --baselines timm \
        --modes train,infer --compile off \
        --schemes gqa,kdgqa,kdgqa-ps,dgqa-ema,dgqa-diff,calibrated \
        --out "$OUT/model_vit_b_224_headmap_eager_h200.json" >/dev/null 2>>"$LOG" ;;
    *) echo "unknown stage $stage" >>"$LOG"; exit 2 ;;
  esac
done
[ -n "${tests_pid:-}" ] && { wait "$tests_pid"; echo "tests rc=$?" >>"$LOG"; }
echo "== done $(date +%T)" >>"$LOG"
