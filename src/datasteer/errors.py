"""User-facing errors.

Every error a user can cause (bad input, unknown model, missing optional dependency, a run
directory made with another config) is a `DatasteerError`. Its message is one line that says
what was wrong and what to do; the CLI prints it without a traceback and exits with status 2.
"""


class DatasteerError(Exception):
    """Base class for errors the user can fix."""

    exit_code = 2


class InputError(DatasteerError):
    """A missing, unreadable or malformed input file, or an empty input set."""


class ConfigError(DatasteerError):
    """An invalid configuration (recipe, flags)."""


class ModelNotFoundError(DatasteerError):
    """A model spec that resolves to nothing."""


class MissingDependencyError(DatasteerError):
    """An optional dependency that a requested feature needs is not installed."""

    def __init__(self, feature: str, install: str):
        super().__init__(f"{feature} needs an optional dependency that is not installed; install it with `{install}`")


def optional_import(module: str, feature: str, install: str):
    """Import an optional dependency, or raise MissingDependencyError naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(feature, install) from None


class RunMismatchError(DatasteerError):
    """A run directory whose manifest was written by a different config or input."""


class TrainingDivergedError(ConfigError):
    """Training produced a non-finite (or exploding) loss, gradient or parameter: almost always a learning rate
    far too high. Raised at the step where it shows, before the weights are saved or used."""


class RunInUseError(RunMismatchError):
    """The run directory is being used by another process."""


class OutputError(DatasteerError):
    """An output that cannot be written: a read-only folder, a path that is not a directory, a full disk."""


class TeacherRequestError(DatasteerError):
    """A teacher endpoint refused a request, or kept failing after all retries."""
