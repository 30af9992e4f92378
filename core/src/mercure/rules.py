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

What a rule may contain -- what mercure's evaluator accepts, less what could escape it:

* tags: ``tags.Keyword`` (falls back to a case-insensitive match, as mercure's does),
  ``tags["Keyword"]`` (exact), ``'Keyword' in tags`` (presence), and the legacy placeholders
  ``@Keyword@`` and ``%Keyword%`` (exact; ``%Keyword%`` is the form mercure's documentation
  gives, which its code does not read: accepted here with ``@Keyword@``'s meaning);
* literals (text, numbers, ``True``, ``False``, ``None``), lists, tuples and sets;
* ``and``, ``or``, ``not``, comparisons (also chained, ``is``/``is not``),
  arithmetic (``+ - * / // % **``, shifts and bitwise operators) with bounds that keep a rule
  from exhausting the router (see :mod:`mercure.rule_eval`);
* the functions of mercure's allow-list (``float int str len bool abs min max sum round pow
  any all sorted chr ord divmod hex oct bin repr range list tuple set`` and the ``math`` ones
  ``sqrt ceil floor log log10 log2 exp sin cos tan asin acos atan atan2 fabs factorial trunc
  isinf isnan``, constants ``pi`` and ``e``) and this project's ``re_match(pattern, value)`` /
  ``regex(pattern, value)`` (``re.search``, True/False);
* text methods (``.lower()``, ``.startswith()``, ``.split()``, ... see ``METHODS``),
  indexing and slicing.

Evaluation never raises, and follows mercure's: a missing tag, or any operation that fails,
makes **the whole rule False** -- even inside an ``or`` or under a ``not`` (the
:class:`RuleResult` says when that happened, so the rule tester can point it out).
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from mercure import rule_eval as ev
from mercure.rule_eval import CONSTANTS, FUNCTIONS, METHODS, REGEX_FUNCTIONS
from mercure.rule_source import BINOP_SYMBOLS, MAX_DEPTH, RuleError, Source, friendly

__all__ = [
    "CompiledRule",
    "RuleError",
    "RuleResult",
    "compile_rule",
    "evaluate_rule",
    "rule_warnings",
]


_TAG_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RuleResult:
    """The outcome of evaluating a rule, with what is needed to explain it to the user.

    ``missing_tags`` lists the tags the evaluation looked up but did not find (the first one
    stopped it; tags in a branch skipped by ``and``/``or`` short-circuiting are not looked up).
    ``notes`` holds what else stopped it, such as a failed conversion. ``surprise`` is True when
    the rule is False only because of a missing tag or a failure inside an ``or`` or a ``not``,
    which mercure's evaluator, and so this one, treats as False for the whole rule.
    """

    matched: bool
    missing_tags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    surprise: bool = False

    def explain(self) -> str:
        """A human-readable, multi-line account of the result (for the CLI rule tester)."""
        lines = [
            "result: True (the rule matches)"
            if self.matched
            else "result: False (the rule does not match)"
        ]
        if self.missing_tags:
            lines.append("missing tags: " + ", ".join(self.missing_tags))
            lines.append("  (as in mercure, a missing tag makes the whole rule false)")
        if self.surprise:
            lines.append(
                "note: this happened inside an 'or' or a 'not', where it may surprise: as in "
                "mercure's evaluator, the whole rule is False, not just that part"
            )
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        if not self.missing_tags and not self.notes:
            lines.append("all tags used by the rule were present")
        return "\n".join(lines)


_ATTRIBUTE_REASON: Final = (
    "attribute access '{}' is not allowed (only tags.<Keyword> and string methods such as .lower())"
)


def _is_tags(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "tags"


def _arity_text(low: int, high: int | None) -> str:
    if high is None:
        return f"at least {low} argument{'s' if low != 1 else ''}"
    if low == high:
        return f"{low} argument{'s' if low != 1 else ''}"
    return f"{low} to {high} arguments"


_COMPARE_SYMBOLS: Final[dict[type[ast.cmpop], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_UNARY_SYMBOLS: Final[dict[type[ast.unaryop], str]] = {
    ast.USub: "-",
    ast.UAdd: "+",
    ast.Invert: "~",
}
_ALLOWED_NODES: Final = (
    ast.BoolOp, ast.Call, ast.Subscript, ast.Slice, ast.List, ast.Tuple, ast.Set,
    ast.Compare, ast.UnaryOp, ast.Attribute,
)  # fmt: skip


class _RuleCompiler:
    """Checks a parsed rule against the allow-list and builds its evaluator tree."""

    def __init__(self, source: Source) -> None:
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
            if node.value is not None and type(node.value) not in (str, int, float, bool):
                return src.start(node), f"{type(node.value).__name__} literals are not allowed"
            return None
        if isinstance(node, ast.Name):
            return self._screen_name(node, called=called)
        if isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                return src.end(node) - len(node.attr), _ATTRIBUTE_REASON.format(node.attr)
            return None
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.MatMult):
                return src.operator_offset(node.left, node.right), "the operator '@' is not allowed"
            return None
        if isinstance(node, _ALLOWED_NODES):
            return None  # allowed here; the structural pass checks how they are used
        if isinstance(node, ast.IfExp):
            return src.start(node), (
                "a conditional expression (x if c else y) is not allowed: mercure's evaluator "
                "cannot run one, so such a rule never matches there; use 'and'/'or'"
            )
        if isinstance(node, ast.keyword):
            if node.arg is None:
                return src.start(node), "keyword argument unpacking (**) is not allowed"
            return src.start(node), f"keyword arguments ({node.arg}=...) are not allowed"
        if getattr(node, "lineno", None) is None:
            return None  # helper nodes (comprehension, arguments) of a node rejected anyway
        return src.start(node), f"{friendly(node)} is not allowed"

    def _screen_name(self, node: ast.Name, *, called: bool) -> tuple[int, str] | None:
        name = node.id
        if name in ("tags", "None") or name in FUNCTIONS or name in CONSTANTS:
            return None
        offset = self.src.start(node)
        if called:
            allowed = ", ".join(sorted(FUNCTIONS))
            return offset, f"function '{name}' is not allowed (allowed functions: {allowed})"
        if name.startswith("_"):
            return offset, f"the name '{name}' is not allowed"
        if name.lower() in ("true", "false"):
            return offset, f"unknown name '{name}'; did you mean {name.capitalize()}?"
        return offset, (
            f"unknown name '{name}' (write tags.{name} for a tag, or '{name}' in quotes for text)"
        )

    # -- structural pass -------------------------------------------------------------------

    def build(self, node: ast.expr, depth: int = 0) -> ev.Node:
        src = self.src
        if depth > MAX_DEPTH:
            raise src.error(src.start(node), "the expression is nested too deeply")
        deeper = depth + 1
        text = src.snippet(node)

        if isinstance(node, ast.Constant):
            return ev.Const(text, node.value)
        if isinstance(node, ast.Name):
            if node.id == "tags":
                return ev.TagsRef(text)
            if node.id in CONSTANTS:
                return ev.Const(text, CONSTANTS[node.id])
            if node.id == "None":
                return ev.Const(text, None)
            raise src.error(
                src.start(node),
                f"function '{node.id}' must be called, e.g. {node.id}(tags.SliceThickness)",
            )
        if isinstance(node, ast.Attribute):
            if _is_tags(node.value):
                return self._tag(text, node.attr, src.end(node) - len(node.attr), exact=False)
            attr_offset = src.end(node) - len(node.attr)
            if node.attr in METHODS:
                raise src.error(attr_offset, f"the method .{node.attr}() must be called with ()")
            raise src.error(attr_offset, _ATTRIBUTE_REASON.format(node.attr))
        if isinstance(node, ast.Subscript):
            return self._subscript(node, text, deeper)
        if isinstance(node, ast.Call):
            return self._call(node, text, deeper)
        if isinstance(node, ast.Compare):
            ops = tuple(_COMPARE_SYMBOLS[type(op)] for op in node.ops)
            comparators = tuple(self.build(c, deeper) for c in node.comparators)
            return ev.Compare(text, self.build(node.left, deeper), ops, comparators)
        if isinstance(node, ast.BoolOp):
            items = tuple(self.build(value, deeper) for value in node.values)
            return ev.And(text, items) if isinstance(node.op, ast.And) else ev.Or(text, items)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return ev.Not(text, self.build(node.operand, deeper))
            operand = node.operand
            if (
                isinstance(node.op, ast.USub | ast.UAdd)
                and isinstance(operand, ast.Constant)
                and isinstance(operand.value, int | float)
                and not isinstance(operand.value, bool)
            ):
                negative = isinstance(node.op, ast.USub)
                return ev.Const(text, -operand.value if negative else operand.value)
            return ev.UnaryOp(text, _UNARY_SYMBOLS[type(node.op)], self.build(operand, deeper))
        if isinstance(node, ast.BinOp):
            symbol = BINOP_SYMBOLS[type(node.op)]
            return ev.BinOp(
                text, symbol, self.build(node.left, deeper), self.build(node.right, deeper)
            )
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
            items = tuple(self.build(element, deeper) for element in node.elts)
            return ev.Collection(text, kind, items)
        raise src.error(src.start(node), f"{friendly(node)} is not allowed")

    def _tag(self, text: str, name: str, offset: int, *, exact: bool) -> ev.Tag:
        if name.startswith("_"):
            raise self.src.error(offset, _ATTRIBUTE_REASON.format(name))
        if not _TAG_NAME_RE.fullmatch(name):
            raise self.src.error(
                offset,
                f"'{name}' is not a valid tag keyword (ASCII letters and digits, "
                "starting with a letter)",
            )
        self.tags_used.add(name)
        return ev.Tag(text, name, exact=exact)

    def _subscript(self, node: ast.Subscript, text: str, depth: int) -> ev.Node:
        src = self.src
        key = node.slice
        if _is_tags(node.value):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                return self._tag(text, key.value, src.start(key) + 1, exact=True)
            if isinstance(key, ast.Slice):
                raise src.error(src.start(key), "tags[...] needs a keyword, e.g. tags['Modality']")
            return ev.DynamicTag(text, self.build(key, depth))
        value = self.build(node.value, depth)
        if isinstance(key, ast.Slice):
            parts = [self.build(p, depth) if p is not None else None
                     for p in (key.lower, key.upper, key.step)]  # fmt: skip
            return ev.Index(text, value, lower=parts[0], upper=parts[1], step=parts[2])
        return ev.Index(text, value, self.build(key, depth))

    def _check_arity(self, node: ast.Call, name: str, low: int, high: int | None) -> None:
        count = len(node.args)
        if count < low or (high is not None and count > high):
            raise self.src.error(
                self.src.start(node),
                f"{name}() takes {_arity_text(low, high)}, got {count}",
            )

    def _call(self, node: ast.Call, text: str, depth: int) -> ev.Node:
        src = self.src
        func = node.func
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            starred = next(a for a in node.args if isinstance(a, ast.Starred))
            raise src.error(src.start(starred), "a starred expression (*x) is not allowed")
        if isinstance(func, ast.Name):
            if func.id not in FUNCTIONS:
                raise src.error(
                    src.start(func),
                    f"'{func.id}' cannot be called; use tags.<Keyword> to read a tag",
                )
            impl, low, high = FUNCTIONS[func.id]
            self._check_arity(node, func.id, low, high)
            if func.id in REGEX_FUNCTIONS:
                self._check_pattern(node.args[0], func.id)
            args = tuple(self.build(arg, depth) for arg in node.args)
            return ev.Call(text, impl, args)
        if isinstance(func, ast.Attribute):
            attr_offset = src.end(func) - len(func.attr)
            if _is_tags(func.value):
                raise src.error(src.start(func), f"tags.{func.attr} is a tag and cannot be called")
            if func.attr not in METHODS:
                allowed = ", ".join(f".{m}()" for m in sorted(METHODS))
                raise src.error(
                    attr_offset, f"the method .{func.attr}() is not allowed (allowed: {allowed})"
                )
            impl, low, high = METHODS[func.attr]
            self._check_arity(node, f".{func.attr}", low, high)
            receiver = self.build(func.value, depth)
            args = tuple(self.build(arg, depth) for arg in node.args)
            return ev.Method(text, receiver, func.attr, impl, args)
        raise src.error(
            src.start(func),
            "only the functions "
            + ", ".join(sorted(FUNCTIONS))
            + " and string methods such as .lower() can be called",
        )

    def _check_pattern(self, pattern: ast.expr, name: str) -> None:
        if not isinstance(pattern, ast.Constant):
            return  # computed at run time; an invalid pattern then fails the rule
        if not isinstance(pattern.value, str):
            raise self.src.error(
                self.src.start(pattern), f"the pattern of {name}() must be text in quotes"
            )
        try:
            ev.regex(pattern.value)
        except re.error as exc:
            raise self.src.error(
                self.src.start(pattern),
                f"invalid regular expression {pattern.value!r}: {exc}",
            ) from None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A checked rule, ready to be evaluated against the tags of any number of series.

    ``tags_used`` holds every tag keyword the rule mentions (in any branch), so callers can tell
    which tags a rule depends on without running it. ``placeholders`` are the legacy
    ``@Keyword@``/``%Keyword%`` names: mercure replaces only those the series has, so one
    that is missing leaves the rule unparseable there, and False, whichever branch it is in.
    """

    text: str
    tags_used: frozenset[str]
    _root: ev.Node = field(repr=False, compare=False)
    placeholders: tuple[str, ...] = ()

    def evaluate(self, tags: Mapping[str, str]) -> RuleResult:
        """Evaluate against ``tags`` (keyword -> string value); never raises."""
        for name in self.placeholders:
            if tags.get(name) is None:
                return RuleResult(
                    False,
                    (name,),
                    (f"@{name}@ names a tag the series does not have: mercure leaves it in "
                     "the rule, which then cannot be read, so the whole rule is False",),
                )  # fmt: skip
        ctx = ev.Context(tags)
        try:
            matched = bool(self._root.run(ctx))
        except ev.Abort as stop:
            if stop.missing is None:
                ctx.notes.setdefault(stop.note, None)
            return RuleResult(False, tuple(ctx.missing), tuple(ctx.notes), surprise=ctx.surprise)
        except RecursionError:
            ctx.notes.setdefault("the rule is nested too deeply to evaluate", None)
            matched = False
        except Exception as exc:  # a defect in this module must not stop routing
            ctx.notes.setdefault(f"internal error while evaluating the rule: {exc!r}", None)
            matched = False
        return RuleResult(matched, tuple(ctx.missing), tuple(ctx.notes))

    def __call__(self, tags: Mapping[str, str]) -> bool:
        """Shortcut for ``evaluate(tags).matched``."""
        return self.evaluate(tags).matched


@functools.lru_cache(maxsize=1024)
def compile_rule(text: str) -> CompiledRule:
    """Check ``text`` and compile it; raises :class:`RuleError` with the offending column.

    Cached, because the same rule text is evaluated for every series that arrives. An empty or
    blank rule never matches (mercure cannot read it either).
    """
    if not text or not text.strip():
        return CompiledRule(text or "", frozenset(), ev.Const("", False))
    source = Source(text, placeholders=True, kind="rule")
    tree = source.parse()
    compiler = _RuleCompiler(source)
    compiler.screen(tree)
    root = compiler.build(tree.body)
    placeholders = tuple(dict.fromkeys(source.placeholders))
    return CompiledRule(text, frozenset(compiler.tags_used), root, placeholders)


def evaluate_rule(text: str, tags: Mapping[str, str]) -> RuleResult:
    """Compile (cached) and evaluate ``text`` against ``tags``; raises :class:`RuleError`."""
    return compile_rule(text).evaluate(tags)


def rule_warnings(text: str) -> list[str]:
    """What in a valid rule behaves as mercure's evaluator does but may surprise its author."""
    try:
        compiled = compile_rule(text)
    except RuleError:
        return []
    found = []
    root = compiled._root
    if isinstance(root, ev.Const) and isinstance(root.value, str) and root.value:
        found.append(
            f"the rule is the quoted text {root.value!r}, which is always true (as in mercure); "
            "write it without quotes for the value True or False"
        )
    return found
