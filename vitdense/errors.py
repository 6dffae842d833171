"""User-facing errors.

Every error a user can cause (a missing file, a corrupt image, a checkpoint for another architecture, a
bad option) raises a :class:`VitdenseError` subclass whose message names the file or option and says how
to fix it. The CLI prints the message on one line and exits with code 2; programming errors stay
ordinary exceptions with tracebacks.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping


def cli_terms(text: str, flags: Mapping[str, str], names: Iterable[str]) -> str:
    """``text`` with its mentions of the Python arguments ``names`` (``weights=PATH``,
    ``model='dino_vits8'``) written as the command line's flags (``--weights PATH``, ``--model dino_vits8``):
    ``flags`` maps a name to its flag where it is not ``--name-with-dashes``."""
    for name in names:
        flag = flags.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w-]){re.escape(name)}=(?:'([^']*)'|([^\s,;:)]+))",
                      lambda m: f"{flag} {m.group(1) if m.group(1) is not None else m.group(2)}", text)
    return text


class VitdenseError(Exception):
    """Base class of errors caused by user input."""

    arg: str | None = None  # the Python argument at fault, when the error is about one argument's value
    value: object = None
    problem: str = ""
    mentions: tuple[str, ...] = ()  # Python arguments the message names as ``name=VALUE`` (e.g. a hint)

    def naming(self, *names: str) -> "VitdenseError":
        """Say that the message names these Python arguments as ``name=VALUE``, for :meth:`cli_message`."""
        self.mentions = names
        return self

    def cli_message(self, flags: dict[str, str]) -> str:
        """The message as the command line says it: the argument's flag (``flags``, else ``--name-with-dashes``)
        instead of its Python name, and so for every argument it mentions."""
        if self.arg is None:
            return cli_terms(str(self), flags, self.mentions)
        message = f"{flags.get(self.arg, '--' + self.arg.replace('_', '-'))} {self.value}: {self.problem}"
        return cli_terms(message, flags, self.mentions)


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
