"""Where a job's instances go on the server, and how a reader tells a series is complete.

Layout (defaults keep mercure's: ``<folder>/<task id>/<instance>`` plus ``.complete``)::

    <folder>/<folder_pattern>/                     the series, complete, with .complete in it
    <folder>/<parent>/.<name>.<task id>.partial/   hidden staging folder while it is sent
                                                   (``.<task id>.partial`` by default)
    <folder>/<folder_pattern>_<task id>/           if another job's series holds the name

rsync sends the instances into the hidden staging folder (each under rsync's own temporary
name, renamed once its bytes are all there), the ``.complete`` marker is written into it last,
and then the folder is renamed to its final name in one step: a reader sees either no series
or all of it, marker included. The marker holds the task id, so a retry after a crash between
the rename and the router's record recognises its own, complete series and sends nothing.

(The same layout as the sftp target's; the two plugins do not depend on each other.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from posixpath import basename, dirname, join, normpath

MARKER = ".complete"
STAGING_SUFFIX = ".partial"


@dataclass(frozen=True)
class SeriesPaths:
    """The remote paths of one job (POSIX paths as the server sees them)."""

    base: str
    final: str
    alternate: str
    staging: str

    @property
    def parent(self) -> str:
        return dirname(self.final)


def series_paths(folder: str, relative: str, task_id: str) -> SeriesPaths:
    """Paths for a job whose folder renders to ``relative`` (already safe) below ``folder``."""
    base = normpath(folder) if folder not in ("", ".") else "."
    final = join(base, relative)
    parent, name = dirname(final), basename(final)
    hidden = f".{name}" if name == task_id else f".{name}.{task_id}"
    return SeriesPaths(
        base=base,
        final=final,
        alternate=f"{final}_{task_id}",
        staging=join(parent, hidden + STAGING_SUFFIX),
    )


def marker_text(task_id: str, target: str) -> str:
    """Content of ``.complete``: mercure writes it empty; the task id lets a retry know it."""
    return json.dumps({"task_id": task_id, "target": target})


def marker_probe(task_id: str) -> str:
    """The part of :func:`marker_text` that names the job (for a ``grep -F`` on the server)."""
    return json.dumps({"task_id": task_id})[1:-1]
