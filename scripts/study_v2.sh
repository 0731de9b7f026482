#!/usr/bin/env bash
# Study v2 (results/study-v2/, docs/study-v2.md) in resumable stages, on a machine with one or
# more GPUs (PYTHONPATH=src; ../shared/data/tiny-imagenet-32.tar.xz copied into .data/).
# Every stage skips what is already done, so a stage cut off by a call's time limit continues
# where it stopped when it is started again, on the same machine or, from the state committed
# in results/study-v2/raw, on a fresh one.
#
#   bash scripts/study_v2.sh pretrain   # the pretraining candidates side by side, then `select`
#   bash scripts/study_v2.sh select     # best candidate on the validation split -> bf16 model
#   bash scripts/study_v2.sh tune       # uptraining LR x {mha, gqa G=2, gqa G=4, mqa}, seed 0
#   bash scripts/study_v2.sh gain       # kdgqa, dgqa-ema at gain 2, 4, 8 (G = 2, 4), seed 0
#   bash scripts/study_v2.sh grid       # the grid (seed-major) and the MQA control
#   bash scripts/study_v2.sh conversion # issue 15's conversion grid (auto: WITH_CONVERSION=1)
#   bash scripts/study_v2.sh auto       # whatever is missing, in that order, until DEADLINE
#   bash scripts/study_v2.sh collect F  # here: fold a returned state.tgz into results/study-v2
#   bash scripts/study_v2.sh stash      # keep a carried checkpoint for the next calls
#
# Decisions are files, so a later call or session makes the same ones: runs/study-v2/
# choice.txt (the checkpoint), recipe.txt (the uptraining LR: the best mean validation
# accuracy of MHA and GQA G = 2 among the LRs where GQA G = 2 trails MHA by >= 2 points),
# gate.txt (that gap; the grid starts only when it passes, or with FORCE_GATE=1), gain.txt
# (the gains of the *-gain arms).
#
# Environment: DEADLINE (seconds from the start for `auto`, default 570), PROCS (processes
# at a time, default 6 per GPU), CANDIDATES (pretraining: "NAME:KEY=VALUE,KEY=VALUE ..."),
# TUNE_LRS (default "1e-4 2e-4 4e-4"), GAINS (default "2 4 8"), SEEDS (default "0 1 2 3 4"),
# GRID_SHARDS (processes per seed, default 5), PRE and UP (the two configs).
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
# Many processes share the machine; the GPU does the work, so few CPU threads each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/out}
S=${STUDY_DIR:-runs/study-v2}
# The bf16 checkpoint every grid run starts from (its path is part of the recorded config).
# On a fresh machine it and the data do not fit in one call's 64 MiB together: carry
# .data/study-v2-model in a first call that runs `stash`, then the data in the next (the
# machine keeps runs/ while it stays warm, and the checkpoint is put back from there).
MODEL=${MODEL:-.data/study-v2-model}
if [ ! -f "$MODEL/kdgqa_config.json" ] && [ -f runs/study-v2-model/kdgqa_config.json ]; then
  mkdir -p "$(dirname "$MODEL")" && cp -r runs/study-v2-model "$MODEL"
fi
PRE=${PRE:-configs/study-v2/pretrain-vit-s4-h12-tin32.yaml}
UP=${UP:-configs/study-v2/uptrain-tin32.yaml}
RESULTS=${RESULTS:-results/study-v2}
RAW=$RESULTS/raw
START=$(date +%s)
mkdir -p "$OUT" "$S"
stage=${1:?stage: pretrain, select, tune, gain, grid, auto or collect}

left() { echo $(( START + ${DEADLINE:-570} - $(date +%s) - ${1:-0} )); }
gpus() { local n; n=$( (nvidia-smi -L 2>/dev/null || true) | wc -l); [ "$n" -ge 1 ] || n=1; echo "$n"; }
procs() { echo "${PROCS:-$(( 6 * $(gpus) ))}"; }

