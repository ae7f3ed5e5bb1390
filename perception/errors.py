"""User-facing errors.

Every mistake a user can make (a wrong name, a missing directory, a bad image, a corrupt
checkpoint) raises a subclass of :class:`PerceptionError`. The command-line entry points
catch exactly this type and print its message as one line, so users never see a traceback
for their own mistakes, while real bugs still surface with one.
"""

from __future__ import annotations


class PerceptionError(Exception):
    """A problem with the user's input, reported as one clear line."""


class UnknownNameError(PerceptionError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class DataError(PerceptionError):
    """Missing, unreadable or malformed data."""


class InputError(PerceptionError, ValueError):
    """An image batch (or other tensor input) of the wrong shape, dtype or range."""


class CheckpointError(PerceptionError):
    """A missing, corrupt or mismatched checkpoint."""


class OutputExistsError(PerceptionError):
    """Refusing to overwrite existing results."""


class NonFiniteLossError(PerceptionError):
    """Training produced a NaN or infinite loss."""
