"""The evaluator of compiled rules: Python's expression semantics on an allow-listed tree.

:mod:`mercure.rules` parses a rule and builds a tree of the node classes here; nothing of the
rule text ever reaches Python's own evaluator. The semantics are those of mercure's
evaluator (Python's, on a ``tags`` object):

* a tag that is missing, or any operation that fails (``float('abc')``, ``'1' < 2``, a division
  by zero), stops the evaluation and **the whole rule is False** -- also when the failing
  part sits inside an ``or`` or under a ``not`` (the rule tester says so);
* ``tags.Keyword`` falls back to a case-insensitive match; ``tags['Keyword']`` and the legacy
  ``@Keyword@`` do not; ``'Keyword' in tags`` tests presence;
* ``and``/``or`` return one of their operands, and the rule matches if the final value is
  true (a non-empty text is true).

Operations that could exhaust the router are bounded as mercure's evaluator bounds them:
exponents up to 10000, shifts up to 1000, texts and lists up to 262144 items, and integers
up to a million bits; past that the rule fails (False, with the reason).
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

MAX_EXPONENT: Final = 10_000
MAX_SHIFT: Final = 1_000
MAX_LENGTH: Final = 262_144
MAX_INT_BITS: Final = 1_000_000
MAX_RANGE: Final = 1_000_000


class Abort(Exception):
    """The evaluation stops here; the rule is False. ``missing`` names a missing tag."""

    def __init__(self, note: str, missing: str | None = None) -> None:
        super().__init__(note)
        self.note = note
        self.missing = missing


class TagsView:
    """What a rule sees as ``tags``: presence (``in``), ``len`` and iteration only."""

    __slots__ = ("_tags",)

    def __init__(self, tags: Mapping[str, str]) -> None:
        self._tags = tags

    def __contains__(self, name: object) -> bool:
        return name in self._tags

    def __len__(self) -> int:
        return len(self._tags)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tags)


class Context:
    """Per-evaluation state: the tags, what was looked up, and how deep in or/not we are."""

    __slots__ = ("guarded", "missing", "notes", "surprise", "tags", "view")

    def __init__(self, tags: Mapping[str, str]) -> None:
        self.tags = tags
        self.view = TagsView(tags)
        self.missing: dict[str, None] = {}
        self.notes: dict[str, None] = {}
        self.guarded = 0  # > 0 inside an 'or' or a 'not'
        self.surprise = False

    def lookup(self, name: str, *, exact: bool) -> str:
        value = self.tags.get(name)
        if value is None and not exact:
            lowered = name.lower()
            value = next((v for k, v in self.tags.items() if k.lower() == lowered), None)
        if value is None:
            self.missing.setdefault(name, None)
            if self.guarded:
                self.surprise = True
            raise Abort(f"tag {name} is missing", missing=name)
        return value

    def fail(self, source: str, problem: object) -> Abort:
        if self.guarded:
            self.surprise = True
        return Abort(f"{source} failed: {problem}")


class Node:
    """A node of a compiled rule; ``source`` is its text as the user wrote it."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def run(self, ctx: Context) -> Any:
        raise NotImplementedError


class Const(Node):
    __slots__ = ("value",)

    def __init__(self, source: str, value: object) -> None:
        super().__init__(source)
        self.value = value

    def run(self, ctx: Context) -> Any:
        return self.value


class TagsRef(Node):
    """The bare name ``tags`` (``'Modality' in tags``, ``len(tags)``)."""

    def run(self, ctx: Context) -> Any:
        return ctx.view


class Tag(Node):
    __slots__ = ("exact", "name")

    def __init__(self, source: str, name: str, *, exact: bool) -> None:
        super().__init__(source)
        self.name = name
        self.exact = exact

    def run(self, ctx: Context) -> Any:
        return ctx.lookup(self.name, exact=self.exact)


