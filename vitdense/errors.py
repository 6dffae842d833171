"""User-facing errors.

Every error a user can cause (a missing file, a corrupt image, a checkpoint for another architecture, a
bad option) raises a :class:`VitdenseError` subclass whose message names the file or option and says how
to fix it. The CLI prints the message on one line and exits with code 2; programming errors stay
ordinary exceptions with tracebacks.
"""
from __future__ import annotations


class VitdenseError(Exception):
    """Base class of errors caused by user input."""

    arg: str | None = None  # the Python argument at fault, when the error is about one argument's value
    value: object = None
    problem: str = ""

    def cli_message(self, flags: dict[str, str]) -> str:
        """The message as the command line says it: the argument's flag (``flags``, else ``--name-with-dashes``)
        instead of its Python name."""
        if self.arg is None:
            return str(self)
        return f"{flags.get(self.arg, '--' + self.arg.replace('_', '-'))} {self.value}: {self.problem}"


class ImageError(VitdenseError):
    """An image file is missing, unreadable, or too small."""


class CheckpointError(VitdenseError):
    """A weights file is missing, unreadable, or does not match the architecture."""


class ConfigError(VitdenseError):
    """An option has a value that cannot work (bad stride, unknown model, bad layer...)."""

    @classmethod
    def argument(cls, arg: str, value: object, problem: str) -> "ConfigError":
        """``facet='nose': choose one of ...`` in Python; the CLI shows ``--facet nose: choose one of ...``."""
        err = cls(f"{arg}={value!r}: {problem}")
        err.arg, err.value, err.problem = arg, value, problem
        return err


class DataError(VitdenseError):
    """A folder or data set is empty or malformed."""


class WeakWeightsWarning(UserWarning):
    """``ViTExtractor()`` fell back to the bundled backbone, whose features are much weaker than DINO's."""
