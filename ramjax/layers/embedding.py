"""The token embedding: nnx.Embed (same parameter, same checkpoints) whose gradient is summed as model.embedding_grad
says (ramjax/ops/shared/embedding.py: a one-hot matrix product on GPUs and TPUs, where XLA's scatter-add slows down
on the repeated tokens of text)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.ops.shared.embedding import embedding_lookup, resolve_grad


class TokenEmbedding(nnx.Embed):
    def __init__(self, num_embeddings: int, features: int, *, grad: str = "auto", **kwargs):
        resolve_grad(grad)  # an unknown value fails here, naming the field
        super().__init__(num_embeddings, features, **kwargs)
        self.grad = grad

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"token embedding: tokens must be integers, got {inputs.dtype}")
        return embedding_lookup(self.embedding[...], inputs, dtype=self.dtype, grad=self.grad)
