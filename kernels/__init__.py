"""Pallas kernels for ramjax's hot loops.

A package of its own: it imports nothing from ramjax, so the kernels can be read, tested and reused alone.
ramjax.ops dispatches to them. The PDMA sparse-update kernels arrive here next (see README.md).
"""
