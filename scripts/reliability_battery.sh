#!/usr/bin/env bash
# The adversarial battery of docs/reliability.md in one go: kills at random moments and
# resumes (two crash seeds), damaged and malicious files, fuzzed configs (alias bombs among
# the hostile ones), devices this machine lacks, Ctrl-C, two writers, a full disk (a real
# tmpfs where mounting is allowed), killed grid workers. Prints one line per part with its
# counts and time, then the total; any traceback or hang shows up as a failed or timed-out
# test.
#   bash scripts/reliability_battery.sh            # FUZZ=300 examples per fuzz test
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-src} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FUZZ=${FUZZ:-300}
part() {  # part NAME [ENV=VALUE ...] -- PYTEST ARGS
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local start out
  start=$(date +%s)
  out=$(env "${envs[@]}" timeout 1800 python -m pytest -p no:cacheprovider "$@" 2>&1 | tail -n 1)
  echo "$name: $out ($(( $(date +%s) - start )) s)"
}
part "kill + resume, crash seed 5" KDGQA_CRASH_SEED=5 -- tests/study/test_crash_resume.py
part "kill + resume, crash seed 11" KDGQA_CRASH_SEED=11 -- tests/study/test_crash_resume.py
part "damaged and malicious files" X=1 -- tests/cli/test_bad_files.py tests/io
part "fuzzed configs and flags ($FUZZ examples each)" KDGQA_FUZZ_EXAMPLES=$FUZZ -- \
  tests/cli/test_fuzz_cli.py
part "devices, aliases, resume guards, Ctrl-C, splits" X=1 -- tests/cli/test_experiment_input.py
part "two writers, killed workers" X=1 -- tests/study/test_lock.py tests/study/test_workers.py
part "full disk (tmpfs)" X=1 -- tests/cli/test_full_disk.py -rs
