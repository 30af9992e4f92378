"""mercure's own results for rule strings, written down from running mercure's evaluator.

Each row's expected value is what mercure 0.4's ``parse_rule`` (its default, asteval-based
evaluator) returned for the rule on ``TAGS``; the test checks that this router's evaluator,
which never hands the text to Python, gives the same result. Rows cover missing tags (inside
``or`` and ``not`` too), the case-insensitive fallback of ``tags.X`` (and its absence for
``tags['X']``, placeholders and ``in tags``), arithmetic on converted values, failures, text
methods, literals, the legacy ``@Tag@`` and bounds. The few rule strings mercure cannot run at
all (so they never match there) are refused here when the configuration loads; ``%Tag%``,
which mercure's documentation shows but its code does not read, is accepted here as ``@Tag@``.
"""

from __future__ import annotations

import pytest
from mercure.rules import RuleError, compile_rule
from mercure.study_trigger import parse_completion_series

TAGS = {
    "Modality": "MR",
    "SeriesDescription": "T1 MPRAGE sag",
    "SliceThickness": "1.5",
    "SeriesNumber": "7",
    "StudyDescription": "BRAIN^ROUTINE",
    "PatientName": "Doe^Jane",
    "ImageType": "ORIGINAL\\PRIMARY\\M",
    "EchoTime": "2.26",
    "BodyPartExamined": "",
    "ManufacturerModelName": "Prisma",
}

# (rule, mercure's result on TAGS)
MERCURE = [
    ("tags.Modality == 'MR'", True),
    ("tags.modality == 'MR'", True),  # attribute access falls back to any case
    ("tags.MODALITY == 'MR'", True),
    ("tags['Modality'] == 'MR'", True),
    ("tags['modality'] == 'MR'", False),  # tags[...] is exact: missing, so False
    ("'Modality' in tags", True),
    ("'modality' in tags", False),  # presence is exact
    ("'Nope' not in tags", True),
    ("tags.Nope == 'x'", False),
    ("tags.Nope != 'x'", False),  # a missing tag: the whole rule is False
    ("tags.Nope == 'x' or True", False),  # ... even inside 'or'
    ("True or tags.Nope == 'x'", True),
    ("not tags.Nope", False),  # ... and under 'not'
    ("not (tags.Nope == 'x')", False),
    ("tags.Modality == 'MR' or tags.Nope == 'x'", True),
    ("tags.Nope == 'x' or tags.Modality == 'MR'", False),
    ("False and tags.Nope == 'x'", False),
    ("float(tags.SliceThickness) * 2 > 3", False),
    ("float(tags.SliceThickness) * 2 >= 3", True),
    ("int(tags.SeriesNumber) % 2 == 1", True),
    ("int(tags.SeriesNumber) // 2 == 3", True),
    ("int(tags.SeriesNumber) ** 2 == 49", True),
    ("float(tags.EchoTime) + float(tags.SliceThickness) < 4", True),
    ("tags.SliceThickness < 2.0", False),
    ("float(tags.SliceThickness) < 2.0 or tags.SliceThickness < 2.0", True),
    ("tags.SliceThickness < 2.0 or True", False),
    ("float('abc') > 1 or True", False),
    ("int(tags.SliceThickness) == 1", False),
    ("round(float(tags.EchoTime), 1) == 2.3", True),
    ("abs(-float(tags.EchoTime)) > 2", True),
    ("sqrt(float(tags.SeriesNumber) + 2) == 3", True),
    ("max(int(tags.SeriesNumber), 3) == 7", True),
    ("'CINE' in tags.SeriesDescription", False),
    ("'mprage' in tags.SeriesDescription.lower()", True),
    ("tags.SeriesDescription.lower().startswith('t1')", True),
    ("tags.SeriesDescription.upper().endswith('SAG')", True),
    ("tags.SeriesDescription.split()[1] == 'MPRAGE'", True),
    ("tags.StudyDescription.split('^')[0] == 'BRAIN'", True),
    ("tags.ImageType.split('\\\\')[1] == 'PRIMARY'", True),
    ("len(tags.SeriesDescription) == 13", True),
    ("tags.SeriesDescription.replace(' ', '_') == 'T1_MPRAGE_sag'", True),
    ("tags.SeriesDescription[0:2] == 'T1'", True),
    ("tags.PatientName.strip().count('^') == 1", True),
    ("tags.SeriesNumber.isdigit()", True),
    ("tags.BodyPartExamined", False),  # an empty value is false
    ("tags.Modality", True),
    ("tags.Modality in ['CT', 'MR']", True),
    ("tags.Modality not in ('CT', 'PT')", True),
    ("tags.Modality == 'MR' and ('T1' in tags.SeriesDescription)", True),
    ("(tags.Modality == 'MR') | (tags.Modality == 'CT')", True),
    ("(tags.Modality == 'MR') & ('T2' in tags.SeriesDescription)", False),
    ("@Modality@ == 'MR'", True),
    ("@Nope@ == 'MR'", False),
    ("True or @Nope@ == 'MR'", False),  # a missing @Tag@ is left in the text
    ("@modality@ == 'MR'", False),  # placeholders are exact
    ("'MPRAGE' in @SeriesDescription@ and @Modality@ == 'MR'", True),
    ("1 < int(tags.SeriesNumber) < 10", True),
    ("tags.ManufacturerModelName.lower() in ['prisma', 'skyra']", True),
    ("False", False),
    ("True", True),
    ('"False"', True),  # a non-empty text is true
    ("", False),
    ("2 ** 100000 > 1", False),  # exponents are bounded (10000)
    ("tags.Modality * 3 == 'MRMRMR'", True),
    ("str(int(tags.SeriesNumber) + 1) == '8'", True),
    ("tags.Modality != None", True),
    ("tags[tags.Modality[0:0] + 'Modality'] == 'MR'", True),
    ("len(tags) > 5", True),
]


