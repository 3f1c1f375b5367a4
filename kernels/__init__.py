"""Pallas kernels for ramjax's hot loops.

A package of its own: it imports nothing from ramjax, so the kernels can be read, tested and reused alone.
ramjax.ops dispatches to them (`ramjax.ops.pdma(..., impl="scan" or "pallas")`). See README.md for the design
and the measurements.

  product_topk  RAM-Net's address decoder (factor softmaxes, exact beam search, values) and its backward
  sparse_scan   the sparse gated scan (xla / Pallas Triton / Pallas Mosaic TPU / sorted)
  sorted_scan   the sparse gated scan on events sorted by slot: parallel over time, no M-sized state
  token_scan    PDMA's recurrence in chunks of tokens with one row per token (Pallas Triton; a second design)
  pdma          RAM-Net's PDMA forward and backward on a scan, with a custom VJP
  gla_chunk     chunked gated linear attention (GLA / Mamba-2 SSD): `chunk_gla`, Pallas Triton kernels forward and
                backward, with a custom VJP
  gated_delta_chunk  the chunked gated delta rule (Gated DeltaNet, WY / UT form): `chunk_gated_delta`, Pallas
                Triton kernels forward and backward, with a custom VJP
  loglinear_chunk  the in-chunk part of log-linear attention over a scalar decay (the Mamba-2 base):
                `loglinear_intra_chunk`, Pallas Triton kernels forward and backward, with a custom VJP
  chunk_common  what the chunked kernels share: launch options, fp32-accumulating products, the row layout, pallas_call
  shapes        padding helpers (Triton arrays have power-of-2 sizes)
"""
