"""Config files outside the `ramjax` command: load `path[:variant]`, and set a field from "a.b=value" text.

The scripts under experiments/ take configs the way `ramjax train --config` does, without absl flags.
"""

from __future__ import annotations

import importlib.util
import os


def load_config(spec: str):
    """`get_config(variant)` of the config file in `spec` = "path/to/config.py[:variant]"."""
    path, _, variant = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def set_field(config, item: str) -> None:
    """Applies "model.d_model=128" to `config`, converting the text to the field's current type."""
    field, _, value = item.partition("=")
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    old = node[leaf]
    node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
