"""User-facing errors.

Anything a user can cause (a bad folder, a corrupt image, a wrong option, a checkpoint of the other family) raises
:class:`ViewsslError` with one line that names the file or option and what is wrong. The CLI prints that line and
exits with code 2, without a traceback (``--debug`` shows it).
"""
from __future__ import annotations

import os


class ViewsslError(Exception):
    """An error caused by the user's input; its message is one line that names the file or option."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)
