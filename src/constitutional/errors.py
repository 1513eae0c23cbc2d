"""The one error type users see: bad input, reported in one line with exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, model name): the CLI prints it on one line and exits 2.

    The message names the file and line, or the config key, and says what was expected.
    """
