"""The model scoreboard: whole-model training throughput and memory of every LM variant, in one process.

  python experiments/bench_models.py --config configs/bench_models.py:gpu
  python experiments/bench_models.py --config configs/bench_models.py:gpu --shapes 4096x8 --append   # one shape
  python experiments/bench_models.py --config configs/bench_models.py:gpu --only ramnet --shapes 16384x2 \
      --results experiments/results/bench_models_ramnet.md
  python experiments/bench_models.py --config configs/bench_models.py:cpu        # tiny models, on a laptop
  python experiments/bench_models.py --config configs/bench_models.py:gpu --only transformer \
      --variant "ramnet:pallas:xla model.pattern=ramnet model.ramnet.impl=pallas model.ramnet.decoder_impl=xla"
  python experiments/bench_models.py --config configs/bench_models.py:gpu --only ramnet \
      --config.model_overrides="model.dtype=bfloat16 model.d_model=1024"

Each row is one (variant, shape): the configs/lm.py model with the variant's config overrides, and the train step
exactly as `ramjax train` builds it (ramjax.train.setup.train_setup: AdamW, one jit with explicit shardings,
donated state), fed random tokens (no dataset; drawn as text's are, by default: token_distribution "zipf"). The step is lowered and compiled ahead of time (compile s), run
`warmup_steps` times, then timed over `steps` steps one at a time (block_until_ready): the median step time and
tokens/s = seq_len x batch / step time. Peak memory per device is XLA's memory analysis of the compiled step
(arguments + outputs - donated aliases + temporaries). "x transformer" divides by the baseline variant measured
in this run at the same shape (the baseline always runs). A row that fails (out of memory, compile error) is
recorded with its error and the run goes on. The Markdown table and a JSON file of the raw rows beside it are
rewritten after every row, so a run cut short keeps what it measured.

Options: --config FILE[:VARIANT] and --config.FIELD=VALUE (the bench config: e.g. --config.model_overrides="
FIELD=VALUE ..." for every model config), --only NAME[,NAME] (a variant's name, or its name up to the first
":"), --shapes SEQxBATCH[,...], --variant "NAME FIELD=VALUE ..." (an extra row with its own overrides;
repeatable; an item "set:package.module.NAME=VALUE" sets a module switch for that row alone, e.g. "gdn:tf32
model.pattern=gated_deltanet set:kernels.gated_delta_chunk.INVERSE_PRECISION=tf32x3", so that switches are timed
against one baseline in one run; config.kernel_settings sets them for every row), --steps, --warmup,
--num_devices, --results, and --append: keep the results file's rows at the shapes this run does not measure
(the whole scoreboard one shape per command, within a time limit per command; every shape's rows, the baseline's
included, still come from one run). FIELD=VALUE items are parsed as --config.FIELD=VALUE would be
(ramjax.configs.override).
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from ramjax import timing
from ramjax.configs import error_message, load_config, override
from ramjax.train.setup import train_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- configs -----------------------------------------------------------------------------------------------------


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """"1024x32,4096x8" -> ((1024, 32), (4096, 8)): (seq_len, batch) pairs."""
    shapes = []
    for item in text.split(","):
        seq_len, sep, batch = item.strip().lower().partition("x")
        if not sep or not seq_len.isdigit() or not batch.isdigit() or int(seq_len) < 1 or int(batch) < 1:
            raise SystemExit(f"bench_models: --shapes: {item!r} is not SEQ_LENxBATCH of positive sizes (e.g. "
                             "1024x32)")
        shapes.append((int(seq_len), int(batch)))
    return tuple(shapes)


def select_variants(variants, only: str | None, baseline: str) -> list[tuple[str, dict]]:
    """The variants named in `only`, the baseline first.

    A name picks the variant of that exact name; a name no variant has picks every variant whose name up to its
    first ":" is that name ("gla" is the row "gla" alone; "ramnet" with no row "ramnet" would pick "ramnet:...").
    """
    variants = [(name, dict(overrides)) for name, overrides in variants]
    if only is None:
        chosen = variants
    else:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        chosen = []
        for want in wanted:
            matches = ([v for v in variants if v[0] == want]
                       or [v for v in variants if v[0].split(":")[0] == want])
            if not matches:
                raise SystemExit(f"bench_models: --only: no variant {want!r}; variants: "
                                 f"{', '.join(name for name, _ in variants)}")
            chosen += [m for m in matches if m not in chosen]
    base = [v for v in variants if v[0] == baseline]
    if base and base[0] not in chosen:
        chosen.insert(0, base[0])
    return sorted(chosen, key=lambda v: v[0] != baseline)  # stable: the baseline first, then in order


def _model_config_spec(spec: str) -> str:
    path, sep, variant = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    return path + sep + variant


def parse_items(text: str) -> list[str]:
    """"model.dtype=bfloat16 model.d_model=1024" -> FIELD=VALUE items (shell-style words)."""
    items = shlex.split(text)
    bad = [item for item in items if "=" not in item]
    if bad:
        raise SystemExit(f"bench_models: {bad[0]!r} is not FIELD=VALUE")
    return items


SETTING_PREFIX = "set:"  # a variant item "set:package.module.NAME=value": a module switch for that row only


def row_settings(overrides: dict) -> list[str]:
    """The variant's module switches ("set:" items) as "package.module.NAME=value" settings."""
    return [f"{field[len(SETTING_PREFIX):]}={value}" for field, value in overrides.items()
            if field.startswith(SETTING_PREFIX)]


