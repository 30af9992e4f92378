"""Path and object-key patterns over DICOM tags, safe against hostile tag values.

Targets that write files or objects (folder, S3, SFTP, rsync, ...) name them from tags, e.g.
``{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm``. A sender controls
every tag value, so each value is reduced to one harmless path component: ``/``, ``\\``, NUL,
control characters and a leading dot never survive, ``..`` can never climb out, and an empty or
missing value becomes a placeholder. A pattern is checked when the configuration loads: a
misspelled keyword is an error there, not a wrong folder at the first delivery.

Plugins use :data:`TagPatternField` in their settings model and call :meth:`TagPattern.render`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer
from pydicom.datadict import keyword_dict

from mercure.tags import RECEIVER_AET, SENDER_ADDRESS, SENDER_AET

#: Names a pattern may use besides DICOM keywords: the router's own tags and the job's fields.
ROUTER_FIELDS: frozenset[str] = frozenset(
    {SENDER_ADDRESS, SENDER_AET, RECEIVER_AET, "task_id", "target", "filename"}
)
MISSING_VALUE = "UNKNOWN"
MAX_COMPONENT = 128


class PatternError(ValueError):
    """A pattern that cannot be used: bad braces, an unknown keyword, an absolute path."""


def safe_value(value: str, *, placeholder: str = MISSING_VALUE) -> str:
    """One tag value as a single path component that cannot leave its folder."""
    cleaned = "".join(
        "_" if (c in "/\\" or not c.isprintable() or c in '<>:"|?*') else c for c in value.strip()
    )
    cleaned = cleaned.lstrip(".").strip()
    if not cleaned:
        return placeholder
    return cleaned[:MAX_COMPONENT]


@dataclass(frozen=True)
class TagPattern:
    """A parsed pattern: literal text and ``{Keyword}`` fields; ``/`` separates folders."""

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, *, allowed: Iterable[str] = ()) -> TagPattern:
        """Check ``text`` and return the pattern; :class:`PatternError` says what is wrong."""
        if not isinstance(text, str) or not text.strip():
            raise PatternError("a pattern must be a non-empty string")
        if text.startswith("/"):
            raise PatternError(f"pattern {text!r} must be relative (no leading '/')")
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise PatternError(f"pattern {text!r}: {exc}") from None
        extra = set(allowed)
        for literal, name, spec, conversion in parsed:
            if any(part in ("..", ".") for part in literal.split("/") if part):
                raise PatternError(f"pattern {text!r} must not contain '.' or '..' folders")
            if name is None:
                continue
            if spec or conversion:
                raise PatternError(f"pattern {text!r}: {{{name}}} takes no format options")
            if name not in keyword_dict and name not in ROUTER_FIELDS and name not in extra:
                raise PatternError(
                    f"pattern {text!r}: {{{name}}} is not a DICOM keyword (spelled as in the "
                    "standard, e.g. StudyInstanceUID) nor one of "
                    + ", ".join(sorted(ROUTER_FIELDS | extra))
                )
            names.append(name)
        return cls(text, tuple(dict.fromkeys(names)))

    def render(self, values: Mapping[str, str]) -> str:
        """The relative path for ``values``; every field becomes one safe path component."""
        out: list[str] = []
        for literal, name, _spec, _conv in string.Formatter().parse(self.text):
            out.append(literal)
            if name is not None:
                out.append(safe_value(str(values.get(name, "") or "")))
        parts = [p for p in "".join(out).split("/") if p]
        # parse() refuses '.'/'..' literals and safe_value() strips leading dots; keep the
        # guard so that no later change to either can open a way out of the base folder.
        parts = [p if p not in (".", "..") else "_" for p in parts]
        if not parts:
            raise PatternError(f"pattern {self.text!r} rendered to an empty path")
        return "/".join(parts)

    def __str__(self) -> str:
        return self.text


def _parse_pattern(value: Any) -> TagPattern:
    if isinstance(value, TagPattern):
        return value
    return TagPattern.parse(value)


TagPatternField = Annotated[
    TagPattern, BeforeValidator(_parse_pattern), PlainSerializer(str, return_type=str)
]
"""A settings field holding a :class:`TagPattern`, written in JSON as its text."""

__all__ = [
    "MISSING_VALUE",
    "ROUTER_FIELDS",
    "PatternError",
    "TagPattern",
    "TagPatternField",
    "safe_value",
]
