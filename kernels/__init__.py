"""Pallas kernels for ramjax's hot loops.

A package of its own: it imports nothing from ramjax, so the kernels can be read, tested and reused alone.
ramjax.ops dispatches to them (`ramjax.ops.ram_memory.pdma(..., impl="pallas")`). See README.md for the design
and the measurements.

  sparse_scan  the sparse gated scan (xla / Pallas Triton / Pallas Mosaic TPU)
  pdma         RAM-Net's PDMA forward and backward on it, with a custom VJP
"""