def model_config(bench, overrides: dict, *, name: str = "base"):
    """The training config of one row: bench.model_config, bench.model_overrides, then the row's own overrides
    (which define the row, so they win; "set:" items are module switches, not config fields). A field that does
    not exist is an error."""
    config = load_config(_model_config_spec(bench.model_config))
    items = parse_items(bench.model_overrides) + [f"{field}={value}" for field, value in overrides.items()
                                                  if not field.startswith(SETTING_PREFIX)]
    for item in items:
        try:
            override(config, item)
        except ValueError as error:
            raise SystemExit(f"bench_models: {name}: cannot set {item!r}: {error}") from None
    return config


# --- one row -----------------------------------------------------------------------------------------------------


def random_tokens(shape, vocab_size: int, seed: int, distribution: str = "zipf", exponent: float = 1.0):
    """int32 token ids: "uniform", or "zipf": id of rank r drawn with probability proportional to r^-exponent, as
    in text (at exponent 1 over 258 bytes the commonest is ~16% of tokens, as ' ' is in source code), so that
    the embedding gradient's scatter-add contends as on real data (ramjax/ops/shared/embedding.py)."""
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        return rng.integers(0, vocab_size, size=shape, dtype=np.int32)
    if distribution != "zipf":
        raise ValueError(f"token_distribution: must be 'zipf' or 'uniform', got {distribution!r}")
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(exponent)
    ids = rng.permutation(vocab_size).astype(np.int32)  # which id has which rank
    return ids[rng.choice(vocab_size, size=shape, p=weights / weights.sum())]


def token_options(bench) -> dict:
    """random_tokens' distribution and exponent from a bench config (configs/bench_models.py)."""
    return {"distribution": bench.get("token_distribution", "zipf"), "exponent": bench.get("zipf_exponent", 1.0)}


def random_batch(seq_len: int, batch: int, vocab_size: int, seed: int, sharding, distribution: str = "zipf",
                 exponent: float = 1.0) -> dict:
    """An LM batch as the train step takes it (ramjax.data.lm.LMBatch): random tokens (random_tokens), targets the
    inputs shifted by one, every position counted, positions 0..seq_len-1 in every row (one document per row)."""
    tokens = random_tokens((batch, seq_len + 1), vocab_size, seed, distribution, exponent)
    fields = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), bool),
              "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))}
    return {name: jax.device_put(np.ascontiguousarray(value), sharding) for name, value in fields.items()}


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of a compiled function; {} where the backend gives none."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    out = {f"{name}_bytes": int(getattr(analysis, f"{name}_size_in_bytes", 0))
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    xla_peak = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)  # newer XLA, some backends only
    if xla_peak:
        out["xla_peak_memory_bytes"] = xla_peak
    return out