unpack() {
  [ -d .data/tiny-imagenet-32 ] || tar xf .data/tiny-imagenet-32.tar.xz -C .data
}

# pool P: run the job lines on stdin ("LOG|ARGS of kdgqa experiment"), at most P at a time,
# the k-th job on GPU k mod (number of GPUs), each stopped at the deadline (and resumed later).
pool() {
  local p=$1 n_gpu k=0 log args
  n_gpu=$(gpus)
  while IFS='|' read -r log args; do
    [ -n "$log" ] || continue
    while [ "$(jobs -rp | wc -l)" -ge "$p" ]; do wait -n || true; done
    [ "$(left 20)" -gt 30 ] || break
    mkdir -p "$(dirname "$log")"
    # set -f: --set values such as grid.seeds=[0] are not file patterns.
    # shellcheck disable=SC2086
    (set -f; CUDA_VISIBLE_DEVICES=$((k % n_gpu)) exec timeout "$(left 20)" \
      python -m kdgqa.cli experiment $args --no-progress --resume >> "$log" 2>&1) &
    k=$((k + 1))
  done
  wait || true
}

candidates() {
  echo "${CANDIDATES:-lr5e-4:pretrain.lr=5e-4 lr5e-4-mix:pretrain.lr=5e-4,pretrain.mixup=0.8,pretrain.cutmix=1.0}" \
    | tr ' ' '\n'
}

stage_pretrain() {
  unpack
  local name sets
  candidates | while IFS=: read -r name sets; do
    [ -f "$S/pretrain/$name/pretrain/model/kdgqa_config.json" ] && continue
    echo "$S/pretrain/$name.log|$PRE --pretrain-only -o $S/pretrain/$name $(
      echo "$sets" | tr ',' '\n' | sed 's/^/--set /' | tr '\n' ' ')"
  done | pool "$(gpus)"
  grep -h "pretrain: best val" "$S"/pretrain/*.log || true
}

# The candidate with the best validation accuracy (of those finished), as a bf16 checkpoint.
stage_select() {
  [ -f "$MODEL/kdgqa_config.json" ] && return 0
  local total done_
  total=$(candidates | wc -l)
  done_=$(ls -d "$S"/pretrain/*/pretrain/model 2>/dev/null | wc -l)
  [ "$done_" -eq "$total" ] || { echo "select: $done_ of $total candidates finished"; return 0; }
  python - "$S" <<'PY' | tee "$S/choice.txt"
import glob, json, re, sys
best = None
for hist in sorted(glob.glob(sys.argv[1] + "/pretrain/*/history.jsonl")):
    name = hist.split("/")[-2]
    val = max(json.loads(l)["val_acc"] for l in open(hist))
    log = open(f"{sys.argv[1]}/pretrain/{name}.log").read()
    test = re.findall(r"pretrain: best val acc ([0-9.]+), test acc ([0-9.]+)", log)[-1][1]
    print(f"candidate {name}: best val acc {val:.4f}, test acc {test}")
    if best is None or val > best[1]:
        best = (name, val)
