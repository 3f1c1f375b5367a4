"""`ramjax generate --workdir DIR --prompt TEXT`: continue text with a trained language model.

Reads the run's config, newest checkpoint (or --step) and tokenizer, prefills each prompt and samples
--max_new_tokens tokens (ramjax/models/decode.py: one jitted loop; temperature 0 is greedy). Several prompts
(--prompt repeated, or --prompt_file with one prompt per line) run as one batch. A continuation stops at the
end-of-document token. Prints each prompt's continuation.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from ramjax.errors import ConfigError, exit_with_usage_error


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    texts = list(prompts or [])
    if prompt_file:
        if not os.path.isfile(prompt_file):
            raise ConfigError(f"--prompt_file {prompt_file!r}: no such file")
        with open(prompt_file, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ConfigError("give a prompt: --prompt TEXT (repeatable) or --prompt_file FILE (one prompt per line)")
    if any(not text for text in texts):
        raise ConfigError("--prompt: a prompt is empty; give at least one character")
    return texts


def generate_text(workdir: str, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, step: int | None = None) -> list[str]:
    """The continuation of each prompt, as text."""
    import jax.numpy as jnp

    from ramjax.data.tokenizers import load_run_tokenizer
    from ramjax.train.setup import load_model, load_run_config
    from ramjax.models.decode import generate

    config = load_run_config(workdir)
    if config.task != "lm":
        raise ConfigError(f"--workdir {workdir}: a {config.task!r} run; generation needs a language model (task lm)")
    try:
        tokenizer = load_run_tokenizer(workdir, config.data.tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    encoded = [tokenizer.encode(text) for text in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("--prompt: a prompt encodes to no tokens")
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    batch = np.full((len(encoded), lengths.max()), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        batch[row, :len(ids)] = ids
    model = load_model(workdir, step)
    try:
        tokens = generate(model, jnp.asarray(batch), max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, prompt_lengths=jnp.asarray(lengths))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    texts = []
    for row in np.asarray(tokens):
        ends = np.flatnonzero(row == tokenizer.eos_id)
        texts.append(tokenizer.decode(row[:ends[0]] if len(ends) else row))
    return texts


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ramjax generate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a `ramjax train` directory of a language model")
    parser.add_argument("--prompt", action="append", default=[], help="text to continue (repeat for a batch)")
    parser.add_argument("--prompt_file", default=None, help="a file of prompts, one per line")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                        "whose probability reaches top_p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompt_file)
        texts = generate_text(args.workdir, prompts, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              step=args.step)
    except ConfigError as error:
        exit_with_usage_error(f"ramjax generate: {error}")
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}" if len(prompts) == 1 else f"--- {prompt!r}\n{prompt}{text}")
