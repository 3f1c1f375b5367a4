"""Issue 21: the fork's MQAR table under its protocol (configs/adaptive_decay.py: their model, data, Adam 3e-4,
best evaluation, early stop at 0.99), 8 seeds per cell trained in one program (train.num_seeds).

  ramjax sweep --config configs/adaptive_decay.py:mqar --sweep experiments/sweeps/adaptive_decay_fork.py \
      --workdir runs/adaptive_decay_fork --max-parallel 12

Cells: lambda mode (linear: the fork's "fixed lambda" baseline; mlp_softplus; mlp_softmax) x kv pairs (4, 8, 16,
32) at length 128. Report best_eval per seed (summary.json: best_accuracy_mean / _std) and the final evaluation.
Published (5 seeds): kv 32 linear 60.9 +- 46.7, mlp_softplus 99.6 +- 0.1. The length test is the
configs/adaptive_decay.py:mqar_length variant with the same sweep minus the kv field.
"""

from ramjax.sweep import product, values

PLOT = {"x": "data.train_settings", "y": ["eval/accuracy/mean"], "series": ["model.loglinear.mode"]}


def get_sweep():
    cells = product(values("model.loglinear.mode", ["linear", "mlp_softplus", "mlp_softmax"]),
                    values("data.train_settings", ["4:128", "8:128", "16:128", "32:128"]))
    # evaluation on the trained setting: the fork's validation set has the training kv
    for cell in cells:
        cell["data.eval_settings"] = cell["data.train_settings"]
        cell["train.num_seeds"] = 8
    return cells
