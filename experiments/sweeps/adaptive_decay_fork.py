"""Issue 21: the fork's MQAR table under its protocol (configs/adaptive_decay.py: their model, data, Adam 3e-4,
best evaluation, early stop at 0.99), 8 seeds per cell trained in one program (train.num_seeds).

  ramjax sweep --config configs/adaptive_decay.py:mqar --sweep experiments/sweeps/adaptive_decay_fork.py \
      --workdir runs/adaptive_decay_fork --max-parallel 12

Cells: lambda mode (linear: the fork's "fixed lambda" baseline; mlp_softplus; mlp_softmax) x kv pairs (4, 8, 16,
32) at length 128. Report best_eval per seed (summary.json: best_accuracy_mean / _std) and the final evaluation.
Published (5 seeds): kv 32 linear 60.9 +- 46.7, mlp_softplus 99.6 +- 0.1.

The argument `modes` gives the three modes alone (8 seeds each), for the tasks whose setting the config variant
fixes: the length test (train 128, evaluate 256), selective copying at 256 and 512, and each of them with our
Mamba-2 block (`,ours`):

  ramjax sweep --config configs/adaptive_decay.py:mqar_length --sweep experiments/sweeps/adaptive_decay_fork.py:modes \
      --workdir runs/adaptive_decay_fork_length --max-parallel 3
  ramjax sweep --config configs/adaptive_decay.py:selective_copy,len512 \
      --sweep experiments/sweeps/adaptive_decay_fork.py:modes --workdir runs/adaptive_decay_fork_sc512 --max-parallel 3
  ramjax sweep --config configs/adaptive_decay.py:mqar,ours --sweep experiments/sweeps/adaptive_decay_fork.py \
      --workdir runs/adaptive_decay_fork_ours --max-parallel 12

Tables per seed (best and final evaluation, seeds that reached 0.99 and when), runs cut short included:
  python experiments/fork_table.py runs/adaptive_decay_fork_length runs/adaptive_decay_fork_sc512 \
      --results experiments/results/adaptive_decay_fork.md --title "..."
"""

from ramjax.sweep import product, values

PLOT = {"x": "data.train_settings", "y": ["eval/accuracy/mean"], "series": ["model.loglinear.mode"]}


MODES = ["linear", "mlp_softplus", "mlp_softmax"]


def get_sweep(cells: str = ""):
    """The kv table (no argument), or `modes`: the lambda modes alone, on the config variant's own task."""
    if cells not in ("", "modes"):
        raise ValueError(f"adaptive_decay_fork.py: unknown argument {cells!r}; '' (the kv table) or 'modes'")
    if cells == "modes":
        return product(values("model.loglinear.mode", MODES), values("train.num_seeds", [8]))
    cells = product(values("model.loglinear.mode", MODES),
                    values("data.train_settings", ["4:128", "8:128", "16:128", "32:128"]))
    # evaluation on the trained setting: the fork's validation set has the training kv
    for cell in cells:
        cell["data.eval_settings"] = cell["data.train_settings"]
        cell["train.num_seeds"] = 8
    return cells
