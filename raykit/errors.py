"""One exception type for bad input: the CLI prints its message as one line and exits non-zero."""


class RaykitError(Exception):
    """A problem with the user's input (config, data, paths, credentials).

    The message must say what is wrong, where, and how to fix it: the CLI prints it as is.
    """


class ConfigError(RaykitError):
    pass


class DataError(RaykitError):
    pass
