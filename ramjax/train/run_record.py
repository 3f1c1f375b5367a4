"""A run's record in its workdir: config.json written once, amendments.jsonl for deliberate changes.

A resumed run must compute what the uninterrupted run would have, so a rerun of a workdir with a config that
differs in anything that changes the result is refused, with the list of differences. Changing such a field on
purpose (more steps, a new learning rate after a crash) takes `--amend`: the change is appended to
amendments.jsonl with the step it takes effect at, and config.json keeps the config the run started with. The
effective config of a run is config.json with its amendments applied in order.

Fields that choose how something is computed or reported, not what is computed (implementations, the mesh,
logging, checkpoint and evaluation cadence, evaluation settings), may change freely.
"""

from __future__ import annotations

import json
import os
import time

from ramjax.errors import ConfigError

CONFIG_FILE = "config.json"
AMENDMENTS_FILE = "amendments.jsonl"

# Dotted field names (or prefixes ending in ".") that do not change the trained parameters.
RESULT_NEUTRAL = (
    "mesh.",
    "train.progress", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.address_metrics", "train.on_nonfinite", "train.microbatches", "train.loss_chunk_tokens",
    "data.eval_settings", "data.eval_examples", "data.eval_batch_size", "data.eval_seed", "data.data_dir",
    "data.num_workers",  # the LM pipeline's order does not depend on it (tests/test_lm_pipeline.py)
)
# Fields added after runs were recorded, with the value that computes what those runs computed (the ones whose
# "off" value is not False, 0 or ""): a record that lacks one of them and a config at this value are the same run.
ADDED_DEFAULTS = {
    "model.block": "pre_norm", "model.norm": "rms", "model.feed_forward": True, "model.weight_init": "default",
    "model.init_std": 0.02, "model.mamba2.gate": True, "model.mamba2.output_norm": True, "model.mamba2.d_skip": True,
    "model.mamba2.dt_scales_v": True, "model.mamba2.a_init": "uniform", "model.loglinear.lambda_init": "as_described",
    "data.layout": "standard", "optim.schedule": "warmup_cosine", "train.num_seeds": 1,
}
# Leaf names that choose an implementation of the same function, wherever they sit in the model config.
IMPLEMENTATION_LEAVES = ("impl", "decoder_impl", "remat", "remat_policy", "scan_layers", "embedding_grad")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _is_neutral(field: str) -> bool:
    if field.startswith("model.") and field.rsplit(".", 1)[-1] in IMPLEMENTATION_LEAVES:
        return True
    return any(field == n or (n.endswith(".") and field.startswith(n)) for n in RESULT_NEUTRAL)


def differences(recorded: dict, current: dict, inert: tuple[str, ...] = ()) -> dict:
    """{field: (recorded value, current value)} for every result-changing field that differs. A field the
    record lacks is a field added to ramjax since; at an "off" value (False, 0, "", None, or its ADDED_DEFAULTS
    value), or named in `inert` (fields the caller knows change nothing for this config, e.g. a RAM-Net schedule
    in a model without RAM-Net layers), it changes nothing."""
    old, new = _flatten(recorded), _flatten(current)
    diffs = {}
    for field in sorted(set(old) | set(new)):
        if _is_neutral(field):
            continue
        if field not in old and (not new[field] or field in inert or (
                field in ADDED_DEFAULTS and new[field] == ADDED_DEFAULTS[field])):
            continue
        if field not in new:
            continue  # a field ramjax no longer has: nothing can set it
        a, b = old.get(field, "<absent>"), new.get(field, "<absent>")
        if a != b:
            diffs[field] = (a, b)
    return diffs


def neutral_changes(workdir: str, current: dict) -> dict:
    """{field: (recorded, current)} of the result-neutral fields (cadences, evaluation settings, implementations)
    that differ from the run's record: what a rerun of a finished run would silently not apply."""
    recorded = effective_config(workdir)
    if recorded is None:
        return {}
    old, new = _flatten(recorded), _flatten(current)
    return {f: (old[f], new[f]) for f in sorted(set(old) & set(new)) if _is_neutral(f) and old[f] != new[f]}


def _set(tree: dict, field: str, value) -> None:
    *parents, leaf = field.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = list(value) if isinstance(value, tuple) else value


def read_amendments(workdir: str) -> list[dict]:
    path = os.path.join(workdir, AMENDMENTS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def effective_config(workdir: str) -> dict | None:
    """config.json with every amendment applied, or None when the workdir has no readable config.json."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for amendment in read_amendments(workdir):
        for field, (_, value) in amendment["changes"].items():
            _set(config, field, value)
    return config


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def check_and_record(workdir: str, current: dict, *, step: int, amend: bool, write: bool = True, log=print,
                     inert: tuple[str, ...] = ()) -> None:
    """Writes config.json on a run's first start; on a rerun, refuses a config that changes the result unless
    `amend`, in which case the changes go to amendments.jsonl at `step`. Every process checks; only the one with
    `write` (process 0) writes. `inert`: fields that change nothing for this config (see differences)."""
    path = os.path.join(workdir, CONFIG_FILE)
    recorded = effective_config(workdir)
    if recorded is None:
        if write:
            if os.path.exists(path):
                log(f"ramjax train: {path} is unreadable (torn or not JSON); writing it again from this run's "
                    "config")
            _write_atomically(path, json.dumps(current, indent=2))
        return
    diffs = differences(recorded, current, inert)
    if not diffs:
        return
    listed = "; ".join(f"{field}: recorded {a!r}, now {b!r}" for field, (a, b) in diffs.items())
    if not amend:
        raise ConfigError(f"{workdir} holds a run with a different config ({listed}). A resumed run must compute "
                          "what the uninterrupted run would have: rerun with the recorded values, use a new "
                          "--workdir, or pass --amend to change these fields from this step on (recorded in "
                          f"{AMENDMENTS_FILE})")
    if write:
        with open(os.path.join(workdir, AMENDMENTS_FILE), "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(),
                                "changes": {field: [a, b] for field, (a, b) in diffs.items()}}) + "\n")
        log(f"ramjax train: amended {workdir} at step {step}: {listed}")
