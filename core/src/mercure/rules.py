"""The routing-rule language: Python-like expressions over DICOM tags, evaluated safely.

Why this module exists: mercure's rules are written as Python expressions (for example
``'CINE' in tags.SeriesDescription`` or ``@Modality@ == 'CT'``) and mercure ran them through
Python's own expression evaluator, so anyone able to edit the configuration could run arbitrary
code inside the router. Here the rule text is only *parsed* with :func:`ast.parse`; every node of
the syntax tree is checked against a strict allow-list and translated into a small tree of
evaluator objects defined in this module. Nothing from the rule text is ever handed to the
interpreter, so attribute tricks (``().__class__``), imports and calls to arbitrary functions
are impossible, and they are rejected when the configuration is loaded -- with the column of the
offending text -- rather than when the first series arrives.

What a rule may contain:

* tags: ``tags.Keyword``, ``tags["Keyword"]`` and the legacy placeholders ``@Keyword@`` and
  ``%Keyword%`` (all four mean the tag's value, a string);
* literals: strings (both quote styles), integers, floats, ``True``/``False``; lists, tuples and
  sets of literals on the right of ``in``/``not in``;
* ``and``, ``or``, ``not``, parentheses, comparisons (``== != < <= > >= in not in``, also
  chained as in ``1 < x < 3``), unary minus on numbers; ``|`` and ``&`` on True/False values
  (non short-circuit ``or``/``and``, as in old mercure examples);
* the functions ``float int str len bool abs min max`` and ``re_match(pattern, value)`` /
  ``regex(pattern, value)`` (``re.search`` semantics, returning True/False; patterns are
  compiled once and cached, a literal pattern is checked when the rule is compiled -- like any
  regular expression engine, a pathological pattern can still be slow);
* the string methods ``lower upper strip lstrip rstrip startswith endswith split replace find
  count isdigit``, and indexing/slicing with integer literals (``tags.X[0:3]``).

Evaluation never raises. A missing tag (absent from the tag mapping) evaluates to a
:class:`Missing` value which propagates through functions and methods; **a missing tag makes a
comparison false** -- every comparison involving it, including ``!=`` and ``not in``, is False,
and a bare missing value is False in a boolean context (so ``not tags.X`` is True when ``X`` is
missing). A conversion that fails at run time (``float('abc')``) behaves the same way and is
recorded as a note in the :class:`RuleResult`.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

__all__ = [
    "CompiledRule",
    "Missing",
    "RuleError",
    "RuleResult",
    "check_completion_series",
    "compile_rule",
    "evaluate_rule",
    "parse_completion_series",
]

# Deepest nesting of the expression tree that is compiled; keeps the evaluator's recursion bounded.
_MAX_DEPTH: Final = 100
# Longest string a rule may produce with .replace(); stops a rule from exhausting memory.
_MAX_STRING: Final = 1_000_000

_TAG_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Legacy placeholders: @Keyword@ and %Keyword%. Names starting with "_" are matched on purpose,
# so that they are rewritten and then rejected with a precise message.
_PLACEHOLDER_RE: Final = re.compile(r"([@%])([A-Za-z_][A-Za-z0-9_]*)\1")


class RuleError(ValueError):
    """A rule (or study-completion series list) that cannot be compiled.

    Raised at compile time, never while routing, so that a bad rule is reported when the
    configuration is loaded or tested. ``offset`` (0-based) and ``position`` (1-based column)
    point into the text exactly as the user wrote it, legacy placeholders included; they count
    characters from the start of the text (a newline counts as one character).
    """

    rule: str
    offset: int
    position: int
    reason: str
    kind: str  # "rule", or "series list" for study_trigger_series

    def __init__(self, rule: str, offset: int, reason: str, *, kind: str = "rule") -> None:
        offset = max(0, min(offset, len(rule)))
        self.rule = rule
        self.offset = offset
        self.position = offset + 1
        self.reason = reason
        self.kind = kind
        super().__init__(f"{kind} {rule!r} column {offset + 1}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error picklable (worker processes report it to the parent).
        return (_rebuild_rule_error, (self.rule, self.offset, self.reason, self.kind))

    def caret(self) -> str:
        """The offending line of the text and a ``^`` under the error column, for CLI output."""
        line_start = self.rule.rfind("\n", 0, self.offset) + 1
        line_end = self.rule.find("\n", self.offset)
        line = self.rule[line_start : line_end if line_end >= 0 else len(self.rule)]
        # Keep tabs so that the caret lines up under the same character.
        pad = "".join(c if c == "\t" else " " for c in self.rule[line_start : self.offset])
        return f"{line}\n{pad}^"


def _rebuild_rule_error(rule: str, offset: int, reason: str, kind: str) -> RuleError:
    return RuleError(rule, offset, reason, kind=kind)


@final
class Missing:
    """The value of a tag that is absent, or of an operation that could not be performed.

    It exists so that a rule never raises while routing: functions and string methods applied to
    a ``Missing`` return it unchanged, every comparison involving it is False, and it is False in
    a boolean context. ``reason`` says where it came from (for debugging).
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Missing({self.reason!r})"


