"""Issue 16, section 3: RAM-Net on MQAR without the short convolution, in the fig4 regime (configs/mqar.py:ramnet,fig4:
vocabulary 512, d_model 64, 2 layers, 4 heads, M = 1024 (U 5, d_p 4), K 8 at evaluation, top-K annealed 32 -> 8
over 500 steps, 1000 steps), 2 seeds per option:

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/no_conv.py \
      --workdir runs/no_conv --max-parallel 12

Options (all with model.ramnet.short_conv = 0): CAPE on every head or none, with and without a bias on W_q / W_k
(without one, a position-only address cannot form); the conv as the control. On the CPU (M = 64, no annealing,
500-2000 steps) none learned: the best, bias + CAPE on all heads, plateaued at 0.14
(experiments/results/ramnet_without_conv_cpu.md).
Results: experiments/results/ramnet_without_conv.md.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "model.ramnet.cape", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.qk_bias"]}


# What these runs trained with when their results were recorded: the top-K anneal 32 -> 8 over 500 steps, then
# the fig4 default. The factor schedule has since replaced it as the default (configs/mqar.py).
BASE = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500, "train.ramnet_factors_start": 0}


# `no_conv.py:factors`: the same question under the factor schedule (the default since; K = 8 on every step, the
# memory growing from 64 slots, where a read and the previous token's write meet often), trained 3000 steps.
FACTORS = {"train.ramnet_top_k_start": 0, "train.ramnet_top_k_anneal_steps": 0, "train.ramnet_factors_start": 3,
           "train.ramnet_factors_grow_steps": 600, "train.num_steps": 3000}


# `no_conv.py:dense`: the CPU's lead (experiments/results/ramnet_without_conv_cpu.md, 2026-12-02: at M = 64 a
# denser address, K 8 instead of 4, doubled the best accuracy without the conv): hold the memory at 64 slots for
# longer (factors 3 -> 5 over 3000 of 6000 steps, so K 8 reads 1/8 of the slots for 1000 steps), and the same with
# K 16 annealed to 8 over those 3000 steps; CAPE on every head started as a relative address, q/k bias.
DENSE = {"model.ramnet.short_conv": 0, "model.ramnet.qk_bias": True, "model.ramnet.cape": "all",
         "model.ramnet.cape_offset_bias": 2.0, "train.ramnet_factors_start": 3,
         "train.ramnet_factors_grow_steps": 3000, "train.num_steps": 6000}


# `no_conv.py:dense_long`: K 8 of DENSE, whose better seed was still rising at step 6000 (0.214 -> 0.235 over the last
# 500 steps; experiments/results/ramnet_without_conv.md, 2026-12-02 18:23): 12000 steps, 4 seeds in one program.
# It sets no top-K fields, so BASE's anneal (32 -> 8 over the first 500 steps) applies, as it did in the recorded
# run (2026-12-02 22:54: 0.452 mean at step 12000, every seed 0.37-0.52).
DENSE_LONG = dict(DENSE, **{"train.num_steps": 12000, "train.num_seeds": 4})


# `no_conv.py:zoology`: Zoology's MQAR layout, which the paper's MQAR setup comes from: a BaseConv layer (a gated
# short conv of width 3, mixer kind "base_conv") then one RAM-Net layer with no conv of its own, no MLP. On the CPU
# (M = 64, K 4; experiments/results/ramnet_without_conv_cpu.md, 2026-12-03) it stayed at 0.09-0.11 with K 4 on
# every step and learned (0.985-0.986 at step 500) with K 16, or K 32 annealed to 4. At M = 1024, K 8 (this
# regime on the CPU) the factor schedule stayed at 0.051 by step 1000 (seed 0), and with the top-K anneal 32 -> 8
# added it reached 0.910 / 0.982 (seeds 0 / 1). Here: the factor schedule, the top-K anneal, both, or neither,
# 3 seeds in one program each, and attention in the same layout as the control.
ZOOLOGY = {"model.pattern": "base_conv,ramnet", "model.num_layers": 2, "model.ramnet.short_conv": 0,
           "model.feed_forward": False, "train.num_seeds": 3}


def single(fields: dict):
    """The grid of one run with these field values."""
    return product(*(values(field, [value]) for field, value in fields.items()))


def get_sweep(which: str = ""):
    """The options above; `no_conv.py:offset`: CAPE heads started as relative addresses
    (model.ramnet.cape_offset_bias; q/k bias on) on layer 0 only or on both layers, at two bias strengths;
    `no_conv.py:factors`: four of these options under the factor schedule, 3000 steps (FACTORS); `no_conv.py:dense`:
    the memory held at 64 slots longer, with K 8 or K 16 annealed to 8 (DENSE), 6000 steps; `no_conv.py:dense_long`:
    its K 8 for 12000 steps, 4 seeds in one program (DENSE_LONG); `no_conv.py:zoology`: Zoology's layout, a
    BaseConv layer then RAM-Net without its own conv (ZOOLOGY)."""
    if which == "zoology":
        methods = zipped(values("train.ramnet_factors_start", [3, 0, 3, 0]),
                         values("train.ramnet_top_k_start", [0, 32, 32, 0]),
                         values("train.ramnet_top_k_anneal_steps", [0, 500, 500, 0]))
        # Appended after the first GPU run (indices 0-4 stay): both methods in the configs' own layout (RAM-Net
        # with its short conv, an MLP after each mixer), the question being whether the top-K anneal can join the
        # factor schedule as a default without costing that layout anything (`--runs 5`). Answer (GPU, 2026-12-03):
        # the same 0.999 at step 1000, later and dearer on the way; the default stays (large_memory.md).
        own_layout = single({"train.num_seeds": 3, "train.ramnet_factors_start": 3, "train.ramnet_top_k_start": 32,
                             "train.ramnet_top_k_anneal_steps": 500})
        return (product(single(ZOOLOGY), methods) + single(dict(ZOOLOGY, **{"model.pattern": "base_conv,attention"}))
                + own_layout)
    if which == "dense_long":
        return single(DENSE_LONG)
    if which == "dense":
        options = product(single(DENSE),
                          zipped(values("train.ramnet_top_k_start", [0, 16]),
                                 values("train.ramnet_top_k_anneal_steps", [0, 3000])))
    elif which == "factors":
        options = zipped(values("model.ramnet.short_conv", [0, 0, 0, 0]),
                         values("model.ramnet.qk_bias", [True, False, True, True]),
                         values("model.ramnet.cape", ["all", "all", "all", "4,0"]),
                         values("model.ramnet.cape_offset_bias", [0.0, 0.0, 2.0, 2.0]),
                         *(values(field, [value] * 4) for field, value in FACTORS.items()))
    elif which == "offset":
        options = zipped(values("model.ramnet.short_conv", [0, 0, 0, 0]),
                         values("model.ramnet.qk_bias", [True, True, True, True]),
                         values("model.ramnet.cape", ["4,0", "4,0", "all", "all"]),
                         values("model.ramnet.cape_offset_bias", [2.0, 4.0, 2.0, 4.0]))
    elif which:
        raise ValueError(f"no_conv.py: unknown option set {which!r}; known: '' (default), 'offset', 'factors', "
                         "'dense', 'dense_long', 'zoology'")
    else:
        options = zipped(values("model.ramnet.short_conv", [0, 0, 0, 4]),
                         values("model.ramnet.qk_bias", [True, True, False, False]),
                         values("model.ramnet.cape", ["all", "none", "all", "none"]))
    seeds = zipped(values("train.init_seed", [0, 1]), values("data.seed", [0, 1]))
    return product(options, seeds)
