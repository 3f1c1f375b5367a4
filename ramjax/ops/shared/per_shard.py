"""Running a chunked kernel on each device's shard under a mesh.

The Pallas kernels of the plain gated recurrences (kernels/gla_chunk.py, gated_delta_chunk.py) are custom calls
that XLA's partitioner cannot split, so in a sharded train step it would first gather every argument onto every
device. Every (batch, head) sequence is independent, so the kernel runs instead under `shard_map` on the device's
own batch rows and heads (the time axis must stay whole).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec


def run_per_shard(fn: Callable, sharding: NamedSharding | None, sequences: tuple, state: jax.Array):
    """fn(*sequences, state) -> (o, final_state), per device shard when `sharding` spans several devices.

    Args:
      fn: the kernel call; returns o `[batch, time, heads, d_v]` and the final state `[batch, heads, d_k, d_v]`.
      sharding: the layout of the `[batch, time, heads, ...]` arguments (batch axes, None, head axes, ...); None
        or a one-device mesh: fn runs as it is.
      sequences: the per-token arguments, each `[batch, time, heads, ...]` (any number of trailing axes); one
        with a single head (q and k shared by every head) is given whole to each device's head shard.
      state: the initial state `[batch, heads, d_k, d_v]`.
    """
    if not spans_devices(sharding):
        return fn(*sequences, state)
    batch_axes, head_axes, sequence_specs = _specs(sharding, sequences)
    state_spec = PartitionSpec(batch_axes, head_axes, None, None)
    run = jax.shard_map(fn, mesh=sharding.mesh, in_specs=sequence_specs + (state_spec,),
                        out_specs=(PartitionSpec(batch_axes, None, head_axes, None), state_spec), check_vma=False)
    return run(*sequences, state)


def run_sequences_per_shard(fn: Callable, sharding: NamedSharding | None, sequences: tuple):
    """fn(*sequences) -> o `[batch, time, heads, d_v]`, per device shard when `sharding` spans several devices
    (`run_per_shard` without a state: e.g. the log-linear ops' kernels in training, which start from position 0
    and return no state). `sequences` are per-token arguments `[batch, time, heads, ...]` as there."""
    if not spans_devices(sharding):
        return fn(*sequences)
    batch_axes, head_axes, sequence_specs = _specs(sharding, sequences)
    run = jax.shard_map(fn, mesh=sharding.mesh, in_specs=sequence_specs,
                        out_specs=PartitionSpec(batch_axes, None, head_axes, None), check_vma=False)
    return run(*sequences)


def spans_devices(sharding: NamedSharding | None) -> bool:
    """Whether `sharding` lays arrays over more than one device (else the kernels run as they are)."""
    return sharding is not None and sharding.mesh.size > 1


def _specs(sharding: NamedSharding, sequences: tuple):
    """(batch axes, head axes, one PartitionSpec per sequence); a sequence with a single head (q and k shared by
    every head) is given whole to each device's head shard."""
    spec = tuple(sharding.spec) + (None,) * (3 - len(sharding.spec))
    if spec[1] is not None:
        raise ValueError(f"sharding: the time axis must not be split, got {sharding.spec}")
    batch_axes, head_axes = spec[0], spec[2]
    sequence_specs = tuple(PartitionSpec(batch_axes, None, None if x.shape[2] == 1 else head_axes,
                                         *(None,) * (x.ndim - 3)) for x in sequences)
    return batch_axes, head_axes, sequence_specs