@dataclass(frozen=True)
class RuleResult:
    """The outcome of evaluating a rule, with what is needed to explain it to the user.

    ``missing_tags`` lists the tags the evaluation looked up but did not find, in the order they
    were first accessed (tags in a branch skipped by ``and``/``or`` short-circuiting are not
    looked up). ``notes`` holds run-time problems such as failed conversions.
    """

    matched: bool
    missing_tags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def explain(self) -> str:
        """A human-readable, multi-line account of the result (for the CLI rule tester)."""
        lines = [
            "result: True (the rule matches)"
            if self.matched
            else "result: False (the rule does not match)"
        ]
        if self.missing_tags:
            lines.append("missing tags: " + ", ".join(self.missing_tags))
            lines.append("  (a missing tag makes every comparison that uses it false)")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        if not self.missing_tags and not self.notes:
            lines.append("all tags used by the rule were present")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Evaluator tree
# --------------------------------------------------------------------------------------------

_RUNTIME_ERRORS: Final = (ArithmeticError, LookupError, TypeError, ValueError, re.error)


class _Context:
    """Per-evaluation state: the tags, and what went wrong while looking at them."""

    __slots__ = ("missing", "notes", "tags")

    def __init__(self, tags: Mapping[str, str]) -> None:
        self.tags = tags
        self.missing: dict[str, None] = {}  # insertion-ordered set
        self.notes: dict[str, None] = {}

    def lookup(self, name: str) -> object:
        if name in self.tags:
            value = self.tags[name]
            if value is not None:
                return value
        self.missing.setdefault(name, None)
        return Missing(f"tag {name} is missing")

    def fail(self, note: str) -> Missing:
        self.notes.setdefault(note, None)
        return Missing(note)


