"""The errors a user can catch: one base class, three kinds.

``LungEffNetError`` is the base of every error this package raises on purpose. Its three kinds say
whose move it is:

- ``InputError``: the data or an argument is wrong (a manifest without a label column, too few
  patients for the folds, an output folder that holds another run). Fix the input.
- ``ConfigError``: a setting is out of range or unknown; the message names the key and the value.
- ``ServiceError``: a service the run needs (the MLflow tracking server or store) cannot be reached.

The CLI prints these as one line and exits with the error's ``exit_code``: 2 for input and config
errors (fix the command), 3 when the input held files but none could be used (``NoUsableInputError``),
1 for a service that failed. Anything else is a bug: it keeps its traceback and exits 1.
The concrete classes below subclass ``ValueError`` or ``RuntimeError`` as well, so code written against
the built-in types keeps working.
"""

from __future__ import annotations


class LungEffNetError(Exception):
    """Base of all errors lung-effnet raises on purpose (bad input, bad config, unreachable service)."""

    exit_code = 2
    """What the ``lung-effnet`` command exits with when this error ends it."""


class InputError(LungEffNetError, ValueError):
    """The data or an argument cannot be used; the message names the file, flag or column."""


class ConfigError(LungEffNetError, ValueError):
    """A config that cannot be used; the message names the key and the value received."""


class ServiceError(LungEffNetError, RuntimeError):
    """A service the run needs cannot be reached or refuses the request."""

    exit_code = 1


class MissingInputError(InputError, FileNotFoundError):
    """A file, folder, model or run that was named does not exist or lacks what the step needs."""


class NoUsableInputError(InputError):
    """The input held files, but not one could be used (every file failed or was skipped). The
    outputs that account for each file (``files.csv``, ``errors.csv``) are written before it is raised."""

    exit_code = 3


class UsageError(InputError):
    """A command-line option that cannot be used; the message names the flag."""


class ManifestError(InputError):
    """A manifest or labels file that cannot be used at all (missing column, unreadable)."""


class TooFewPatientsError(InputError):
    """The data cannot fill the folds asked for."""


class LeakageError(InputError):
    """A patient or an identical image is on both sides of a split."""


class RunExistsError(InputError):
    """The output folder holds a run and ``--resume`` was not given."""


class OutputMismatchError(InputError):
    """``--out`` holds records of a run with another model or settings."""


class TrackingError(ServiceError):
    """The tracking server or store cannot be used; the message is one line."""


class JobError(ServiceError):
    """A job submitted to the cluster (or to local processes) failed; the message names its log."""
