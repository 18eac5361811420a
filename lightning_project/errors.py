"""The one exception for user mistakes: entry points print its message as one line and exit 2."""


class UserError(Exception):
    """A wrong configuration value, file or input: the message names it, the value and the fix."""


def close_names(wanted: str, names, n: int = 5) -> str:
    """The closest candidates for a misspelt name, for error messages."""
    import difflib

    names = list(names)
    close = difflib.get_close_matches(wanted, names, n=n, cutoff=0.4)
    if not close:  # fall back to names sharing a prefix (e.g. 'classifier.9' -> 'classifier.6.weight')
        stem = wanted.split(".")[0]
        close = [x for x in names if x.startswith(stem)][:n]
    return ", ".join(close) if close else "none close"


class Stopped(UserError):
    """The run was stopped from outside (SIGTERM, Ctrl-C): a sweep stops too, a resume continues it."""
