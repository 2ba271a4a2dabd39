#!/usr/bin/env bash
# HetComp against its ablation in the reference regime: HetComp, the ablation (final ensemble, L_R
# only) and the student alone, seeds 0-2. One thread per run; JOBS runs at a time. Every run resumes
# from its checkpoint and a finished one is skipped, so the script can be stopped and rerun at any time.
#   JOBS=2 bash bench/fidelity.sh [citeulike|gowalla]
#   pkill -f bench/fidelity.sh           # stops it and its runs (they resume from their checkpoints)
# citeulike: configs/citeulike.yaml's distill section (the reference regime), rank-importance
#   temperature 10 and 40.
# gowalla: configs/gowalla.yaml's distill section with the reference's lr 1e-3 (init N(0, 0.01) is the
#   default); it keeps its 1,000-item sampled denominator (the exact one costs ~4x an epoch there);
#   temperature 10. TEMPS overrides the temperatures.
# The run's teachers are trained first where they are missing (hetcomp train-teachers skips finished
# ones): sequentially for CiteULike, as concurrent Ray actors for Gowalla (its config is sized so).
# A cell with a record in docs/results/fidelity_cells/<dataset>/ (bench/fidelity_report.py --record
# writes them, and they are committed) is skipped: run folders do not outlive a fresh checkout.
# SEEDS (default "0 1 2") picks the seeds.
# REGIME=fast: the fast regime instead (lr 0.01, 1,000 sampled negatives, temperature 40; cells fast_*):
#   HetComp with the reference's epoch-counting DKC schedule, HetComp with the progress-tied one
#   (distill.dkc_schedule: progress, cell hetcomp-progress) and the ablation.
set -uo pipefail
cd "$(dirname "$0")/.."
dataset=${1:-citeulike}
regime=${REGIME:-ref}
export HETCOMP_DATASETS_DIR="${HETCOMP_DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}"
run=runs/$dataset
mkdir -p "$run/logs"
case $dataset in
  citeulike) temps=${TEMPS:-10 40}; extra=""; teachers=(--sequential) ;;
  gowalla) temps=${TEMPS:-10}; extra="--set distill.lr=0.001"; teachers=() ;;
  *) echo "bench/fidelity.sh: unknown dataset '$dataset' (citeulike or gowalla)" >&2; exit 2 ;;
esac
methods="hetcomp final_ensemble bpr"
case $regime in
  ref) ;;
  fast) temps=${TEMPS:-40}; extra="--set distill.lr=0.01 --set distill.sampled_negatives=1000"
        methods="hetcomp hetcomp-progress final_ensemble" ;;
  *) echo "bench/fidelity.sh: unknown REGIME '$regime' (ref or fast)" >&2; exit 2 ;;
esac
.venv/bin/hetcomp train-teachers --config configs/$dataset.yaml "${teachers[@]}" >> "$run/logs/teachers.log" 2>&1 \
  || { echo "bench/fidelity.sh: train-teachers failed, see $run/logs/teachers.log" >&2; exit 1; }
runs=()
# The first temperature (the paper's 10), all seeds, before the next: the head-to-head needs seeds soonest.
for temp in $temps; do
  for seed in ${SEEDS:-0 1 2}; do
    for method in $methods; do
      [[ $method == bpr && $temp != "${temps%% *}" ]] && continue      # the student alone has no teachers
      runs+=("$method $temp $seed")
    done
  done
done
one() {
  local method=$1 temp=$2 seed=$3
  local out=$run/distill/${regime}_${method}_T${temp}_s${seed} args=(--set "distill.method=$method")
  [[ -f $out/MANIFEST.json || -f docs/results/fidelity_cells/$dataset/$(basename "$out").json ]] && return 0
  [[ $method == hetcomp-progress ]] && args=(--set distill.method=hetcomp --set distill.dkc_schedule=progress)
  # shellcheck disable=SC2086  # $extra: zero or more --set pairs
  .venv/bin/hetcomp distill --config configs/$dataset.yaml "${args[@]}" $extra \
    --set distill.temperature=$temp --set distill.seed=$seed --set distill.out=$out \
    >> "$run/logs/$(basename "$out").log" 2>&1
}
export -f one; export run dataset extra regime
# Stopping the script (kill -TERM / Ctrl-C) stops its runs: xargs first, so that no next cell
# starts when a run's shell exits, then everything under it. A stopped run resumes on the next call.
tree() { local p; echo "$1"; for p in $(pgrep -P "$1"); do tree "$p"; done; }
trap 'kill -TERM $(tree "$feeder") 2>/dev/null; exit 143' TERM INT
printf '%s\n' "${runs[@]}" | xargs -P "${JOBS:-1}" -L 1 bash -c 'one $0 $1 $2' &
feeder=$!
wait "$feeder"
