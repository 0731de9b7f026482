#!/usr/bin/env bash
# The first GPU study (results/study/) in stages, as run on the H200 machine (PYTHONPATH=src, data archives
# from ../shared/data copied into .data/). Each stage fits one 10-minute device call; what a
# stage produces is packed under $OUT (at most 8 files come back per call).
#
#   bash scripts/gpu_study.sh pretrain     # MHA ViT-S/4 on Tiny ImageNet 32 -> bf16 shards in $OUT/model
#   bash scripts/gpu_study.sh tune         # uptraining LR sweep for mha + gqa on CIFAR-10's val split
#   bash scripts/gpu_study.sh grid 6 0 1 2 # shards 0-2 of 6 of the study grid, concurrently
#   bash scripts/gpu_study.sh control      # G = 1 (MQA) control, 3 seeds
#   bash scripts/gpu_study.sh bench        # whole-model benchmark rows still missing
#   bash scripts/gpu_study.sh ablation     # calibrated with the pooling loss alone
#   bash scripts/gpu_study.sh auto         # whatever is still missing, in order, until DEADLINE
#   bash scripts/gpu_study.sh collect F    # here: add a returned grid-files.tgz to results/study
# then, anywhere: kdgqa report runs/study/uptrain/shard*/ runs/study/mqa -o results/study
#
# The finished runs are committed in results/study/raw; `auto` on a fresh machine continues from
# them (carry .data/study-model, the pretrained checkpoint, and .data/cifar10-jpeg.tar.xz), and
# refuses a checkpoint whose checksums differ from results/study/raw/checkpoint.
#
# Environment: MODEL (pretrained checkpoint dir; default: the pretrain stage's output or
# .data/study-model), TIME_LIMIT (seconds per process, default 560; rerun to resume),
# UPTRAIN_SET (one extra --set for the uptraining recipe, e.g. "uptrain.lr=3e-4"; the auto
# stage writes the tuned one to runs/study/recipe.txt), DEADLINE (auto: seconds from its start,
# default 560), GRID_SHARDS (auto: concurrent grid processes, default 6).
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/out}
mkdir -p "$OUT"
stage=${1:?stage: pretrain, tune, grid, control, bench, auto or collect}
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
      ${UPTRAIN_SET:+--set $UPTRAIN_SET} >> "runs/study/uptrain/shard$i.log" 2>&1 &
    k=$((k + 1))
  done
  wait || true
}

# Seconds left before DEADLINE (auto stage), less a margin for packing the results.
left() { echo $(( START + ${DEADLINE:-560} - $(date +%s) - ${1:-20} )); }

# The LR whose mean best-validation accuracy over mha and gqa (G = 2) is highest; empty until
# every tuning run has finished.
chosen_lr() {
  python - <<'PY'
import glob, json, os, statistics
scores = {}
for d in sorted(glob.glob("runs/study/tune/lr*/")):
    rows = [json.loads(line) for f in glob.glob(d + "shard*/results.jsonl") for line in open(f)]
    if len(rows) == 2:
        scores[d.rstrip("/").split("/lr")[-1]] = statistics.mean(r["best_val_acc"] for r in rows)
expected = len(os.environ.get("TUNE_LRS", "1e-4 3e-4 1e-3").split())
if len(scores) == expected:
    print(max(scores, key=scores.get))
PY
}

tune_runs() {  # one process per (LR, mha|gqa G=2) cell, all at once; resumable
  mkdir -p runs/study/tune
  local lr i
  for lr in ${TUNE_LRS:-1e-4 3e-4 1e-3}; do
    for i in 0 1; do
      timeout "$1" python -m kdgqa.cli experiment "$UPTRAIN_CONFIG" --no-progress --resume \
        -o "runs/study/tune/lr$lr/shard$i" --shard "$i/2" --set "model.pretrained=$(model_dir)" \
        --set "uptrain.lr=$lr" --set "grid.schemes=[gqa]" --set "grid.kv_heads=[2]" \
        --set "grid.seeds=[0]" > "runs/study/tune/lr$lr-$i.log" 2>&1 &
    done
  done
  wait || true
  for f in runs/study/tune/lr*/shard*/results.jsonl; do
    [ -f "$f" ] && python - "$f" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{sys.argv[1].split('/')[3]:8s} {r['run_id']:12s} best val {100 * r['best_val_acc']:.2f}"
          f"  test {100 * r['test_acc']:.2f}  {r['train_img_per_s']:.0f} img/s"
          f"  {r['train_seconds']:.0f} s")
