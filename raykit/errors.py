"""raykit's exceptions, one per exit code the CLI gives a scheduler:

- `RaykitError`: bad input (config, data, paths, credentials), found before anything is written: exit 2;
- `RunFailed`: the input was accepted but the run failed (a worker lost for good, storage down past its
  retries): exit 1; what was done is kept, and the message says how to resume;
- `Interrupted`: stopped by the user (Ctrl-C): exit 130, resumable the same way.

The CLI prints the message as one line, last on stderr.
"""


class RaykitError(Exception):
    """A problem with the user's input (config, data, paths, credentials).

    The message must say what is wrong, where, and how to fix it: the CLI prints it as is.
    """


class ConfigError(RaykitError):
    pass


class DataError(RaykitError):
    pass


class RunFailed(Exception):
    """The run failed at run time; the message says what failed and how to resume."""


class Interrupted(RunFailed):
    """The user stopped the run; the message says how to resume."""


class StorageUnavailable(RunFailed):
    """The object store did not answer within RAYKIT_STORAGE_RETRY; what was written is kept."""
