"""Errors caused by what the user gave (photos, prompts, paths, checkpoints, settings).

A command line reports an :class:`InputError` as one line on stderr with exit status 2; any other
exception (a shape mismatch, a bug) keeps its traceback. ``InputError`` is a ``ValueError`` so
that code catching ``ValueError`` keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class InputError(ValueError):
    """Input that cannot be used; the message names the input and the fix."""


class MissingPathError(InputError, FileNotFoundError):
    """A file or folder the user named that does not exist (also a ``FileNotFoundError``)."""


class ReferencePhotoError(InputError):
    """A reference photo that cannot be used (no face, unreadable); names the file and the fix.

    ``photo``, ``reason`` and ``detail`` (when the face pipeline refused it) let a front end
    word the message its own way (the web app names the upload and its face-index knob).
    """

    def __init__(
        self,
        message: str,
        *,
        photo: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.photo, self.reason, self.detail = photo, reason, detail


class PromptError(InputError):
    """A prompt that cannot be used: no placeholder, or a placeholder cut off by the limit."""


class CheckpointMismatchError(InputError):
    """A training checkpoint that does not fit the base model it is loaded onto."""


def run_command(prog: str, main: Callable[..., Any], argv: list[str] | None = None) -> None:
    """Run a command line's ``main(argv)``: an InputError is one line on stderr and exit 2."""
    try:
        main(argv)
    except InputError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(2)
