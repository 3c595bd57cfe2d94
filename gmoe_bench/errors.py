"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, environment) and how to fix it."""


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A dataset is missing, incomplete or corrupt."""


class TrainingError(Exception):
    """A seed could not finish (e.g. its loss stopped being finite); other seeds go on."""


def describe_error(err: BaseException) -> str:
    """``Type: first line of the message``: one line, however long the message (tensors, paths)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