class _Node:
    """A node of the compiled rule; ``source`` is its text as the user wrote it."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def run(self, ctx: _Context) -> object:
        raise NotImplementedError


class _Const(_Node):
    __slots__ = ("value",)

    def __init__(self, source: str, value: object) -> None:
        super().__init__(source)
        self.value = value

    def run(self, ctx: _Context) -> object:
        return self.value


class _Tag(_Node):
    __slots__ = ("name",)

    def __init__(self, source: str, name: str) -> None:
        super().__init__(source)
        self.name = name

    def run(self, ctx: _Context) -> object:
        return ctx.lookup(self.name)


class _Not(_Node):
    __slots__ = ("operand",)

    def __init__(self, source: str, operand: _Node) -> None:
        super().__init__(source)
        self.operand = operand

    def run(self, ctx: _Context) -> object:
        return not self.operand.run(ctx)


class _And(_Node):
    __slots__ = ("items",)

    def __init__(self, source: str, items: tuple[_Node, ...]) -> None:
        super().__init__(source)
        self.items = items

    def run(self, ctx: _Context) -> object:
        value: object = True
        for item in self.items:
            value = item.run(ctx)
            if not value:
                return value
        return value


class _Or(_Node):
    __slots__ = ("items",)

    def __init__(self, source: str, items: tuple[_Node, ...]) -> None:
        super().__init__(source)
        self.items = items

    def run(self, ctx: _Context) -> object:
        value: object = False
        for item in self.items:
            value = item.run(ctx)
            if value:
                return value
        return value


class _BitLogic(_Node):
    """``|`` / ``&`` between True/False values: both sides are evaluated."""

    __slots__ = ("left", "right", "symbol")

    def __init__(self, source: str, symbol: str, left: _Node, right: _Node) -> None:
        super().__init__(source)
        self.symbol = symbol
        self.left = left
        self.right = right

    def run(self, ctx: _Context) -> object:
        values = []
        for side in (self.left, self.right):
            value = side.run(ctx)
            if isinstance(value, Missing):
                value = False
            if not isinstance(value, bool):
                return ctx.fail(
                    f"{self.source} failed: '{self.symbol}' needs True/False on both sides, "
                    f"got {type(value).__name__}; use 'and'/'or'"
                )
            values.append(value)
        return (values[0] or values[1]) if self.symbol == "|" else (values[0] and values[1])


def _contains(left: Any, right: Any) -> bool:
    return left in right


def _not_contains(left: Any, right: Any) -> bool:
    return left not in right


_COMPARE_OPS: Final[dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], Any]]]] = {
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.In: ("in", _contains),
    ast.NotIn: ("not in", _not_contains),
}


class _Compare(_Node):
    __slots__ = ("comparators", "left", "ops")

    def __init__(
        self,
        source: str,
        left: _Node,
        ops: tuple[tuple[str, Callable[[Any, Any], Any]], ...],
        comparators: tuple[_Node, ...],
    ) -> None:
        super().__init__(source)
        self.left = left
        self.ops = ops
        self.comparators = comparators

    def run(self, ctx: _Context) -> object:
        left = self.left.run(ctx)
        for (symbol, op), comparator in zip(self.ops, self.comparators, strict=True):
            right = comparator.run(ctx)
            if isinstance(left, Missing) or isinstance(right, Missing):
                return False
            try:
                ok = bool(op(left, right))
            except _RUNTIME_ERRORS as exc:
                hint = ""
                numbers = (int, float)
                if symbol in ("<", "<=", ">", ">=") and (
                    (isinstance(left, str) and isinstance(right, numbers))
                    or (isinstance(right, str) and isinstance(left, numbers))
                ):
                    hint = " (convert the text with float(...) or int(...))"
                ctx.fail(f"{self.source} failed: {exc}{hint}")
                return False
            if not ok:
                return False
            left = right
        return True


class _Negate(_Node):
    __slots__ = ("negative", "operand")

    def __init__(self, source: str, operand: _Node, *, negative: bool) -> None:
        super().__init__(source)
        self.operand = operand
        self.negative = negative

    def run(self, ctx: _Context) -> object:
        value = self.operand.run(ctx)
        if isinstance(value, Missing):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return ctx.fail(
                f"{self.source} failed: unary {'-' if self.negative else '+'} needs a number, "
                f"got {type(value).__name__}"
            )
        return -value if self.negative else value


class _Call(_Node):
    __slots__ = ("args", "impl")

    def __init__(self, source: str, impl: Callable[..., object], args: tuple[_Node, ...]) -> None:
        super().__init__(source)
        self.impl = impl
        self.args = args

    def run(self, ctx: _Context) -> object:
        values = []
        for arg in self.args:
            value = arg.run(ctx)
            if isinstance(value, Missing):
                return value
            values.append(value)
        try:
            return self.impl(*values)
        except _RUNTIME_ERRORS as exc:
            return ctx.fail(f"{self.source} failed: {exc}")


class _Method(_Node):
    __slots__ = ("args", "impl", "name", "receiver")

    def __init__(
        self,
        source: str,
        receiver: _Node,
        name: str,
        impl: Callable[..., object],
        args: tuple[_Node, ...],
    ) -> None:
        super().__init__(source)
        self.receiver = receiver
        self.name = name
        self.impl = impl
        self.args = args

    def run(self, ctx: _Context) -> object:
        receiver = self.receiver.run(ctx)
        if isinstance(receiver, Missing):
            return receiver
        values = []
        for arg in self.args:
            value = arg.run(ctx)
            if isinstance(value, Missing):
                return value
            values.append(value)
        if not isinstance(receiver, str):
            return ctx.fail(
                f"{self.source} failed: .{self.name}() needs a text value, "
                f"got {type(receiver).__name__}"
            )
        try:
            return self.impl(receiver, *values)
        except _RUNTIME_ERRORS as exc:
            return ctx.fail(f"{self.source} failed: {exc}")


class _Index(_Node):
    __slots__ = ("index", "value")

    def __init__(self, source: str, value: _Node, index: int | slice) -> None:
        super().__init__(source)
        self.value = value
        self.index = index

    def run(self, ctx: _Context) -> object:
        value = self.value.run(ctx)
        if isinstance(value, Missing):
            return value
        if not isinstance(value, str | list | tuple):
            return ctx.fail(
                f"{self.source} failed: only text and lists can be indexed, "
                f"got {type(value).__name__}"
            )
        try:
            return value[self.index]
        except _RUNTIME_ERRORS as exc:
            return ctx.fail(f"{self.source} failed: {exc}")


# --------------------------------------------------------------------------------------------
# Functions and string methods available to rules
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    """Compiled regular expressions, cached: a rule's pattern is compiled once, not per series."""
    return re.compile(pattern)


def _re_match(pattern: object, value: object) -> bool:
    if not isinstance(pattern, str):
        raise TypeError(f"the pattern must be text, got {type(pattern).__name__}")
    if not isinstance(value, str):
        raise TypeError(f"the value must be text, got {type(value).__name__}")
    return _regex(pattern).search(value) is not None


