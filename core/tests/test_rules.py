"""Tests for the safe routing-rule language (mercure.rules)."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
from mercure import rule_eval, rule_source, study_trigger
from mercure import rules as rules_module
from mercure.rules import (
    CompiledRule,
    RuleError,
    RuleResult,
    compile_rule,
    evaluate_rule,
)
from mercure.study_trigger import check_completion_series, parse_completion_series

TAGS: dict[str, str] = {
    "Modality": "MR",
    "SeriesDescription": "CINE_T1 sax",
    "SliceThickness": "1.5",
    "SeriesNumber": "7",
    "PatientName": "Doe^John",
    "ImageType": "ORIGINAL\\PRIMARY\\M",
    "StudyDescription": "Schädel nativ",
    "SenderAET": "SCANNER1",
    "Empty": "",
    "Bad": "abc",
    "Pattern": "(",
}


def matches(rule: str, tags: dict[str, str] | None = None) -> bool:
    return evaluate_rule(rule, TAGS if tags is None else tags).matched


# ---------------------------------------------------------------------------------------------
# Accepted syntax
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # the examples from mercure's documentation
        ("'CINE' in tags.SeriesDescription", True),
        ("'FLAIR' in tags.SeriesDescription", False),
        ("tags.SeriesDescription.lower() == 'cine_t1 sax'", True),
        ("float(tags.SliceThickness) < 2.0", True),
        ("float(tags.SliceThickness) < 1.0", False),
        ("tags[\"Modality\"] == 'MR' and ('T1' in tags.SeriesDescription)", True),
        ("tags['Modality'] == 'MR' and ('T2' in tags.SeriesDescription)", False),
        # literals
        ("True", True),
        ("False", False),
        ('"True"', True),
        ("'True'", True),
        ('"False"', True),  # a non-empty text is true, in mercure too (config check warns)
        ("' false '", True),
        ("1", True),
        ("0", False),
        ("2.5", True),
        ("'text'", True),
        ("''", False),
        ("'a' == \"a\"", True),
        ("'it\\'s' == \"it's\"", True),
        # not / and / or / parentheses
        ("not False", True),
        ("not True", False),
        ("not (tags.Modality == 'CT')", True),
        ("tags.Modality == 'CT' or tags.Modality == 'MR'", True),
        ("tags.Modality == 'CT' or (tags.Modality == 'MR' and not tags.Empty)", True),
        ("(False or (True and (False or True)))", True),
        ("False and True or False", False),
        # comparisons
        ("tags.Modality == 'MR'", True),
        ("tags.Modality != 'MR'", False),
        ("int(tags.SeriesNumber) > 6", True),
        ("int(tags.SeriesNumber) >= 7", True),
        ("int(tags.SeriesNumber) <= 6", False),
        ("tags.Modality < 'NM'", True),
        ("'CINE' not in tags.SeriesDescription", False),
        ("'DWI' not in tags.SeriesDescription", True),
        # chains
        ("1 < float(tags.SliceThickness) < 3", True),
        ("1 < float(tags.SliceThickness) < 1.2", False),
        ("0 < 1 < 2 < 3 != 4", True),
        ("3 > 2 > 2", False),
        ("1 <= int(tags.SeriesNumber) <= 10 and tags.Modality == 'MR'", True),
        # in with lists, tuples and sets of literals
        ("tags.Modality in ['CT', 'MR']", True),
        ("tags.Modality in ('CT', 'PT')", False),
        ("tags.Modality in {'MR'}", True),
        ("tags.Modality not in ['CT', 'PT']", True),
        ("int(tags.SeriesNumber) in [5, 6, 7]", True),
        ("-1 in [-1, +2]", True),
        ("tags.Modality in []", False),
        # indexing and slicing with integer literals
        ("tags.SeriesDescription[0:4] == 'CINE'", True),
        ("tags.SeriesDescription[:4] == 'CINE'", True),
        ("tags.SeriesDescription[-3:] == 'sax'", True),
        ("tags.SeriesDescription[0] == 'C'", True),
        ("tags.SeriesDescription[-1] == 'x'", True),
        ("tags.SeriesDescription[::2] == 'CN_1sx'", True),
        ("tags.ImageType.split('\\\\')[1] == 'PRIMARY'", True),
        # functions
        ("float(tags.SliceThickness) == 1.5", True),
        ("int(tags.SeriesNumber) == 7", True),
        ("int('ff', 16) == 255", True),
        ("str(7) == tags.SeriesNumber", True),
        ("len(tags.Modality) == 2", True),
        ("bool(tags.Empty) == False", True),
        ("bool(tags.Modality)", True),
        ("abs(-3) == 3", True),
        ("abs(-float(tags.SliceThickness)) == 1.5", True),
        ("min(3, int(tags.SeriesNumber)) == 3", True),
        ("max(3, int(tags.SeriesNumber), 5) == 7", True),
        ("min(tags.Modality) == 'M'", True),
        ("re_match('^CINE', tags.SeriesDescription)", True),
        ("re_match('^sax', tags.SeriesDescription)", False),
        ("re_match('sax$', tags.SeriesDescription)", True),
        ("regex('T[12]', tags.SeriesDescription)", True),
        (
            "regex('(?i)cine', tags.SeriesDescription) and not regex('T2', tags.SeriesDescription)",
            True,
        ),
        # string methods
        ("tags.SeriesDescription.upper() == 'CINE_T1 SAX'", True),
        ("'  x '.strip() == 'x'", True),
        ("'xxaxx'.strip('x') == 'a'", True),
        ("'  x '.lstrip() == 'x '", True),
        ("'  x '.rstrip() == '  x'", True),
        ("'--x'.lstrip('-') == 'x'", True),
        ("tags.SeriesDescription.startswith('CINE')", True),
        ("tags.SeriesDescription.endswith('sax')", True),
        ("tags.SeriesDescription.endswith('CINE')", False),
        ("len(tags.ImageType.split('\\\\')) == 3", True),
        ("'M' in tags.ImageType.split('\\\\')", True),
        ("len(tags.SeriesDescription.split()) == 2", True),
        ("'a,b,c'.split(',', 1)[1] == 'b,c'", True),
        ("tags.PatientName.replace('^', ' ') == 'Doe John'", True),
        ("'aaa'.replace('a', 'b', 2) == 'bba'", True),
        ("tags.SeriesDescription.find('T1') == 5", True),
        ("tags.SeriesDescription.find('T2') == -1", True),
        ("tags.ImageType.count('\\\\') == 2", True),
        ("tags.SeriesNumber.isdigit()", True),
        ("tags.Modality.isdigit()", False),
        ("tags.SeriesDescription.lower().strip().startswith('cine')", True),
        # unary plus/minus
        ("-float(tags.SliceThickness) < 0", True),
        ("+int(tags.SeriesNumber) == 7", True),
        ("-2 < -1", True),
        # | and & on True/False, as in old mercure examples
        ("('Tr' in tags.Modality) | (tags.Modality == 'MR')", True),
        ("(tags.Modality == 'MR') & (tags.Modality == 'CT')", False),
        # non-ASCII text
        ("'Schädel' in tags.StudyDescription", True),
        # routing-only tags that are not DICOM keywords
        ("tags.SenderAET == 'SCANNER1'", True),
        # whitespace and line breaks
        ("   tags.Modality == 'MR'   ", True),
        ("\ttags.Modality == 'MR'", True),
        ("tags.Modality == 'MR'\nand 'CINE' in tags.SeriesDescription", True),
        ("tags.Modality == 'MR' \\\n and True", True),
    ],
)
def test_accepted_rules(rule: str, expected: bool) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.matched is expected
    assert result.missing_tags == ()
    assert result.notes == ()


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("@Modality@ == 'MR'", True),
        ("@Modality@ == 'CT'", False),
        ("'CINE' in %SeriesDescription%", True),
        ("'FLAIR' in %SeriesDescription%", False),
        ("%SeriesDescription%.lower().startswith('cine')", True),
        ("float(@SliceThickness@) < 2", True),
        (
            "@Modality@ == 'MR' and 'T1' in %SeriesDescription% and tags.SenderAET == 'SCANNER1'",
            True,
        ),
        ("@Modality@ in ['CT', 'MR']", True),
        ("(@Modality@=='MR')", True),
        # placeholders inside string literals are plain text
        ("'@Modality@' != @Modality@", True),
        ("'%Modality%' != 'MR'", True),
    ],
)
def test_legacy_placeholders(rule: str, expected: bool) -> None:
    assert matches(rule) is expected


def test_placeholders_inside_strings_are_not_tags() -> None:
    compiled = compile_rule("'@Modality@' == \"%SeriesDescription%\" or @SenderAET@ == 'x'")
    assert compiled.tags_used == frozenset({"SenderAET"})
    assert compiled(TAGS) is False
    assert compile_rule("'@Modality@' == '@Modality@'")({}) is True


@pytest.mark.parametrize("rule", ["", "   ", "\n\t "])
def test_empty_rule_is_false(rule: str) -> None:
    compiled = compile_rule(rule)
    assert compiled.tags_used == frozenset()
    assert compiled(TAGS) is False
    assert compiled.evaluate({}) == RuleResult(False, (), ())


def test_default_mercure_rule_text() -> None:
    assert compile_rule("False")(TAGS) is False
    assert compile_rule("True")({}) is True


def test_tags_used_lists_every_tag_in_every_form() -> None:
    compiled = compile_rule(
        "tags.Modality == 'MR' or (tags['SeriesDescription'] == 'x' and @SenderAET@ == 'y')"
        " or %ReceiverAET%.lower() == 'z' or float(tags.SliceThickness) > 1"
    )
    assert compiled.tags_used == frozenset(
        {"Modality", "SeriesDescription", "SenderAET", "ReceiverAET", "SliceThickness"}
    )
    assert isinstance(compiled.tags_used, frozenset)


def test_compiled_rule_call_shortcut_and_immutability() -> None:
    compiled = compile_rule("tags.Modality == 'MR'")
    assert isinstance(compiled, CompiledRule)
    assert compiled.text == "tags.Modality == 'MR'"
    assert compiled(TAGS) is True
    assert compiled({"Modality": "CT"}) is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        compiled.text = "True"  # type: ignore[misc, unused-ignore]


def test_compile_rule_is_cached() -> None:
    assert compile_rule("tags.Modality == 'PT'") is compile_rule("tags.Modality == 'PT'")


def test_result_is_always_bool() -> None:
    for rule in ("tags.Modality", "tags.Empty", "len(tags.Modality)", "tags.Missing or 0"):
        assert type(evaluate_rule(rule, TAGS).matched) is bool
    assert matches("tags.Modality") is True
    assert matches("tags.Empty") is False


# ---------------------------------------------------------------------------------------------
# Missing tags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "missing"),
    [
        ("tags.Nope == 'x'", ("Nope",)),
        ("tags.Nope != 'x'", ("Nope",)),
        ("'x' in tags.Nope", ("Nope",)),
        ("'x' not in tags.Nope", ("Nope",)),
        ("tags.Nope in ['a', 'b']", ("Nope",)),
        ("tags.Nope not in ['a', 'b']", ("Nope",)),
        ("tags['Nope'] < 'z'", ("Nope",)),
        ("float(tags.Nope) < 2.0", ("Nope",)),
        ("tags.Nope.lower() == 'x'", ("Nope",)),
        ("tags.Nope.lower().strip() != 'x'", ("Nope",)),
        ("tags.Nope[0:3] == 'abc'", ("Nope",)),
        ("len(tags.Nope) == 0", ("Nope",)),
        ("re_match('.*', tags.Nope)", ("Nope",)),
        ("tags.Nope", ("Nope",)),
        ("1 < float(tags.Nope) < 3", ("Nope",)),
        ("max(1, int(tags.Nope)) == 1", ("Nope",)),
        ("-float(tags.Nope) < 0", ("Nope",)),
        ("tags.A == 'x' or tags.B == 'y' or tags.A == 'z'", ("A",)),  # the first stops it
        ("tags.Zeta == tags.Alpha", ("Zeta",)),
        ("tags.Modality == 'MR' and tags.Nope == 'x'", ("Nope",)),
    ],
)
def test_missing_tag_makes_the_rule_false(rule: str, missing: tuple[str, ...]) -> None:
    result = evaluate_rule(rule, TAGS)
    assert result.matched is False
    assert result.missing_tags == missing
    assert result.notes == ()
    explanation = result.explain()
    assert "result: False" in explanation
    for name in missing:
        assert name in explanation
    assert "missing" in explanation


def test_a_missing_tag_under_not_or_in_an_or_makes_the_whole_rule_false() -> None:
    # mercure's evaluator stops at the missing tag: the whole rule is False, and the tester
    # says why that may surprise.
    for rule in ("not tags.Nope", "not (tags.Nope == 'x')", "tags.Nope == 'x' or True",
                 "tags.Nope == 'x' or tags.Modality == 'MR'"):  # fmt: skip
        result = evaluate_rule(rule, TAGS)
        assert result.matched is False, rule
        assert result.missing_tags == ("Nope",)
        assert result.surprise is True
        assert "inside an 'or' or a 'not'" in result.explain()
    plain = evaluate_rule("tags.Nope == 'x' and True", TAGS)
    assert plain.matched is False and plain.surprise is False


def test_short_circuit_skips_lookups() -> None:
    assert evaluate_rule("True or tags.Nope == 'x'", TAGS).missing_tags == ()
    assert evaluate_rule("False and tags.Nope == 'x'", TAGS).missing_tags == ()
    assert evaluate_rule("tags.Modality == 'CT' and float('abc') > 1", TAGS).notes == ()
    # A failed link of a comparison chain stops the chain, like Python.
    assert evaluate_rule("2 < 1 < float(tags.Nope)", TAGS).missing_tags == ()
    # | and & evaluate both sides (Python's bitwise operators on True/False).
    assert evaluate_rule("True | (tags.Nope == 'x')", TAGS).missing_tags == ("Nope",)
    assert matches("(tags.Modality == 'MR') | False") is True


def test_none_value_counts_as_missing() -> None:
    tags: dict[str, str] = {"Modality": None}  # type: ignore[dict-item]
    result = evaluate_rule("tags.Modality == 'MR'", tags)
    assert result.matched is False
    assert result.missing_tags == ("Modality",)


def test_explain_when_everything_is_present() -> None:
    text = evaluate_rule("tags.Modality == 'MR'", TAGS).explain()
    assert text.splitlines()[0] == "result: True (the rule matches)"
    assert "present" in text
    assert "missing tags" not in text


# ---------------------------------------------------------------------------------------------
# Run-time failures become notes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "note_fragments"),
    [
        ("float(tags.Bad) < 2", ["float(tags.Bad) failed", "could not convert string to float"]),
        ("float('abc') < 1", ["float('abc') failed: could not convert string to float: 'abc'"]),
        ("float(@Bad@) < 2", ["float(@Bad@) failed"]),
        ("int(tags.SliceThickness) == 1", ["int(tags.SliceThickness) failed", "invalid literal"]),
        ("float(tags.ImageType) > 0", ["float(tags.ImageType) failed"]),
        ("tags.SliceThickness < 2.0", ["failed", "not supported", "float(...)"]),
        ("1 < tags.SeriesNumber < 9", ["1 < tags.SeriesNumber < 9 failed", "float(...)"]),
        ("1 in tags.Modality", ["failed", "requires string as left operand"]),
        ("len(5) == 1", ["len(5) failed"]),
        ("min('') == 'a'", ["min('') failed"]),
        ("max(tags.Modality, 3) == 3", ["max(tags.Modality, 3) failed"]),
        ("int(tags.SeriesNumber).lower() == '7'", ["'int' object has no method .lower()"]),
        ("tags.Modality.startswith(1)", ["tags.Modality.startswith(1) failed"]),
        ("tags.Modality[5] == 'x'", ["tags.Modality[5] failed", "index out of range"]),
        ("int(tags.SeriesNumber)[0] == 7", ["'int' object is not subscriptable"]),
        ("-tags.Modality == 'x'", ["bad operand type for unary -"]),
        ("re_match(tags.Pattern, tags.Modality)", ["re_match(tags.Pattern, tags.Modality) failed"]),
        ("regex('M', int(tags.SeriesNumber))", ["the value must be text"]),
        ("regex(tags.Modality, 'MR')", []),  # a computed, valid pattern works (this one matches)
        ("(tags.Modality == 'MR') | tags.Modality", ["unsupported operand type(s) for |"]),
        ("tags.Modality[0.5] == 'x'", ["indices must be integers"]),
        ("tags.Modality[::0] == 'x'", ["slice step cannot be zero"]),
        ("tags[0] == 'x'", ["a tag keyword must be text"]),
        ("2 ** 100000 > 1", ["exponent 100000 is larger than 10000"]),
        ("9 ** 9999 ** 2 > 1", ["exponent"]),
        ("tags.Modality * 1000000 == 'x'", ["longer than 262144"]),
        ("'%999999999d' % 1 == 'x'", ["field width"]),
        ("1 << 5000 > 1", ["shift by 5000"]),
        ("len(range(10 ** 9)) > 1", ["range of more than"]),
        ("factorial(100000) > 1", ["factorial"]),
        ("1 / 0 == 1", ["division by zero"]),
    ],
)
def test_runtime_failures_are_notes_not_exceptions(rule: str, note_fragments: list[str]) -> None:
    result = evaluate_rule(rule, TAGS)
    if not note_fragments:
        assert result.matched is True
        assert result.notes == ()
        return
    assert result.matched is False
    assert len(result.notes) == 1
    for fragment in note_fragments:
        assert fragment in result.notes[0]
    assert result.notes[0] in result.explain()
    assert result.missing_tags == ()


def test_failure_inside_not_makes_the_whole_rule_false() -> None:
    result = evaluate_rule("not (float(tags.Bad) > 1)", TAGS)
    assert result.matched is False
    assert result.surprise is True
    assert result.notes and "float(tags.Bad) failed" in result.notes[0]


def test_identical_notes_are_reported_once() -> None:
    result = evaluate_rule("float(tags.Bad) > 1 or float(tags.Bad) < 1", TAGS)
    assert len(result.notes) == 1


def test_replace_cannot_blow_up_memory() -> None:
    rule = "'ab'" + ".replace('', 'abcdefgh')" * 12 + " == 'x'"
    result = evaluate_rule(rule, TAGS)
    assert result.matched is False
    assert any("longer than" in note for note in result.notes)


def test_internal_error_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = compile_rule("tags.Modality == 'MR' and tags.SeriesNumber == '7'")

    class Exploding(dict[str, str]):
        def get(self, key: object, default: object = None) -> str:  # type: ignore[override]
            raise RuntimeError("boom")

    result = compiled.evaluate(Exploding(TAGS))
    assert result.matched is False
    assert any("boom" in note for note in result.notes)


# ---------------------------------------------------------------------------------------------
# Rejected rules: position and reason
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "column", "fragment"),
    [
        ("().__class__.__bases__", 4, "attribute access '__class__' is not allowed"),
        ("__import__('os')", 1, "function '__import__' is not allowed"),
        ("tags.__class__", 6, "attribute access '__class__' is not allowed"),
        ("open('x')", 1, "function 'open' is not allowed"),
        ("tags.PatientName.__len__()", 18, "'__len__'"),
        ("[x for x in tags]", 1, "list comprehension"),
        ("lambda: 1", 1, "lambda"),
        ("getattr(tags, 'x')", 1, "function 'getattr' is not allowed"),
        ("tags.Modality == 'MR' and __builtins__", 27, "'__builtins__'"),
        ("'x'.__class__", 5, "'__class__'"),
        ("tags.Modality.__doc__", 15, "'__doc__'"),
        ("tags.Modality.real", 15, "attribute access 'real' is not allowed"),
        ("tags.Modality.lower", 15, "must be called"),
        ("tags.Modality.format('x')", 15, "method .format() is not allowed"),
        ("tags.Modality.encode()", 15, "method .encode() is not allowed"),
        ("tags._Modality == 'x'", 6, "'_Modality'"),
        ("tags['__class__'] == 'x'", 7, "'__class__'"),
        ("tags['Bad Name'] == 'x'", 7, "'Bad Name' is not a valid tag keyword"),
        ("tags['1Modality'] == 'x'", 7, "'1Modality' is not a valid tag keyword"),
        ("tags.Größe == 'x'", 6, "'Größe' is not a valid tag keyword"),
        ("tags('Modality')", 1, "'tags' cannot be called"),
        ("tags.get('Modality')", 1, "tags.get is a tag and cannot be called"),
        ("float", 1, "function 'float' must be called"),
        ("float(tags.A, tags.B)", 1, "float() takes 0 to 1 arguments, got 2"),
        ("tags.Modality @ 1", 15, "the operator '@' is not allowed"),
        ("re_match('x')", 1, "re_match() takes 2 arguments, got 1"),
        ("min() == 1", 1, "min() takes at least 1 argument"),
        ("tags.Modality.lower('x')", 1, ".lower() takes 0 arguments, got 1"),
        ("tags.Modality.replace('x')", 1, ".replace() takes 2 to 3 arguments, got 1"),
        ("float(x=1)", 7, "keyword arguments (x=...) are not allowed"),
        ("max(*[1, 2])", 5, "starred expression"),
        ("tags.Modality == CT", 18, "unknown name 'CT'"),
        ("true", 1, "did you mean True?"),
        ("b'x' == tags.Modality", 1, "bytes literals are not allowed"),
        ("1j == 1", 1, "complex literals are not allowed"),
        ("... == 1", 1, "ellipsis literals are not allowed"),
        ("f'{tags.Modality}' == 'MR'", 1, "f-string"),
        ("(y := 1)", 2, "assignment expression"),
        ("{'a': 1}", 1, "dict literal"),
        ("(x for x in 'ab')", 1, "generator expression"),
        ("{x for x in 'ab'}", 1, "set comprehension"),
        ("float(tags.X)()", 1, "only the functions"),
        ("tags.Modality.lower()()", 1, "only the functions"),
        ("re_match('(', tags.SeriesDescription)", 10, "invalid regular expression '('"),
        ("regex('[a-', tags.SeriesDescription)", 7, "invalid regular expression"),
        ("re_match(5, tags.Modality)", 10, "pattern of re_match() must be text"),
        ("tags.Modality == 'MR' and eval('1')", 27, "function 'eval' is not allowed"),
        ("exec('1')", 1, "function 'exec' is not allowed"),
        ("compile('1', 'x', 'eval')", 1, "function 'compile' is not allowed"),
        ("vars(tags)", 1, "function 'vars' is not allowed"),
    ],
)
def test_rejected_rules(rule: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(rule)
    err = info.value
    assert fragment in err.reason
    assert err.position == column, str(err)
    assert err.offset == column - 1
    assert err.rule == rule
    assert str(err) == f"rule {rule!r} column {column}: {err.reason}"
    assert isinstance(err, ValueError)


def test_rejection_message_format() -> None:
    with pytest.raises(RuleError) as info:
        compile_rule("tags.__class__")
    assert str(info.value) == (
        "rule 'tags.__class__' column 6: attribute access '__class__' is not allowed "
        "(only tags.<Keyword> and string methods such as .lower())"
    )


def test_evaluate_rule_raises_for_an_invalid_rule() -> None:
    with pytest.raises(RuleError):
        evaluate_rule("open('x')", TAGS)


@pytest.mark.parametrize(
    ("rule", "column", "fragment"),
    [
        ("tags.Modality == ", 18, "syntax error"),
        ("tags.Modality ==", 17, "syntax error"),
        ("(tags.Modality == 'MR'", 1, "'(' was never closed"),
        ("tags.Modality == 'MR')", 22, "unmatched ')'"),
        ("'CINE in tags.SeriesDescription", 1, "unterminated string literal"),
        ("tags.Modality = 'MR'", 15, "syntax error"),
        ("tags.Modality == 'MR' and and True", 27, "syntax error"),
        ("'Schädel' in tags.StudyDescription ¤", 36, "invalid character"),
        ("tags.Modality == 'MR' &&", 24, "syntax error"),
        ("1 +", 4, "syntax error"),
        ("   tags.X ==", 13, "syntax error"),
        ("tags.Modality == 'MR'\nand and", 27, "syntax error"),
    ],
)
def test_syntax_errors_have_positions(rule: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(rule)
    assert fragment in info.value.reason
    assert info.value.position == column, str(info.value)


def test_positions_count_characters_not_bytes() -> None:
    with pytest.raises(RuleError) as info:
        compile_rule("'Schädelö' in tags.StudyDescription and tags.X.__class__")
    assert info.value.position == 48
    assert info.value.rule[info.value.offset :].startswith("__class__")


@pytest.mark.parametrize(
    ("rule", "column", "points_at"),
    [
        ("@Modality@ == 'CT' and %SeriesDescription%.__class__", 44, "__class__"),
        ("@_hidden@ == 'x'", 2, "_hidden@"),
        ("%__class__% == 'x'", 2, "__class__%"),
        ("@Modality@ == 'CT' and and", 24, "and"),
        ("%SeriesDescription%.format() == 'x'", 21, "format()"),
        ("@Modality@.lower", 12, "lower"),
        ("@Modality@ == @X@ == open('x')", 22, "open("),
        ("@Modality@ == 'CT' and @Über@ == 'x'", 24, "@Über@"),  # not a placeholder
        ("@Modality@ == 'CT' and @Modality@ == CT", 38, "CT"),
    ],
)
def test_placeholder_errors_point_into_the_original_text(
    rule: str, column: int, points_at: str
) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(rule)
    err = info.value
    assert err.position == column, str(err)
    assert err.rule == rule
    assert rule[err.offset :].startswith(points_at)


def test_notes_quote_the_original_text() -> None:
    result = evaluate_rule("float(%Bad%) > 1 or 1 < @SeriesNumber@", TAGS)
    assert result.notes == (result.notes[0],)  # the first failure stops the rule
    assert result.notes[0].startswith("float(%Bad%) failed")
    result = evaluate_rule("1 < @SeriesNumber@", TAGS)
    assert result.notes[0].startswith("1 < @SeriesNumber@ failed")


def test_multiline_rule_positions_count_from_the_start() -> None:
    rule = "tags.Modality == 'MR'\nand tags.X.__dict__"
    with pytest.raises(RuleError) as info:
        compile_rule(rule)
    assert rule[info.value.offset :] == "__dict__"
    assert info.value.caret() == "and tags.X.__dict__\n           ^"


def test_rule_error_caret_and_pickling() -> None:
    with pytest.raises(RuleError) as info:
        compile_rule("tags.Modality == 'MR' and open('x')")
    err = info.value
    assert err.caret() == "tags.Modality == 'MR' and open('x')\n" + " " * 26 + "^"
    clone = pickle.loads(pickle.dumps(err))
    assert isinstance(clone, RuleError)
    assert (clone.rule, clone.offset, clone.position, clone.reason) == (
        err.rule,
        err.offset,
        err.position,
        err.reason,
    )
    assert str(clone) == str(err)


def test_deep_nesting_is_a_rule_error() -> None:
    deep_parentheses = "(" * 300 + "True" + ")" * 300
    with pytest.raises(RuleError):
        compile_rule(deep_parentheses)
    deep_not = "not " * 500 + "True"
    with pytest.raises(RuleError) as info:
        compile_rule(deep_not)
    assert "nested too deeply" in info.value.reason
    assert compile_rule("not " * 50 + "True")({}) is True


def test_long_flat_rules_are_fine() -> None:
    rule = " or ".join(f"tags.Modality == 'X{i}'" for i in range(500)) + " or True"
    assert compile_rule(rule)(TAGS) is True


def test_source_never_uses_the_builtin_evaluators() -> None:
    source = Path(rules_module.__file__).read_text(encoding="utf-8")
    for module in (rule_eval, rule_source, study_trigger):
        source += Path(module.__file__).read_text(encoding="utf-8")
    assert "eval(" not in source
    assert "exec(" not in source
    assert not re.search(r"\bcompile\(", source.replace("re.compile(", ""))


def test_regex_patterns_are_compiled_once() -> None:
    rule_eval.regex.cache_clear()
    compiled = compile_rule("re_match('^CINE_T[0-9]', tags.SeriesDescription)")
    for _ in range(5):
        assert compiled(TAGS) is True
    info = rule_eval.regex.cache_info()
    assert info.misses == 1
    assert info.hits >= 5


# ---------------------------------------------------------------------------------------------
# Study completion series
# ---------------------------------------------------------------------------------------------

SERIES = ["AX T2 FLAIR", "T1-COR", "SAG", "dwi b1000"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("'SAG'", True),
        ("'T1'", True),
        ("'flair'", True),  # case-insensitive, as in mercure
        ("'DWI'", True),
        ("'T3'", False),
        ("'T1' and 'SAG'", True),
        ("'T1' and 'T3'", False),
        ("'T3' or 'SAG'", True),
        ("'SAG' or ('COR' and 'AX')", True),
        ("'T1' and ('T2' or 'FLAIR')", True),
        ("'T1' and ('T3' or 'PD')", False),
        ("'T1' and not 'T3'", True),  # mercure's router evaluates 'not'
        ("not 'SAG'", False),
        ("not ('T3' or 'PD') and 'dwi'", True),
        ('"T1" and "SAG"', True),
        ("  ('T1')\n and 'SAG'  ", True),
        ("", True),  # no condition: complete
        ("   ", True),
        ("'T1' and", False),  # invalid: never complete
        ("T1", False),
    ],
)
def test_parse_completion_series(condition: str, expected: bool) -> None:
    assert parse_completion_series(condition, SERIES) is expected


def test_parse_completion_series_without_received_series() -> None:
    assert parse_completion_series("'T1'", []) is False
    assert parse_completion_series("", []) is False


@pytest.mark.parametrize(
    "condition",
    ["'T1'", "'T1' and 'T2'", "('a' or 'b') and 'c'", "'SAG' or ('COR' and 'AX')", "not 'T1'"],
)
def test_check_completion_series_accepts(condition: str) -> None:
    assert check_completion_series(condition) is None


@pytest.mark.parametrize(
    ("condition", "column", "fragment"),
    [
        ("T1 and 'T2'", 1, "'T1' must be in quotes"),
        ("'T1' and T2", 10, "'T2' must be in quotes"),
        ("'T1' + 'T2'", 6, "operator '+'"),
        ("'T1' | 'T2'", 6, "operator '|'"),
        ("'T1' == 'T2'", 1, "comparison is not allowed"),
        ("'T1' and 1", 10, "the value 1 is not allowed"),
        ("'T1' and ''", 10, "empty series description"),
        ("__import__('os')", 1, "function call is not allowed"),
        ("'T1' and", 9, "syntax error"),
        ("('T1' or 'T2'", 1, "never closed"),
        ("'T1' and tags.Modality", 10, "attribute access is not allowed"),
        ("'T1' and @Modality@", 10, "syntax error"),
    ],
)
def test_check_completion_series_rejects(condition: str, column: int, fragment: str) -> None:
    message = check_completion_series(condition)
    assert message is not None
    assert fragment in message
    assert f"column {column}:" in message
    assert message.startswith(f"series list {condition!r}")


@pytest.mark.parametrize("condition", ["", "  "])
def test_check_completion_series_rejects_empty(condition: str) -> None:
    message = check_completion_series(condition)
    assert message is not None
    assert "empty" in message
