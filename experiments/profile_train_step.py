"""Where a model's train step spends its time: a profiler trace of the step, summed per XLA op and per source
scope (the layer and the function each op came from).

  python experiments/profile_train_step.py --only gla,mamba2 --shape 4096x8
  python experiments/profile_train_step.py --config configs/bench_models.py:cpu --only gla --shape 64x2   # CPU

The models and overrides are those of experiments/bench_models.py (same config file and --config.FIELD=VALUE
overrides, e.g. --config.model_overrides="model.dtype=bfloat16 model.d_model=1024", same --only names). Per
variant: compile the train step, warm it up, trace --steps steps with `jax.profiler` (perfetto trace), then
sum the device time of every XLA op (the events carry the HLO op name) and map each op to the `op_name`
metadata of its HLO instruction (the jax source path: module, function, primitive). Prints and appends to
--results, with device, versions, date and command: the step time, the traced device time, the --top ops, and
the time per scope (the op_name cut to --depth path components, transformations dropped).

  python experiments/profile_train_step.py --trace runs/ad_mqar/profile --steps 5

--trace summarises a trace already written, e.g. by a training run's `train.profile_steps = (start, stop)`
(then --steps is stop - start): the device's busy time against the traced wall time (a step that keeps the
device idle is waiting on the host), the top device ops and the host's top events. There is no compiled module
to map ops to source paths, so the op names are XLA's.
"""

from __future__ import annotations

import collections
import os
import re
import shlex
import sys
import tempfile
import time

# On GPUs XLA replays whole runs of ops as CUDA command buffers (graphs), and the trace then shows one event per
# buffer with no op or source path (seen on an H200: five "command_buffer_N" rows for the whole step). Off while
# profiling, so every op is its own event; set before JAX starts its backend. (The step time is then slightly
# higher than the scoreboard's.)
if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_models import model_config, random_batch, select_variants, token_options  # noqa: E402
from ramjax import timing  # noqa: E402
from ramjax.train.setup import train_setup  # noqa: E402

# jax transformation wrappers in op_name paths: "jvp(LanguageModel)" -> "LanguageModel"
_WRAPPER = re.compile(r"^(?:jit|jvp|transpose|vmap|remat|checkpoint|pjit|custom_vjp_call|custom_jvp_call|"
                      r"shard_map|while|scan|cond|body|rematted_computation)\((.*)\)$")


# HLO ops whose events contain other ops' events (on the CPU, where the host runs the loops).
_CONTAINERS = ("while", "conditional", "call")


# op_name components that only say "inside a loop" (the scan over layers, a chunk scan).
_CONTROL = ("while", "body", "cond", "closed_call", "checkpoint", "remat")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jax source path), from the compiled module's text. A
    fusion's name maps to the op_name of its root, as XLA copies it."""
    names = {}
    for match in re.finditer(r"%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]*)\"", hlo_text):
        names[match.group(1)] = match.group(2)
    return names


def scope(op_name: str, depth: int) -> str:
    """op_name cut to `depth` components, with jit(...)/jvp(...) wrappers unwrapped and the train step's own
    jit dropped; the last component (the primitive) is kept only when the path is shorter."""
    parts = []
    for part in op_name.split("/"):
        while (m := _WRAPPER.match(part)) is not None:
            part = m.group(1)
        if part and not part.startswith("train_step") and part not in _CONTROL:
            parts.append(part)
    return "/".join(parts[:depth]) or "(no source path)"


def device_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of XLA ops on the accelerator (the host's, on a CPU-only machine)."""
    events, processes = timing.trace_events(trace_dir)
    accelerators = {pid for pid, name in processes.items() if "GPU" in name or "TPU" in name}
    keep = accelerators or set(processes)
    return [e for e in events if e.get("pid") in keep and "hlo_op" in e.get("args", {})]


def summarise_trace(trace_dir: str, steps: int, top: int) -> str:
    """A trace written elsewhere: the device's busy time per step against the traced span, its top ops, and the
    host's top events (per step)."""
    events, processes = timing.trace_events(trace_dir)
    accelerators = {pid for pid, name in processes.items() if "GPU" in name or "TPU" in name}
    device = [e for e in events if e.get("pid") in accelerators and "hlo_op" in e.get("args", {})]
    host = [e for e in events if e.get("pid") not in accelerators]
    lines = [f"### trace {trace_dir} ({steps} steps)", ""]
    if device:
        start = min(float(e["ts"]) for e in device)
        end = max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in device)
        busy = sum(float(e.get("dur", 0.0)) for e in device)
        lines += [f"- device ops: {busy / 1e3 / steps:.2f} ms per step over a span of {(end - start) / 1e3 / steps:.2f} "
                  f"ms per step (busy {100 * busy / max(end - start, 1e-9):.0f}%), {len(device) / steps:.0f} op "
                  "events per step", ""]
        per_op = collections.Counter()
        for e in device:
            per_op[e["args"]["hlo_op"]] += float(e.get("dur", 0.0)) / steps
        lines += [f"Top {top} device ops:", "", "| op | ms per step | count per step |", "|---|---|---|"]
        counts = collections.Counter(e["args"]["hlo_op"] for e in device)
        for op, us in per_op.most_common(top):
            lines.append(f"| {op} | {us / 1e3:.3f} | {counts[op] / steps:.1f} |")
    else:
        lines.append("- no device op events in the trace (a CPU-only run: the host events below are the ops)")
    per_host = collections.Counter()
    for e in host:
        per_host[e.get("name", "?")[:90]] += float(e.get("dur", 0.0)) / steps
    lines += ["", f"Top {top} host events (inclusive: nested events count in each):", "",
              "| event | ms per step |", "|---|---|"]
    for name, us in per_host.most_common(top):
        lines.append(f"| {name} | {us / 1e3:.3f} |")
    return "\n".join(lines) + "\n"


