"""ramjax: efficient sequence models with addressable memory, in JAX and Flax."""

__version__ = "0.1.0"
