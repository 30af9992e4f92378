"""The hidden temporary name a file is uploaded under; the rest of the layout is the core's.

See :mod:`mercure.remote_layout` for the folders and the ``.complete`` marker. Each instance
is written under ``.<name>.part`` and renamed once all its bytes are there (and its size is
checked), so a reader never sees a half file under an instance's name.
"""

from __future__ import annotations

from posixpath import basename, dirname, join

PART_SUFFIX = ".part"


def part_name(path: str) -> str:
    """The hidden temporary name a file is written under before it is renamed to ``path``."""
    return join(dirname(path), f".{basename(path)}{PART_SUFFIX}")
