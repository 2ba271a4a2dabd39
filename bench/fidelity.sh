#!/usr/bin/env bash
# HetComp against its ablation in the reference regime (configs/citeulike.yaml's distill section):
# HetComp, the ablation (final ensemble, L_R only) and the student alone, seeds 0-2, rank-importance
# temperature 10 and 40. One thread per run; JOBS runs at a time. Every run resumes from its
# checkpoint and a finished one is skipped, so the script can be stopped and rerun at any time.
#   JOBS=2 bash bench/fidelity.sh [citeulike|gowalla]
set -uo pipefail
cd "$(dirname "$0")/.."
dataset=${1:-citeulike}
export HETCOMP_DATASETS_DIR="${HETCOMP_DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}"
run=runs/$dataset
mkdir -p "$run/logs"
runs=()
# T=10 first (the paper's setting), all seeds, before T=40: the head-to-head needs seeds soonest.
for temp in 10 40; do
  for seed in 0 1 2; do
    for method in hetcomp final_ensemble bpr; do
      [[ $method == bpr && $temp == 40 ]] && continue      # the student alone has no teachers
      runs+=("$method $temp $seed")
    done
  done
done
one() {
  local method=$1 temp=$2 seed=$3
  local out=$run/distill/ref_${method}_T${temp}_s${seed}
  [[ -f $out/MANIFEST.json ]] && return 0
  .venv/bin/hetcomp distill --config configs/$dataset.yaml --set distill.method=$method \
    --set distill.temperature=$temp --set distill.seed=$seed --set distill.out=$out \
    >> "$run/logs/$(basename "$out").log" 2>&1
}
export -f one; export run dataset
printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-1}" -L 1 bash -c 'one $0 $1 $2'
