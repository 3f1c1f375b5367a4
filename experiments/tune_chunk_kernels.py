"""Times every chunked-op kernel (kernels/chunk_common.py's `call`) under each Triton launch setting, from one
profiler trace per (setting, op): which num_warps / num_stages each kernel wants.

  python experiments/tune_chunk_kernels.py --ops gla,gated_delta --shape 8x4096 --warps 2,4,8 --stages 1,2,3

Each setting is applied to every kernel at once (kernels.chunk_common.LAUNCH_BY_KERNEL["*"]), so one traced
forward + backward of an op gives each of its kernels' times under that setting; a kernel's best setting is then
its own, whatever the others'. Inputs as experiments/bench_linear_ops.py makes them (bf16 q, k, v; 16 heads of 64
by default). Prints, per op, a table of kernel x setting (ms per forward + backward call, device time) with each
kernel's best marked, and the op's wall time per call; writes it with device, versions and date to --results.
Set what it finds as defaults in LAUNCH_BY_KERNEL (by kernel name), or time a choice in the whole train step with
experiments/bench_models.py --config.kernel_settings="('kernels.chunk_common.LAUNCH_BY_KERNEL={...}',)".
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_linear_ops  # noqa: E402  (make_inputs, our_op)
from kernels import chunk_common  # noqa: E402
from ramjax import timing  # noqa: E402

# The names the chunk kernels pass to kernels.chunk_common.call (their pallas_call names).
KERNEL_NAME = re.compile(r"(gla_chunk_\w+|gated_delta_\w+|loglinear_chunk_\w+)")


def kernel_times(trace_dir: str, calls: int) -> dict[str, float]:
    """ms per call of each named kernel in the trace under trace_dir (device events; host ones on a CPU)."""
    events, processes = timing.trace_events(trace_dir)
    accelerators = {pid for pid, name in processes.items() if "GPU" in name or "TPU" in name}
    times = collections.Counter()
    for event in events:
        if accelerators and event.get("pid") not in accelerators:
            continue
        found = KERNEL_NAME.search(event.get("name", "") + " " + json.dumps(event.get("args", {})))
        if found:
            times[found.group(1)] += float(event.get("dur", 0.0)) / 1e3 / calls
    return dict(times)


def time_setting(op: str, inputs, chunk_size: int, calls: int) -> tuple[dict[str, float], float]:
    """(per-kernel ms per call, wall ms per call) of one op's jitted forward + backward under the current
    LAUNCH_BY_KERNEL (a fresh jit after clearing JAX's caches, so that the setting is traced in rather than a
    cached trace of the custom VJP's pieces reused)."""
    jax.clear_caches()
    forward = bench_linear_ops.our_op(op, "pallas", chunk_size)
    step = jax.jit(jax.grad(lambda *args: jnp.sum(forward(*args).astype(jnp.float32)),
                            argnums=tuple(range(len(inputs)))))
    wall = 1e3 * timing.time_call(step, *inputs, iters=calls)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(step(*inputs))
        return kernel_times(trace_dir, calls), wall


def table(op: str, settings: list[tuple[int, int]], results: dict) -> list[str]:
    names = sorted({name for kernels, _ in results.values() for name in kernels})
    head = [f"w{w} s{s}" for w, s in settings]
    lines = [f"### {op}", "", "| kernel | " + " | ".join(head) + " | best |", "|---" * (len(head) + 2) + "|"]
    for name in names:
        times = [results[setting][0].get(name) for setting in settings]
        known = [(t, i) for i, t in enumerate(times) if t is not None]
        best = min(known)[1] if known else None
        cells = [("-" if t is None else f"**{t:.3f}**" if i == best else f"{t:.3f}") for i, t in enumerate(times)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {head[best] if best is not None else '-'} |")
    walls = [results[setting][1] for setting in settings]
    lines.append("| (op, wall ms per call) | " + " | ".join(f"{w:.3f}" for w in walls) + " | "
                 f"{head[walls.index(min(walls))]} |")
    return lines + [""]


def _shape(text: str) -> tuple[int, int]:
    """"8x4096" -> (8, 4096); anything else is argparse's one-line error."""
    batch, sep, seq_len = text.lower().partition("x")
    if not sep or not batch.isdigit() or not seq_len.isdigit() or int(batch) < 1 or int(seq_len) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not BATCHxTIME of positive sizes (e.g. 8x4096)")
    return int(batch), int(seq_len)


def _dtype(text: str) -> str:
    if text not in ("bfloat16", "float16", "float32"):
        raise argparse.ArgumentTypeError(f"{text!r}: one of bfloat16, float16, float32")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="gla,gated_delta", help="of bench_linear_ops' ops with a pallas impl")
    parser.add_argument("--shape", type=_shape, default="8x4096", help="BATCHxTIME")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64, help="d_k (and d_v unless --dim_v)")
    parser.add_argument("--dim_v", type=int, default=None, help="d_v (default: --dim)")
    parser.add_argument("--dtype", type=_dtype, default="bfloat16")
    parser.add_argument("--chunk_size", type=int, default=64)
    parser.add_argument("--warps", default="2,4,8", help="num_warps values (GPU)")
    parser.add_argument("--stages", default="1,2,3", help="num_stages values (GPU)")
    parser.add_argument("--calls", type=int, default=5, help="traced (and timed) calls per setting")
    parser.add_argument("--results", default="experiments/results/tune_chunk_kernels.md")
    parser.add_argument("--setting", action="append", default=[],
                        help="a module switch for the whole run, 'package.module.NAME=value' (repeatable; "
                             "e.g. kernels.gated_delta_chunk.INVERSE_PRECISION=tf32x3)")
    args = parser.parse_args()
    batch, seq_len = args.shape
    settings = [(int(w), int(s)) for w in args.warps.split(",") for s in args.stages.split(",")]
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in ("gla", "simple_gla", "gated_delta", "loglinear_mamba2")]
    if unknown:
        raise SystemExit(f"tune_chunk_kernels: --ops {unknown[0]!r} has no pallas kernels here; known: gla, "
                         "simple_gla, gated_delta, loglinear_mamba2")
    command = "python experiments/tune_chunk_kernels.py " + shlex.join(sys.argv[1:])
    out = ["# Chunked-op kernels under each Triton launch setting (experiments/tune_chunk_kernels.py)", "",
           timing.environment_lines(command),
           f"{batch}x{seq_len}, {args.heads} heads, d_k {args.dim}, d_v {args.dim_v or args.dim}, {args.dtype}, "
           f"chunk {args.chunk_size}; device ms "
           f"per forward + backward call (mean of {args.calls} traced calls); w = num_warps, s = num_stages, applied "
           "to every kernel at once" + (f"; switches: {', '.join(args.setting)}" if args.setting else "") + ".", ""]
    for setting in args.setting:  # every switch checked before anything is traced
        try:
            timing.parse_module_setting(setting)
        except ValueError as error:
            raise SystemExit(f"tune_chunk_kernels: --setting: {error}") from None
    with timing.module_settings(args.setting):
        saved = dict(chunk_common.LAUNCH_BY_KERNEL)
        try:
            for op in ops:
                inputs = bench_linear_ops.make_inputs(op, batch, seq_len, args.heads, args.dim, jnp.dtype(args.dtype),
                                                      dim_v=args.dim_v)
                results = {}
                for warps, stages in settings:
                    chunk_common.LAUNCH_BY_KERNEL.clear()
                    chunk_common.LAUNCH_BY_KERNEL["*"] = {"num_warps": warps, "num_stages": stages}
                    results[warps, stages] = time_setting(op, inputs, args.chunk_size, args.calls)
                    print(f"{op} w{warps} s{stages}: wall {results[warps, stages][1]:.3f} ms", flush=True)
                lines = table(op, settings, results)
                out += lines
                print("\n".join(lines), flush=True)
                os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
                with open(args.results, "w") as f:
                    f.write("\n".join(out) + "\n")
        finally:
            chunk_common.LAUNCH_BY_KERNEL.clear()
            chunk_common.LAUNCH_BY_KERNEL.update(saved)
    print(f"wrote {args.results}", flush=True)


if __name__ == "__main__":
    main()