def measure(config, seq_len: int, batch: int, bench, devices, row: dict) -> None:
    """Compiles and times the train step of `config` at (seq_len, batch); fills `row` as it goes."""
    config.data.seq_len, config.data.batch_size = seq_len, batch
    setup = train_setup(config, devices=devices)
    row["params"] = setup.num_params
    data = random_batch(seq_len, batch, config.data.vocab_size, bench.seed, setup.batch_sharding,
                        **token_options(bench))
    abstract_batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in data.items()}
    start = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_rest, abstract_batch).compile()
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))
    state, rest = setup.init_state(), setup.init_rest()
    metrics = None
    for _ in range(bench.warmup_steps):
        state, metrics = compiled(state, rest, data)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(bench.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, rest, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    row.update(step_ms=1e3 * step_s, step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times),
               tokens_per_s=seq_len * batch / step_s)
    if metrics is not None:
        row["loss"] = float(metrics["loss"])  # ~ln(vocab) on random tokens; a NaN here is worth knowing
        if not np.isfinite(row["loss"]) or not float(metrics["finite"]):
            row["note"] = "non-finite loss or gradient"


def apply_xla_flags(flags: str) -> str:
    """Adds `flags` to XLA_FLAGS (a flag already set keeps its value); returns XLA_FLAGS. Only effective before
    JAX starts its backend (the first device query or array)."""
    current = os.environ.get("XLA_FLAGS", "")
    for flag in flags.split():
        if flag.partition("=")[0] not in current:
            current = f"{current} {flag}".strip()
    if current:
        os.environ["XLA_FLAGS"] = current
    return current


def _short(error: BaseException, limit: int = 240) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _process_peak_bytes(devices) -> int | None:
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


# --- the results file --------------------------------------------------------------------------------------------


