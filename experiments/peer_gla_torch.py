"""fla's chunk_gla (PyTorch + Triton) fwd and fwd+bwd at given shapes: the linear-attention peer of the
RAM-Net memory benchmark. Prints one JSON line per shape; run by experiments/bench_ram_memory.py.

  python experiments/peer_gla_torch.py 8x4096 2x16384 1x65536

bf16 q, k, v [B, T, 16, 64] and fp32 per-key-dim log gates, as in shared/bench/peer_ops.py (the anchors);
median of triton.testing.do_bench.
"""

import json
import sys

import torch
import triton
from fla.ops.gla import chunk_gla
from triton.testing import do_bench


def main() -> None:
    heads, dim = 16, 64
    for shape in sys.argv[1:]:
        batch, seq_len = map(int, shape.split("x"))

        def rand(*size):
            return torch.randn(*size, device="cuda", dtype=torch.bfloat16).requires_grad_()

        q, k, v = rand(batch, seq_len, heads, dim), rand(batch, seq_len, heads, dim), rand(batch, seq_len, heads, dim)
        gk = (-torch.rand(batch, seq_len, heads, dim, device="cuda") * 0.1).requires_grad_()

        def forward():
            return chunk_gla(q, k, v, gk)[0]

        def forward_backward():
            forward().sum().backward()

        fwd = do_bench(forward, warmup=25, rep=200, return_mode="median")
        both = do_bench(forward_backward, warmup=25, rep=200, return_mode="median")
        print(json.dumps({"shape": shape, "fwd_ms": fwd, "fwd_bwd_ms": both, "torch": torch.__version__,
                          "triton": triton.__version__}), flush=True)
        del q, k, v, gk
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
