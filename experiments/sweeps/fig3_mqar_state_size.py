"""RAM-Net Figure 3: mean MQAR accuracy against total recurrent state size, 2 layers, two widths, two learning
rates (each model plotted at its better one).

The paper's regime (Zoology's 7-setting suite, vocabulary 8192, d_model 128):
  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig3_mqar_state_size.py \
      --workdir runs/fig3 --max-parallel 3 --config.train.num_steps=6000

The small regime committed in experiments/results/fig3_mqar_state_size.md (configs/mqar.py's cpu sizes,
vocabulary 512, kv 4-32 up to length 128 in training, up to kv 64 / length 256 in evaluation, 1000 steps):
  ramjax sweep --config configs/mqar.py:ramnet,cpu --sweep experiments/sweeps/fig3_mqar_state_size.py \
      --workdir runs/fig3_small --devices 0,1,2,3 --max-parallel 12 \
      --config.data.vocab_size=512 --config.model.vocab_size=512 --config.train.num_steps=1000 \
      --config.train.eval_every=500 --config.data.train_settings=4:64,8:64,16:64,32:128 \
      --config.data.eval_settings=4:64,8:64,16:64,32:128,64:256

The paper's regime with the factor schedule, 2 seeds (issue 16, section 4): 39 programs (6 models x 3 widths x 2
learning rates, then RAM-Net at three smaller states), each training both seeds in one vmapped step
(train.num_seeds = 2; the table and plot show the mean over seeds, summary.json each seed's). Zoology's training
mixture up to length 256 (configs/mqar.py), the 7 settings up to length 1024 in evaluation. On one H200
(2026-12-03) eight programs sharing it advanced ~28 program-steps/s in all, and RAM-Net at d_model 256 held ~33 GB
per program where the others fit in 14 GB, so each run brings its own memory share (memory_fraction below) and
the sweep packs them onto the GPU by it:
  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig3_mqar_state_size.py:paper \
      --workdir runs/fig3_paper --max-parallel 8 --config.train.num_steps=3000 --config.train.eval_every=500
(--dry-run lists the indices and shares; `--runs 0-5,36-38` trains part of the grid into the same directory;
finished runs are skipped, unfinished ones resume from their checkpoints.) The whole grid is ~45 minutes of an
H200 at that rate; `--report` writes the table and plot of what has finished.

Zoology's layout (`fig3_mqar_state_size.py:zoology`): the same 36 programs with every model built as Zoology's
reference MQAR configs build theirs, a BaseConv layer (mixer kind base_conv) then the mixer, no MLP; RAM-Net
without its own conv and trained with both the factor schedule and the top-K anneal 32 -> 8 over 500 steps (in
this layout either alone stayed near chance at M 1024, K 8: experiments/results/ramnet_without_conv.md,
2026-12-03); Mamba-2, Gated DeltaNet and log-linear Mamba-2 keep the short conv their blocks have. The state
sizes are one mixer layer's. d_model 128 first (12 programs, ~15 minutes of an H200):
  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig3_mqar_state_size.py:zoology \
      --workdir runs/fig3_zoology --runs 2,3,8,9,14,15,20,21,26,27,32,33 --config.train.num_steps=3000 \
      --config.train.eval_every=500 --config.train.progress=False

The claim to test: RAM-Net is best at every state size. Width moves the baselines' state; RAM-Net's state is
heads x M x (d_v + 1), so its points move with d_v (zipped with the width here). Attention's "state" is its KV
cache at the longest evaluation length. Add (256, 256) to the zip for wider points.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "state_size", "y": ["eval/accuracy/mean"], "series": ["model.pattern"],
        "best_over": ["optim.learning_rate"]}


MODELS = ["ramnet", "gla", "mamba2", "gated_deltanet", "loglinear", "attention"]


def memory_fraction(run: dict):
    """Each paper-grid run's share of an H200's memory (the sweep packs runs by it): RAM-Net at d_model 256 held
    ~33 GB there (2026-12-03; it failed at 0.12 of the GPU), every other run trained within 0.12 (RAM-Net, and the
    d_model 256 baselines) or 0.10; Gated DeltaNet at d_model 128 once ran out of 0.10 (a 5.53 GiB allocation,
    up to nine programs on the GPU) and finished at 0.10 on a rerun, so it gets 0.12. None (the launcher's even split)
    for the small grid."""
    if run.get("train.num_seeds", 1) == 1:
        return None
    mixer = run["model.pattern"].split(",")[-1]  # Zoology's layout: "base_conv,MIXER"
    if mixer == "ramnet" and run["model.d_model"] == 256:
        return 0.3
    wider = mixer in ("ramnet", "gated_deltanet") or run["model.d_model"] == 256
    return 0.12 if wider else 0.1


def get_sweep(regime: str = ""):
    """The grid above, or `fig3_mqar_state_size.py:paper`: issue 16's rerun in the paper's regime with RAM-Net's
    factor schedule on (configs/mqar.py's default): widths 64, 128 and 256, two learning rates, seeds 0 and 1 in
    one program each (train.num_seeds = 2), then RAM-Net at the baselines' state sizes (runs 36-38); it resumes:
    rerun the same command."""
    if regime not in ("", "paper", "zoology"):
        raise ValueError(f"fig3_mqar_state_size.py: unknown regime {regime!r}; '' (the grid above), 'paper' or "
                         "'zoology'")
    models = values("model.pattern", MODELS)
    if regime == "zoology":
        return [zoology_layout(run) for run in get_sweep("paper")[:36]]
    if regime == "paper":
        widths = zipped(values("model.d_model", [64, 128, 256]), values("model.ramnet.d_v", [16, 64, 128]))
        # Seed i of a program initialises with train.init_seed + i and draws data.seed + i: seeds 0 and 1.
        grid = product(models, widths, values("optim.learning_rate", [3e-3, 1e-3]), values("train.num_seeds", [2]))
        # With M = 1024 RAM-Net's state (139k-1.06M numbers) sits above every recurrent baseline's (1k-65k): to
        # compare at equal state, RAM-Net at d_model 128 and lr 3e-3 (where it learned at every width, 2026-12-03)
        # with M = 64, 256, 256 slots and d_v 16, 16, 32: 8,704 / 34,816 / 67,584 numbers. Appended, so that the
        # indices and names of the runs above stay as they were.
        grid += product(values("model.pattern", ["ramnet"]), values("model.d_model", [128]),
                        zipped(values("model.ramnet.num_factors", [3, 4, 4]), values("model.ramnet.d_v", [16, 16, 32])),
                        values("optim.learning_rate", [3e-3]), values("train.num_seeds", [2]))
        # 2 microbatches (the same gradient, half the activations at a time) where XLA:CPU's buffer assignment of
        # the two-seed step at length 256 (the longest training length) is ~20 GB or more: RAM-Net (its sparse
        # read and write keep each token's K slots per head, [seeds, time, batch, heads x K, d_v + 1] fp32;
        # 12 GB at d_v 64, 21 GB at d_v 128) and every model at d_model 256 (Gated DeltaNet 27 GB, Mamba-2 20 GB;
        # at d_model 128 9-15 GB). On an H200 RAM-Net at d_model 256 still held ~33 GB per program: its share is
        # larger (memory_fraction below).
        return [dict(run, **{"train.microbatches": 2})
                if run["model.pattern"] == "ramnet" or run["model.d_model"] == 256 else run for run in grid]
    widths = zipped(values("model.d_model", [64, 128]), values("model.ramnet.d_v", [16, 64]))
    return product(models, widths, values("optim.learning_rate", [1e-2, 3e-3]))


# Zoology's MQAR layout (fig3_mqar_state_size.py:zoology): a BaseConv layer then the mixer, no MLP.
ZOOLOGY = {"model.num_layers": 2, "model.feed_forward": False}
# RAM-Net in that layout: no conv of its own, the top-K anneal on top of the factor schedule (configs/mqar.py's).
ZOOLOGY_RAMNET = {"model.ramnet.short_conv": 0, "train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500}


def zoology_layout(run: dict) -> dict:
    """A paper-grid run rebuilt in Zoology's layout (same width, rate, seeds and microbatches)."""
    mixer = run["model.pattern"]
    run = dict(run, **{"model.pattern": f"base_conv,{mixer}"}, **ZOOLOGY)
    return dict(run, **ZOOLOGY_RAMNET) if mixer == "ramnet" else run
