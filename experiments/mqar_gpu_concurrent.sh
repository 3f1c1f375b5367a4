#!/usr/bin/env bash
# Train several MQAR models at the same time on one GPU (`ramjax sweep --max-parallel`), then tabulate them with
# experiments/mqar_suite.py.
#
#   bash experiments/mqar_gpu_concurrent.sh WORKDIR RESULTS.md NUM_STEPS VARIANT [VARIANT ...]
#
# d_model-128 models leave most of an H200 idle (the RAM-Net scan is latency-bound), so one process per model,
# each with a share of the GPU's memory (MQAR_MEM_FRACTION, default 0.3), finishes the set in about the time of
# the slowest one. Steps/s in the table are therefore measured while sharing the GPU. Extra config overrides for
# every model (each passed as --config.FIELD=VALUE): MQAR_SETS, e.g.
#   MQAR_SETS="optim.learning_rate=3e-3 train.eval_every=500"
# MQAR_TIMEOUT=SECONDS stops the sweep after that long (its trainers save and stop; their evaluations so far
# still tabulate, and rerunning resumes them), and MQAR_CONFIG the config (MQAR_CONFIG=configs/mqar.py:cpu: the
# cpu sizes, for a smoke test).
set -euo pipefail
workdir=$1; results=$2; steps=$3; shift 3
sets=()
for item in ${MQAR_SETS:-}; do sets+=("--config.$item"); done
status=0
MQAR_SUITE_MODELS=$(IFS=,; echo "$*") XLA_PYTHON_CLIENT_MEM_FRACTION=${MQAR_MEM_FRACTION:-0.3} \
  timeout "${MQAR_TIMEOUT:-0}" ramjax sweep --config "${MQAR_CONFIG:-configs/mqar.py}" \
  --sweep experiments/sweeps/mqar_suite.py --workdir "$workdir" --max-parallel $# \
  --config.train.num_steps="$steps" --config.train.eval_every="$steps" "${sets[@]}" || status=1
python experiments/mqar_suite.py --sweep_dir "$workdir" --results "$results"
exit $status
