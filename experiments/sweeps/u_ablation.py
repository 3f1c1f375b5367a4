"""Issue 16, section 2: the U ablation at M = 1024 with the top-K anneal on (configs/mqar.py:ramnet,fig4: K 32 ->
16 -> 8 over 500 steps, 1000 steps, K = 8 at evaluation), 3 seeds per U:

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/u_ablation.py \
      --workdir runs/u_ablation --max-parallel 12

U 1, 2, 5, 10 with d_p 1024, 32, 4, 2 (d_p^U = 1024 each). U = 1 is a single softmax over all 1024 slots (its
top-K is exact); U = 10 a beam search over ten 2-way factors. The paper's claim: at a fixed M, accuracy does not
fall with more factors (fewer parameters in the address: U x d_p = 1024, 64, 20, 20 logits per head).
Results: experiments/results/large_memory.md.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "model.ramnet.num_factors", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.top_k"]}


FACTORISATIONS = {1: 1024, 2: 32, 5: 4, 10: 2}  # U -> d_p, d_p^U = 1024


# What these runs trained with when their results were recorded: the top-K anneal 32 -> 8 over 500 steps, then
# the fig4 default. The factor schedule has since replaced it as the default (configs/mqar.py).
FIXED = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500, "train.ramnet_factors_start": 0}


def get_sweep(num_factors: str = ""):
    """Every U, or only the one named (`u_ablation.py:1`: the U = 1 runs, 3-4x slower per step than the others)."""
    chosen = sorted(FACTORISATIONS)
    if num_factors:
        if not num_factors.isdigit() or int(num_factors) not in FACTORISATIONS:
            raise ValueError(f"u_ablation.py: unknown U {num_factors!r}; known: {chosen}")
        chosen = [int(num_factors)]
    factors = zipped(values("model.ramnet.num_factors", chosen),
                     values("model.ramnet.factor_size", [FACTORISATIONS[u] for u in chosen]))
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(factors, seeds)
