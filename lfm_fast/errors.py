"""The error a user can fix: the CLI prints it as one line and exits with code 2."""


class InputError(ValueError):
    """Bad input from the user (a path, a flag, a file): the message names it and what was expected."""


class RunError(RuntimeError):
    """A run that cannot go on (e.g. training diverged): the CLI prints it as one line and exits with code 1."""
