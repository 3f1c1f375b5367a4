"""RAM-Net Figure 4: ablations over U (U = 1 is a flat softmax over M) and over M at a fixed state budget.

  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig4_ramnet_ablations.py \
      --workdir runs/fig4 --max-parallel 3

Rows 0-3: M = 1024 slots reached with U = 1, 2, 5, 10 factors (d_p = 1024, 32, 4, 2). Rows 4-6: the state
budget heads x M x d_v fixed at 4 x 65536 while M goes 256, 1024, 4096 (d_v 256, 64, 16).

The paper's regime with issue 16's method on (section 4): the same seven rows with the factor schedule, from about
64 slots (1 factor of 32, 3 of 4, 6 of 2) growing to all U over 600 steps, K = 8 throughout; U = 1 has no factor to hold and
anneals top-K 32 -> 8 over 500 steps instead (as experiments/sweeps/u_ablation.py:factors). Seeds 0 and 1 train
in one program per row (train.num_seeds = 2):
  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig4_ramnet_ablations.py:paper \
      --workdir runs/fig4_paper --max-parallel 7 --config.train.num_steps=3000 --config.train.eval_every=500
Each paper row brings its own memory share and microbatches (memory_fraction and get_sweep below), so the sweep
runs as many at once as fit on the GPU: five of the seven on a GPU of its own, two under --gpu-budget 0.6.

`fig4_ramnet_ablations.py:paper_both`: the same rows with both methods, the factor schedule and the top-K anneal
32 -> 8 over 500 steps (U = 1 as in `paper`). In the paper's regime the factor schedule alone learned at U 5
(0.977) but not at U 2 or M 4096 (experiments/results/fig4_ramnet_ablations.md, 2026-12-03), and in Zoology's
layout only both together learned (experiments/results/ramnet_without_conv.md).
`fig4_ramnet_ablations.py:paper_lr1e-2`: the `paper` rows at lr 1e-2 instead of 3e-3. In the small regime the M 4096
row (d_v 16) learned at 1e-2 (0.995) and stayed near chance at 3e-3 (0.020) in 1000 steps (CPU, 2026-12-03).
"""

from ramjax.sweep import values, zipped

PLOT = {"x": "run", "y": ["eval/accuracy/mean"], "series": []}


# What these runs trained with when their results were recorded: neither the top-K anneal nor the factor schedule
# (the factor schedule is now configs/mqar.py's default).
BASE = {"train.ramnet_top_k_start": 0, "train.ramnet_factors_start": 0}


# `paper`: the method on, growing from about 64 slots (start_factors) to all U factors over 600 steps. U = 1 anneals
# top-K instead (it has no factor to hold).
METHOD = {"train.ramnet_top_k_start": 0, "train.ramnet_top_k_anneal_steps": 0, "train.ramnet_factors_grow_steps": 600}
TOP_K_ANNEAL = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500}  # `paper_both`, with METHOD
START_SLOTS = 64  # where the factor schedule starts: K^2 / slots = 1 at K = 8 (experiments/results/large_memory.md)
METHOD_U1 = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500, "train.ramnet_factors_start": 0}


def start_factors(factor_size: int) -> int:
    """The factors active at the start: the most whose slots (factor_size^A) stay within START_SLOTS, at least 1
    (d_p 32: 1, d_p 4: 3, d_p 2: 6)."""
    active = 1
    while factor_size ** (active + 1) <= START_SLOTS:
        active += 1
    return active


REGIMES = ("", "paper", "paper_both", "paper_lr1e-2")


def get_sweep(regime: str = ""):
    """The seven rows as first run (no method: BASE), or `fig4_ramnet_ablations.py:paper`: with the method on
    (METHOD; METHOD_U1 for U = 1) and seeds 0 and 1 in one program per row; `paper_both` adds the top-K anneal,
    `paper_lr1e-2` changes the rate (module docstring)."""
    if regime not in REGIMES:
        raise ValueError(f"fig4_ramnet_ablations.py: unknown regime {regime!r}; one of {REGIMES} ('' as first "
                         "run)")
    over_u = zipped(values("model.ramnet.num_factors", [1, 2, 5, 10]),
                    values("model.ramnet.factor_size", [1024, 32, 4, 2]),
                    values("model.ramnet.d_v", [64, 64, 64, 64]))
    over_m = zipped(values("model.ramnet.num_factors", [4, 5, 6]),
                    values("model.ramnet.factor_size", [4, 4, 4]),
                    values("model.ramnet.d_v", [256, 64, 16]))
    runs = over_u + over_m
    if regime.startswith("paper"):
        for run in runs:
            if run["model.ramnet.num_factors"] == 1:
                run.update(METHOD_U1)
            else:
                run.update(METHOD, **{"train.ramnet_factors_start": start_factors(run["model.ramnet.factor_size"])})
                if regime == "paper_both":
                    run.update(TOP_K_ANNEAL)
            run["train.num_seeds"] = 2
            # Figure 3's rate for RAM-Net in this regime (now configs/mqar.py's default for it): at 1e-3 no row
            # learned in 3000 steps (experiments/results/fig4_ramnet_ablations.md, 2026-12-03). Explicit, so
            # the runs' directory names differ from those lr 1e-3 runs and never resume them.
            run["optim.learning_rate"] = 1e-2 if regime == "paper_lr1e-2" else 3e-3
            # Microbatches (the same gradient) against RAM-Net's per-token K-slot copies, which grow with d_v and
            # with the annealed K: XLA:CPU's buffer assignment of the two-seed step at length 256 is 7.6 GB at d_v
            # 64 with 2, 7.8 GB at d_v 256 with 4, 17 GB for U = 1 at K 32 with 4 (2026-12-03); an H200 needed
            # ~3x that for RAM-Net at d_model 256 in the Figure-3 grid.
            if run["train.ramnet_top_k_start"]:
                # K 32 early (U = 1, and every `paper_both` row) holds 4x the copies of K 8: 4 microbatches at
                # d_v 64, scaled with d_v. XLA:CPU's buffer assignment of the step at K 32, length 256: 9.7 GB at
                # d_v 64 (4), 6.6 GB at d_v 256 (16), against U = 1's 17 GB, which held ~30 GB of an H200.
                run["train.microbatches"] = max(4, 4 * run["model.ramnet.d_v"] // 64)
            else:
                run["train.microbatches"] = 4 if run["model.ramnet.d_v"] > 64 else 2
            if run["model.ramnet.d_v"] > 64:
                # Evaluation is not microbatched: at d_v 256 a batch of 125 at length 1024 asked for 16.6 GiB more
                # than the row's 0.25 of an H200 and ended the run at its first evaluation (2026-12-03). Results
                # do not depend on the evaluation batch.
                run["data.eval_batch_size"] = 25
    return runs


def memory_fraction(run: dict):
    """The paper rows' shares of an H200 (the sweep packs runs by them; see the microbatches above): U = 1 with
    its top-K anneal from 32 and d_v 256 the largest, then the rows annealing top-K (`paper_both`). None (the
    launcher's even split) for the first regime. On the GPU (2026-12-03) the 0.12 rows held 16-19 GB and one program
    30 GB, by elimination U = 1 (nvidia-smi does not name the row)."""
    if run.get("train.num_seeds", 1) == 1:
        return None
    if run["model.ramnet.num_factors"] == 1:
        return 0.35
    if run["train.ramnet_top_k_start"]:
        return 0.2
    return 0.25 if run["model.ramnet.d_v"] > 64 else 0.12
