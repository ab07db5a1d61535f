"""Errors that end a command with a one-line message instead of a traceback."""


class KdistillError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 1


class UserError(KdistillError):
    """Bad input (missing data, unknown name, wrong type...): exit status 2."""

    exit_code = 2


class TrainingError(KdistillError):
    """Training cannot go on (e.g. non-finite loss): exit status 1, checkpoints intact."""

    exit_code = 1
