#!/usr/bin/env bash
# The whole ICP head-to-head of bench/results/icp_compare_cpu.md: every task x schedule x retraining
# budget x seed through bench/icp_compare.py (one process at a time, 1 torch thread), then the
# tables. About an hour on one core; finished cells are skipped, so it can be resumed.
#
#   bash bench/icp_grid.sh [OUT_DIR]        # default runs/icp_grid
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/icp_grid}
mkdir -p "$out"

run() {  # run TASK SCHEDULE RETRAIN FINAL SEED
  local task=$1 schedule=$2 retrain=$3 final=$4 seed=$5
  local name="${task}_${schedule}_b${retrain}-${final}_s${seed}"
  [[ -f "$out/$name.json" ]] && return 0
  local budget cache eta=0.2
  if [[ $task == flow ]]; then
    budget=(--retrain-epochs "$retrain" --final-epochs "$final")
    cache=(--dense-cache "$out/dense_flow_s$seed.pt")
    eta=0.1
  else
    budget=(--clf-retrain-epochs "$retrain" --clf-final-epochs "$final")
    cache=(--clf-cache "$out/dense_clf_s$seed.pt" --digits-cache "$out/dense_digits_s$seed.pt")
  fi
  echo "== $name"
  python bench/icp_compare.py --task "$task" --schedule "$schedule" --pq-eta "$eta" --seed "$seed" \
    "${budget[@]}" "${cache[@]}" --json "$out/$name.json.tmp" > "$out/$name.log" 2>&1
  mv "$out/$name.json.tmp" "$out/$name.json"
}

for seed in 0 1 2; do
  for schedule in geometric pq; do
    for task in clf digits; do
      for budget in "4 8" "10 20" "20 40"; do run $task $schedule $budget $seed; done
    done
    for budget in "2 4" "6 12"; do run flow $schedule $budget $seed; done
  done
done
python bench/icp_table.py "$out"/*.json
