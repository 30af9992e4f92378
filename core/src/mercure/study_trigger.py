"""mercure's ``study_trigger_series``: which received series complete a study.

The text is quoted series descriptions combined with ``and``, ``or``, ``not`` and parentheses,
e.g. ``'Axial T2' and ('Sag T1' or 'Cor T1')``; it is parsed like a rule (never evaluated by
Python) and errors point at their column, at configuration load.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Sequence
from typing import Final

from mercure.rule_source import MAX_DEPTH, RuleError, Source, friendly

__all__ = ["check_completion_series", "parse_completion_series"]


class _SeriesExpr:
    """A compiled series list; ``series`` are the received descriptions, lower-cased."""

    __slots__ = ()

    def matches(self, series: Sequence[str]) -> bool:
        raise NotImplementedError


class _SeriesTerm(_SeriesExpr):
    __slots__ = ("needle",)

    def __init__(self, needle: str) -> None:
        self.needle = needle

    def matches(self, series: Sequence[str]) -> bool:
        return any(self.needle in description for description in series)


class _SeriesNot(_SeriesExpr):
    __slots__ = ("part",)

    def __init__(self, part: _SeriesExpr) -> None:
        self.part = part

    def matches(self, series: Sequence[str]) -> bool:
        return not self.part.matches(series)


class _SeriesAll(_SeriesExpr):
    __slots__ = ("parts",)

    def __init__(self, parts: tuple[_SeriesExpr, ...]) -> None:
        self.parts = parts

    def matches(self, series: Sequence[str]) -> bool:
        return all(part.matches(series) for part in self.parts)


class _SeriesAny(_SeriesExpr):
    __slots__ = ("parts",)

    def __init__(self, parts: tuple[_SeriesExpr, ...]) -> None:
        self.parts = parts

    def matches(self, series: Sequence[str]) -> bool:
        return any(part.matches(series) for part in self.parts)


_SERIES_KIND: Final = "series list"
_SERIES_HINT: Final = (
    "only quoted series descriptions combined with 'and', 'or', 'not' and parentheses are allowed"
)


def _build_series(src: Source, node: ast.expr, depth: int) -> _SeriesExpr:
    if depth > MAX_DEPTH:
        raise src.error(src.start(node), "the expression is nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        if not node.value:
            raise src.error(src.start(node), "an empty series description '' matches anything")
        return _SeriesTerm(node.value.lower())
    if isinstance(node, ast.BoolOp):
        parts = tuple(_build_series(src, value, depth + 1) for value in node.values)
        return _SeriesAll(parts) if isinstance(node.op, ast.And) else _SeriesAny(parts)
    if isinstance(node, ast.Name):
        raise src.error(
            src.start(node),
            f"'{node.id}' must be in quotes ('{node.id}'); {_SERIES_HINT}",
        )
    if isinstance(node, ast.BinOp):
        raise src.error(
            src.operator_offset(node.left, node.right), f"{friendly(node)}: {_SERIES_HINT}"
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        # mercure's editor refuses 'not', but its router evaluates it: a configuration that
        # uses it routes the same here.
        return _SeriesNot(_build_series(src, node.operand, depth + 1))
    raise src.error(src.start(node), f"{friendly(node)} is not allowed; {_SERIES_HINT}")


@functools.lru_cache(maxsize=256)
def _compile_completion(text: str) -> _SeriesExpr:
    source = Source(text, placeholders=False, kind=_SERIES_KIND)
    return _build_series(source, source.parse().body, 0)


def check_completion_series(value: str) -> str | None:
    """Validate a ``study_trigger_series`` text: None when valid, else the error description.

    The syntax is mercure's: quoted series descriptions combined with ``and``/``or`` and
    parentheses, e.g. ``'T1' and ('T2' or 'FLAIR')``. As in mercure, an empty value is an error.
    """
    if not value or not value.strip():
        return "the list of series must not be empty, e.g. 'T1' and ('T2' or 'FLAIR')"
    try:
        _compile_completion(value)
    except RuleError as exc:
        return str(exc)
    return None


def parse_completion_series(completion_str: str, received_series: list[str]) -> bool:
    """Whether the series received so far complete a study, per ``study_trigger_series``.

    Each quoted description is satisfied when it is a substring of any received series
    description, compared case-insensitively (as mercure does). As in mercure: nothing received
    means not complete, an empty condition means complete, and an invalid condition (which
    :func:`check_completion_series` reports when the configuration is loaded) means not complete.
    """
    if not received_series:
        return False
    if not completion_str or not completion_str.strip():
        return True
    try:
        expression = _compile_completion(completion_str)
    except RuleError:
        return False
    return expression.matches([description.lower() for description in received_series])
