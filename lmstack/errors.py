"""Exceptions a user can hit. The CLI prints them as one line and exits with code 2."""


class LMStackError(Exception):
    """A problem with the user's input (path, config, request) that carries its own fix."""


class ConfigError(LMStackError, ValueError):
    """A configuration value is missing, unknown or impossible."""


class ContextLengthError(LMStackError, ValueError):
    """A prompt (plus requested new tokens) does not fit in the model's context window."""
