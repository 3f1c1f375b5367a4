"""The device mesh and the mapping from logical axis names to mesh axes (MaxText's rules table).

Parameters carry logical names (embed, heads, mlp, vocab, layers, ...); `config.mesh.rules` maps each name to
mesh axes. A dimension whose size is not divisible by the mesh axes it maps to stays replicated, with a warning,
so a model whose head count does not divide the tensor axis still runs (sharding is an optimisation, never a
reason to fail).
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; one of them may be -1 (the devices the others leave)."""
    sizes = [mesh_config[axis] for axis in AXES]
    bad = [(axis, size) for axis, size in zip(AXES, sizes) if not isinstance(size, int) or size == 0 or size < -1]
    if bad or sizes.count(-1) > 1:
        raise ValueError(f"mesh: sizes must be positive integers with at most one -1, got "
                         f"data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known} "
                             f"(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data * fsdp * tensor = {math.prod(sizes)} must equal the {num_devices} devices "
                         f"(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}); use -1 for one axis")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _rules_dict(rules) -> dict:
    table = {}
    for rule in rules:
        name, axes = rule
        if axes is not None:
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            unknown = [a for a in axes if a not in AXES]
            if unknown:
                raise ValueError(f"mesh.rules: {name!r} maps to unknown mesh axes {unknown}; mesh axes are {AXES}")
        table[name] = axes
    return table


def logical_to_mesh(names, shape, rules, mesh: Mesh, where: str = "") -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions have logical `names`."""
    table = _rules_dict(rules)
    used, spec = set(), []
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"mesh.rules: no rule for the logical axis {name!r} (of {where or 'an array'}); "
                             f"add ({name!r}, None) to replicate it")
        axes = tuple(a for a in (table[name] or ()) if a not in used and mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            # The message names the dimension, not the array, so that Python's warning filter shows it once for
            # every array (and optimizer moment) that has it, not once per array.
            warnings.warn(f"sharding: dimension {name!r} of size {size} is not divisible by mesh axes {axes} "
                          f"({ways} ways); every array with it keeps it replicated", stacklevel=2)
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree, rules, mesh: Mesh):
    """NamedShardings for a tree of nnx Variables (parameters, or optimizer moments that copy them): each Variable
    by its logical names; any other leaf (step counters) replicated. The result has a NamedSharding where each
    Variable was, a valid `in_shardings`/`out_shardings` prefix for jit."""
    def sharding(path, leaf):
        if not isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        shape = leaf.get_value().shape
        names = leaf.get_metadata().get("out_sharding") or (None,) * len(shape)
        return NamedSharding(mesh, logical_to_mesh(names, shape, rules, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(rules, mesh: Mesh) -> NamedSharding:
    """Batches `[batch, time]` shard the batch over the axes the 'batch' rule names."""
    return NamedSharding(mesh, logical_to_mesh(("batch", None), (0, 0), rules, mesh, "batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_shards(named_sharding: NamedSharding, dim: int = 0) -> int:
    """How many ways dimension `dim` is split by `named_sharding`."""
    entry = named_sharding.spec[dim] if dim < len(named_sharding.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(named_sharding.mesh.shape[a] for a in axes)
