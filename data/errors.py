"""The data package's one-line errors: bad input (DataError) and an undecodable image (BadImage).

Kept apart from the reader interface (gcvit_data.index, which re-exports them) so that the config schema
can raise them without importing numpy or any reader.
"""
from __future__ import annotations

from pathlib import Path


class DataError(SystemExit):
    """Bad input data: exits with its one-line message instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"data error: {message}")


class BadImage(ValueError):
    """An undecodable file, raised where SystemExit cannot travel (DataLoader workers); see bad_image()."""


def bad_image(path: Path | str, reason: object) -> str:
    """The one-line message for a file that cannot be read or decoded."""
    return (f"cannot decode {path} ({reason}); run python -m gcvit_data.verify on the dataset root and train "
            "on the clean index it writes (data.index_dir)")
