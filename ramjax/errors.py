"""Exceptions with a message meant for the person who wrote the config or the command line, and how a command
reports one."""

import sys

USAGE_ERROR = 2  # the exit status of a command stopped by its config or arguments (argparse's and absl's too)


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names the field, the value and the rule."""


def exit_with_usage_error(message: str):
    """One line on stderr and exit status USAGE_ERROR: no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(USAGE_ERROR)
