"""The errors of ``recon.datasets.io``: one-line messages ``"PATH: what is wrong (what was expected)"``."""

from __future__ import annotations

import os

__all__ = ["ImageReadError", "ImageWriteError", "one_line"]


def one_line(text: object) -> str:
    """``text`` as one line (runs of whitespace, newlines included, become one space).

    Args:
        text: anything ``str`` takes.

    Returns:
        The one-line text.
    """
    return " ".join(str(text).split())


class ImageReadError(ValueError):
    """An input could not be read as an image. ``path`` names it; the message is one line,
    ``"PATH: what is wrong (what was expected)"``, without patient data."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class ImageWriteError(ValueError):
    """An output could not be written. ``path`` names the file or folder; the message is one line,
    ``"PATH: what is wrong (what was expected)"``. Nothing is left behind by a failed write."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")