def _sig(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def with_ratios(rows: list[dict], baseline: str) -> list[dict]:
    """The rows with tokens/s and memory divided by the baseline's at the same shape (None where it has none)."""
    base = {r["shape"]: r for r in rows if r["variant"] == baseline and "error" not in r}
    out = []
    for r in rows:
        b = base.get(r["shape"])
        r = dict(r)
        r["x_baseline_tokens_per_s"] = (r["tokens_per_s"] / b["tokens_per_s"]
                                        if b and "tokens_per_s" in r else None)
        r["x_baseline_memory"] = (r["peak_bytes"] / b["peak_bytes"]
                                  if b and r.get("peak_bytes") and b.get("peak_bytes") else None)
        out.append(r)
    return out


def table(rows: list[dict], baseline: str) -> str:
    lines = [f"| shape (seq x batch) | model | params | step ms | tokens/s | x {baseline} | peak memory GB | "
             f"x {baseline} memory | compile s | notes |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, spec):
        return "-" if value is None else spec(value)

    for r in with_ratios(rows, baseline):
        note = r.get("error") or r.get("note") or ""
        lines.append(" | ".join([
            f"| {r['shape']}", r["variant"], cell(r.get("params"), "{:,}".format),
            cell(r.get("step_ms"), _sig), cell(r.get("tokens_per_s"), "{:,.0f}".format),
            cell(r.get("x_baseline_tokens_per_s"), "{:.2f}x".format),
            cell(r.get("peak_bytes"), lambda b: _sig(b / 1e9)),
            cell(r.get("x_baseline_memory"), "{:.2f}x".format), cell(r.get("compile_s"), _sig),
            note.replace("|", "/") + " |"]))
    return "\n".join(lines)


def describe(bench, base, variants, devices) -> str:
    m, tokens = base.model, token_options(bench)
    r = m.ramnet
    lines = [
        f"Models: `{bench.model_config}` with {', '.join(parse_items(bench.model_overrides)) or 'no overrides'}"
        f": d_model {m.d_model}, {m.num_layers} layers, "
        f"{m.num_heads} heads, vocabulary {m.vocab_size}, compute {m.dtype} (parameters, optimizer state and loss "
        f"fp32); RAM-Net U {r.num_factors}, d_p {r.factor_size} (M = {r.factor_size ** r.num_factors} slots per "
        f"head), K {r.top_k}, d_v {r.d_v}. Optimiser AdamW as in training.",
        "",
        f"Each row: the train step `ramjax train` runs, on {len(devices)} device(s) (data parallel), fed random "
        f"tokens ({tokens['distribution']}"
        + (f", exponent {tokens['exponent']}" if tokens["distribution"] == "zipf" else "")
        + f"); compile s = trace + lower + XLA compile; then {bench.warmup_steps} warm-up steps and the median "
        f"of {bench.steps} timed steps (each to block_until_ready); tokens/s = seq_len x batch / median step. Peak "
        "memory per device: XLA's memory analysis of the compiled step (arguments + outputs - donated aliases + "
        f"temporaries). x {bench.baseline}: this row / {bench.baseline} at the same shape in this run.",
        "",
        "Variants (config overrides on top of the above; a row's own values win over model_overrides):",
        "",
    ]
    lines += [f"- {name}: " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "(none)")
              for name, overrides in variants]
    return "\n".join(lines)


def load_previous(path: str, device: str) -> tuple[list[dict], list[dict]]:
    """(rows, runs) of an earlier results JSON at `path` (for --append); none if there is no file. A file
    measured on another device is refused: its rows would not compare with this run's."""
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(json_path):
        return [], []
    with open(json_path) as f:
        saved = json.load(f)
    if saved.get("environment", {}).get("device") != device:
        raise SystemExit(f"bench_models: --append: {json_path} was measured on "
                         f"{saved.get('environment', {}).get('device')!r}, this is {device!r}; give a new --results")
    return saved.get("rows", []), saved.get("runs", [])


def earlier_runs(rows: list[dict], runs: list[dict], current: int) -> str:
    """Header lines naming the run of every shape that an earlier run (--append) measured."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("run", current) != current):
        run = runs[next(r["run"] for r in rows if r["shape"] == shape)]
        lines.append(f"- {shape}: an earlier run, {run['environment']['date']}: `{run['command']}`")
    return ("Shapes kept from earlier runs (--append; each shape's rows and ratios come from one run):\n\n" +
            "\n".join(lines) + "\n\n") if lines else ""


def write_results(path: str, head: str, rows: list[dict], bench, process_peak, runs: list[dict]) -> None:
    """The Markdown table (after `head`) at `path` and the raw rows in the JSON file beside it."""
    text = head + "\n" + earlier_runs(rows, runs, len(runs) - 1) + table(rows, bench.baseline) + "\n"
    if process_peak is not None:
        text += (f"\nProcess peak device memory so far (memory_stats peak_bytes_in_use, a running maximum over every "
                 f"row this run measured, not per model): {process_peak / 1e9:.2f} GB\n")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"environment": runs[-1]["environment"], "bench": bench.to_dict(), "header": head,
                   "process_peak_bytes_so_far": process_peak, "runs": runs, "rows": with_ratios(rows, bench.baseline)},
                  f, indent=2)


# --- main --------------------------------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """The command line (without the program name) parsed into its own flag values, so `main` may run more
    than once in a process (the tests)."""
    argv = ["bench_models"] + list(argv)
    f = flags.FlagValues()
    config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/bench_models.py:gpu"),
                                    "the bench config, FILE[:VARIANT]", flag_values=f, sys_argv=argv)
    flags.DEFINE_string("only", None, "run these variants (and the baseline), NAME[,NAME]", flag_values=f)
    flags.DEFINE_string("shapes", None, "SEQxBATCH[,...], e.g. 1024x32,16384x2", flag_values=f)
    flags.DEFINE_multi_string("variant", [], "an extra row: \"NAME FIELD=VALUE ...\" (repeatable)", flag_values=f)
    flags.DEFINE_integer("steps", None, "timed steps (default: the config's)", flag_values=f)
    flags.DEFINE_integer("warmup", None, "warm-up steps (default: the config's)", flag_values=f)
    flags.DEFINE_integer("num_devices", None, "devices (default: the config's)", flag_values=f)
    flags.DEFINE_string("results", None, "the Markdown file (default: the config's results_file)", flag_values=f)
    flags.DEFINE_bool("help", False, "print this script's description and its flags", flag_values=f,
                      short_name="h")
    flags.DEFINE_bool("append", False, "keep the results file's rows at the shapes this run does not measure (a "
                      "long scoreboard one shape per command); rows at this run's shapes are replaced", flag_values=f)
    try:
        rest = f(argv)
    except flags.Error as error:  # a config file's own error arrives with its traceback inside: its last line
        raise SystemExit(f"bench_models: {error_message(error)}") from None
    if f.help:  # absl's own --help needs the global flags; these are the script's own
        print(__doc__ + "\nFlags:\n" + f.main_module_help())
        raise SystemExit(0)
    if len(rest) > 1:
        raise SystemExit(f"bench_models: unexpected arguments {rest[1:]}")
    return f


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the scoreboard; returns the rows (also written to the results file and the JSON beside it)."""
    command = "python experiments/bench_models.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    bench = args.config
    for field, value in (("steps", args.steps), ("warmup_steps", args.warmup), ("num_devices", args.num_devices),
                         ("results_file", args.results)):
        if value is not None:
            bench[field] = value
    # Checked before anything runs: a bad value would otherwise fail every row and still rewrite the results file.
    for field, least in (("steps", 1), ("warmup_steps", 0), ("num_devices", 1)):
        if isinstance(bench[field], bool) or not isinstance(bench[field], int) or bench[field] < least:
            raise SystemExit(f"bench_models: {field}: must be an integer >= {least}, got {bench[field]!r}")
    if args.shapes:
        bench.shapes = parse_shapes(args.shapes)
    extra = []
    for text in args.variant:
        name, _, items = text.strip().partition(" ")
        extra.append((name, dict(item.partition("=")[::2] for item in parse_items(items))))
    variants = select_variants(bench.variants, args.only, bench.baseline) + extra
    if len({name for name, _ in variants}) < len(variants):
        raise SystemExit(f"bench_models: two variants share a name: {[name for name, _ in variants]}")
    try:
        timing.apply_module_settings(bench.kernel_settings)
    except ValueError as error:
        raise SystemExit(f"bench_models: config.{error}") from None
    xla_flags = apply_xla_flags(bench.xla_flags)  # before the first device query starts the backend
    if bench.num_devices > jax.device_count():
        raise SystemExit(f"bench_models: num_devices {bench.num_devices} but only {jax.device_count()} devices")
    devices = jax.devices()[:bench.num_devices]

    for name, overrides in variants:
        model_config(bench, overrides, name=name)  # every field and switch checked before the first compilation
        for setting in row_settings(overrides):
            try:
                timing.parse_module_setting(setting)
            except ValueError as error:
                raise SystemExit(f"bench_models: {name}: {error}") from None
        clash = sorted({item.partition("=")[0] for item in parse_items(bench.model_overrides)} & set(overrides))
        if clash:
            print(f"bench_models: {name} keeps its own {', '.join(clash)} (over model_overrides)", flush=True)
    head = ("# Model scoreboard: whole-model training throughput and memory\n\n" +
            timing.environment_lines(command) +
            (f"- XLA_FLAGS: `{xla_flags}`\n" if xla_flags else "") + "\n" +
            describe(bench, model_config(bench, {}), variants, devices) + "\n")
    print(head, flush=True)

    environment = timing.environment()
    kept, runs = load_previous(bench.results_file, environment["device"]) if args.append else ([], [])
    kept = [r for r in kept if (r["seq_len"], r["batch"]) not in {tuple(shape) for shape in bench.shapes}]
    runs = runs + [{"environment": environment, "command": command}]
    rows, done = [], 0
    total = len(bench.shapes) * len(variants)
    for seq_len, batch in bench.shapes:
        for name, _ in variants:
            row = {"shape": f"{seq_len}x{batch}", "seq_len": seq_len, "batch": batch, "variant": name,
                   "run": len(runs) - 1}
            print(f"[{done + 1}/{total}] {row['shape']} {name}: compiling and timing", flush=True)
            overrides = dict(variants)[name]
            config = model_config(bench, overrides, name=name)
            start = time.perf_counter()
            try:
                with timing.module_settings(row_settings(overrides)):
                    measure(config, seq_len, batch, bench, devices, row)
            except Exception as error:  # noqa: BLE001 - out of memory, a compile error: record it and go on
                row["error"] = _short(error)
            row["wall_s"] = time.perf_counter() - start
            gc.collect()  # the row's arrays (state, batch) and executable go before the next row
            rows.append(row)
            done += 1
            if "error" in row:
                print(f"[{done}/{total}] {row['shape']} {name}: FAILED ({row['error']})", flush=True)
            else:
                print(f"[{done}/{total}] {row['shape']} {name}: {row['params']:,} params, compile "
                      f"{row['compile_s']:.1f} s, step {_sig(row['step_ms'])} ms, {row['tokens_per_s']:,.0f} "
                      f"tokens/s, peak {_sig(row.get('peak_bytes', 0) / 1e9)} GB, loss {row.get('loss', 0):.3f}",
                      flush=True)
            rows_so_far = sorted(kept + rows, key=lambda r: r["seq_len"])  # stable: variants stay in order
            write_results(bench.results_file, head, rows_so_far, bench, _process_peak_bytes(devices), runs)
    print("\n" + table(rows, bench.baseline), flush=True)
    print(f"\nwrote {bench.results_file} and {os.path.splitext(bench.results_file)[0]}.json", flush=True)
    return rows


if __name__ == "__main__":
    main()
