#!/usr/bin/env bash
# Issue 21's remaining tables on one GPU: the length test, selective copying at 256 and 512, and the same three
# tasks with our Mamba-2 block (`,ours`), each as one sweep of its three lambda modes (8 seeds per run, trained in
# one program: train.num_seeds), then one table over all of them (experiments/fork_table.py).
#
#   bash experiments/adaptive_decay_fork_tasks.sh WORKDIR RESULTS.md [TASK ...]
#
# TASKs are configs/adaptive_decay.py variants; the default is the six above. The sweeps run one after another,
# each with its three runs at once: one of the fork's 8-seed runs alone trained at 264-320 steps/s on an H200, and
# 22 processes on the GPU at once gave fewer steps in all than one alone (experiments/results/adaptive_decay_fork.md), so
# FORK_PARALLEL (default 3) runs share the GPU, each with FORK_MEM_FRACTION of its memory (default 0.1).
# FORK_TIMEOUT=SECONDS stops each sweep after that long (its runs save; rerunning the script resumes them, and
# finished runs are skipped), so a call with a time limit keeps what it trained. FORK_SETS: config overrides for
# every run, each passed as --config.FIELD=VALUE, e.g. FORK_SETS="train.num_steps=200 train.eval_every=100".
set -euo pipefail
workdir=$1; results=$2; shift 2
tasks=("$@")
if [ ${#tasks[@]} -eq 0 ]; then
  tasks=(mqar_length selective_copy selective_copy,len512 mqar,ours mqar_length,ours selective_copy,ours)
fi
sets=()
for item in ${FORK_SETS:-}; do sets+=("--config.$item"); done
status=0
dirs=()
for task in "${tasks[@]}"; do
  dir="$workdir/${task//,/_}"
  dirs+=("$dir")
  XLA_PYTHON_CLIENT_MEM_FRACTION=${FORK_MEM_FRACTION:-0.1} timeout -s TERM -k 120 "${FORK_TIMEOUT:-0}" \
    python -m ramjax.cli sweep --config "configs/adaptive_decay.py:$task" \
    --sweep experiments/sweeps/adaptive_decay_fork.py:modes --workdir "$dir" \
    --max-parallel "${FORK_PARALLEL:-3}" "${sets[@]}" || status=1
done
python experiments/fork_table.py "${dirs[@]}" --results "$results" \
  --title "the length test, selective copying, and the tasks with our block"
# The length test again on each finished run's last checkpoint with the Fenwick level that training at 128 never
# filled (level 8, where every query of the 256 test sits) tied to level 7 (docs/loglinear.md section 4); each
# run's eval_mqar_*_tied.json, the per-seed accuracies printed here.
for task in "${tasks[@]}"; do
  case $task in
    mqar_length*)
      for run in "$workdir/${task//,/_}"/*/; do
        if [ -f "$run/summary.json" ]; then python -m ramjax.cli eval --workdir "$run" --tie-unseen-levels || status=1; fi
      done;;
  esac
done
exit $status
