"""Generation: prefill + token-by-token decoding equals the full forward pass for every mixer and a hybrid;
sampling and `generate` behave as documented."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ramjax.models import LanguageModel
from ramjax.models.decode import generate, init_cache, jit_decode_step, prefill, sample
from tiny import tiny_config


def relative_rms(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2) / np.mean(ref**2)))


def build(variant, *, pattern=None, scan_layers=True, gla=None, **ramnet):
    config = tiny_config(variant)
    m = config.model
    if pattern:
        m.pattern = pattern
        m.num_layers = 2 * len(pattern.split(","))
    m.scan_layers = scan_layers
    m.ramnet.cape = "1," * (m.num_layers - 1) + "1"  # CAPE on one head of every layer: positions matter
    for name, value in ramnet.items():
        m.ramnet[name] = value
    for name, value in (gla or {}).items():
        m.gla[name] = value
    m.gla.chunk_size = m.mamba2.chunk_size = m.gated_deltanet.chunk_size = 8
    return LanguageModel(m, rngs=nnx.Rngs(3)), m


CASES = {
    "ramnet": dict(variant="ramnet"),
    "ramnet_unscanned_no_conv": dict(variant="ramnet", scan_layers=False, short_conv=0, qk_bias=True),
    "attention": dict(variant="transformer"),
    "gla": dict(variant="gla"),
    "gla_conv": dict(variant="gla", gla={"conv_width": 3}),
    "mamba2": dict(variant="mamba2"),
    "gated_deltanet": dict(variant="gated_deltanet"),
    "loglinear_mamba2": dict(variant="loglinear_mamba2"),
    "loglinear_gated_deltanet": dict(variant="loglinear_gated_deltanet"),
    "hybrid": dict(variant="ramnet", pattern="ramnet,attention,gla"),
    "zoology_base_conv": dict(variant="ramnet", pattern="base_conv,ramnet", short_conv=0),
}


@pytest.mark.parametrize("name", CASES)
def test_prefill_then_decode_equals_the_full_forward_pass(name):
    model, cfg = build(**CASES[name])
    batch, split, total = 2, 11, 19  # the prompt is not a whole number of chunks
    tokens = jax.random.randint(jax.random.key(0), (batch, total), 0, cfg.vocab_size)
    # Packed documents: positions restart at 7 in row 0 (CAPE and RoPE read them).
    positions = np.tile(np.arange(total, dtype=np.int32), (batch, 1))
    positions[0, 7:] -= 7
    positions = jnp.asarray(positions)
    # Jitted (op by op these cases took 1.8-3.3x longer); the prefill starts from a cache made in the same trace, so
    # it is fresh (length 0 known) and the log-linear mixers run their chunked form, as outside jit.
    full = nnx.jit(lambda m, t, p: m(t, p))(model, tokens, positions)
    logits, cache = nnx.jit(lambda m, t, p: prefill(m, t, init_cache(m, batch, total), p))(
        model, tokens[:, :split], positions[:, :split])
    decoded = [logits]
    step = jit_decode_step(model)
    for t in range(split, total):
        step_logits, cache = step(cache, tokens[:, t], positions[:, t])
        decoded.append(step_logits[:, None])
    decoded = jnp.concatenate(decoded, axis=1)
    assert int(cache["length"]) == total
    assert relative_rms(decoded, full) < 1e-4, name


def test_generate_is_deterministic_and_matches_greedy_decoding():
    model, cfg = build("ramnet", pattern="ramnet,attention")
    prompt = jax.random.randint(jax.random.key(2), (3, 6), 0, cfg.vocab_size)
    lengths = jnp.array([6, 4, 5])
    a = generate(model, prompt, max_new_tokens=5, temperature=0.9, top_p=0.9, seed=7, prompt_lengths=lengths)
    b = generate(model, prompt, max_new_tokens=5, temperature=0.9, top_p=0.9, seed=7, prompt_lengths=lengths)
    assert a.shape == (3, 5) and a.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Greedy generation of each row alone, its prompt cut to its own length, by plain full forward passes. Every
    # pass has one shape (one compile): the row in a buffer padded on the right, read at its last real token (the
    # model is causal, so the padding after it changes nothing there).
    greedy = generate(model, prompt, max_new_tokens=4, temperature=0, prompt_lengths=lengths)
    full_pass = nnx.jit(lambda model, tokens: model(tokens))
    for row, length in enumerate(np.asarray(lengths)):
        buffer = np.zeros((1, prompt.shape[1] + 4), np.int32)
        buffer[0, :length] = np.asarray(prompt[row, :length])
        for j in range(4):
            nxt = int(jnp.argmax(full_pass(model, jnp.asarray(buffer))[0, length + j - 1]))
            assert nxt == int(greedy[row, j]), (row, j)
            buffer[0, length + j] = nxt


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda **kw: {int(sample(logits, k, **kw)[0]) for k in keys}  # noqa: E731
    assert draw(temperature=0) == {0}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7, then 0.5 + 0.3 reaches it
    assert draw(top_p=0.5) == {0}
    assert draw() == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(max_new_tokens=2, top_k=10**6), "top_k"),
])
def test_generate_rejects_bad_arguments(kwargs, needle):
    model, _ = build("gla")
    with pytest.raises(ValueError, match=needle):
        generate(model, jnp.zeros((1, 3), jnp.int32), **kwargs)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, jnp.zeros((3,), jnp.int32), max_new_tokens=2)


def test_bench_decode_row_puts_the_state_at_the_context_and_times_it():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, _ = build("ramnet", pattern="ramnet,attention")
    cache = bench.at_position(init_cache(model, 2, 40), 33)
    assert int(cache["length"]) == 33
    assert [int(c["length"][0]) for c in cache["layers"] if "length" in c] == [33]  # the attention layer's
    row = bench.bench_row(model, context=30, batch=2, steps=3, iters=1, max_bytes=None)
    assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["state_mb_per_seq"] > 0
    assert bench.bench_row(model, context=30, batch=2, steps=3, iters=1, max_bytes=1)["status"].startswith("skipped")


_INSTRUCTION = re.compile(r"\s*(ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\((.*)")


def ops_writing_dimension(hlo: str, size: int) -> tuple[list, list]:
    """The instructions of a compiled HLO module (outside fusion bodies) whose result has a dimension `size`, as
    (in-place row updates, others): a row update is a scatter, or a dynamic-update-slice whose update has no
    dimension `size` (XLA's CPU emitters turn small scatters into loops of those); fusions count as their root."""
    computations, roots, name = {}, {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*{$", line)
        if header:
            name = header.group(1)
            computations[name] = {}
            continue
        op = _INSTRUCTION.match(line)
        if op and name:
            root, instruction, dims, kind, rest = op.groups()
            rest = re.sub(r"/\*.*?\*/", "", rest)
            operands = [a.strip().lstrip("%") for a in rest.split(")")[0].split(",")]
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            computations[name][instruction] = ([int(d) for d in dims.split(",") if d], kind, operands,
                                              called and called.group(1))
            if root:
                roots[name] = instruction
    fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo))
    in_place, others = [], []
    for name, instructions in computations.items():
        if name in fused:
            continue
        for instruction, (dims, kind, operands, called) in instructions.items():
            if size not in dims or kind in ("parameter", "get-tuple-element", "bitcast"):
                continue
            where = name
            if kind == "fusion":
                where = called
                _, kind, operands, _ = computations[called][roots[called]]
            update = computations[where].get(operands[1]) if len(operands) > 1 else None
            row = kind == "scatter" or (kind == "dynamic-update-slice" and update and size not in update[0])
            (in_place if row else others).append((name, instruction))
    return in_place, others


def test_a_decode_step_touches_k_slots_not_the_whole_memory():
    """Guards RAM-Net's per-token decode cost against growing with M, without timing: in the compiled decode
    step (cache donated) of a layer-scanned model, the only ops whose result has the M-slot dimension update K
    rows of the memory and normaliser, in place (no temporary as large as one layer's memory, the cache aliased).
    The scan over layers used to slice each layer's memory out, write it into a fresh stack and copy that out,
    every token: four passes over all M slots of every layer (73x slower at M = 2^20 than at 2^10 on an H200)."""
    model, cfg = build("ramnet", num_factors=6, factor_size=3)  # M = 729: no other dimension of the model
    num_slots, batch = 729, 2
    step = jit_decode_step(model)
    compiled = step.func.lower(*step.args, init_cache(model, batch, 8), jnp.zeros((batch,), jnp.int32)).compile()
    in_place, others = ops_writing_dimension(compiled.as_text(), num_slots)
    assert in_place and not others, others
    layer_memory = batch * cfg.num_heads * num_slots * cfg.ramnet.d_v * 4
    stats = compiled.memory_analysis()
    assert stats.temp_size_in_bytes < layer_memory and stats.alias_size_in_bytes > cfg.num_layers * layer_memory
