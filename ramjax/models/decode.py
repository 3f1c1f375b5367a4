"""Generation: the language model run token by token from a decoding state (docs/design.md, "Generation").

Every mixer has a decoding state (`init_cache`) and `extend(x, positions, cache)`, which runs the layer over a
block of tokens following the ones the state has seen and returns the state after them: the chunked / scan
forms for a prompt, the step for one token. RAM-Net's state is its PDMA memory (M slots of d_v per head, whatever
the context length; a token touches K of them), the linear mixers' their d_k x d_v matrices (one per Fenwick
level for the log-linear ones), and attention's is a KV cache of max_len tokens.

  cache = init_cache(model, batch_size, max_len)
  logits, cache = prefill(model, prompt, cache)          # [batch, time] -> logits of every prompt position
  logits, cache = decode_step(model, cache, next_token)  # [batch] -> [batch, vocab]
  step = jit_decode_step(model); logits, cache = step(cache, next_token)  # the same, compiled, cache donated
  tokens = generate(model, prompt, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

The cache also counts the tokens seen (`cache["length"]`); positions default to that count and may be given
(packed documents restart them; RAM-Net's CAPE and attention's RoPE read them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.models.lm import LanguageModel


def init_cache(model: LanguageModel, batch_size: int, max_len: int) -> dict:
    """The decoding state before the first token. `max_len` bounds prompt + generated tokens (attention's KV
    cache is that long; the recurrent mixers' states do not depend on it)."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return {"layers": model.init_cache(batch_size, max_len), "length": jnp.int32(0)}


def _default_positions(cache: dict, batch: int, time: int) -> jax.Array:
    return jnp.broadcast_to(cache["length"] + jnp.arange(time, dtype=jnp.int32), (batch, time))


def prefill(model: LanguageModel, tokens: jax.Array, cache: dict, positions: jax.Array | None = None):
    """(fp32 logits `[batch, time, vocab]` of every position of `tokens` `[batch, time]`, the state after them)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens: expected [batch, time] with time >= 1, got shape {tuple(tokens.shape)}")
    if positions is None:
        positions = _default_positions(cache, *tokens.shape)
    # From a fresh cache (a concrete length 0, also under jit when init_cache ran in the same trace) the
    # log-linear mixers can run their chunked form.
    try:
        fresh = int(cache["length"]) == 0
    except jax.errors.ConcretizationTypeError:
        fresh = False
    logits, layers = model.extend(tokens, jnp.asarray(positions, jnp.int32), cache["layers"], fresh)
    return logits, {"layers": layers, "length": cache["length"] + tokens.shape[1]}


def decode_step(model: LanguageModel, cache: dict, token: jax.Array, position: jax.Array | None = None):
    """(fp32 logits `[batch, vocab]` after one more token `[batch]`, the state after it)."""
    token = jnp.asarray(token)
    if token.ndim != 1:
        raise ValueError(f"token: expected [batch], got shape {tuple(token.shape)}")
    positions = None if position is None else jnp.broadcast_to(jnp.asarray(position, jnp.int32), token.shape)[:, None]
    logits, cache = prefill(model, token[:, None], cache, positions)
    return logits[:, 0], cache


def jit_decode_step(model: LanguageModel):
    """`decode_step` compiled for `model` (its parameters as they are now), the cache donated:
    `step(cache, token, position=None) -> (logits, cache)`.

    The state is updated in place (a RAM-Net token touches K slots per head, whatever M), so the cache passed in
    is consumed: keep only the returned one. An undonated step has to copy the whole state every token, and
    `decode_step` outside a jit does. Inside a jitted loop (`generate`) the carried cache is updated in place."""
    graphdef, params = nnx.split(model)
    return functools.partial(_jitted_decode_step, graphdef, params)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _jitted_decode_step(graphdef, params, cache, token, position=None):
    return decode_step(nnx.merge(graphdef, params), cache, token, position)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """One token per row of logits `[batch, vocab]`: argmax at temperature 0; else from softmax(logits / T)
    restricted to the top_k most likely tokens (0: all) and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the probability of the tokens before it in the order is below top_p (the most
        # likely one always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, vocab_size) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0: greedy), got {temperature!r}")
    if not isinstance(top_k, int) or not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k: must be an integer in [0, vocab size {vocab_size}] (0: no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p!r}")


def generate(model: LanguageModel, prompt: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, prompt_lengths: jax.Array | None = None) -> jax.Array:
    """`max_new_tokens` tokens after each prompt: int `[batch, max_new_tokens]`.

    prompt: int `[batch, time]`; rows shorter than `time` give their lengths in `prompt_lengths` `[batch]` (their
    tail is ignored). The common prefix is prefilled at once; then one jitted `jax.lax.scan` feeds each row its
    remaining prompt tokens and then its samples. Deterministic for a seed.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt: expected int [batch, time] with time >= 1, got shape {tuple(prompt.shape)}")
    batch, time = prompt.shape
    lengths = jnp.full((batch,), time, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (batch,) or int(lengths.min()) < 1 or int(lengths.max()) > time:
        raise ValueError(f"prompt_lengths: expected [batch] = [{batch}] values in [1, {time}], got {lengths}")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, model.lm_head.kernel.shape[-1])
    shortest = int(lengths.min())
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, lengths, jax.random.key(seed), shortest=shortest,
                     steps=time - shortest + max_new_tokens, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_k=top_k, top_p=float(top_p))


@functools.partial(jax.jit, static_argnames=("graphdef", "shortest", "steps", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _generate(graphdef, state, prompt, lengths, key, *, shortest, steps, max_new_tokens, temperature, top_k,
              top_p):
    model = nnx.merge(graphdef, state)
    batch, time = prompt.shape
    cache = init_cache(model, batch, time + max_new_tokens)
    logits, cache = prefill(model, prompt[:, :shortest], cache)
    rows, columns = jnp.arange(batch), jnp.arange(max_new_tokens)

    # Step i has seen shortest + i tokens of each row; the next one is the row's prompt token while there is one,
    # else a sample. A row's j-th new token is the sample taken after lengths + j - 1 tokens, i.e. at step
    # i = lengths - shortest + j.
    def step(carry, i):
        # The parameters ride in the carry: nnx refuses Variables holding the outer trace's values in here.
        params, logits, cache, out, key = carry
        model = nnx.merge(graphdef, params)
        key, sub = jax.random.split(key)
        sampled = sample(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        seen = shortest + i
        from_prompt = seen < lengths
        token = jnp.where(from_prompt, prompt[rows, jnp.minimum(seen, time - 1)], sampled)
        j = seen - lengths  # which new token of each row the sample is (< 0: still in the prompt)
        out = jnp.where(columns[None, :] == j[:, None], sampled[:, None], out)
        logits, cache = decode_step(model, cache, token)
        return (params, logits, cache, out, key), None

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    (*_, out, _), _ = jax.lax.scan(step, (state, logits[:, -1], cache, out, key), jnp.arange(steps))
    return out


def load_model(workdir: str, step: int | None = None) -> LanguageModel:
    """The model of a `ramjax train` workdir with the parameters of checkpoint `step` (default: the newest).

    The function is ramjax.train.setup.load_model (built on the trainer's restore machinery), imported here on
    call so that ramjax.models does not depend on ramjax.train at import time."""
    from ramjax.train.setup import load_model as load

    return load(workdir, step)
