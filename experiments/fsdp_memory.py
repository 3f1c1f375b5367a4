"""Per-device memory of the compiled train step under different meshes: FSDP divides parameters + optimizer state.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/fsdp_memory.py \\
      --config configs/mqar.py:ramnet --meshes "8,1,1 4,2,1 2,4,1 1,8,1 2,2,2" [--config.FIELD=VALUE ...]

Compiles (does not run) the train step of the config on each (data, fsdp, tensor) mesh and reads XLA's memory
analysis; writes a Markdown table with device, versions, date and command to --results.
"""

from __future__ import annotations

import copy
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from ramjax import timing
from ramjax.train.setup import step_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/mqar.py:ramnet"), "training config")
flags.DEFINE_string("meshes", "8,1,1 4,2,1 2,4,1 1,8,1 2,2,2", "space-separated DATA,FSDP,TENSOR meshes")
flags.DEFINE_string("results", "experiments/results/fsdp_memory.md", "the Markdown file written")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    rows = []
    for mesh in args.meshes.split():
        config = copy.deepcopy(_CONFIG.value)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(x) for x in mesh.split(","))
        memory = step_memory(config)
        rows.append(memory)
        print(memory, flush=True)
    base = rows[0]["state_bytes_per_device"]
    lines = ["| mesh (data, fsdp, tensor) | params + optimizer per device (MB) | vs first row | step arguments (MB) | "
             "step temporaries (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        m = r["mesh"]
        lines.append(f"| ({m['data']}, {m['fsdp']}, {m['tensor']}) | {r['state_bytes_per_device'] / 1e6:.2f} | "
                     f"{base / r['state_bytes_per_device']:.2f}x smaller | {r['argument_bytes'] / 1e6:.2f} | "
                     f"{r['temp_bytes'] / 1e6:.2f} |")
    text = ("# Train-step memory per device by mesh\n\n" + timing.environment_lines() +
            f"- {jax.device_count()} devices; compiled, not run\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(args.results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
