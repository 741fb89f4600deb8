"""Errors that reach the user as one line and an exit code, never as a traceback."""


class UserError(Exception):
    """Bad input or an unusable environment: the CLI prints the message and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """A sweep config that cannot be used as written."""
