"""Issue 16: RAM-Net with a memory that grows one address factor at a time (ramjax/train/factor_schedule.py)
instead of, or before, a wider top-K. The fig4 regime of configs/mqar.py (K = 8 at evaluation), 3 seeds per
method; one sweep per memory size, since their runs need different shares of a GPU:

  # M 1024 (U 5) and 4096 (U 6): K = 8 throughout, the memory growing from 64 slots (3 factors)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.06 ramjax sweep --config configs/mqar.py:ramnet,fig4 \
      --sweep experiments/sweeps/factor_schedule.py:small --workdir runs/factor_schedule_small --max-parallel 12
  # M 65536 (U 8): from 64 slots at K = 8, or from 1024 slots with the top-K anneal 32 -> 8 there first
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 ramjax sweep --config configs/mqar.py:ramnet,fig4 \
      --sweep experiments/sweeps/factor_schedule.py:65536 --workdir runs/factor_schedule_65536 --max-parallel 6
  # M 65536 within 1000 steps (growth over 700 steps from 64 slots, or over 500 from 256): :65536_1000
  # M 2^20 (U 10), from 64 slots: experiments/sweeps/factor_schedule.py:1048576

Without a schedule M 1024 at K = 8 stays at chance (0.011, issue 16). With this one (3 seeds): M 1024 0.999,
M 4096 0.997 in 1000 steps; M 65536 0.930 in 1000 steps when the growth ends at step 700 (0.968 in 1500 steps
with a growth over 1000), at chance when it starts from 256 slots; M 2^20 0.814 at 2000 steps. Results:
experiments/results/large_memory.md.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "train.ramnet_factors_start", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.num_factors"]}

# memory -> rows of (U, factors at the start, grow steps, top-K start, top-K anneal steps, training steps)
METHODS = {
    "small": [(5, 3, 600, 0, 0, 1000), (6, 3, 700, 0, 0, 1000)],
    "65536": [(8, 3, 1000, 0, 0, 1500), (8, 5, 1000, 32, 300, 1500)],
    # within the target's 1000 steps: all eight factors by step 700 (the 1000-step growth reached 0.745 at 1000)
    "65536_1000": [(8, 3, 700, 0, 0, 1000), (8, 4, 500, 0, 0, 1000)],
    # M = 2^20 (U 10): seven phases of 200 steps from 64 slots
    "1048576": [(10, 3, 1400, 0, 0, 2000)],
}


def get_sweep(memory: str = "small"):
    if memory not in METHODS:
        raise ValueError(f"factor_schedule.py: unknown memory size {memory!r}; known: {sorted(METHODS)}")
    rows = METHODS[memory]
    column = lambda i: [row[i] for row in rows]  # noqa: E731
    methods = zipped(values("model.ramnet.num_factors", column(0)), values("train.ramnet_factors_start", column(1)),
                     values("train.ramnet_factors_grow_steps", column(2)),
                     values("train.ramnet_top_k_start", column(3)),
                     values("train.ramnet_top_k_anneal_steps", column(4)), values("train.num_steps", column(5)))
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(methods, seeds)