class DynamicTag(Node):
    """``tags[<expression>]``: an exact lookup of a computed keyword."""

    __slots__ = ("key",)

    def __init__(self, source: str, key: Node) -> None:
        super().__init__(source)
        self.key = key

    def run(self, ctx: Context) -> Any:
        key = self.key.run(ctx)
        if not isinstance(key, str):
            raise ctx.fail(self.source, f"a tag keyword must be text, not {type(key).__name__}")
        return ctx.lookup(key, exact=True)


class Not(Node):
    __slots__ = ("operand",)

    def __init__(self, source: str, operand: Node) -> None:
        super().__init__(source)
        self.operand = operand

    def run(self, ctx: Context) -> Any:
        ctx.guarded += 1
        try:
            return not self.operand.run(ctx)
        finally:
            ctx.guarded -= 1


class And(Node):
    __slots__ = ("items",)

    def __init__(self, source: str, items: tuple[Node, ...]) -> None:
        super().__init__(source)
        self.items = items

    def run(self, ctx: Context) -> Any:
        value: Any = True
        for item in self.items:
            value = item.run(ctx)
            if not value:
                return value
        return value


class Or(Node):
    __slots__ = ("items",)

    def __init__(self, source: str, items: tuple[Node, ...]) -> None:
        super().__init__(source)
        self.items = items

    def run(self, ctx: Context) -> Any:
        value: Any = False
        ctx.guarded += 1
        try:
            for item in self.items:
                value = item.run(ctx)
                if value:
                    return value
            return value
        finally:
            ctx.guarded -= 1


class Collection(Node):
    __slots__ = ("items", "kind")

    def __init__(self, source: str, kind: type, items: tuple[Node, ...]) -> None:
        super().__init__(source)
        self.kind = kind
        self.items = items

    def run(self, ctx: Context) -> Any:
        values = [item.run(ctx) for item in self.items]
        try:
            return self.kind(values)
        except TypeError as exc:  # an unhashable element of a set
            raise ctx.fail(self.source, exc) from None


def _hint(symbol: str, left: Any, right: Any) -> str:
    numbers = (int, float)
    if symbol in ("<", "<=", ">", ">=") and (
        (isinstance(left, str) and isinstance(right, numbers))
        or (isinstance(right, str) and isinstance(left, numbers))
    ):
        return " (tag values are text: convert with float(...) or int(...))"
    return ""


COMPARE: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
    "is": operator.is_,
    "is not": operator.is_not,
}


class Compare(Node):
    __slots__ = ("comparators", "left", "ops")

    def __init__(
        self, source: str, left: Node, ops: tuple[str, ...], comparators: tuple[Node, ...]
    ) -> None:
        super().__init__(source)
        self.left = left
        self.ops = ops
        self.comparators = comparators

    def run(self, ctx: Context) -> Any:
        left = self.left.run(ctx)
        for symbol, comparator in zip(self.ops, self.comparators, strict=True):
            right = comparator.run(ctx)
            try:
                ok = bool(COMPARE[symbol](left, right))
            except (TypeError, ValueError) as exc:
                raise ctx.fail(self.source, f"{exc}{_hint(symbol, left, right)}") from None
            if not ok:
                return False
            left = right
        return True


def _check_int(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"the result would have more than {MAX_INT_BITS} bits")
    return value


def _check_length(value: Any) -> Any:
    if isinstance(value, str | list | tuple | bytes) and len(value) > MAX_LENGTH:
        raise ValueError(f"the result would be longer than {MAX_LENGTH}")
    return _check_int(value)


def safe_pow(base: Any, exponent: Any, modulo: Any = None) -> Any:
    """``**`` and ``pow()`` with mercure's evaluator's bound on the exponent."""
    if isinstance(exponent, int | float) and abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    if (
        modulo is None
        and isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and base.bit_length() * exponent > MAX_INT_BITS
    ):
        raise ValueError(f"the result would have more than {MAX_INT_BITS} bits")
    return pow(base, exponent) if modulo is None else pow(base, exponent, modulo)


