"""The mesh and the logical-to-mesh rules (on abstract meshes, so one CPU device is enough), the shardings of a
whole train state, and the optimizer's weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P
from tiny import tiny_config

from ramjax.models import LanguageModel
from ramjax.train import sharding
from ramjax.train.optim import make_optimizer, weight_decay_mask

RULES = tiny_config().mesh.rules


def mesh(data=2, fsdp=2, tensor=2):
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def mesh_config(data, fsdp, tensor):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.parametrize(
    "sizes,devices,expected",
    [((-1, 1, 1), 8, (8, 1, 1)), ((-1, 2, 2), 8, (2, 2, 2)), ((2, -1, 1), 8, (2, 4, 1)), ((1, 2, -1), 2, (1, 2, 1)),
     ((2, 2, 2), 8, (2, 2, 2)), ((-1, 1, 1), 1, (1, 1, 1))],
)
def test_mesh_shape(sizes, devices, expected):
    assert sharding.mesh_shape(mesh_config(*sizes), devices) == expected


@pytest.mark.parametrize(
    "sizes,devices,needle",
    [
        ((-1, -1, 1), 8, "at most one -1"),
        ((2, 2, 1), 8, "must equal the 8 devices"),
        ((2, 2, 4), 8, "must equal the 8 devices"),
        ((-1, 3, 1), 8, "not divisible"),
        ((0, 1, 1), 1, "positive integers"),
        ((-2, 1, 1), 1, "positive integers"),
        ((1.5, 1, 1), 1, "positive integers"),
    ],
)
def test_mesh_shape_errors_name_the_fields(sizes, devices, needle):
    with pytest.raises(ValueError, match=needle) as error:
        sharding.mesh_shape(mesh_config(*sizes), devices)
    message = str(error.value)
    assert message.startswith("mesh") and f"data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}" in message


def test_make_mesh_on_the_local_devices():
    m = sharding.make_mesh(mesh_config(-1, 1, 1))
    assert m.axis_names == sharding.AXES and m.shape["data"] == jax.device_count()


@pytest.mark.parametrize(
    "names,shape,expected",
    [
        (("embed", "heads"), (16, 32), P("fsdp", "tensor")),
        (("vocab", "embed"), (64, 16), P("tensor", "fsdp")),
        (("layers", "embed", "mlp"), (3, 16, 48), P(None, "fsdp", "tensor")),
        (("batch", None), (8, 5), P(("data", "fsdp"), None)),
        (("levels", "decay_mlp"), (8, 8), P(None, None)),
        ((None, "heads"), (4, 4), P(None, "tensor")),
        # One mesh axis is never used twice: the second name that wants it stays replicated.
        (("heads", "mlp"), (4, 4), P("tensor", None)),
        (("batch", "embed"), (8, 16), P(("data", "fsdp"), None)),
        (("embed", "batch"), (16, 8), P("fsdp", "data")),
    ],
)
def test_logical_to_mesh_follows_the_rules(names, shape, expected):
    assert sharding.logical_to_mesh(names, shape, RULES, mesh()) == expected


def test_mesh_axes_of_size_one_are_not_used():
    assert sharding.logical_to_mesh(("batch", "embed", "heads"), (8, 16, 4), RULES, mesh(8, 1, 1)) == P("data", None,
                                                                                                         None)
    assert sharding.logical_to_mesh(("embed", "heads"), (16, 4), RULES, mesh(1, 1, 1)) == P(None, None)


def test_non_divisible_dimensions_stay_replicated_with_a_warning():
    with pytest.warns(UserWarning, match="'heads' of size 3 .* keeps it replicated"):
        spec = sharding.logical_to_mesh(("embed", "heads"), (16, 3), RULES, mesh(), "w")
    assert spec == P("fsdp", None)
    with pytest.warns(UserWarning, match="'batch' of size 6"):
        spec = sharding.logical_to_mesh(("batch", "embed"), (6, 16), RULES, mesh())
    # The batch gave up data and fsdp, so embed may take fsdp.
    assert spec == P(None, "fsdp")


def test_unknown_names_and_axes_are_errors_naming_the_rules():
    with pytest.raises(ValueError, match="mesh.rules: no rule for the logical axis 'experts'"):
        sharding.logical_to_mesh(("experts", "embed"), (4, 16), RULES, mesh())
    with pytest.raises(ValueError, match="mesh.rules: 'embed' maps to unknown mesh axes"):
        sharding.logical_to_mesh(("embed",), (16,), (("embed", "model"),), mesh())


def abstract_train_state(config):
    model = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config.optim, config.train.num_steps)
    return {"params": params, "opt_state": jax.eval_shape(tx.init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}, rest


def test_train_state_shardings_follow_the_parameters():
    config = tiny_config("ramnet")
    state, rest = abstract_train_state(config)
    shardings = sharding.tree_shardings(state, RULES, mesh())
    params = dict(nnx.to_flat_state(shardings["params"]))
    assert params[("embed", "embedding")].spec == P("tensor", "fsdp")
    assert params[("lm_head", "kernel")].spec == P("fsdp", "tensor")
    assert params[("groups", "blocks", 0, "mixer", "q_proj", "kernel")].spec == P(None, "fsdp", "tensor")
    assert params[("groups", "blocks", 0, "mixer", "alpha")].spec == P(None, "tensor")
    # Adam's moments are sharded as their parameters; the step counters are replicated.
    adam = shardings["opt_state"][1][0]
    for moments in (adam.mu, adam.nu):
        assert dict(nnx.to_flat_state(moments)) == params
    assert adam.count.spec == P() and shardings["step"].spec == P()
    rest_shardings = dict(nnx.to_flat_state(sharding.tree_shardings(rest, RULES, mesh())))
    assert rest_shardings[("groups", "blocks", 0, "mixer", "cape_heads")].spec == P(None, "tensor")


def test_batch_sharding_and_shard_count():
    batch = sharding.batch_sharding(RULES, mesh())
    assert batch.spec == P(("data", "fsdp"), None) and sharding.num_shards(batch) == 4
    assert sharding.num_shards(batch, 1) == 1
    assert sharding.num_shards(sharding.batch_sharding(RULES, mesh(1, 1, 8))) == 1


def mixed_model_params():
    """Parameters of every kind: kernels, embeddings, norm scales, biases, alpha, A_log, dt_bias, D, Lscale."""
    config = tiny_config("ramnet")
    config.model.pattern, config.model.num_layers = "ramnet,gla,loglinear,gated_deltanet", 4
    config.model.loglinear.mode = "linear"
    config.model.ramnet.output_norm = True
    model = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
    return config, nnx.state(model, nnx.Param)


def test_weight_decay_mask_marks_kernels_and_embeddings_only():
    _, params = mixed_model_params()
    mask = dict(nnx.to_flat_state(weight_decay_mask(params)))
    names = {}
    for path, decayed in mask.items():
        names.setdefault(path[-1], set()).add(bool(decayed))
    assert names.pop("kernel") == {True} and names.pop("embedding") == {True}
    assert {"scale", "bias", "alpha", "a_log", "dt_bias", "d_skip", "level_scale"} <= set(names), names
    assert all(values == {False} for values in names.values()), names


def test_weight_decay_applies_through_the_mask():
    config, abstract_params = mixed_model_params()
    config.optim.weight_decay, config.optim.learning_rate = 0.5, 0.1
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract_params)
    tx = make_optimizer(config.optim, 10)

    @jax.jit
    def step(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = dict(nnx.to_flat_state(step(params)))
    for path, value in new.items():
        expected = 1 - 0.1 * 0.5 if path[-1] in ("kernel", "embedding") else 1.0
        np.testing.assert_allclose(value.get_value(), expected, rtol=1e-6, err_msg=str(path))
