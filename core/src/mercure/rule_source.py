"""The text of a rule as the user wrote it: parsing, positions and the errors that point into it.

Why a module of its own: both the routing-rule compiler (:mod:`mercure.rules`) and the study
completion series list (:mod:`mercure.study_trigger`) parse user text with :func:`ast.parse`
and must report errors at the column the user sees, legacy ``@Tag@`` placeholders included.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Final

__all__ = ["BINOP_SYMBOLS", "MAX_DEPTH", "RuleError", "Source", "friendly"]

# Deepest nesting of the expression tree that is compiled; keeps the evaluator's recursion bounded.
MAX_DEPTH: Final = 100

# Legacy placeholders: @Keyword@ and %Keyword%. Names starting with "_" are matched on purpose,
# so that they are rewritten and then rejected with a precise message.
PLACEHOLDER_RE: Final = re.compile(r"([@%])([A-Za-z_][A-Za-z0-9_]*)\1")


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


BINOP_SYMBOLS: Final[dict[type[ast.operator], str]] = {
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

FRIENDLY_NAMES: Final[dict[type[ast.AST], str]] = {
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


def friendly(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp):
        return f"the operator '{BINOP_SYMBOLS.get(type(node.op), '?')}'"
    if isinstance(node, ast.Name):
        return f"the name '{node.id}'"
    if isinstance(node, ast.Constant):
        return f"the value {node.value!r}"
    return FRIENDLY_NAMES.get(type(node), f"{type(node).__name__} syntax")


# --------------------------------------------------------------------------------------------
# Source text handling: legacy placeholders and positions
# --------------------------------------------------------------------------------------------


def string_end(text: str, start: int) -> int:
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


class Source:
    """The rule text as parsed, with a map back to the text the user wrote.

    Legacy placeholders ``@Tag@``/``%Tag%`` (outside string literals) are rewritten to
    ``tags['Tag']`` (recorded in ``placeholders``), line breaks outside string literals become
    spaces (so a rule may span lines) and leading blanks are dropped. ``_starts[i]`` and
    ``_ends[i]`` give the span in the original text that produced character ``i`` of the
    parsed text, so errors and notes quote and point at what the user wrote.
    """

    def __init__(self, original: str, *, placeholders: bool, kind: str) -> None:
        self.original = original
        self.kind = kind
        self.placeholders: list[str] = []
        out: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        i = 0
        while i < len(original):
            char = original[i]
            if char in "'\"":
                stop = string_end(original, i)
                out.extend(original[i:stop])
                starts.extend(range(i, stop))
                ends.extend(range(i + 1, stop + 1))
                i = stop
                continue
            if placeholders and char in "@%":
                match = PLACEHOLDER_RE.match(original, i)
                if match is not None:
                    # mercure writes tags["Keyword"] in place of @Keyword@: an exact lookup.
                    name = match.group(2)
                    self.placeholders.append(name)
                    out.extend("tags['")
                    starts.extend([i] * 6)
                    ends.extend([i + 1] * 6)
                    out.extend(name)
                    starts.extend(range(i + 1, i + 1 + len(name)))
                    ends.extend(range(i + 2, i + 2 + len(name)))
                    out.extend("']")
                    starts.extend([match.end() - 1] * 2)
                    ends.extend([match.end()] * 2)
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
