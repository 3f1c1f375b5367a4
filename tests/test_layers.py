"""The token mixers and the language model: causality, the CAPE schedule, the layer pattern, scanning over
layers (same function, constant trace size), logical axis names on every parameter, and RAM-Net's temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import rel_rms
from tiny import tiny_config

from ramjax.layers.ramnet import cape_heads_per_layer
from ramjax.models import MIXERS, LanguageModel
from ramjax.models.lm import cape_schedule
from ramjax.models.mixers import make_mixer, parse_pattern

SEQ_LEN, CUT = 37, 17  # 37: not a multiple of the chunk size 8, so the chunked kernels pad
LOGICAL_NAMES = {"embed", "heads", "mlp", "vocab", "layers", "levels", "decay_mlp", None}


def model_config(pattern="ramnet", **overrides):
    m = tiny_config().model
    m.pattern = pattern
    for name, value in overrides.items():
        m[name] = value
    return m


def positions_for(x):
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])


def run_mixer(module):
    """A jitted `x -> module(x, positions)` (one compilation for the two calls each test makes)."""
    graphdef, state = nnx.split(module)

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x, positions_for(x))

    return lambda x: run(state, x)


def run_model(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return lambda tokens: run(state, tokens)


def assert_causal(before, after, cut=CUT):
    before, after = np.asarray(before), np.asarray(after)
    assert np.abs(after[:, : cut + 1] - before[:, : cut + 1]).max() < 1e-5, "the past saw the future"
    assert np.abs(after[:, cut + 1 :] - before[:, cut + 1 :]).max() > 1e-3, "the perturbation changed nothing"


# --- causality ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXERS)
def test_every_mixer_is_causal(kind):
    cfg = model_config()
    mixer = run_mixer(make_mixer(kind, cfg, 1, rngs=nnx.Rngs(0)))  # RAM-Net: head 0 uses CAPE, head 1 not
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, SEQ_LEN, cfg.d_model)).astype(np.float32)
    perturbed = x.copy()
    perturbed[:, CUT + 1 :] += rng.normal(size=perturbed[:, CUT + 1 :].shape)
    before, after = mixer(jnp.asarray(x)), mixer(jnp.asarray(perturbed))
    assert before.shape == x.shape and np.isfinite(np.asarray(before)).all()
    assert_causal(before, after)


@pytest.fixture(scope="module")
def hybrid():
    """A 4-layer "ramnet,attention" model with scan_layers (two stacked groups), its config and its jitted forward."""
    cfg = model_config("ramnet,attention", num_layers=4)
    cfg.ramnet.cape = "1,0,0,0"  # CAPE on one head of the first RAM-Net layer, absolute addresses in the other
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    return cfg, model, run_model(model)


def test_language_model_is_causal(hybrid):
    cfg, _, forward = hybrid
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, SEQ_LEN))
    perturbed = tokens.copy()
    perturbed[:, CUT + 1 :] = rng.integers(0, cfg.vocab_size, size=perturbed[:, CUT + 1 :].shape)
    assert_causal(forward(jnp.asarray(tokens)), forward(jnp.asarray(perturbed)))


# --- the CAPE schedule and the layer pattern -------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,layers,heads,expected",
    [
        ("paper", 10, 4, [4, 4, 4, 4, 2, 2, 2, 2, 0, 0]),
        ("paper", 2, 3, [3, 3]),
        ("half", 3, 3, [2, 2, 2]),
        ("half", 2, 4, [2, 2]),
        ("all", 2, 4, [4, 4]),
        ("none", 3, 4, [0, 0, 0]),
        ([1, 0, 2], 3, 2, [1, 0, 2]),
    ],
)
def test_cape_schedules(schedule, layers, heads, expected):
    assert cape_heads_per_layer(schedule, layers, heads) == expected


@pytest.mark.parametrize(
    "schedule,layers,heads",
    [("halves", 2, 2), ("", 2, 2), ([1, 1], 3, 2), ([3, 0], 2, 2), ([-1, 0], 2, 2)],
)
def test_cape_schedule_rejects_bad_values(schedule, layers, heads):
    with pytest.raises(ValueError, match="model.ramnet.cape"):
        cape_heads_per_layer(schedule, layers, heads)


def test_cape_schedule_from_the_config():
    cfg = model_config(num_layers=2)
    cfg.ramnet.cape = "half"
    assert list(cape_schedule(cfg)) == [1, 1]
    cfg = model_config(num_layers=3)
    cfg.ramnet.cape = "2,0,1"
    assert list(cape_schedule(cfg)) == [2, 0, 1]
    cfg.ramnet.cape = "2,0"
    with pytest.raises(ValueError, match="model.ramnet.cape"):
        cape_schedule(cfg)


def test_parse_pattern():
    assert parse_pattern("ramnet,ramnet,ramnet,attention", 8) == ["ramnet"] * 3 + ["attention"] + ["ramnet"] * 3 + [
        "attention"]
    assert parse_pattern(" gla , attention ", 4) == ["gla", "attention"] * 2
    assert parse_pattern("mamba2", 3) == ["mamba2"] * 3
    for bad in ("", "ramnet,transformer", ",", "ramnet;attention"):
        with pytest.raises(ValueError, match="model.pattern"):
            parse_pattern(bad, 4)
    with pytest.raises(ValueError, match="model.num_layers"):
        parse_pattern("ramnet,ramnet,ramnet,attention", 6)


def test_language_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="model.num_heads"):
        LanguageModel(model_config(num_heads=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="model.pattern"):
        LanguageModel(model_config("ramnet,lstm"), rngs=nnx.Rngs(0))


# --- scanning over layers --------------------------------------------------------------------------------------


def unstack_into(list_model, scanned_model):
    """Copy the stacked parameters of a scan_layers model into the per-group modules of a list model."""
    flat = {}
    for path, variable in nnx.to_flat_state(nnx.state(scanned_model)):
        if path[0] == "groups":
            for g in range(variable.get_value().shape[0]):
                flat[("groups", g) + path[1:]] = variable.get_value()[g]
        else:
            flat[path] = variable.get_value()
    target = nnx.state(list_model)
    paths = {path for path, _ in nnx.to_flat_state(target)}
    assert paths == set(flat), paths ^ set(flat)
    for path, variable in nnx.to_flat_state(target):
        assert variable.get_value().shape == flat[path].shape, path
        variable.set_value(flat[path])
    nnx.update(list_model, target)


def test_hybrid_model_with_and_without_scan_computes_the_same_function(hybrid):
    cfg, scanned, forward = hybrid
    cfg = cfg.copy_and_resolve_references()
    cfg.scan_layers = False
    unrolled = LanguageModel(cfg, rngs=nnx.Rngs(1))
    unstack_into(unrolled, scanned)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, SEQ_LEN)))
    a, b = forward(tokens), run_model(unrolled)(tokens)
    assert a.shape == b.shape == (2, SEQ_LEN, cfg.vocab_size) and a.dtype == jnp.float32
    assert np.isfinite(np.asarray(a)).all()
    assert rel_rms(b, a) < 1e-5


def forward_jaxpr_size(cfg) -> int:
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    return len(jax.make_jaxpr(forward)(state, jnp.zeros((2, 16), jnp.int32)).jaxpr.eqns)


def test_scanned_trace_does_not_grow_with_depth():
    sizes = {}
    for scan in (True, False):
        for layers in (2, 6):
            sizes[scan, layers] = forward_jaxpr_size(model_config("ramnet,attention", num_layers=layers,
                                                                  scan_layers=scan))
    assert abs(sizes[True, 6] - sizes[True, 2]) <= 4, sizes
    assert sizes[False, 6] > sizes[False, 2] + 20, sizes


# --- logical axis names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXERS + ("loglinear-gated_deltanet", "loglinear-linear", "loglinear-fixed"))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "list"])
def test_every_parameter_has_logical_axis_names(kind, scan):
    cfg = model_config(kind.split("-")[0], scan_layers=scan)
    if kind == "loglinear-gated_deltanet":
        cfg.loglinear.base = "gated_deltanet"
    elif kind.startswith("loglinear-"):
        cfg.loglinear.mode = kind.split("-")[1]
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
    params = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(params) > 5
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        names = variable.get_metadata().get("out_sharding")
        shape = variable.get_value().shape
        assert names is not None and len(names) == len(shape), (path, names, shape)
        assert set(names) <= LOGICAL_NAMES, (path, names)
        # Scanned groups stack their parameters on a leading "layers" axis; nothing else has one.
        assert (names[0] == "layers") == (scan and path[0] == "groups"), (path, names)


# --- RAM-Net's temperature -------------------------------------------------------------------------------------


def test_ramnet_alpha_scales_the_address_projections():
    cfg = model_config()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, cfg.d_model)), jnp.float32)
    positions = positions_for(x)

    def addresses(alpha, kernel_scale=1.0):
        mixer = make_mixer("ramnet", cfg, 0, rngs=nnx.Rngs(3))
        mixer.alpha.set_value(jnp.full_like(mixer.alpha.get_value(), alpha))
        for proj in (mixer.q_proj, mixer.k_proj):
            proj.kernel.set_value(proj.kernel.get_value() * kernel_scale)
        return mixer.addresses(x, positions)

    (_, read0), (_, write0) = addresses(0.0)
    (read_idx, read), (write_idx, write) = addresses(1.5)
    # Sharper: the top slot's weight grows, for reads and writes.
    assert float(read[..., 0].mean()) > float(read0[..., 0].mean()) + 0.05
    assert float(write[..., 0].mean()) > float(write0[..., 0].mean()) + 0.05
    # And exactly a scale on W_q and W_k: alpha = 0 with the kernels times e^1.5 gives the same codes (the
    # optional short conv after the projections is linear, with a zero bias at initialisation).
    (ref_read_idx, ref_read), (ref_write_idx, ref_write) = addresses(0.0, np.exp(1.5))
    np.testing.assert_array_equal(read_idx, ref_read_idx)
    np.testing.assert_array_equal(write_idx, ref_write_idx)
    assert rel_rms(read, ref_read) < 1e-5 and rel_rms(write, ref_write) < 1e-5


def test_ramnet_qk_bias_forms_a_position_only_address():
    """With model.ramnet.qk_bias the addresses of an all-zero input are the bias's: every token writes the slot
    the bias peaks at, shifted by CAPE to (slot - position) mod M. Off (the default), there is no bias at all."""
    cfg = model_config()
    cfg.ramnet.short_conv, cfg.ramnet.qk_bias = 0, True
    mixer = make_mixer("ramnet", cfg, cfg.num_heads, rngs=nnx.Rngs(4))  # CAPE on every head
    r = cfg.ramnet
    d_p, num_slots = r.factor_size, r.factor_size**r.num_factors
    digits = [1 % d_p] * r.num_factors  # slot 1 1 ... 1 in mixed radix
    peak = np.full((cfg.num_heads, r.num_factors, d_p), -8.0, np.float32)
    for u, digit in enumerate(digits):
        peak[:, u, digit] = 8.0
    mixer.k_proj.bias.set_value(jnp.asarray(peak.reshape(-1)))
    x = jnp.zeros((1, 6, cfg.d_model), jnp.float32)
    _, (write_idx, write_val) = mixer.addresses(x, positions_for(x))
    slot = sum(d * d_p ** (r.num_factors - 1 - u) for u, d in enumerate(digits))
    np.testing.assert_array_equal(np.asarray(write_idx[0, :, :, 0]),
                                  np.broadcast_to(((slot - np.arange(6)) % num_slots)[:, None], (6, cfg.num_heads)))
    assert float(write_val[..., 0].min()) > 0.99
    cfg.ramnet.qk_bias = False
    assert make_mixer("ramnet", cfg, 0, rngs=nnx.Rngs(4)).k_proj.bias is None


@pytest.mark.parametrize("num_factors, factor_size, cape_heads", [(2, 4, 3), (3, 3, 2)])
def test_cape_offset_bias_starts_cape_head_h_reading_what_was_written_h_plus_1_tokens_before(num_factors, factor_size,
                                                                                              cape_heads):
    """model.ramnet.cape_offset_bias: with no content in the address (zero W_q, W_k kernels), CAPE head h reads at
    position t exactly the slot written at t - h - 1 (offsets past M wrap), most of its weight on it; the heads
    without CAPE get no bias; without qk_bias the field is refused, naming both."""
    cfg = model_config()
    cfg.num_heads = 4
    cfg.ramnet.short_conv, cfg.ramnet.qk_bias, cfg.ramnet.cape_offset_bias = 0, True, 6.0
    cfg.ramnet.num_factors, cfg.ramnet.factor_size, cfg.ramnet.top_k = num_factors, factor_size, 2
    mixer = make_mixer("ramnet", cfg, cape_heads, rngs=nnx.Rngs(1))
    for projection in (mixer.q_proj, mixer.k_proj):
        projection.kernel.set_value(jnp.zeros_like(projection.kernel[...]))
    seq_len = 9
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, seq_len, cfg.d_model)), jnp.float32)
    (read_idx, read_val), (write_idx, write_val) = mixer.addresses(x, positions_for(x))
    num_slots = factor_size**num_factors
    for h in range(cape_heads):
        top_read_h = np.asarray(read_idx[0, :, h])[np.arange(seq_len), np.argmax(np.asarray(read_val[0, :, h]), -1)]
        top_write_h = np.asarray(write_idx[0, :, h])[np.arange(seq_len), np.argmax(np.asarray(write_val[0, :, h]), -1)]
        lag = h + 1
        np.testing.assert_array_equal(top_read_h[lag:], top_write_h[:seq_len - lag])
        np.testing.assert_array_equal(top_write_h, (-np.arange(seq_len)) % num_slots)
        assert float(read_val[0, :, h].max(-1).min()) > 0.9
    q_bias = np.asarray(mixer.q_proj.bias[...]).reshape(cfg.num_heads, -1)
    assert not q_bias[cape_heads:].any() and q_bias[:cape_heads].any()
    cfg.ramnet.qk_bias = False
    with pytest.raises(ValueError, match="model.ramnet.cape_offset_bias.*model.ramnet.qk_bias"):
        make_mixer("ramnet", cfg, cape_heads, rngs=nnx.Rngs(1))


def test_cape_offset_bias_builds_inside_the_scanned_layers():
    """The CAPE head count is a traced value per layer in the scanned model: the biases follow it."""
    config = tiny_config("ramnet")
    r = config.model.ramnet
    r.short_conv, r.qk_bias, r.cape, r.cape_offset_bias = 0, True, "2,0", 3.0
    model = LanguageModel(config.model, rngs=nnx.Rngs(0))
    biases = [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
              if "q_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)]
    assert len(biases) == 1 and biases[0].shape[0] == 2  # [layers, heads * U * d_p]
    assert np.abs(biases[0][0]).sum() > 0 and not biases[0][1].any()  # CAPE heads in layer 0 only
    x = jnp.zeros((1, 5), jnp.int32)
    assert np.isfinite(np.asarray(model(x, jnp.arange(5)[None]))).all()


@pytest.mark.parametrize("kind, gate", [("mamba2", "z_proj"), ("gla", "gate_proj"), ("gated_deltanet", "gate_proj")])
def test_the_output_gate_is_recomputed_not_kept(kind, gate):
    """The gated mixers' output piece (gate projection, gated norm, output projection) is rematerialised: the
    backward pass does not keep the gate projection's output (nor, for Mamba-2, whose widths tell them apart, the
    gated or normalised [batch, time, d_inner] tensors)."""
    cfg = model_config(kind)
    mixer = make_mixer(kind, cfg, 0, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, cfg.d_model)), jnp.float32)
    graphdef, params = nnx.split(mixer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, positions_for(x)) ** 2)

    _, vjp = jax.jit(lambda params, x: jax.vjp(loss, params, x))(params, x)  # one compile, not op by op
    kept = [np.asarray(leaf) for leaf in jax.tree.leaves(vjp)]
    gate_out = np.asarray(getattr(mixer, gate)(x))
    assert not any(a.size == gate_out.size and np.allclose(a.reshape(gate_out.shape), gate_out) for a in kept)
    if kind == "mamba2":  # nor the gated or normalised [batch, time, d_inner] (GLA's v has the gate's shape)
        assert not any(a.shape == gate_out.shape for a in kept), [a.shape for a in kept]


@pytest.mark.parametrize("mode", ["mlp_softplus", "linear"])
def test_the_level_weights_mlp_is_recomputed_not_kept(mode):
    """The log-linear lambda MLP is rematerialised: its [batch, time, heads, hidden] activations (fp32) are not
    among the backward pass's residuals; only the level weights the op takes are."""
    from ramjax.layers.mamba2 import Mamba2Mixer

    hidden, levels = 24, 7  # no other array has these widths
    mixer = Mamba2Mixer(32, head_dim=16, d_state=8, chunk_size=8, decay_mode=mode, num_levels=levels,
                        decay_hidden=hidden, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 13, 32)), jnp.float32)
    graphdef, params = nnx.split(mixer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, positions_for(x)) ** 2)

    _, vjp = jax.jit(lambda params, x: jax.vjp(loss, params, x))(params, x)  # one compile, not op by op
    shapes = [leaf.shape for leaf in jax.tree.leaves(vjp)]
    assert not [s for s in shapes if len(s) == 4 and s[-1] == hidden], shapes
    assert len([s for s in shapes if len(s) == 4 and s[-1] == levels]) <= 1, shapes  # the weights, or nothing


# --- Zoology's BaseConv ----------------------------------------------------------------------------------------


def test_base_conv_is_zoologys_gated_short_conv_plus_its_input():
    """y_t = (sum_j w_j x_{t-j} + c) * (W x_t + b) + x_t, against a numpy loop (width 3, odd length)."""
    cfg = model_config("base_conv")
    mixer = make_mixer("base_conv", cfg, 0, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    mixer.conv.bias[...] = jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32)  # zero at initialisation
    mixer.projection.bias[...] = jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32)
    x = rng.normal(size=(2, 13, cfg.d_model))
    w = np.asarray(mixer.conv.kernel[...], np.float64)
    conv = np.tile(np.asarray(mixer.conv.bias[...], np.float64), (2, 13, 1))
    for t in range(13):
        for j in range(w.shape[0]):
            if t - j >= 0:
                conv[:, t] += w[j] * x[:, t - j]
    gate = x @ np.asarray(mixer.projection.kernel[...], np.float64) + np.asarray(mixer.projection.bias[...])
    y = mixer(jnp.asarray(x, jnp.float32), None)
    assert w.shape[0] == 3
    assert rel_rms(y, conv * gate + x) < 1e-5
