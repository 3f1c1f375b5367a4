"""Issue 16, section 2: the U ablation at M = 1024 with the top-K anneal on (configs/mqar.py:ramnet,fig4: K 32 ->
16 -> 8 over 500 steps, 1000 steps, K = 8 at evaluation), 3 seeds per U:

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/u_ablation.py \
      --workdir runs/u_ablation --max-parallel 12

U 1, 2, 5, 10 with d_p 1024, 32, 4, 2 (d_p^U = 1024 each). U = 1 is a single softmax over all 1024 slots (its
top-K is exact); U = 10 a beam search over ten 2-way factors. The paper's claim: at a fixed M, accuracy does not
fall with more factors (fewer parameters in the address: U x d_p = 1024, 64, 20, 20 logits per head).
With the factor schedule instead (U = 1 keeps the top-K anneal: it has no factor to hold):

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/u_ablation.py:factors \
      --workdir runs/u_ablation_factors --max-parallel 12

Results: experiments/results/large_memory.md.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "model.ramnet.num_factors", "y": ["eval/accuracy/mean"]}  # a line per seed


FACTORISATIONS = {1: 1024, 2: 32, 5: 4, 10: 2}  # U -> d_p, d_p^U = 1024


# What these runs trained with when their results were recorded: the top-K anneal 32 -> 8 over 500 steps, then
# the fig4 default. The factor schedule has since replaced it as the default (configs/mqar.py).
BASE = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500, "train.ramnet_factors_start": 0}


# With the factor schedule (`u_ablation.py:factors`): U -> factors active at the start, about 64 slots (d_p^start),
# growing to U over 600 steps. U = 1 has no factor to hold, so it keeps the top-K anneal (BASE).
FACTORS_START = {1: 0, 2: 1, 5: 3, 10: 6}


def get_sweep(argument: str = ""):
    """Every U with the top-K anneal; `u_ablation.py:U` (e.g. `:1`, the U = 1 runs, 3-4x slower per step than the
    others) one U of them; `u_ablation.py:factors` every U with the factor schedule (FACTORS_START)."""
    chosen = sorted(FACTORISATIONS)
    if argument and argument != "factors":
        if not argument.isdigit() or int(argument) not in FACTORISATIONS:
            raise ValueError(f"u_ablation.py: unknown argument {argument!r}; a U of {chosen}, or 'factors'")
        chosen = [int(argument)]
    factors = zipped(values("model.ramnet.num_factors", chosen),
                     values("model.ramnet.factor_size", [FACTORISATIONS[u] for u in chosen]))
    if argument == "factors":
        for run in factors:
            start = FACTORS_START[run["model.ramnet.num_factors"]]
            if start:
                run.update({"train.ramnet_top_k_start": 0, "train.ramnet_factors_start": start,
                            "train.ramnet_factors_grow_steps": 600})
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(factors, seeds)
