"""RAM-Net Figure 3: mean accuracy over the 7-setting MQAR suite against total recurrent state size, 2 layers.

  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig3_mqar_state_size.py \
      --workdir runs/fig3 --max-parallel 3 --config.train.num_steps=6000

Widths 64 and 128 fit one 10-minute device call with the other figures' runs; add (256, 256) to the zip for the
widest points.

The claim to test: RAM-Net is best at every state size. Width moves the baselines' state; RAM-Net's state is
heads x M x (d_v + 1), so its points move with d_v (zipped with the width here). Attention's "state" is its KV
cache at the longest evaluation length.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "state_size", "y": ["eval/accuracy/mean"], "series": ["model.pattern"]}


def get_sweep():
    widths = zipped(values("model.d_model", [64, 128]), values("model.ramnet.d_v", [16, 64]))
    models = values("model.pattern", ["ramnet", "gla", "mamba2", "gated_deltanet", "loglinear", "attention"])
    return product(models, widths)
