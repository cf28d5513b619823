"""The error type of bad user input, shared by the library and the command line."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""