def profile(config, seq_len, batch, args, bench) -> dict:
    config.data.seq_len, config.data.batch_size = seq_len, batch
    setup = train_setup(config, devices=jax.devices()[:1])
    data = random_batch(seq_len, batch, config.data.vocab_size, 0, setup.batch_sharding, **token_options(bench))
    abstract_batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in data.items()}
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_rest, abstract_batch).compile()
    names = hlo_op_names(compiled.as_text())
    state, rest = setup.init_state(), setup.init_rest()
    for _ in range(2):
        state, metrics = compiled(state, rest, data)
        jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, rest, data)
            jax.block_until_ready((state, metrics))
        step_ms = 1e3 * (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        events = device_events(trace_dir)
    per_op, per_scope, per_part = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        op = e["args"]["hlo_op"]
        if op.split(".")[0] in _CONTAINERS:  # (the CPU's events nest: a loop spans its body's ops)
            continue
        us = float(e.get("dur", 0.0)) / args.steps
        per_op[op] += us
        per_scope[scope(names.get(op, ""), args.depth)] += us
        per_part[scope(names.get(op, ""), 2)] += us
    return {"step_ms": step_ms, "device_ms": sum(per_op.values()) / 1e3, "per_op": per_op, "per_scope": per_scope,
            "per_part": per_part, "names": names}


def report(name, shape, result, args) -> str:
    lines = [f"### {name} at {shape}: step {result['step_ms']:.1f} ms (traced, wall), device ops "
             f"{result['device_ms']:.1f} ms per step", "",
             "Per part (op_name cut to 2 components: mixer_KIND/op is the sequence op, mixer_KIND the rest of the "
             "layer, mlp, the loss and optimiser outside):", "",
             "| part | ms per step | share |", "|---|---|---|"]
    total = max(result["device_ms"], 1e-9)
    for key, us in result["per_part"].most_common(args.top):
        lines.append(f"| {key} | {us / 1e3:.2f} | {100 * us / 1e3 / total:.1f}% |")
    lines += ["", f"Per scope (op_name cut to {args.depth} components):", "",
              "| scope | ms per step | share |", "|---|---|---|"]
    for key, us in result["per_scope"].most_common(args.top):
        lines.append(f"| {key} | {us / 1e3:.2f} | {100 * us / 1e3 / total:.1f}% |")
    lines += ["", f"Top {args.top} XLA ops:", "", "| op | ms per step | share | source |", "|---|---|---|---|"]
    for op, us in result["per_op"].most_common(args.top):
        source = result["names"].get(op, "")
        lines.append(f"| {op} | {us / 1e3:.2f} | {100 * us / 1e3 / total:.1f}% | {source[-120:]} |")
    return "\n".join(lines) + "\n"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/bench_models.py:gpu"),
                                          "bench_models config[:variant]")
flags.DEFINE_string("only", None, "variant names, comma-separated (bench_models --only)")
flags.DEFINE_string("shape", "4096x8", "seq_len x batch")
flags.DEFINE_integer("steps", 3, "traced steps (times are per step)")
flags.DEFINE_integer("top", 25, "ops and scopes listed")
flags.DEFINE_integer("depth", 3, "op_name components per scope")
flags.DEFINE_string("results", "experiments/results/profile_train_step.md", "the Markdown file appended to")
flags.DEFINE_string("trace", None, "summarise the trace under this directory (e.g. a run's train.profile_steps "
                    "trace) instead of profiling bench_models variants; --steps: the traced steps")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    bench = _CONFIG.value
    seq_len, batch = map(int, args.shape.lower().split("x"))
    env = timing.environment()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = [f"## {env['date']}", "", timing.environment_lines(command)]
    if args.trace:
        text = summarise_trace(args.trace, args.steps, args.top)
        print(text, flush=True)
        with open(args.results, "a") as f:
            f.write("\n".join(out + [text]) + "\n")
        print(f"appended to {args.results}")
        return
    for name, overrides in select_variants(bench.variants, args.only, bench.baseline):
        config = model_config(bench, dict(overrides), name=name)
        try:
            text = report(name, args.shape, profile(config, seq_len, batch, args, bench), args)
        except Exception as error:  # one model's failure is a line, not the end of the run
            text = f"### {name} at {args.shape}: failed: {type(error).__name__}: {str(error)[:300]}\n"
        print(text, flush=True)
        out.append(text)
    with open(args.results, "a") as f:
        f.write("\n".join(out) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    app.run(main)
