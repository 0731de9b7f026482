#!/usr/bin/env bash
# The GPU study (issue 6/7) in stages, as run on the H200 machine (PYTHONPATH=src, data archives
# from ../shared/data copied into .data/). Each stage fits one 10-minute device call; what a
# stage produces is packed under $OUT (at most 8 files come back per call).
#
#   bash scripts/gpu_study.sh pretrain     # MHA ViT-S/4 on Tiny ImageNet 32 -> bf16 shards in $OUT/model
#   bash scripts/gpu_study.sh tune         # uptraining LR sweep for mha + gqa on CIFAR-10's val split
#   bash scripts/gpu_study.sh grid 6 0 1 2 # shards 0-2 of 6 of the study grid, concurrently
#   bash scripts/gpu_study.sh control      # G = 1 (MQA) control, 3 seeds
#   bash scripts/gpu_study.sh bench        # whole-model benchmark rows still missing
# then, anywhere: kdgqa report runs/study/uptrain/shard*/ runs/study/mqa -o results/study
#
# Environment: MODEL (pretrained checkpoint dir; default: the pretrain stage's output or
# .data/study-model), TIME_LIMIT (seconds per process, default 560; rerun to resume),
# UPTRAIN_SET (one extra --set for the uptraining recipe, e.g. "uptrain.lr=3e-4").
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/out}
mkdir -p "$OUT"
stage=${1:?stage: pretrain, tune, grid or control}
UPTRAIN_CONFIG=${UPTRAIN_CONFIG:-configs/study/uptrain-cifar10.yaml}

unpack() {
  for name in "$@"; do
    [ -d ".data/$name" ] || tar xf ".data/$name"*.tar.xz -C .data
  done
}

gpus() { (nvidia-smi -L 2>/dev/null || true) | wc -l; }

model_dir() {
  if [ -n "${MODEL:-}" ]; then echo "$MODEL"
  elif [ -f runs/study/pretrain/pretrain/model/kdgqa_config.json ]; then
    echo runs/study/pretrain/pretrain/model
  else echo .data/study-model; fi
}

# Shards I of N of the study grid, concurrently, spread over the GPUs; resumable (a shard killed
# by the time limit continues from its checkpoint when started again).
grid_shards() {  # grid_shards N I...
  local total=$1; shift
  local n_gpu; n_gpu=$(gpus); [ "$n_gpu" -ge 1 ] || n_gpu=1
  local k=0 i
  mkdir -p runs/study/uptrain
  for i in "$@"; do
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=$((k % n_gpu)) timeout "${TIME_LIMIT:-560}" python -m kdgqa.cli \
      experiment "$UPTRAIN_CONFIG" --no-progress --resume \
      --shard "$i/$total" -o "runs/study/uptrain/shard$i" --set "model.pretrained=$(model_dir)" \
      ${UPTRAIN_SET:+--set $UPTRAIN_SET} > "runs/study/uptrain/shard$i.log" 2>&1 &
    k=$((k + 1))
  done
  wait || true
}

case "$stage" in
  pretrain)
    unpack tiny-imagenet-32 cifar10
    n_gpu=$(gpus)
    launcher=(python)
    [ "$n_gpu" -gt 1 ] && launcher=(torchrun --nproc_per_node "$n_gpu")
    timeout "${PRETRAIN_TIMEOUT:-560}" "${launcher[@]}" -m kdgqa.cli experiment \
      configs/study/pretrain-vit-s4-tin32.yaml --pretrain-only --no-progress \
      ${RESUME:+--resume} 2>&1 | tee "$OUT/pretrain.log" || true
    if [ -f runs/study/pretrain/pretrain/model/kdgqa_config.json ]; then
      python scripts/shrink_checkpoint.py runs/study/pretrain/pretrain/model "$OUT/model" \
        --dtype bfloat16 --max-shard 15MiB
    else
      echo "pretraining did not finish: run this stage again with RESUME=1 while the machine is warm"
    fi
    tar czf "$OUT/pretrain-files.tgz" runs/study/pretrain/*.json* runs/study/pretrain/config.yaml
    ;;
  tune)
    unpack cifar10
    mkdir -p runs/study/tune
    for lr in ${TUNE_LRS:-1e-4 3e-4 1e-3}; do
      for epochs in ${TUNE_EPOCHS:-10}; do
        python -m kdgqa.cli experiment "$UPTRAIN_CONFIG" --no-progress \
          -o "runs/study/tune/lr$lr-e$epochs" --set "model.pretrained=$(model_dir)" \
          --set "uptrain.lr=$lr" --set "uptrain.epochs=$epochs" --set "grid.schemes=[gqa]" \
          --set "grid.kv_heads=[2]" --set "grid.seeds=[0]" \
          > "runs/study/tune/lr$lr-e$epochs.log" 2>&1 &
      done
    done
    wait || true
    for d in runs/study/tune/*/; do
      echo "== $d"; python - "$d" <<'PY'
import json, sys
for line in open(sys.argv[1] + "results.jsonl"):
    r = json.loads(line)
    print(f"{r['run_id']:14s} best val {100 * r['best_val_acc']:.2f}  test {100 * r['test_acc']:.2f}"
          f"  {r['train_img_per_s']:.0f} img/s  {r['train_seconds']:.0f} s")
PY
    done | tee "$OUT/tune.txt"
    tar czf "$OUT/tune-files.tgz" runs/study/tune
    ;;
  grid)  # grid N I... : run shards I of N (e.g. "grid 6 0 1 2", then "grid 6 3 4 5")
    unpack cifar10
    shift
    total=${1:?number of shards}; shift
    grid_shards "$total" "${@:?shard indices}"
    tail -n 2 runs/study/uptrain/shard*.log
    tar czf "$OUT/grid-files.tgz" runs/study/uptrain/*.log runs/study/uptrain/shard*/*.jsonl \
      runs/study/uptrain/shard*/meta.json || true
    ;;
  control)  # G = 1 (MQA): every allocation is the same there
    unpack cifar10
    timeout "${TIME_LIMIT:-560}" python -m kdgqa.cli experiment \
      "$UPTRAIN_CONFIG" --no-progress --resume -o runs/study/mqa \
      --set "model.pretrained=$(model_dir)" --set "grid.schemes=[mqa]" --set "grid.kv_heads=[1]" \
      --set grid.include_mha=false ${UPTRAIN_SET:+--set $UPTRAIN_SET} 2>&1 | tail -n 3
    tar czf "$OUT/control-files.tgz" runs/study/mqa/*.jsonl runs/study/mqa/meta.json || true
    ;;
  bench)  # whole-model rows still missing (issue 6): PGQA after its fused kernels, kdgqa-ps
          # compiled, calibrated/similarity beyond ViT-B 224 eager; each beside its own timm rows
    R=benchmarks/results
    timeout "${TIME_LIMIT:-560}" python benchmarks/model.py --models vit_b --batch 128 \
      --schemes gqa,pgqa --baselines timm --max-minutes 2 \
      --out "$OUT/model_vit_b_224_pgqa_fused_h200.json" 2>&1 | tail -n 6 || true
    timeout "${TIME_LIMIT:-560}" python benchmarks/model.py --models vit_b --batch 256 \
      --compile on --schemes kdgqa-ps,calibrated,similarity --baselines timm --max-minutes 3 \
      --out "$OUT/model_vit_b_224_compiled_topup_h200.json" 2>&1 | tail -n 8 || true
    echo "copy $OUT/*.json into $R and regenerate the README tables with benchmarks/table.py"
    ;;
  *) echo "unknown stage $stage (pretrain, tune, grid, control, bench)" >&2; exit 2 ;;
esac
