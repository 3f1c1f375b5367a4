"""Throwaway-sized grid that chose the MQAR cpu defaults: python experiments/tune_mqar_cpu.py STEPS [names].
Results: experiments/results/mqar_tuning.md (run on the GPU machine for speed)."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(__file__))
from mqar_suite import load_config  # noqa: E402
from ramjax.train.trainer import train
from ramjax.train.metrics import read_metrics

GRID = [
    ("transformer", "transformer,cpu", {}),
    ("base", "cpu", {}),
    ("h4a1", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0}),
    ("h4a1k2", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.top_k": 2, "model.ramnet.factor_size": 16, "model.ramnet.d_v": 16}),
    ("h4u3", "cpu", {"model.num_heads": 4, "model.ramnet.num_factors": 3, "model.ramnet.factor_size": 4}),
    ("h4a1cape40", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.cape": "4,0"}),
    ("h4a1cape42", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.cape": "4,2"}),
    ("h4a1lr1e2", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "optim.learning_rate": 1e-2}),
    ("h4a1g05", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.gamma": 0.5}),
    ("h4a2", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 2.0}),
    ("d128h4a1", "cpu", {"model.d_model": 128, "model.num_heads": 4, "model.ramnet.alpha_init": 1.0}),
    ("gla", "gla,cpu", {}),
    ("mamba2", "mamba2,cpu", {}),
    ("gdn", "gated_deltanet,cpu", {}),
    ("loglinear", "loglinear_mamba2,cpu", {}),
    ("h4a1long", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "train.num_steps": 5000}),
    ("conv", "cpu", {"model.ramnet.short_conv": 4}),
    ("h4a1conv", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.short_conv": 4}),
    ("h4a1conv_nocape", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.short_conv": 4, "model.ramnet.cape": "none"}),
    ("h4a1conv_u3", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.short_conv": 4, "model.ramnet.num_factors": 3}),
    ("h4a1conv_d128", "ramnet", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.short_conv": 4, "data.batch_size": 64, "data.vocab_size": 256, "model.vocab_size": 256, "data.train_settings": "4:64,8:64,16:64", "data.mixture": "pad", "data.eval_settings": "4:64,8:64,16:64", "data.eval_examples": 500}),
    # Round 2, from the cpu default (4 heads, alpha 1, short conv 4, CAPE none): learning faster in fewer steps.
    ("cpu_default", "cpu", {}),
    ("lr5e3", "cpu", {"optim.learning_rate": 5e-3}),
    ("lr1e2", "cpu", {"optim.learning_rate": 1e-2}),
    ("k2", "cpu", {"model.ramnet.top_k": 2}),
    ("batch32", "cpu", {"data.batch_size": 32}),
    ("h2", "cpu", {"model.num_heads": 2}),
    ("wd0", "cpu", {"optim.weight_decay": 0.0}),
    ("lr5e3_wu50", "cpu", {"optim.learning_rate": 5e-3, "optim.warmup_steps": 50}),
    # Round 3: the new cpu default (lr 1e-2, 500 steps) over seeds.
    ("seed0", "cpu", {"train.init_seed": 0, "data.seed": 0, "train.num_steps": 500, "optim.learning_rate": 1e-2}),
    ("seed1", "cpu", {"train.init_seed": 1, "data.seed": 1, "train.num_steps": 500, "optim.learning_rate": 1e-2}),
    ("seed2", "cpu", {"train.init_seed": 2, "data.seed": 2, "train.num_steps": 500, "optim.learning_rate": 1e-2}),
    ("seed3", "cpu", {"train.init_seed": 3, "data.seed": 3, "train.num_steps": 500, "optim.learning_rate": 1e-2}),
    ("h4a1outnorm", "cpu", {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0, "model.ramnet.output_norm": True}),
]
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
out = os.environ.get("OUT", "/tmp/tune")
rows = []
for name, variant, over in GRID:
    if only and name not in only:
        continue
    cfg = load_config(variant)
    cfg.train.num_steps = steps
    cfg.train.eval_every = int(os.environ.get("EVAL_EVERY", 250))
    cfg.train.progress = False
    cfg.optim.learning_rate = 3e-3  # what rounds 1-2 ran at; entries that differ say so
    cfg.train.num_steps = over.get("train.num_steps", steps)
    for k, v in over.items():
        *ps, leaf = k.split(".")
        node = cfg
        for p in ps: node = node[p]
        node[leaf] = v
    t = time.time()
    try:
        s = train(cfg, f"/tmp/tune/{name}")
        evals = [(m["step"], m["eval/accuracy/kv8_len64"]) for m in read_metrics(f"/tmp/tune/{name}") if "eval/accuracy/kv8_len64" in m]
        rows.append((name, time.time() - t, s["train"]["steps_per_s"], evals))
    except Exception as e:
        rows.append((name, time.time() - t, 0, repr(e)[:300]))
    print(rows[-1], flush=True)
with open(os.path.join(out, "tune.json"), "w") as f:
    json.dump(rows, f)
