"""Test-session settings, applied before JAX creates its CPU backend.

The tests compile hundreds of tiny programs and run each a few times, so XLA's compile time is most of their
wall time. Two XLA CPU flags cut it by 3-5x on the model and training tests:
  --xla_backend_optimization_level=0    no LLVM optimisation of the generated code;
  --xla_cpu_use_fusion_emitters=false   the older loop emitters, much quicker to compile than the MLIR ones.
Neither changes what is computed (only how fast the code runs). They are XLA's own debug options, not API: if
a jaxlib drops one, XLA aborts naming it: jaxlib 0.11 no longer knows --xla_cpu_use_fusion_emitters, so each flag
names the jaxlib versions it is set for (ramjax/compile_options.py). Any XLA_FLAGS you set yourself take precedence.
"""

import os

from ramjax.compile_options import fast_compile_options

_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in fast_compile_options().items():
    if f"--{_name}" not in _flags:
        _flags = f"{_flags} --{_name}={str(_value).lower()}".strip()
os.environ["XLA_FLAGS"] = _flags