print(f"chosen {best[0]}")
PY
  local chosen
  chosen=$(sed -n 's/^chosen //p' "$S/choice.txt")
  python scripts/shrink_checkpoint.py "$S/pretrain/$chosen/pretrain/model" "$MODEL" \
    --dtype bfloat16 --max-shard 15MiB
  mkdir -p "$OUT/model" && cp "$MODEL"/*.safetensors "$OUT/model/"
  tar czf "$OUT/model-meta.tgz" --exclude='*.safetensors' -C "$(dirname "$MODEL")" \
    "$(basename "$MODEL")"
}

common() { echo "$UP -o $1 --set model.pretrained=$MODEL"; }

stage_tune() {
  unpack
  local lr i
  for lr in ${TUNE_LRS:-1e-4 2e-4 4e-4}; do
    for i in 0 1 2; do  # mha, gqa G=2, gqa G=4
      echo "$S/tune/lr$lr/shard$i.log|$(common "$S/tune/lr$lr/shard$i") --shard $i/3 \
--set uptrain.lr=$lr --set grid.schemes=[gqa] --set grid.kv_heads=[2,4] --set grid.seeds=[0]"
    done
    echo "$S/tune/lr$lr/mqa.log|$(common "$S/tune/lr$lr/mqa") --set uptrain.lr=$lr \
--set grid.schemes=[mqa] --set grid.kv_heads=[1] --set grid.seeds=[0] --set grid.include_mha=false"
  done | pool "$(procs)"
  python - "$S" "${TUNE_LRS:-1e-4 2e-4 4e-4}" <<'PY' | tee "$S/tune.txt"
import glob, json, sys
S, lrs = sys.argv[1], sys.argv[2].split()
scores, gaps = {}, {}
for lr in lrs:
    rows = {json.loads(l)["run_id"]: json.loads(l)
            for f in glob.glob(f"{S}/tune/lr{lr}/*/results.jsonl") for l in open(f)}
    for r in rows.values():
        print(f"lr {lr:6s} {r['run_id']:10s} best val {100 * r['best_val_acc']:.2f}  "
              f"converted {100 * r['converted_test_acc']:.2f}  {r['train_img_per_s']:.0f} img/s  "
              f"{r['train_seconds']:.0f} s")
    if {"mha-g12-s0", "gqa-g2-s0"} <= rows.keys():
        scores[lr] = (rows["mha-g12-s0"]["best_val_acc"] + rows["gqa-g2-s0"]["best_val_acc"]) / 2
        gaps[lr] = rows["mha-g12-s0"]["best_val_acc"] - rows["gqa-g2-s0"]["best_val_acc"]
if len(scores) == len(lrs):
    # The best LR for MHA and GQA together among those that leave the gap the study needs
    # (GQA G = 2 >= 2 points below MHA on the validation split): a recipe under which GQA
    # recovers nearly all of MHA leaves nothing for an allocation to win back.
    best = max(scores, key=scores.get)
    fit = [lr for lr in lrs if gaps[lr] >= 0.02]
    lr = max(fit, key=scores.get) if fit else best
    for each in lrs:
        print(f"lr {each}: mean best val of mha and gqa G=2 {100 * scores[each]:.2f} %, "
              f"mha - gqa G=2 {100 * gaps[each]:+.2f} points")
    print(f"chosen uptrain.lr={lr} (mean best val of mha and gqa G=2: {100 * scores[lr]:.2f} %)")
    print(f"gate: mha - gqa G=2 on the validation split at lr {lr}: {100 * gaps[lr]:+.2f} points "
          f"({'pass' if gaps[lr] >= 0.02 else 'FAIL'}: needs >= 2)"
          + (f"; lr {best} scores {100 * (scores[best] - scores[lr]):.2f} points higher but "
             f"leaves {100 * gaps[best]:+.2f}" if best != lr else ""))
PY
  if grep -q "^chosen" "$S/tune.txt"; then
    sed -n 's/^chosen \(uptrain.lr=[^ ]*\).*/\1/p' "$S/tune.txt" > "$S/recipe.txt"
    grep "^gate" "$S/tune.txt" > "$S/gate.txt"
  fi
}