PY
  done | tee "$OUT/tune.txt"
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
  bench)  # whole-model rows still missing: PGQA after its fused kernels, kdgqa-ps
          # compiled, calibrated/similarity beyond ViT-B 224 eager; each beside its own timm rows
    R=benchmarks/results
    end=$(( $(date +%s) + ${TIME_LIMIT:-560} ))
    timeout $(( end - $(date +%s) )) python benchmarks/model.py --models vit_b --batch 128 \
      --schemes gqa,pgqa --baselines timm --max-minutes 2 \
      --out "$OUT/model_vit_b_224_pgqa_fused_h200.json" 2>&1 | tail -n 6 || true
    timeout $(( end - $(date +%s) )) python benchmarks/model.py --models vit_b --batch 256 \
      --compile on --schemes kdgqa-ps,calibrated,similarity --baselines timm --max-minutes 3 \
      --out "$OUT/model_vit_b_224_compiled_topup_h200.json" 2>&1 | tail -n 8 || true
    echo "copy $OUT/*.json into $R and regenerate the tables in docs/performance.md with benchmarks/table.py"
    ;;
  ablation)  # `calibrated` with the pooling loss alone (selection=pooling), the
             # form before the output check, G = 2, 3 x 3 seeds; one process per run
    unpack cifar10
    mkdir -p runs/study/ablation
    for i in 0 1 2 3 4 5; do
      timeout "${TIME_LIMIT:-560}" python -m kdgqa.cli experiment "$UPTRAIN_CONFIG" \
        --no-progress --resume --shard "$i/6" -o "runs/study/ablation/shard$i" \
        --set "model.pretrained=$(model_dir)" --set "grid.schemes=[calibrated-pooling]" \
        --set grid.include_mha=false \
        --set "grid.variants={calibrated-pooling: {scheme: calibrated, selection: pooling}}" \
        >> "runs/study/ablation/shard$i.log" 2>&1 &
    done
    wait || true
    tail -qn 2 runs/study/ablation/shard*.log || true
    tar czf "$OUT/ablation-files.tgz" runs/study/ablation/*.log runs/study/ablation/shard*/*.jsonl \
      runs/study/ablation/shard*/meta.json runs/study/ablation/shard*/config.yaml || true
    ;;
  auto)  # pretrain -> tune -> grid + control, each resumed where the last call stopped
    START=$(date +%s)
    unpack cifar10
    mkdir -p runs/study
    # A fresh machine continues from the study state committed in results/study/raw (the
    # results of finished runs, the tuned recipe); unfinished runs start again.
    if [ ! -d runs/study/uptrain ] && [ -d results/study/raw/uptrain ]; then
      cp -r results/study/raw/uptrain results/study/raw/mqa runs/study/
      cp results/study/raw/recipe.txt runs/study/
    fi
    [ -d .data/study-model ] && MODEL=${MODEL:-.data/study-model}
    if [ -f results/study/raw/checkpoint/checksums.sha256 ] && [ -f "$(model_dir)/checksums.sha256" ] \
        && ! cmp -s results/study/raw/checkpoint/checksums.sha256 "$(model_dir)/checksums.sha256"; then
      echo "$(model_dir) is not the checkpoint the committed study started from" >&2; exit 2
    fi
    if [ ! -f "$(model_dir)/kdgqa_config.json" ]; then
      unpack tiny-imagenet-32
      resume=(); [ -d runs/study/pretrain ] && resume=(--resume)
      timeout "$(left 40)" python -m kdgqa.cli experiment \
        "${PRETRAIN_CONFIG:-configs/study/pretrain-vit-s4-tin32.yaml}" \
        --pretrain-only --no-progress "${resume[@]}" 2>&1 | tee -a runs/study-pretrain.log || true
      cp runs/study-pretrain.log "$OUT/pretrain.log"
      if [ -f runs/study/pretrain/pretrain/model/kdgqa_config.json ]; then
        # Every uptraining run starts from the bf16 copy that comes back, on this machine too.
        # At most 8 files come back: the shards, plus one archive of the small files.
        python scripts/shrink_checkpoint.py runs/study/pretrain/pretrain/model .data/study-model \
          --dtype bfloat16 --max-shard 15MiB
        MODEL=.data/study-model
        mkdir -p "$OUT/model" && cp .data/study-model/*.safetensors "$OUT/model/"
        tar czf "$OUT/model-meta.tgz" -C .data study-model/kdgqa_config.json \
          study-model/checksums.sha256 study-model/model.safetensors.index.json
        tar czf "$OUT/pretrain-files.tgz" runs/study/pretrain/*.json* \
          runs/study/pretrain/config.yaml || true
      fi
    fi
    [ -f "$(model_dir)/kdgqa_config.json" ] || exit 0
    [ -n "${UPTRAIN_SET:-}" ] || [ -f runs/study/recipe.txt ] || {
      [ -n "$(chosen_lr)" ] || tune_runs "$(left 30)"
      lr=$(chosen_lr); [ -n "$lr" ] || exit 0
      echo "uptrain.lr=$lr" | tee runs/study/recipe.txt "$OUT/recipe.txt"
      tar czf "$OUT/tune-files.tgz" --exclude='*.pt' runs/study/tune
    }
    UPTRAIN_SET=${UPTRAIN_SET:-$(cat runs/study/recipe.txt)}
    [ "$(left 60)" -gt 0 ] || exit 0
    TIME_LIMIT=$(left 30) grid_shards "${GRID_SHARDS:-6}" $(seq 0 $(( ${GRID_SHARDS:-6} - 1 ))) &
    timeout "$(left 30)" python -m kdgqa.cli experiment "$UPTRAIN_CONFIG" --no-progress --resume \
      -o runs/study/mqa --set "model.pretrained=$(model_dir)" --set "grid.schemes=[mqa]" \
      --set "grid.kv_heads=[1]" --set grid.include_mha=false --set "$UPTRAIN_SET" \
      >> runs/study/mqa.log 2>&1 &
    wait || true
    tail -qn 2 runs/study/uptrain/shard*.log runs/study/mqa.log || true
    cat runs/study/uptrain/shard*/results.jsonl runs/study/mqa/results.jsonl 2>/dev/null | wc -l || true
    tar czf "$OUT/grid-files.tgz" runs/study/uptrain/*.log runs/study/uptrain/shard*/*.jsonl \
      runs/study/uptrain/shard*/meta.json runs/study/uptrain/shard*/config.yaml runs/study/mqa.log \
      runs/study/mqa/*.jsonl runs/study/mqa/meta.json runs/study/mqa/config.yaml || true
    # With the grid done and time to spare, the whole-model benchmark rows still missing.
    to_run=0
    for i in $(seq 0 $(( ${GRID_SHARDS:-6} - 1 ))); do
      n=$(python -m kdgqa.cli experiment "$UPTRAIN_CONFIG" --resume --dry-run \
        --shard "$i/${GRID_SHARDS:-6}" -o "runs/study/uptrain/shard$i" \
        --set "model.pretrained=$(model_dir)" --set "$UPTRAIN_SET" | tail -n 1 \
        | sed -E 's/.* ([0-9]+) to run.*/\1/')
      to_run=$((to_run + n))
    done
    echo "grid runs still to run: $to_run"
    if [ "$to_run" -eq 0 ] && [ "$(left 20)" -gt 200 ]; then
      TIME_LIMIT=$(left 20) bash "$0" bench
    fi
    ;;
  collect)  # here, after a call: collect ARCHIVE (grid-files.tgz or ablation-files.tgz)
            # -> results/study/raw, then the merged report
    archive=${2:?collect: path of the grid-files.tgz or ablation-files.tgz that came back}
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; tar xzf "$archive" -C "$tmp"
    for src in "$tmp"/runs/study/uptrain/shard* "$tmp"/runs/study/mqa \
        "$tmp"/runs/study/ablation/shard*; do
      [ -d "$src" ] || continue
      part=${src#"$tmp"/runs/study/}; dst=results/study/raw/$part
      # The new results must extend the committed ones, never replace a finished run.
      python - "$dst/results.jsonl" "$src/results.jsonl" <<'PY'
import json, os, sys
old = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
new = [json.loads(l) for l in open(sys.argv[2])]
if new[:len(old)] != old:
    sys.exit(f"{sys.argv[2]} does not extend {sys.argv[1]}; not collected")
PY
      mkdir -p "$dst" && cp "$src"/* "$dst"/
    done
    for log in "$tmp"/runs/study/uptrain/shard*.log "$tmp"/runs/study/mqa.log \
        "$tmp"/runs/study/ablation/shard*.log; do
      [ -f "$log" ] || continue
      kind=$(basename "$(dirname "$log")")  # uptrain or ablation; study for mqa.log
      cp "$log" "results/study/raw/logs/$(basename "$log" | sed "s/^shard/$kind-shard/")"
    done
    rm -rf "$tmp"
    python -m kdgqa.cli report results/study/raw/uptrain/shard*/ results/study/raw/mqa \
      $(ls -d results/study/raw/ablation/shard*/ 2>/dev/null) -o results/study
    ;;
  *) echo "unknown stage $stage (pretrain, tune, grid, control, bench, ablation, auto, collect)" >&2
     exit 2 ;;
esac