@pytest.mark.parametrize(("rule", "expected"), MERCURE)
def test_rules_evaluate_as_mercure_evaluates_them(rule: str, expected: bool) -> None:
    assert compile_rule(rule).evaluate(TAGS).matched is expected


def test_the_table_is_large_enough() -> None:
    assert len(MERCURE) >= 40


@pytest.mark.parametrize(
    "rule",
    [
        # mercure's evaluator stops with "IfExp not supported" / "'generatorexp'": never True.
        "tags.Modality == 'MR' if int(tags.SeriesNumber) > 5 else False",
        "any(x in tags.SeriesDescription for x in ['T1'])",
    ],
)
def test_what_mercure_cannot_run_is_refused_at_load(rule: str) -> None:
    with pytest.raises(RuleError):
        compile_rule(rule)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("'MPRAGE' in %SeriesDescription%", True),
        ("%Nope% == 'x' or True", False),  # a missing placeholder: False, as with @Nope@
    ],
)
def test_percent_placeholders_mean_what_at_placeholders_mean(rule: str, expected: bool) -> None:
    assert compile_rule(rule).evaluate(TAGS).matched is expected


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        # mercure's parse_completion_series on these received series descriptions
        ("'Axial T2' and ('Sag T1' or 'Cor T1')", True),
        ("'axial t2' and 'cor t1'", False),
        ("'T2' or 'PD'", True),
        ("'mprage'", True),
        ("'Cor T1'", False),
        ("('DWI' and 'FLAIR') or 'x'", True),
        ("not 'Cor'", True),
        ("'Sag' and not 'Cor'", True),
        ("'T1' and 'T2' and 'b1000'", True),
    ],
)
def test_study_trigger_series_as_mercure(condition: str, expected: bool) -> None:
    received = ["Axial T2 FLAIR", "Sag T1 MPRAGE", "dwi b1000"]
    assert parse_completion_series(condition, received) is expected


def test_the_tester_points_out_mercures_surprises() -> None:
    result = compile_rule("tags.Nope == 'x' or tags.Modality == 'MR'").evaluate(TAGS)
    assert result.matched is False
    assert "inside an 'or' or a 'not'" in result.explain()
    result = compile_rule("True or @Nope@ == 'MR'").evaluate(TAGS)
    assert result.missing_tags == ("Nope",)
    assert "leaves it in the rule" in result.explain()
