"""experiments/bench_models.py, the model scoreboard: a tiny run on the CPU and its results file."""

import importlib.util
import json
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_models", ROOT / "experiments" / "bench_models.py")
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)


def test_gpu_config_variants_build_and_select():
    bench = bench_models.load_config(str(ROOT / "configs" / "bench_models.py") + ":gpu",
                                     ["model_overrides=model.dtype=bfloat16 model.ramnet.top_k=4"])
    names = [name for name, _ in bench.variants]
    assert names[0] == "transformer" and {"ramnet:scan", "ramnet:pallas", "hybrid"} <= set(names)
    for name, overrides in bench.variants:  # every overridden field exists in the LM config
        config = bench_models.model_config(bench, overrides, name=name)
        assert config.model.dtype == "bfloat16" and config.model.d_model == 512 and config.model.ramnet.top_k == 4
    assert bench_models.model_config(bench, dict(bench.variants)["ramnet:pallas"]).model.ramnet.impl == "pallas"
    chosen = bench_models.select_variants(bench.variants, "ramnet,gla", "transformer")
    # "ramnet" names no row, so it picks every "ramnet:..." row; "gla" names one row and picks that row alone
    assert [name for name, _ in chosen] == (["transformer"] + [n for n in names if n.startswith("ramnet:")]
                                            + ["gla"])
    chosen = bench_models.select_variants(bench.variants, "gla:chunked", "transformer")
    assert [name for name, _ in chosen] == ["transformer", "gla:chunked"]
    assert bench_models.parse_shapes("1024x32, 16384x2") == ((1024, 32), (16384, 2))


def test_bad_arguments_stop_before_any_row_runs(tmp_path, capsys):
    """A zero size or step count failed every row and still rewrote the results file; a bad config variant was a
    traceback; --help printed nothing useful."""
    results = str(tmp_path / "r.md")
    for argv, message in ((["--shapes", "0x4"], "--shapes: '0x4' is not SEQ_LENxBATCH of positive sizes"),
                          (["--steps", "0"], "steps: must be an integer >= 1, got 0"),
                          (["--config", "configs/bench_models.py:nosuch"], "unknown variant 'nosuch'; known")):
        with pytest.raises(SystemExit, match=message) as exit_info:
            bench_models.main(["--config", "configs/bench_models.py:cpu", "--results", results, *argv])
        assert "Traceback" not in str(exit_info.value.code)
    assert not os.path.exists(results)
    with pytest.raises(SystemExit) as exit_info:
        bench_models.main(["--help"])
    assert exit_info.value.code == 0 and "The model scoreboard" in capsys.readouterr().out


def test_random_tokens_repeat_like_text_by_default():
    """zipf (the default): the commonest id is ~16% of 258-token-vocabulary batches, as ' ' is in source code
    (what makes the embedding gradient's scatter-add contend); uniform: every id ~1/258."""
    zipf = bench_models.random_tokens((64, 1024), 258, seed=0)
    uniform = bench_models.random_tokens((64, 1024), 258, seed=0, distribution="uniform")
    assert zipf.dtype == uniform.dtype == "int32" and 0 <= zipf.min() and zipf.max() < 258
    assert 0.14 < max(bincount := [int((zipf == i).sum()) for i in range(258)]) / zipf.size < 0.18
    assert len([c for c in bincount if c]) > 200  # the tail is there too
    assert max(int((uniform == i).sum()) for i in range(258)) / uniform.size < 0.01
    with pytest.raises(ValueError, match="token_distribution"):
        bench_models.random_tokens((2, 2), 8, seed=0, distribution="text")


