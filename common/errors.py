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


def error_summary(e: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """One line that says what went wrong in ``e``, for a :class:`ViewsslError` that wraps a library's exception.

    A message whose first line is a header ("Error(s) in loading state_dict for X:") gets its detail lines instead
    (the missing, unexpected or misfit keys); a bare key (``KeyError(101)``) or an empty message gets the type name,
    as does every message with ``with_type``."""
    lines = [" ".join(line.split()) for line in str(e).strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(e).__name__
    text = " ".join(lines[1:]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if with_type or isinstance(e, (KeyError, IndexError)):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
