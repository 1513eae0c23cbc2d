"""The errors users see, each in one line: bad input (exit 2) and a service that stays down (exit 1).

`require` and `require_positive` are the one-line checks that config sections validate with.
"""


class UserError(Exception):
    """Bad input from the user (config, data, model name): the CLI prints it on one line and exits 2.

    The message names the file and line, or the config key, and says what was expected.
    """


class ServiceError(RuntimeError):
    """An outside service (a model server) still failing after the retries: the CLI prints one line, exits 1.

    Not the input's fault and not a bug: what the run finished is kept, and the same command
    continues once the service is back.
    """


def invalid_yaml(where: str, error: Exception) -> UserError:
    """The one-line error for a PyYAML parse error, whose own message spans several lines.

    Args:
        where: the file (or a name for the text) that did not parse.
        error: the `yaml.YAMLError`; its line is used when it has one.

    Returns:
        A UserError "<where>:<line>: invalid YAML: <problem>", for the caller to raise.
    """
    mark = getattr(error, "problem_mark", None)
    at = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    return UserError(f"{where}{at}: invalid YAML: {' '.join(str(problem).split())}")


def require(condition: bool, message: str) -> None:
    """Raise a one-line UserError unless `condition` holds (config validation)."""
    if not condition:
        raise UserError(message)


def require_positive(key: str, value: int | float | None) -> None:
    """`key` must be a positive number (None means "not set" and passes)."""
    require(value is None or value > 0, f"{key}: expected a positive number, got {value}")
