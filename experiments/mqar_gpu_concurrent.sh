#!/usr/bin/env bash
# Train several MQAR models at the same time on one GPU, then tabulate them with experiments/mqar_suite.py.
#
#   bash experiments/mqar_gpu_concurrent.sh WORKDIR RESULTS.md NUM_STEPS VARIANT [VARIANT ...]
#
# d_model-128 models leave most of an H200 idle (the RAM-Net scan is latency-bound), so one process per model,
# each with a third of the GPU's memory, finishes the set in about the time of the slowest one. Steps/s in the
# table are therefore measured while sharing the GPU. Extra config overrides for every model (each passed as
# --config.FIELD=VALUE): MQAR_SETS, e.g.
#   MQAR_SETS="optim.learning_rate=3e-3 train.eval_every=500"
# MQAR_TIMEOUT=SECONDS stops each training process after that long (its evaluations so far still tabulate),
# and MQAR_FLAGS for mqar_suite.py flags (MQAR_FLAGS=--cpu: the cpu sizes, for a smoke test).
set -euo pipefail
workdir=$1; results=$2; steps=$3; shift 3
sets=()
for item in ${MQAR_SETS:-}; do sets+=("--config.$item"); done
for flag in ${MQAR_FLAGS:-}; do sets+=("$flag"); done
mkdir -p "$workdir"
pids=()
for variant in "$@"; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MQAR_MEM_FRACTION:-0.3} timeout "${MQAR_TIMEOUT:-0}" python experiments/mqar_suite.py --variants "$variant" \
    --num_steps "$steps" --workdir "$workdir" --results "$workdir/$variant.md" "${sets[@]}" \
    > "$workdir/$variant.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
variants=$(IFS=,; echo "$*")
python experiments/mqar_suite.py --variants "$variants" --num_steps "$steps" --workdir "$workdir" \
  --results "$results" --table_only "${sets[@]}"
exit $status
