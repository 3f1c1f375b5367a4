"""Train-step memory from XLA's buffer assignment, compiled for the CPU (no GPU needed): the LM rows of
configs/bench_models.py:gpu (d_model 512, 8 layers, bf16) at one shape, with or without per-layer-group
rematerialisation. A proxy for the GPU's peak: the CPU compiler fuses differently, and its attention materialises
T x T (no flash attention), so the transformer row is not comparable.

  python experiments/step_memory_cpu.py gla,mamba2,gated_deltanet,loglinear_mamba2 16384 2 [nothing|dots]

The optional last argument turns model.remat on with that model.remat_policy.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402

import bench_models as bm  # noqa: E402
from ramjax.configs import load_config  # noqa: E402
from ramjax.train.setup import train_setup  # noqa: E402

if len(sys.argv) not in (4, 5) or (len(sys.argv) == 5 and sys.argv[4] not in ("nothing", "dots")):
    raise SystemExit("usage: python experiments/step_memory_cpu.py VARIANT[,VARIANT...] SEQ_LEN BATCH [nothing|dots]")
bench = load_config("configs/bench_models.py:gpu")
names = sys.argv[1].split(",")
seq_len, batch = int(sys.argv[2]), int(sys.argv[3])
variants = dict(bench.variants)
unknown = [n for n in names if n not in variants]
if unknown:
    raise SystemExit(f"step_memory_cpu: unknown variants {unknown}; configs/bench_models.py has {list(variants)}")
for name in names:
    config = bm.model_config(bench, variants[name], name=name)
    config.data.seq_len, config.data.batch_size = seq_len, batch
    config.model.remat = len(sys.argv) > 4
    config.model.remat_policy = sys.argv[4] if len(sys.argv) > 4 else "nothing"
    t0 = time.time()
    setup = train_setup(config)
    b = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding) for k, v in
         bm.random_batch(seq_len, batch, config.model.vocab_size, 0, setup.batch_sharding).items()}
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_rest, b).compile()
    mem = bm.compiled_memory(compiled)
    print(name, {k: round(v / 2**30, 2) for k, v in mem.items()}, f"{time.time() - t0:.0f} s", flush=True)