stage_gain() {
  unpack
  local recipe scheme g
  recipe=$(cat "$S/recipe.txt")
  for scheme in kdgqa dgqa-ema; do
    for g in ${GAINS:-2 4 8}; do
      for i in 0 1; do  # G = 2, G = 4
        echo "$S/gain/$scheme-gain$g/shard$i.log|$(common "$S/gain/$scheme-gain$g/shard$i") \
--shard $i/2 --set $recipe --set grid.schemes=[$scheme] --set grid.kv_heads=[2,4] \
--set grid.seeds=[0] --set grid.include_mha=false --set grid.scheme_options.$scheme.gain=$g"
      done
    done
  done | pool "$(procs)"
  python - "$S" "${GAINS:-2 4 8}" <<'PY' | tee "$S/gain-choice.txt"
import glob, json, sys
S, gains = sys.argv[1], sys.argv[2].split()
out = []
for scheme in ("kdgqa", "dgqa-ema"):
    score = {}
    for g in gains:
        rows = [json.loads(l) for f in glob.glob(f"{S}/gain/{scheme}-gain{g}/*/results.jsonl")
                for l in open(f)]
        for r in rows:
            print(f"{scheme} gain {g}: {r['run_id']:14s} best val {100 * r['best_val_acc']:.2f}")
        if len(rows) == 2:
            score[g] = sum(r["best_val_acc"] for r in rows) / 2
    if len(score) == len(gains):
        g = max(score, key=score.get)
        print(f"chosen {scheme}: gain {g} (mean best val over G = 2, 4: {100 * score[g]:.2f} %)")
        out.append(f"--set grid.variants.{scheme}-gain.gain={float(g)}")
if len(out) == 2:
    print("SETS " + " ".join(out))
PY
  if grep -q "^SETS" "$S/gain-choice.txt"; then
    sed -n 's/^SETS //p' "$S/gain-choice.txt" > "$S/gain.txt"
  fi
}

# The conversion grid of issue 15 (configs/study-v2/conversion-tin32.yaml: mean vs fit vs
# align+fit vs distillation, contiguous and calibrated groups), same recipe and seeds. One run
# per job (CONVERSION_SHARDS, default 15 = the runs of one seed), so these short jobs fill the
# slots the grid's longer shards leave free at the end of a call.
conversion_jobs() {
  local recipe seed i shards=${CONVERSION_SHARDS:-15}
  recipe=$(cat "$S/recipe.txt")
  for seed in ${SEEDS:-0 1 2 3 4}; do
    for i in $(seq 0 $((shards - 1))); do
      echo "$S/conversion/s$seed/shard$i.log|${CONVERSION:-configs/study-v2/conversion-tin32.yaml} \
-o $S/conversion/s$seed/shard$i --set model.pretrained=$MODEL --shard $i/$shards --set $recipe \
--set grid.seeds=[$seed]"
    done
  done
}

stage_conversion() {
  unpack
  conversion_jobs | pool "$(procs)"
  report_counts
}

grid_jobs() {
  local recipe gains seed i shards=${GRID_SHARDS:-5}
  recipe=$(cat "$S/recipe.txt"); gains=$(cat "$S/gain.txt")
  for seed in ${SEEDS:-0 1 2 3 4}; do
    for i in $(seq 0 $((shards - 1))); do
      echo "$S/grid/s$seed/shard$i.log|$(common "$S/grid/s$seed/shard$i") --shard $i/$shards \
--set $recipe $gains --set grid.seeds=[$seed]"
    done
  done
  # A started MQA control resumes from its own saved config (it was begun before the gain
  # default changed in the grid config, which does not touch MQA but fails resume's check).
  if [ -f "$S/mqa/config.yaml" ]; then
    echo "$S/mqa.log|$S/mqa/config.yaml -o $S/mqa"
  else
    echo "$S/mqa.log|$(common "$S/mqa") --set $recipe --set grid.schemes=[mqa] \
--set grid.kv_heads=[1] --set grid.include_mha=false"
  fi
}

report_counts() {
  echo "grid rows: $(cat "$S"/grid/s*/shard*/results.jsonl 2>/dev/null | wc -l) of 145, mqa rows: \
$(cat "$S"/mqa/results.jsonl 2>/dev/null | wc -l) of 5, conversion rows: \
$(cat "$S"/conversion/s*/shard*/results.jsonl 2>/dev/null | wc -l) of 75"
}

stage_grid() {
  unpack
  grid_jobs | pool "$(procs)"
  report_counts
}

