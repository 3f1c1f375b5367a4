"""RAM-Net addressing (docs/ramnet.md sections 2-3): the address decoder `product_topk` (`decoder.py`) and CAPE,
`cape_shift` (`cape.py`).

The decoder's tuning constants (PALLAS_MAX_TOP_K, PALLAS_GPU_OPTIONS) are read in `decoder.py`, so set or
monkeypatch them on `ramjax.ops.addressing.decoder`.
"""

from ramjax.ops.addressing.cape import cape_shift
from ramjax.ops.addressing.decoder import IMPLS, factor_size, factor_softmax, gather_product, product_topk, resolve_impl

__all__ = ["IMPLS", "cape_shift", "factor_size", "factor_softmax", "gather_product", "product_topk", "resolve_impl"]