# name -> (implementation, minimum number of arguments, maximum or None for "any")
_FUNCTIONS: Final[dict[str, tuple[Callable[..., object], int, int | None]]] = {
    "abs": (abs, 1, 1),
    "bool": (bool, 1, 1),
    "float": (float, 1, 1),
    "int": (int, 1, 2),
    "len": (len, 1, 1),
    "max": (max, 1, None),
    "min": (min, 1, None),
    "re_match": (_re_match, 2, 2),
    "regex": (_re_match, 2, 2),
    "str": (str, 1, 1),
}
_REGEX_FUNCTIONS: Final = frozenset({"re_match", "regex"})


def _str_replace(text: str, old: str, new: str, count: int = -1) -> str:
    occurrences = text.count(old)
    if count >= 0:
        occurrences = min(occurrences, count)
    if len(text) + occurrences * (len(new) - len(old)) > _MAX_STRING:
        raise ValueError(f"the result would be longer than {_MAX_STRING} characters")
    return text.replace(old, new, count)


# name -> (implementation taking the string first, minimum and maximum number of arguments)
_METHODS: Final[dict[str, tuple[Callable[..., object], int, int]]] = {
    "count": (str.count, 1, 1),
    "endswith": (str.endswith, 1, 1),
    "find": (str.find, 1, 1),
    "isdigit": (str.isdigit, 0, 0),
    "lower": (str.lower, 0, 0),
    "lstrip": (str.lstrip, 0, 1),
    "replace": (_str_replace, 2, 3),
    "rstrip": (str.rstrip, 0, 1),
    "split": (str.split, 0, 2),
    "startswith": (str.startswith, 1, 1),
    "strip": (str.strip, 0, 1),
    "upper": (str.upper, 0, 0),
}

_ATTRIBUTE_REASON: Final = (
    "attribute access '{}' is not allowed (only tags.<Keyword> and string methods such as .lower())"
)

