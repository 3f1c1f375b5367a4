"""The MQAR model suite: models of configs/common.py's MODELS on the same data and optimiser, then a table of
accuracy per (kv, length) slice with steps/s (experiments/mqar_suite.py).

  ramjax sweep --config configs/mqar.py --sweep experiments/sweeps/mqar_suite.py --workdir runs/mqar_suite \
      --config.train.num_steps=3000 --config.train.eval_every=3000
  python experiments/mqar_suite.py --sweep_dir runs/mqar_suite --results experiments/results/mqar_gpu.md

The models: MQAR_SUITE_MODELS, comma-separated variant names (default ramnet,transformer,gla); each run sets
that variant's model fields. `--config configs/mqar.py:cpu` for the cpu sizes (a smoke run), `--max-parallel N`
to train N models at once (on one GPU each gets 0.9 / N of its memory: experiments/mqar_gpu_concurrent.sh).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
from common import MODELS  # noqa: E402

from ramjax.errors import ConfigError  # noqa: E402


def get_sweep():
    names = [n.strip() for n in os.environ.get("MQAR_SUITE_MODELS", "ramnet,transformer,gla").split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ConfigError(f"MQAR_SUITE_MODELS: unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    return [{f"model.{field}": value for field, value in MODELS[name].items()} for name in names]
