"""Exceptions with a message meant for the person who wrote the config or the command line."""


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names the field, the value and the rule."""