_BINOP_SYMBOLS: Final[dict[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
}

_FRIENDLY_NAMES: Final[dict[type[ast.AST], str]] = {
    ast.Lambda: "lambda",
    ast.ListComp: "a list comprehension",
    ast.SetComp: "a set comprehension",
    ast.DictComp: "a dict comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.IfExp: "a conditional expression (x if c else y)",
    ast.Dict: "a dict literal",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.Starred: "a starred expression (*x)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Set: "a set",
    ast.Call: "a function call",
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Compare: "a comparison",
    ast.UnaryOp: "a unary operator",
    ast.BoolOp: "'and'/'or'",
}


def _friendly(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp):
        return f"the operator '{_BINOP_SYMBOLS.get(type(node.op), '?')}'"
    if isinstance(node, ast.Name):
        return f"the name '{node.id}'"
    if isinstance(node, ast.Constant):
        return f"the value {node.value!r}"
    return _FRIENDLY_NAMES.get(type(node), f"{type(node).__name__} syntax")


# --------------------------------------------------------------------------------------------
# Source text handling: legacy placeholders and positions
# --------------------------------------------------------------------------------------------


def _string_end(text: str, start: int) -> int:
    """Index just past the string literal whose opening quote is at ``start``."""
    quote = text[start]
    delimiter = quote * 3 if text.startswith(quote * 3, start) else quote
    k = start + len(delimiter)
    while k < len(text):
        char = text[k]
        if char == "\\":
            k += 2
            continue
        if len(delimiter) == 1 and char in "\r\n":
            return k  # unterminated; the parser reports it
        if text.startswith(delimiter, k):
            return k + len(delimiter)
        k += 1
    return len(text)


class _Source:
    """The rule text as parsed, with a map back to the text the user wrote.

    Legacy placeholders ``@Tag@``/``%Tag%`` (outside string literals) are rewritten to
    ``tags.Tag``, line breaks outside string literals become spaces (so a rule may span lines)
    and leading blanks are dropped. ``_starts[i]``/``_ends[i]`` give the span in the original
    text that produced character ``i`` of the parsed text, so errors and notes quote and point at
    what the user wrote.
    """

    def __init__(self, original: str, *, placeholders: bool, kind: str) -> None:
        self.original = original
        self.kind = kind
        out: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        i = 0
        while i < len(original):
            char = original[i]
            if char in "'\"":
                stop = _string_end(original, i)
                out.extend(original[i:stop])
                starts.extend(range(i, stop))
                ends.extend(range(i + 1, stop + 1))
                i = stop
                continue
            if placeholders and char in "@%":
                match = _PLACEHOLDER_RE.match(original, i)
                if match is not None:
                    name = match.group(2)
                    out.extend("tags.")
                    starts.extend([i] * 5)
                    ends.extend([i + 1] * 5)
                    out.extend(name)
                    starts.extend(range(i + 1, i + 1 + len(name)))
                    ends.extend(range(i + 2, i + 2 + len(name)))
                    ends[-1] = match.end()  # the last letter's span includes the closing mark
                    i = match.end()
                    continue
            if char == "\\" and original[i + 1 : i + 2] in ("\r", "\n"):
                char = " "  # explicit line continuation
            elif char in "\r\n":
                char = " "
            out.append(char)
            starts.append(i)
            ends.append(i + 1)
            i += 1
        lead = 0
        while lead < len(out) and out[lead] in " \t\f":
            lead += 1
        self.text = "".join(out[lead:])
        self._starts = starts[lead:]
        self._ends = ends[lead:]
        self._line_starts = [0] + [k + 1 for k, c in enumerate(self.text) if c == "\n"]
        self._lines_utf8 = [line.encode("utf-8") for line in self.text.split("\n")]

    # -- positions ------------------------------------------------------------------------

    def _offset(self, lineno: int, col_bytes: int) -> int:
        """Parsed-text offset of an ast position (ast columns count UTF-8 bytes)."""
        line = max(1, min(lineno, len(self._lines_utf8))) - 1
        chars = len(self._lines_utf8[line][:col_bytes].decode("utf-8", errors="replace"))
        return self._line_starts[line] + chars

    def start(self, node: ast.AST) -> int:
        lineno = getattr(node, "lineno", None)
        col = getattr(node, "col_offset", None)
        if lineno is None or col is None:
            return 0
        return self._offset(lineno, col)

    def end(self, node: ast.AST) -> int:
        lineno = getattr(node, "end_lineno", None)
        col = getattr(node, "end_col_offset", None)
        if lineno is None or col is None:
            return self.start(node)
        return self._offset(lineno, col)

    def operator_offset(self, left: ast.AST, right: ast.AST) -> int:
        """Offset of the operator written between two operands."""
        k = first = self.end(left)
        stop = self.start(right)
        while k < stop and (self.text[k].isspace() or self.text[k] == ")"):
            k += 1
        return k if k < stop else first

    def original_offset(self, offset: int) -> int:
        if offset < len(self._starts):
            return self._starts[max(offset, 0)]
        return len(self.original)

    def snippet(self, node: ast.AST) -> str:
        start, end = self.start(node), self.end(node)
        if end <= start or not self._ends:
            return self.text[start:end]
        return self.original[self.original_offset(start) : self._ends[end - 1]]

    def error(self, offset: int, reason: str) -> RuleError:
        return RuleError(self.original, self.original_offset(offset), reason, kind=self.kind)

    # -- parsing --------------------------------------------------------------------------

    def parse(self) -> ast.Expression:
        """Parse (never run) the text as a single expression."""
        try:
            return ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            if exc.offset is None or exc.offset < 1:
                offset = len(self.text)
            else:
                line = max(1, min(exc.lineno or 1, len(self._line_starts))) - 1
                offset = min(self._line_starts[line] + exc.offset - 1, len(self.text))
            raise self.error(offset, f"syntax error: {exc.msg}") from None
        except ValueError as exc:  # null bytes on some Python versions
            raise self.error(max(self.text.find("\0"), 0), f"syntax error: {exc}") from None
        except (RecursionError, MemoryError):
            raise self.error(0, "the expression is nested too deeply") from None


# --------------------------------------------------------------------------------------------
# Compiler: allow-list check and translation into evaluator nodes
# --------------------------------------------------------------------------------------------


def _is_tags(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "tags"


def _arity_text(low: int, high: int | None) -> str:
    if high is None:
        return f"at least {low} argument{'s' if low != 1 else ''}"
    if low == high:
        return f"{low} argument{'s' if low != 1 else ''}"
    return f"{low} to {high} arguments"


class _RuleCompiler:
    """Checks a parsed rule against the allow-list and builds its evaluator tree."""

    def __init__(self, source: _Source) -> None:
        self.src = source
        self.tags_used: set[str] = set()

    # -- screening: context-free checks, reporting the leftmost problem ------------------

    def screen(self, tree: ast.Expression) -> None:
        """Reject forbidden syntax anywhere in the tree, pointing at the leftmost offender.

        Done before the structural pass so that e.g. ``().__class__.__bases__`` is reported at
        ``__class__`` rather than at whatever the top-down pass happens to visit first.
        """
        called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        problems: list[tuple[int, int, str]] = []
        for order, node in enumerate(ast.walk(tree)):
            found = self._screen_node(node, called=id(node) in called)
            if found is not None:
                problems.append((found[0], order, found[1]))
        if problems:
            offset, _, reason = min(problems)
            raise self.src.error(offset, reason)

    def _screen_node(self, node: ast.AST, *, called: bool) -> tuple[int, str] | None:
        src = self.src
        if isinstance(
            node,
            ast.expr_context | ast.boolop | ast.cmpop | ast.unaryop | ast.operator | ast.Expression,
        ):
            return None  # judged as part of their parent node
        if isinstance(node, ast.Constant):
            if node.value is None:
                return src.start(node), "None is not allowed (a missing tag is simply false)"
            if type(node.value) not in (str, int, float, bool):
                return src.start(node), f"{type(node.value).__name__} literals are not allowed"
            return None
        if isinstance(node, ast.Name):
            return self._screen_name(node, called=called)
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                return src.end(node) - len(node.attr), _ATTRIBUTE_REASON.format(node.attr)
            return None
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.BitOr | ast.BitAnd):
                return None
            symbol = _BINOP_SYMBOLS.get(type(node.op), "?")
            return (
                src.operator_offset(node.left, node.right),
                f"the arithmetic operator '{symbol}' is not allowed",
            )
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Invert):
                return src.start(node), "the operator '~' is not allowed"
            return None
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for k, op in enumerate(node.ops):
                if isinstance(op, ast.Is | ast.IsNot):
                    word = "is not" if isinstance(op, ast.IsNot) else "is"
                    return (
                        src.operator_offset(operands[k], operands[k + 1]),
                        f"'{word}' is not allowed; use == or !=",
                    )
            return None
        if isinstance(
            node, ast.BoolOp | ast.Call | ast.Subscript | ast.Slice | ast.List | ast.Tuple | ast.Set
        ):
            return None  # allowed here; the structural pass checks how they are used
        if isinstance(node, ast.keyword):
            if node.arg is None:
                return src.start(node), "keyword argument unpacking (**) is not allowed"
            return src.start(node), f"keyword arguments ({node.arg}=...) are not allowed"
        if getattr(node, "lineno", None) is None:
            return None  # helper nodes (comprehension, arguments) of a node rejected anyway
        return src.start(node), f"{_friendly(node)} is not allowed"

    def _screen_name(self, node: ast.Name, *, called: bool) -> tuple[int, str] | None:
        name = node.id
        if name == "tags" or name in _FUNCTIONS:
            return None
        offset = self.src.start(node)
        if called:
            allowed = ", ".join(sorted(_FUNCTIONS))
            return offset, f"function '{name}' is not allowed (allowed functions: {allowed})"
        if name.startswith("_"):
            return offset, f"the name '{name}' is not allowed"
        if name.lower() in ("true", "false"):
            return offset, f"unknown name '{name}'; did you mean {name.capitalize()}?"
        return offset, (
            f"unknown name '{name}' (write tags.{name} for a tag, or '{name}' in quotes for text)"
        )

    # -- structural pass -------------------------------------------------------------------

    def build(self, node: ast.expr, depth: int = 0) -> _Node:
        src = self.src
        if depth > _MAX_DEPTH:
            raise src.error(src.start(node), "the expression is nested too deeply")
        deeper = depth + 1
        text = src.snippet(node)

        if isinstance(node, ast.Constant):
            return _Const(text, node.value)
        if isinstance(node, ast.Name):
            if node.id == "tags":
                raise src.error(
                    src.start(node),
                    "'tags' must be followed by .Keyword or ['Keyword'], e.g. tags.Modality",
                )
            raise src.error(
                src.start(node),
                f"function '{node.id}' must be called, e.g. {node.id}(tags.SliceThickness)",
            )
        if isinstance(node, ast.Attribute):
            if _is_tags(node.value):
                return self._tag(text, node.attr, src.end(node) - len(node.attr))
            attr_offset = src.end(node) - len(node.attr)
            if node.attr in _METHODS:
                raise src.error(attr_offset, f"the method .{node.attr}() must be called with ()")
            raise src.error(attr_offset, _ATTRIBUTE_REASON.format(node.attr))
        if isinstance(node, ast.Subscript):
            return self._subscript(node, text, deeper)
        if isinstance(node, ast.Call):
            return self._call(node, text, deeper)
        if isinstance(node, ast.Compare):
            return self._compare(node, text, deeper)
        if isinstance(node, ast.BoolOp):
            items = tuple(self.build(value, deeper) for value in node.values)
            return _And(text, items) if isinstance(node.op, ast.And) else _Or(text, items)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return _Not(text, self.build(node.operand, deeper))
            negative = isinstance(node.op, ast.USub)
            operand = node.operand
            if (
                isinstance(operand, ast.Constant)
                and isinstance(operand.value, int | float)
                and not isinstance(operand.value, bool)
            ):
                return _Const(text, -operand.value if negative else operand.value)
            return _Negate(text, self.build(operand, deeper), negative=negative)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr | ast.BitAnd):
            symbol = "|" if isinstance(node.op, ast.BitOr) else "&"
            return _BitLogic(
                text, symbol, self.build(node.left, deeper), self.build(node.right, deeper)
            )
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            raise src.error(
                src.start(node),
                f"{_friendly(node)} is only allowed on the right side of 'in' or 'not in'",
            )
        raise src.error(src.start(node), f"{_friendly(node)} is not allowed")

    def _tag(self, text: str, name: str, offset: int) -> _Tag:
        if name.startswith("_"):
            raise self.src.error(offset, _ATTRIBUTE_REASON.format(name))
        if not _TAG_NAME_RE.fullmatch(name):
            raise self.src.error(
                offset,
                f"'{name}' is not a valid tag keyword (ASCII letters and digits, "
                "starting with a letter)",
            )
        self.tags_used.add(name)
        return _Tag(text, name)

    def _int_literal(self, node: ast.expr | None, what: str) -> int | None:
        if node is None:
            return None
        value: object = None
        if isinstance(node, ast.Constant):
            value = node.value
        elif (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub | ast.UAdd)
            and isinstance(node.operand, ast.Constant)
        ):
            inner = node.operand.value
            if isinstance(inner, int) and not isinstance(inner, bool):
                value = -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self.src.error(
            self.src.start(node), f"{what} must be an integer literal such as 0, 3 or -1"
        )

    def _subscript(self, node: ast.Subscript, text: str, depth: int) -> _Node:
        src = self.src
        key = node.slice
        if _is_tags(node.value):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                return self._tag(text, key.value, src.start(key) + 1)
            raise src.error(
                src.start(key), "tags[...] needs a quoted keyword, e.g. tags['Modality']"
            )
        value = self.build(node.value, depth)
        if isinstance(key, ast.Slice):
            lower = self._int_literal(key.lower, "a slice bound")
            upper = self._int_literal(key.upper, "a slice bound")
            step = self._int_literal(key.step, "a slice step")
            if step == 0:
                raise src.error(src.start(key), "the slice step must not be zero")
            return _Index(text, value, slice(lower, upper, step))
        index = self._int_literal(key, "an index")
        assert index is not None
        return _Index(text, value, index)

    def _check_arity(self, node: ast.Call, name: str, low: int, high: int | None) -> None:
        count = len(node.args)
        if count < low or (high is not None and count > high):
            raise self.src.error(
                self.src.start(node),
                f"{name}() takes {_arity_text(low, high)}, got {count}",
            )

    def _call(self, node: ast.Call, text: str, depth: int) -> _Node:
        src = self.src
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in _FUNCTIONS:
                raise src.error(
                    src.start(func),
                    f"'{func.id}' cannot be called; use tags.<Keyword> to read a tag",
                )
            impl, low, high = _FUNCTIONS[func.id]
            self._check_arity(node, func.id, low, high)
            if func.id in _REGEX_FUNCTIONS:
                self._check_pattern(node.args[0], func.id)
            args = tuple(self.build(arg, depth) for arg in node.args)
            return _Call(text, impl, args)
        if isinstance(func, ast.Attribute):
            attr_offset = src.end(func) - len(func.attr)
            if _is_tags(func.value):
                raise src.error(src.start(func), f"tags.{func.attr} is a tag and cannot be called")
            if func.attr not in _METHODS:
                allowed = ", ".join(f".{m}()" for m in sorted(_METHODS))
                raise src.error(
                    attr_offset, f"the method .{func.attr}() is not allowed (allowed: {allowed})"
                )
            impl, low, high = _METHODS[func.attr]
            self._check_arity(node, f".{func.attr}", low, high)
            receiver = self.build(func.value, depth)
            args = tuple(self.build(arg, depth) for arg in node.args)
            return _Method(text, receiver, func.attr, impl, args)
        raise src.error(
            src.start(func),
            "only the functions "
            + ", ".join(sorted(_FUNCTIONS))
            + " and string methods such as .lower() can be called",
        )

    def _check_pattern(self, pattern: ast.expr, name: str) -> None:
        if not isinstance(pattern, ast.Constant):
            return  # computed at run time; an invalid pattern then becomes a note
        if not isinstance(pattern.value, str):
            raise self.src.error(
                self.src.start(pattern), f"the pattern of {name}() must be text in quotes"
            )
        try:
            _regex(pattern.value)
        except re.error as exc:
            raise self.src.error(
                self.src.start(pattern),
                f"invalid regular expression {pattern.value!r}: {exc}",
            ) from None

    def _compare(self, node: ast.Compare, text: str, depth: int) -> _Node:
        left = self.build(node.left, depth)
        ops: list[tuple[str, Callable[[Any, Any], Any]]] = []
        comparators: list[_Node] = []
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            ops.append(_COMPARE_OPS[type(op)])  # 'is'/'is not' were rejected by screen()
            if isinstance(op, ast.In | ast.NotIn) and isinstance(
                comparator, ast.List | ast.Tuple | ast.Set
            ):
                comparators.append(self._literal_collection(comparator))
            else:
                comparators.append(self.build(comparator, depth))
        return _Compare(text, left, tuple(ops), tuple(comparators))

    def _literal_collection(self, node: ast.List | ast.Tuple | ast.Set) -> _Const:
        values: list[object] = []
        for element in node.elts:
            if isinstance(element, ast.Constant):
                values.append(element.value)
                continue
            if isinstance(element, ast.UnaryOp) and isinstance(element.op, ast.USub | ast.UAdd):
                number = self._int_or_float(element)
                if number is not None:
                    values.append(number)
                    continue
            raise self.src.error(
                self.src.start(element),
                "the elements of a list must be literal values such as 'CT' or 2",
            )
        return _Const(self.src.snippet(node), tuple(values))

    @staticmethod
    def _int_or_float(node: ast.UnaryOp) -> int | float | None:
        operand = node.operand
        if not isinstance(operand, ast.Constant):
            return None
        value = operand.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return -value if isinstance(node.op, ast.USub) else value


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A checked rule, ready to be evaluated against the tags of any number of series.

    ``tags_used`` holds every tag keyword the rule mentions (in any branch), so callers can tell
    which tags a rule depends on without running it.
    """

    text: str
    tags_used: frozenset[str]
    _root: _Node = field(repr=False, compare=False)

    def evaluate(self, tags: Mapping[str, str]) -> RuleResult:
        """Evaluate against ``tags`` (keyword -> string value); never raises."""
        ctx = _Context(tags)
        try:
            matched = bool(self._root.run(ctx))
        except Exception as exc:  # a defect in this module must not stop routing
            ctx.fail(f"internal error while evaluating the rule: {exc!r}")
            matched = False
        return RuleResult(matched, tuple(ctx.missing), tuple(ctx.notes))

    def __call__(self, tags: Mapping[str, str]) -> bool:
        """Shortcut for ``evaluate(tags).matched``."""
        return self.evaluate(tags).matched


_BOOLEAN_WORDS: Final = {"true": True, "false": False}


@functools.lru_cache(maxsize=1024)
def compile_rule(text: str) -> CompiledRule:
    """Check ``text`` and compile it; raises :class:`RuleError` with the offending column.

    Cached, because the same rule text is evaluated for every series that arrives. An empty or
    blank rule never matches. A rule that is nothing but the quoted word ``"True"`` or
    ``"False"`` means that boolean (mercure's stored default rule is the text ``False``, and a
    quoted ``"False"`` that matched everything would be a nasty surprise).
    """
    if not text or not text.strip():
        return CompiledRule(text or "", frozenset(), _Const("", False))
    source = _Source(text, placeholders=True, kind="rule")
    tree = source.parse()
    compiler = _RuleCompiler(source)
    compiler.screen(tree)
    body = tree.body
    if (
        isinstance(body, ast.Constant)
        and isinstance(body.value, str)
        and body.value.strip().lower() in _BOOLEAN_WORDS
    ):
        root: _Node = _Const(source.snippet(body), _BOOLEAN_WORDS[body.value.strip().lower()])
    else:
        root = compiler.build(body)
    return CompiledRule(text, frozenset(compiler.tags_used), root)


def evaluate_rule(text: str, tags: Mapping[str, str]) -> RuleResult:
    """Compile (cached) and evaluate ``text`` against ``tags``; raises :class:`RuleError`."""
    return compile_rule(text).evaluate(tags)


# --------------------------------------------------------------------------------------------
# Study completion: mercure's study_trigger_series
# --------------------------------------------------------------------------------------------


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
    "only quoted series descriptions combined with 'and', 'or' and parentheses are allowed"
)


def _build_series(src: _Source, node: ast.expr, depth: int) -> _SeriesExpr:
    if depth > _MAX_DEPTH:
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
            src.operator_offset(node.left, node.right), f"{_friendly(node)}: {_SERIES_HINT}"
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        raise src.error(src.start(node), f"'not' is not allowed; {_SERIES_HINT}")
    raise src.error(src.start(node), f"{_friendly(node)} is not allowed; {_SERIES_HINT}")


@functools.lru_cache(maxsize=256)
def _compile_completion(text: str) -> _SeriesExpr:
    source = _Source(text, placeholders=False, kind=_SERIES_KIND)
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
