"""Config files from Python, as the command line takes them: `--config FILE[:VARIANT]` and `--config.FIELD=VALUE`.

Commands and experiments read their config through `ml_collections.config_flags`; this is for code that loads a
config file itself (`ramjax COMMAND --help`, `ramjax sweep` checking every run, a benchmark building one training
config per row).
"""

from __future__ import annotations

import importlib.util
import os

from absl import flags
from ml_collections import config_flags


def load_config(spec: str, overrides=()):
    """`get_config(VARIANT)` of the config file for spec "path/to/config.py[:VARIANT]" (unlocked), with the
    "FIELD=VALUE" items of `overrides` applied as `override` does."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    return override(config, overrides) if overrides else config


def override(config, items):
    """`config` with each "FIELD=VALUE" item (e.g. "model.d_model=128") applied exactly as `--config.FIELD=VALUE`
    is on the command line: the field's type parses the text. A field that does not exist, or a value that does
    not parse, raises ValueError naming it. Returns the config (changed in place)."""
    for item in [items] if isinstance(items, str) else items:
        argv = ["override", f"--config.{item}"]
        flag_values = flags.FlagValues()
        try:
            holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, lock_config=False,
                                                     sys_argv=argv)
            flag_values(argv)
        except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{item.partition('=')[0]}: {error_message(error)}") from None
        config = holder.value
    return config


def command_line_overrides(argv: list[str], name: str = "config") -> list[str]:
    """The FIELD=VALUE items of the `--config.FIELD=VALUE` (or `--config.FIELD VALUE`) arguments in `argv`: for a
    script that applies its command line's overrides to several configs (one per model variant), or passes them
    on to `ramjax train`."""
    prefix, items = f"--{name}.", []
    for i, arg in enumerate(argv):
        if arg.startswith(prefix):
            field, sep, value = arg[len(prefix):].partition("=")
            if not sep and i + 1 < len(argv):
                value = argv[i + 1]
            items.append(f"{field}={value}")
    return items


def error_message(error: BaseException) -> str:
    """The part of an error from absl or ml-collections that tells the user what to fix, on one line."""
    # ml-collections wraps KeyErrors in AttributeErrors whose text is the repr of a string.
    text = str(error.args[0]) if len(error.args) == 1 else str(error)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = text.replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        # An error inside the config file's get_config: its own message is the last line.
        return f"{lines[0].split(':')[0]}: {lines[-1]}"
    return " ".join(lines)
