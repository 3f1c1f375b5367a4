"""Config files outside the `ramjax` command: load `path[:variant]`, and set a field from "a.b=value" text.

The scripts under experiments/ take configs the way `ramjax train --config` does, without absl flags.
"""

from __future__ import annotations

import ast
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
    """Applies "model.d_model=128" to `config`, converting the text to the field's current type (Python literals
    for numbers and tuples, True/False for booleans, text as is for strings). A field that does not exist, or
    a value of the wrong kind, raises an error naming the field."""
    field, _, value = item.partition("=")
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    old = node[leaf]
    if isinstance(old, bool):
        if value not in ("True", "False"):
            raise ValueError(f"{field}: must be True or False, got {value!r}")
        node[leaf] = value == "True"
    elif isinstance(old, str) or old is None:
        node[leaf] = value
    else:
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{field}: expected a {type(old).__name__}, got {value!r}") from None
        if isinstance(old, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if isinstance(old, (tuple, list)) and isinstance(parsed, (tuple, list)):
            parsed = type(old)(parsed)
        if not isinstance(parsed, type(old)):
            raise ValueError(f"{field}: expected a {type(old).__name__}, got {value!r}")
        node[leaf] = parsed
