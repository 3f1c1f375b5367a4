"""XLA CPU options that make many small programs compile 3-5x faster (the tests, the benchmarks' CPU smoke run),
each with the first jaxlib that no longer accepts it: XLA aborts on an option it does not know. Neither changes
what is computed, only how fast the compiled code runs."""

from __future__ import annotations

from importlib import metadata

# option (without the leading --) -> (value, the first jaxlib (major, minor) that no longer accepts it, or None)
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": (0, None),  # no LLVM optimisation of the code
                        "xla_cpu_use_fusion_emitters": (False, (0, 11))}  # the older, quicker-to-compile emitters


def jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib; (999, 0) where it cannot be read, so no version-bound option is set."""
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return 999, 0


def fast_compile_options() -> dict:
    """The options this jaxlib accepts, as jax.jit's compiler_options."""
    return {name: value for name, (value, dropped_in) in FAST_COMPILE_OPTIONS.items()
            if dropped_in is None or jaxlib_version() < dropped_in}


def fast_compile_flags() -> str:
    """The same options as XLA_FLAGS text."""
    return " ".join(f"--{name}={str(value).lower()}" for name, value in fast_compile_options().items())
