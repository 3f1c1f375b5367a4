"""Registers and spills of the chunked-op kernels, read statically on a machine without a GPU.

  # 1. the Triton IR Pallas emits for each kernel of an op's forward + backward (this repository's environment):
  python experiments/kernel_registers.py capture --op gla --d_k 32 --d_v 64 --chunk 64 --out /tmp/ttir
  python experiments/kernel_registers.py capture --op gated_delta --d_k 64 --d_v 64 --chunk 32 --out /tmp/ttir \
      --setting kernels.gated_delta_chunk.GRAD_KERNEL_SPLIT=True
  python experiments/kernel_registers.py capture --op loglinear --d_k 64 --d_v 64 --chunk 64 --dtype float32
  python experiments/kernel_registers.py capture --op mamba2 --d_k 64 --d_v 64 --chunk 64  # scalar gate, shared q/k
  # 2. compiled for sm_90a by pip's Triton, then `ptxas -v` (any Python with `pip install triton`):
  python experiments/kernel_registers.py compile /tmp/ttir/*.ttir --warps 4,8

`capture` exports the op's gradient for CUDA (jax.export; no GPU needed) and saves each kernel's Triton IR as
OUT/TAG__KERNEL.ttir (TAG names the op, sizes and settings). `compile` prints, per file and warp count, the
registers per thread and the bytes of spill stores and loads. pip's Triton and its ptxas are not the Triton
inside XLA, so the numbers are a reading, not what runs: use them to compare variants of a kernel, and time the
ones that matter on a GPU. `--setting` takes the "package.module.NAME=value" switches of
ramjax.timing.apply_module_settings (e.g. kernels.gla_chunk.SUB_CHUNK_PROGRAMS={'gla_chunk_dqk'}).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNC_NAME = re.compile(r"tt\.func (?:public )?@(\w+)")


def capture(args) -> None:
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import lowering

    from kernels import gated_delta_chunk, gla_chunk, loglinear_chunk
    from ramjax import timing

    timing.apply_module_settings(args.setting)
    texts = []
    lower = lowering.lower_jaxpr_to_triton_module

    def recording(*a, **k):
        result = lower(*a, **k)
        texts.append(result.module.operation.get_asm())
        return result

    b, t, h, dtype = 2, 4 * args.chunk, 2, jnp.dtype(args.dtype)
    qk = jax.ShapeDtypeStruct((b, t, h, args.d_k), dtype)
    v = jax.ShapeDtypeStruct((b, t, h, args.d_v), dtype)
    state = jax.ShapeDtypeStruct((b, h, args.d_k, args.d_v), jnp.float32)
    if args.op in ("gla", "mamba2"):  # Mamba-2: one decay per head, one q/k head for all (its C and B)
        gate = jax.ShapeDtypeStruct((b, t, h, args.d_k if args.op == "gla" else 1), jnp.float32)
        if args.op == "mamba2":
            qk = jax.ShapeDtypeStruct((b, t, 1, args.d_k), dtype)
        shapes = [qk, qk, v, gate, state]
        op = lambda *x: gla_chunk.chunk_gla(*x, chunk_size=args.chunk)  # noqa: E731
    elif args.op == "gated_delta":
        per_token = jax.ShapeDtypeStruct((b, t, h), jnp.float32)
        shapes = [qk, qk, v, per_token, per_token, state]
        op = lambda *x: gated_delta_chunk.chunk_gated_delta(*x, chunk_size=args.chunk)  # noqa: E731
    else:  # the log-linear in-chunk kernels (no state: the Fenwick levels across chunks are XLA)
        levels = args.chunk.bit_length()  # log2 C + 1: the levels a chunk reaches
        shapes = [qk, qk, v, jax.ShapeDtypeStruct((b, t, h), jnp.float32),
                  jax.ShapeDtypeStruct((b, t, h, levels), jnp.float32)]
        op = lambda *x: (loglinear_chunk.loglinear_intra_chunk(*x, chunk_size=args.chunk),)  # noqa: E731

    def loss(*x):
        o, *final = op(*x)
        return jnp.sum(o.astype(jnp.float32) ** 2) + sum(jnp.sum(f ** 2) for f in final)

    lowering.lower_jaxpr_to_triton_module = recording
    try:
        export.export(jax.jit(jax.grad(loss, argnums=tuple(range(len(shapes))))), platforms=["cuda"],
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.op}_dk{args.d_k}_dv{args.d_v}_c{args.chunk}_{dtype.name}" + "".join(
        "_" + re.sub(r"[^\w=]+", "", s.rpartition(".")[2]).replace("=", "-") for s in args.setting)
    for text in texts:
        name = FUNC_NAME.search(text).group(1)
        path = os.path.join(args.out, f"{tag}__{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        print(path, flush=True)


def compile_files(args) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # the newest ptxas Triton ships (its PTX version can be newer than the plain ptxas takes)
    ptxas = max(glob.glob(os.path.join(bin_dir, "ptxas*")), key=lambda p: ("blackwell" in p, p))
    for path in args.files:
        for warps in (int(w) for w in args.warps.split(",")):
            try:
                kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                        options={"num_warps": warps, "num_stages": args.stages})
            except Exception as error:  # noqa: BLE001 - report it and go on with the next file
                print(f"{os.path.basename(path)} w{warps}: compile failed: {str(error).splitlines()[0][:200]}")
                continue
            ptx = f"{path}.w{warps}.ptx"
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull], capture_output=True,
                                 text=True)
            text = out.stderr + out.stdout
            regs = re.search(r"Used (\d+) registers", text)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
            if not regs or not spill:
                print(f"{os.path.basename(path)} w{warps}: ptxas said: {text.strip()[:300]}")
                continue
            print(f"{os.path.basename(path)} w{warps}: {regs.group(1)} registers, spill stores {spill.group(1)} B, "
                  f"loads {spill.group(2)} B", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("capture", help="save the Triton IR of an op's kernels")
    cap.add_argument("--op", choices=("gla", "mamba2", "gated_delta", "loglinear"), default="gla")
    cap.add_argument("--d_k", type=int, default=64)
    cap.add_argument("--d_v", type=int, default=64)
    cap.add_argument("--chunk", type=int, default=64)
    cap.add_argument("--dtype", default="bfloat16")
    cap.add_argument("--setting", action="append", default=[], help="package.module.NAME=value (repeatable)")
    cap.add_argument("--out", default="/tmp/ttir")
    comp = commands.add_parser("compile", help="registers and spills of saved Triton IR files (needs triton)")
    comp.add_argument("files", nargs="+")
    comp.add_argument("--warps", default="4")
    comp.add_argument("--stages", type=int, default=1)
    args = parser.parse_args()
    capture(args) if args.command == "capture" else compile_files(args)


if __name__ == "__main__":
    main()
