"""Test-session settings, applied before JAX creates its CPU backend.

The tests compile hundreds of tiny programs and run each a few times, so XLA's compile time is most of their
wall time. Two XLA CPU flags cut it by 3-5x on the model and training tests:
  --xla_backend_optimization_level=0    no LLVM optimisation of the generated code;
  --xla_cpu_use_fusion_emitters=false   the older loop emitters, much quicker to compile than the MLIR ones.
Neither changes what is computed (only how fast the code runs). They are XLA's own debug options, not API: if
a jaxlib drops one, XLA aborts naming it: jaxlib 0.11 no longer knows --xla_cpu_use_fusion_emitters, so each flag
names the jaxlib versions it is set for. Any XLA_FLAGS you set yourself take precedence.
"""

import os
from importlib import metadata

# flag -> (value, the first jaxlib (major, minor) that no longer accepts it, or None)
FAST_COMPILE_FLAGS = {"--xla_backend_optimization_level": ("0", None),
                      "--xla_cpu_use_fusion_emitters": ("false", (0, 11))}


def _jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib; (999, 0) where it cannot be read, so no version-bound flag is set."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return 999, 0


_flags = os.environ.get("XLA_FLAGS", "")
for _name, (_value, _dropped_in) in FAST_COMPILE_FLAGS.items():
    if _name not in _flags and (_dropped_in is None or _jaxlib_version() < _dropped_in):
        _flags = f"{_flags} {_name}={_value}".strip()
os.environ["XLA_FLAGS"] = _flags