def _times(left: Any, right: Any) -> Any:
    for seq, count in ((left, right), (right, left)):
        sized = isinstance(seq, str | list | tuple) and isinstance(count, int)
        if sized and len(seq) * max(count, 0) > MAX_LENGTH:
            raise ValueError(f"the result would be longer than {MAX_LENGTH}")
    ints = isinstance(left, int) and isinstance(right, int)
    if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise ValueError(f"the result would have more than {MAX_INT_BITS} bits")
    return left * right


_WIDTH_RE: Final = re.compile(r"%[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, str):  # text formatting: no widths that would build huge texts
        for width, precision in _WIDTH_RE.findall(left):
            for part in (width, precision):
                if part == "*" or (part and int(part) > MAX_LENGTH):
                    raise ValueError("a field width or precision that large is not allowed")
    return _check_length(left % right)


def _shift(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def shift(left: Any, right: Any) -> Any:
        if isinstance(right, int) and right > MAX_SHIFT:
            raise ValueError(f"shift by {right} is larger than {MAX_SHIFT}")
        return _check_int(op(left, right))

    return shift


BINARY: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "+": lambda a, b: _check_length(a + b),
    "-": operator.sub,
    "*": _times,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": _modulo,
    "**": safe_pow,
    "<<": _shift(operator.lshift),
    ">>": _shift(operator.rshift),
    "|": operator.or_,
    "&": operator.and_,
    "^": operator.xor,
}
UNARY: Final[dict[str, Callable[[Any], Any]]] = {
    "-": operator.neg,
    "+": operator.pos,
    "~": operator.invert,
}
RUNTIME_ERRORS: Final = (ArithmeticError, LookupError, TypeError, ValueError, re.error)


class BinOp(Node):
    __slots__ = ("left", "right", "symbol")

    def __init__(self, source: str, symbol: str, left: Node, right: Node) -> None:
        super().__init__(source)
        self.symbol, self.left, self.right = symbol, left, right

    def run(self, ctx: Context) -> Any:
        left = self.left.run(ctx)
        right = self.right.run(ctx)
        try:
            return BINARY[self.symbol](left, right)
        except RUNTIME_ERRORS as exc:
            raise ctx.fail(self.source, exc) from None


class UnaryOp(Node):
    __slots__ = ("operand", "symbol")

    def __init__(self, source: str, symbol: str, operand: Node) -> None:
        super().__init__(source)
        self.symbol, self.operand = symbol, operand

    def run(self, ctx: Context) -> Any:
        value = self.operand.run(ctx)
        try:
            return UNARY[self.symbol](value)
        except RUNTIME_ERRORS as exc:
            raise ctx.fail(self.source, exc) from None


class Call(Node):
    __slots__ = ("args", "impl")

    def __init__(self, source: str, impl: Callable[..., Any], args: tuple[Node, ...]) -> None:
        super().__init__(source)
        self.impl = impl
        self.args = args

    def run(self, ctx: Context) -> Any:
        values = [arg.run(ctx) for arg in self.args]
        try:
            return _check_length(self.impl(*values))
        except RUNTIME_ERRORS as exc:
            raise ctx.fail(self.source, exc) from None


class Method(Node):
    __slots__ = ("args", "impl", "name", "receiver")

    def __init__(
        self, source: str, receiver: Node, name: str, impl: Callable[..., Any],
        args: tuple[Node, ...],
    ) -> None:  # fmt: skip
        super().__init__(source)
        self.receiver, self.name, self.impl, self.args = receiver, name, impl, args

    def run(self, ctx: Context) -> Any:
        receiver = self.receiver.run(ctx)
        values = [arg.run(ctx) for arg in self.args]
        if not isinstance(receiver, str):
            raise ctx.fail(
                self.source, f"'{type(receiver).__name__}' object has no method .{self.name}()"
            )
        try:
            return _check_length(self.impl(receiver, *values))
        except RUNTIME_ERRORS as exc:
            raise ctx.fail(self.source, exc) from None


class Index(Node):
    __slots__ = ("index", "lower", "step", "upper", "value")

    def __init__(
        self, source: str, value: Node, index: Node | None = None, *,
        lower: Node | None = None, upper: Node | None = None, step: Node | None = None,
    ) -> None:  # fmt: skip
        super().__init__(source)
        self.value, self.index = value, index
        self.lower, self.upper, self.step = lower, upper, step

    def run(self, ctx: Context) -> Any:
        value = self.value.run(ctx)
        try:
            if self.index is not None:
                key: Any = self.index.run(ctx)
            else:
                key = slice(*(part.run(ctx) if part is not None else None
                              for part in (self.lower, self.upper, self.step)))  # fmt: skip
            if not isinstance(value, str | list | tuple):
                raise TypeError(f"'{type(value).__name__}' object is not subscriptable")
            return value[key]
        except RUNTIME_ERRORS as exc:
            raise ctx.fail(self.source, exc) from None


# -- the functions and methods a rule may call ------------------------------------------------


@functools.lru_cache(maxsize=256)
def regex(pattern: str) -> re.Pattern[str]:
    """Compiled regular expressions, cached: a rule's pattern is compiled once."""
    return re.compile(pattern)


def re_match(pattern: object, value: object) -> bool:
    if not isinstance(pattern, str):
        raise TypeError(f"the pattern must be text, got {type(pattern).__name__}")
    if not isinstance(value, str):
        raise TypeError(f"the value must be text, got {type(value).__name__}")
    return regex(pattern).search(value) is not None


def _bounded_range(*args: int) -> range:
    found = range(*args)
    if len(found) > MAX_RANGE:
        raise ValueError(f"range of more than {MAX_RANGE} numbers")
    return found


def _factorial(n: int) -> int:
    if isinstance(n, int) and n > 5000:
        raise ValueError("factorial of a number above 5000")
    return math.factorial(n)


def _sequence(kind: Callable[..., Any]) -> Callable[..., Any]:
    def make(*args: Any) -> Any:
        sized = range | str | list | tuple | set | frozenset | TagsView
        if args and isinstance(args[0], sized) and len(args[0]) > MAX_LENGTH:
            raise ValueError(f"more than {MAX_LENGTH} items")
        return kind(*args)

    return make


# name -> (implementation, minimum and maximum number of arguments or None for any).
# mercure's evaluator offers these (its allow-list), plus this project's regex helpers.
FUNCTIONS: Final[dict[str, tuple[Callable[..., Any], int, int | None]]] = {
    "abs": (abs, 1, 1),
    "all": (all, 1, 1),
    "any": (any, 1, 1),
    "bin": (bin, 1, 1),
    "bool": (bool, 0, 1),
    "chr": (chr, 1, 1),
    "divmod": (divmod, 2, 2),
    "float": (float, 0, 1),
    "hex": (hex, 1, 1),
    "int": (int, 0, 2),
    "len": (len, 1, 1),
    "list": (_sequence(list), 0, 1),
    "max": (max, 1, None),
    "min": (min, 1, None),
    "oct": (oct, 1, 1),
    "ord": (ord, 1, 1),
    "pow": (safe_pow, 2, 3),
    "range": (_bounded_range, 1, 3),
    "repr": (repr, 1, 1),
    "round": (round, 1, 2),
    "set": (_sequence(set), 0, 1),
    "sorted": (_sequence(sorted), 1, 1),
    "str": (str, 0, 1),
    "sum": (sum, 1, 2),
    "tuple": (_sequence(tuple), 0, 1),
    # math
    "acos": (math.acos, 1, 1),
    "asin": (math.asin, 1, 1),
    "atan": (math.atan, 1, 1),
    "atan2": (math.atan2, 2, 2),
    "ceil": (math.ceil, 1, 1),
    "cos": (math.cos, 1, 1),
    "exp": (math.exp, 1, 1),
    "fabs": (math.fabs, 1, 1),
    "factorial": (_factorial, 1, 1),
    "floor": (math.floor, 1, 1),
    "isinf": (math.isinf, 1, 1),
    "isnan": (math.isnan, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "sin": (math.sin, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "tan": (math.tan, 1, 1),
    "trunc": (math.trunc, 1, 1),
    # this project's
    "re_match": (re_match, 2, 2),
    "regex": (re_match, 2, 2),
}
CONSTANTS: Final[dict[str, object]] = {"pi": math.pi, "e": math.e}
REGEX_FUNCTIONS: Final = frozenset({"re_match", "regex"})


def _padded(method: Callable[..., str]) -> Callable[..., str]:
    def pad(text: str, width: int, *rest: Any) -> str:
        if isinstance(width, int) and width > MAX_LENGTH:
            raise ValueError(f"width {width} is larger than {MAX_LENGTH}")
        return method(text, width, *rest)

    return pad


def _replace(text: str, old: str, new: str, count: int = -1) -> str:
    occurrences = text.count(old) if count < 0 else min(text.count(old), count)
    growth = len(new) - len(old) if isinstance(new, str) and isinstance(old, str) else 0
    if len(text) + occurrences * growth > MAX_LENGTH:
        raise ValueError(f"the result would be longer than {MAX_LENGTH}")
    return text.replace(old, new, count)


def _join(text: str, items: Any) -> str:
    items = list(items) if not isinstance(items, list | tuple) else items
    if len(items) > MAX_LENGTH:
        raise ValueError(f"more than {MAX_LENGTH} items")
    return text.join(items)


# The text methods a rule may call: (implementation taking the text first, min, max args).
METHODS: Final[dict[str, tuple[Callable[..., Any], int, int]]] = {
    "capitalize": (str.capitalize, 0, 0),
    "casefold": (str.casefold, 0, 0),
    "center": (_padded(str.center), 1, 2),
    "count": (str.count, 1, 3),
    "endswith": (str.endswith, 1, 3),
    "find": (str.find, 1, 3),
    "index": (str.index, 1, 3),
    "isalnum": (str.isalnum, 0, 0),
    "isalpha": (str.isalpha, 0, 0),
    "isdecimal": (str.isdecimal, 0, 0),
    "isdigit": (str.isdigit, 0, 0),
    "islower": (str.islower, 0, 0),
    "isnumeric": (str.isnumeric, 0, 0),
    "isspace": (str.isspace, 0, 0),
    "istitle": (str.istitle, 0, 0),
    "isupper": (str.isupper, 0, 0),
    "join": (_join, 1, 1),
    "ljust": (_padded(str.ljust), 1, 2),
    "lower": (str.lower, 0, 0),
    "lstrip": (str.lstrip, 0, 1),
    "partition": (str.partition, 1, 1),
    "removeprefix": (str.removeprefix, 1, 1),
    "removesuffix": (str.removesuffix, 1, 1),
    "replace": (_replace, 2, 3),
    "rfind": (str.rfind, 1, 3),
    "rindex": (str.rindex, 1, 3),
    "rjust": (_padded(str.rjust), 1, 2),
    "rpartition": (str.rpartition, 1, 1),
    "rsplit": (str.rsplit, 0, 2),
    "rstrip": (str.rstrip, 0, 1),
    "split": (str.split, 0, 2),
    "splitlines": (str.splitlines, 0, 1),
    "startswith": (str.startswith, 1, 3),
    "strip": (str.strip, 0, 1),
    "swapcase": (str.swapcase, 0, 0),
    "title": (str.title, 0, 0),
    "upper": (str.upper, 0, 0),
    "zfill": (_padded(str.zfill), 1, 1),
}

__all__ = ["FUNCTIONS", "METHODS", "Abort", "Context", "Node"]