@pytest.mark.slow  # ~15 s on 2 cores: a benchmark script, not the package; its config and table logic are fast here
def test_cpu_run_writes_the_table_with_ratios_from_the_same_run(tmp_path):
    results = tmp_path / "scoreboard.md"
    argv = ["--config", f"{ROOT}/configs/bench_models.py:cpu", "--only", "transformer", "--shapes", "32x2",
            "--steps", "2", "--warmup", "1", "--results", str(results),
            # a row that cannot be built (3 layers of a 2-mixer pattern): recorded, and the run goes on
            "--variant", "broken model.pattern=ramnet,attention model.num_layers=3",
            "--variant", "ramnet_scan model.pattern=ramnet model.ramnet.impl=scan",
            "--config.model_overrides=model.dtype=float32 model.ramnet.d_v=16"]
    rows = bench_models.main(argv)
    assert [r["variant"] for r in rows] == ["transformer", "broken", "ramnet_scan"]
    assert "num_layers" in rows[1]["error"] and "tokens_per_s" not in rows[1]
    for r in (rows[0], rows[2]):
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_bytes"] > 0 and r["compile_s"] > 0
        assert r["params"] > 0 and r["shape"] == "32x2"

    text = results.read_text()
    for key in ("device", "jax", "flax", "date"):
        assert re.search(rf"^- {key}: \S", text, re.M), key
    assert f"- command: `python experiments/bench_models.py --config {ROOT}/configs/bench_models.py:cpu --only" in text
    assert "d_model 64, 2 layers, 2 heads" in text and "- ramnet_scan: model.pattern=ramnet" in text
    assert "with model.dtype=float32, model.ramnet.d_v=16: " in text and "d_v 16." in text
    table = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| 32x2 |")}
    assert set(table) == {"transformer", "broken", "ramnet_scan"}
    assert " | 1.00x | " in table["transformer"] and "ValueError" in table["broken"]
    speed = rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"]
    memory = rows[2]["peak_bytes"] / rows[0]["peak_bytes"]
    assert f" | {speed:.2f}x | " in table["ramnet_scan"] and f" | {memory:.2f}x | " in table["ramnet_scan"]
    assert f" | {rows[2]['params']:,} | " in table["ramnet_scan"]

    saved = json.loads(results.with_suffix(".json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["transformer", "broken", "ramnet_scan"]
    assert saved["rows"][2]["x_baseline_tokens_per_s"] == speed and saved["rows"][1]["x_baseline_memory"] is None
    assert saved["environment"]["jax"] and saved["bench"]["steps"] == 2

    # --append: another shape (the baseline alone) joins the file; the 32x2 rows stay, named as an earlier run.
    bench_models.main(argv[:4] + ["--shapes", "16x2", "--steps", "1", "--warmup", "0", "--results", str(results),
                                  "--append"])
    text = results.read_text()
    assert [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| 16x2 |")] == [
        ["| 16x2", "transformer"]]
    assert len([line for line in text.splitlines() if line.startswith("| 32x2 |")]) == 3
    assert "- 32x2: an earlier run" in text and text.index("| 16x2 |") < text.index("| 32x2 |")
    saved = json.loads(results.with_suffix(".json").read_text())
    assert len(saved["runs"]) == 2 and [r["run"] for r in saved["rows"]] == [1, 0, 0, 0]
    assert saved["rows"][3]["x_baseline_tokens_per_s"] == speed


def test_linear_ops_table_divides_by_the_peer_of_the_same_op_and_case():
    spec = importlib.util.spec_from_file_location("bench_linear_ops", ROOT / "experiments" / "bench_linear_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [{"case": "1x64", "op": "gla", "impl": "chunked", "fwd": 1.0, "fwd_bwd": 4.0},
            {"case": "1x64", "op": "gla", "impl": "peer", "fwd": 1.0, "fwd_bwd": 2.0},
            {"case": "1x64", "op": "loglinear_gated_delta", "impl": "chunked", "fwd": 1.0, "fwd_bwd": 3.0},
            {"case": "1x64", "op": "simple_gla", "impl": "pallas", "error": "OOM"}]
    lines = module.table(rows)
    assert "| 1x64 | gla | chunked | 1 | 4 | 0.50x |" in lines[2]
    assert "fla chunk_gla" in lines[3] and "| - |" in lines[3]
    assert "| - |" in lines[4]  # no peer for this op
    assert "failed: OOM" in lines[5]


def test_module_settings_switch_a_kernel_and_refuse_what_does_not_exist(monkeypatch):
    from kernels import gla_chunk
    from ramjax import timing

    monkeypatch.setattr(gla_chunk, "SUB_CHUNK_PROGRAMS", frozenset())  # (monkeypatch restores both after the test)
    monkeypatch.setattr(gla_chunk, "SUB", gla_chunk.SUB)
    timing.apply_module_settings(("kernels.gla_chunk.SUB_CHUNK_PROGRAMS={'gla_chunk_dv'}",
                                  " kernels.gla_chunk.SUB = 32"))
    assert gla_chunk.SUB_CHUNK_PROGRAMS == {"gla_chunk_dv"} and gla_chunk.SUB == 32
    for setting, message in (("kernels.gla_chunk.NO_SUCH=1", "has no 'NO_SUCH'"),
                             ("kernels.no_such_module.X=1", "cannot import 'kernels.no_such_module'"),
                             ("SUB=32", "expected 'package.module.NAME=value'"),
                             ("kernels.gla_chunk.SUB=thirty", "must be a Python literal")):
        with pytest.raises(ValueError, match=message):
            timing.apply_module_settings((setting,))


def test_module_settings_hold_for_a_block_retrace_and_restore():
    """timing.module_settings: the switch holds inside the block and a function traced before sees it (JAX's
    caches are cleared, so no stale trace), the old value is back after (also after an error), and every setting
    is checked before any is set."""
    import jax

    from ramjax import timing
    from ramjax.ops.gated_delta import chunked

    @jax.jit
    def read_switch(x):
        return x + len(chunked.INVERSE_METHOD)  # read when traced

    assert chunked.INVERSE_METHOD == "triangular_solve" and int(read_switch(0)) == 16
    with timing.module_settings(["ramjax.ops.gated_delta.chunked.INVERSE_METHOD='doubling'"]):
        assert chunked.INVERSE_METHOD == "doubling" and int(read_switch(0)) == 8
    assert chunked.INVERSE_METHOD == "triangular_solve" and int(read_switch(0)) == 16
    with pytest.raises(RuntimeError, match="inside"):  # a bare word sets a string switch (shells eat quotes)
        with timing.module_settings(["ramjax.ops.gated_delta.chunked.INVERSE_METHOD=doubling"]):
            assert chunked.INVERSE_METHOD == "doubling"
            raise RuntimeError("inside")
    assert chunked.INVERSE_METHOD == "triangular_solve"
    with pytest.raises(ValueError, match="has no 'NO_SUCH'"):
        with timing.module_settings(["ramjax.ops.gated_delta.chunked.INVERSE_METHOD='doubling'",
                                     "ramjax.ops.gated_delta.chunked.NO_SUCH=1"]):
            pass
    assert chunked.INVERSE_METHOD == "triangular_solve"


def test_variant_set_items_are_row_switches_not_config_fields(tmp_path):
    """--variant "NAME ... set:package.module.NAME=VALUE": the set: items are that row's module switches (checked
    before anything compiles), the rest config fields."""
    bench = bench_models.load_config(str(ROOT / "configs" / "bench_models.py") + ":cpu", [])
    overrides = {"model.pattern": "gated_deltanet", "set:kernels.gated_delta_chunk.INVERSE_PRECISION": "'tf32x3'"}
    assert bench_models.row_settings(overrides) == ["kernels.gated_delta_chunk.INVERSE_PRECISION='tf32x3'"]
    assert bench_models.model_config(bench, overrides).model.pattern == "gated_deltanet"
    argv = ["--config", f"{ROOT}/configs/bench_models.py:cpu", "--only", "transformer", "--shapes", "32x2",
            "--results", str(tmp_path / "b.md"),
            "--variant", "gdn model.pattern=gated_deltanet set:kernels.gla_chunk.NO=1"]
    with pytest.raises(SystemExit, match="gdn: kernel_settings: .* has no 'NO'"):
        bench_models.main(argv)


def test_kernel_launch_options_by_name_then_star_then_the_ops_warps(monkeypatch):
    from kernels import chunk_common

    monkeypatch.setattr(chunk_common, "LAUNCH_BY_KERNEL", {})
    assert chunk_common.launch_options("gla_chunk_dqk", 4) == {"num_warps": 4, "num_stages": 1}
    chunk_common.LAUNCH_BY_KERNEL.update({"*": {"num_stages": 2}, "gla_chunk_dqk": {"num_warps": 8}})
    assert chunk_common.launch_options("gla_chunk_dqk", 4) == {"num_warps": 8, "num_stages": 1}
    assert chunk_common.launch_options("gated_delta_grads", 4) == {"num_warps": 4, "num_stages": 2}
    chunk_common.LAUNCH_BY_KERNEL["gla_chunk_dv"] = {"warps": 8}
    with pytest.raises(ValueError, match=r"LAUNCH_BY_KERNEL\['gla_chunk_dv'\]: unknown option 'warps'"):
        chunk_common.launch_options("gla_chunk_dv", 4)


def test_kernel_warps_default_by_operand_dtype():
    """4 warps with bf16 operands, 8 where any of q, k, v is fp32 (their tiles take twice the registers); an
    explicit count wins."""
    import jax.numpy as jnp

    from kernels import chunk_common

    bf16, fp32 = jnp.zeros((1, 16, 1, 16), jnp.bfloat16), jnp.zeros((1, 16, 1, 16), jnp.float32)
    assert chunk_common.default_num_warps(None, bf16, bf16, bf16) == 4
    assert chunk_common.default_num_warps(None, bf16, bf16, fp32) == 8
    assert chunk_common.default_num_warps(None, fp32, fp32, fp32) == 8
    assert chunk_common.default_num_warps(2, fp32, fp32, fp32) == 2


def test_kernel_tuning_table_marks_each_kernels_best_setting():
    spec = importlib.util.spec_from_file_location("tune_chunk_kernels", ROOT / "experiments" / "tune_chunk_kernels.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    settings = [(4, 1), (8, 1)]
    results = {(4, 1): ({"gla_chunk_dqk": 2.0, "gla_chunk_dv": 1.0}, 5.0),
               (8, 1): ({"gla_chunk_dqk": 1.5, "gla_chunk_dv": 1.2}, 4.5)}
    lines = tune.table("gla", settings, results)
    assert "| gla_chunk_dqk | 2.000 | **1.500** | w8 s1 |" in lines
    assert "| gla_chunk_dv | **1.000** | 1.200 | w4 s1 |" in lines
    assert "| (op, wall ms per call) | 5.000 | 4.500 | w8 s1 |" in lines
    assert tune.KERNEL_NAME.search('{"long_name": "mixer_gated_deltanet/op/gated_delta_grads/pallas_call"}'
                                   ).group(1) == "gated_delta_grads"