# Everything small that a later call or session needs, and the logs, into $OUT/state.tgz.
pack_state() {
  (cd "$S/.." && tar czf - --exclude='*.pt' --exclude='*.safetensors' --exclude='model' \
    "$(basename "$S")") > "$OUT/state.tgz" 2>/dev/null || true
}

case "$stage" in
  stash)  # keep a carried .data/study-v2-model on this machine for the calls that follow
    (cd .data/study-v2-model && sha256sum -c --quiet checksums.sha256)
    rm -rf runs/study-v2-model && mkdir -p runs && cp -r .data/study-v2-model runs/
    echo "stashed in runs/study-v2-model" ;;
  pretrain) stage_pretrain; stage_select ;;
  select) stage_select ;;
  tune) stage_tune ;;
  gain) stage_gain ;;
  grid) stage_grid ;;
  conversion) stage_conversion ;;
  auto)
    trap pack_state EXIT
    # A fresh machine continues from the committed state (finished runs and decisions).
    if [ -d "$RAW" ] && [ ! -f "$S/choice.txt" ]; then cp -r "$RAW"/. "$S"/; fi
    if [ -f "$RAW/checkpoint/checksums.sha256" ] && [ -f "$MODEL/checksums.sha256" ] \
        && ! cmp -s "$RAW/checkpoint/checksums.sha256" "$MODEL/checksums.sha256"; then
      echo "$MODEL is not the checkpoint the committed study started from" >&2; exit 2
    fi
    [ -f "$MODEL/kdgqa_config.json" ] || stage_pretrain
    stage_select
    [ -f "$MODEL/kdgqa_config.json" ] || exit 0
    [ -f "$S/recipe.txt" ] || stage_tune
    [ -f "$S/recipe.txt" ] || exit 0
    if ! grep -q pass "$S/gate.txt" && [ -z "${FORCE_GATE:-}" ]; then
      echo "gate not passed (FORCE_GATE=1 to go on): $(cat "$S/gate.txt")"; exit 0
    fi
    [ -f "$S/gain.txt" ] || stage_gain
    [ -f "$S/gain.txt" ] || exit 0
    # One pool for both: the grid's long shards first, conversion runs fill the tail.
    unpack
    { grid_jobs; [ -z "${WITH_CONVERSION:-}" ] || conversion_jobs; } | pool "$(procs)"
    report_counts
    ;;
  collect)  # here, after a call: collect state.tgz -> results/study-v2/raw, then the report
    archive=${2:?collect: path of the state.tgz that came back}
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    tar xzf "$archive" -C "$tmp"
    src=$tmp/$(basename "$S")
    # Results must extend the committed ones, never replace a finished run.
    find "$src" -name results.jsonl | while read -r new; do
      old=$RAW/${new#"$src"/}
      python - "$old" "$new" <<'PY'
import json, os, sys
old = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
new = [json.loads(l) for l in open(sys.argv[2])]
if new[:len(old)] != old:
    sys.exit(f"{sys.argv[2]} does not extend {sys.argv[1]}; nothing collected")
PY
    done
    mkdir -p "$RAW" && cp -r "$src"/. "$RAW"/
    dirs=$(find "$RAW/grid" "$RAW/mqa" -name results.jsonl -printf '%h\n' 2>/dev/null | sort)
    # shellcheck disable=SC2086
    [ -z "$dirs" ] || python -m kdgqa.cli report $dirs -o "$RESULTS"
    dirs=$(find "$RAW/conversion" -name results.jsonl -printf '%h\n' 2>/dev/null | sort)
    # shellcheck disable=SC2086
    [ -z "$dirs" ] || python -m kdgqa.cli report $dirs -o "$RESULTS/conversion-uptrained"
    ;;
  *) echo "unknown stage $stage (stash, pretrain, select, tune, gain, grid, conversion, auto, collect)" >&2
     exit 2 ;;
esac
