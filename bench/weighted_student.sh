#!/usr/bin/env bash
# What teacher weights chosen on valid do to HetComp's student when one teacher is weak: the six
# CiteULike teachers plus MF-weak (configs/citeulike_weak_teacher.yaml), HetComp with equal weights
# against valid-chosen weights, seeds 0-2, in the budget regime of docs/results/history.md (lr 0.01 and
# 1,000 sampled negatives; every other setting the reference's, rank importance exp(-r/10)).
# One thread per run; JOBS runs at a time; every run resumes from its checkpoint and a
# finished one is skipped.
#   hetcomp train-teachers --config configs/citeulike_weak_teacher.yaml --sequential   # after the six
#   JOBS=2 bash bench/weighted_student.sh
#   .venv/bin/python bench/weighted_student_report.py
set -uo pipefail
cd "$(dirname "$0")/.."
export HETCOMP_DATASETS_DIR="${HETCOMP_DATASETS_DIR:-$(cd .. && pwd)/shared/datasets}"
run=runs/citeulike
mkdir -p "$run/logs"
one() {
  local weights=$1 seed=$2
  local out=$run/distill/weak_${weights}_s${seed}
  [[ -f $out/MANIFEST.json ]] && return 0
  .venv/bin/hetcomp distill --config configs/citeulike_weak_teacher.yaml --set distill.lr=0.01 --set distill.sampled_negatives=1000 \
    --set distill.teacher_weights=$weights --set distill.seed=$seed --set distill.out=$out \
    > "$run/logs/$(basename "$out").log" 2>&1
}
export -f one; export run
for seed in 0 1 2; do for weights in equal valid; do echo "$weights $seed"; done; done |
  xargs -P "${JOBS:-1}" -L 1 bash -c 'one $0 $1'
