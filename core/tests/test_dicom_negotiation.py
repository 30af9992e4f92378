"""The receiver's negotiation policy, as a pure function of the proposed contexts."""

from __future__ import annotations

import pytest
from mercure.builtin.dicom_negotiation import (
    RECEIVABLE,
    UNCOMPRESSED,
    NegotiationSettings,
    Outcome,
    ProposedContext,
    Rejection,
    choose_transfer_syntax,
    negotiate,
)
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

VERIFICATION = "1.2.840.10008.1.1"
FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve - FIND
PRIVATE = "1.2.3.4.5.6.7.8.9"
RETIRED_NM = "1.2.840.10008.5.1.4.1.1.5"  # Nuclear Medicine Image Storage (Retired)
HEVC = "1.2.840.10008.1.2.4.107"
JPIP_DEFLATE = "1.2.840.10008.1.2.4.95"

COMPRESSED = NegotiationSettings(accept_compressed_images=True)
DEFAULT = NegotiationSettings()


def one(abstract: str, *syntaxes: str, settings: NegotiationSettings = COMPRESSED) -> Outcome:
    [outcome] = negotiate([ProposedContext(1, abstract, tuple(syntaxes))], settings)
    return outcome


@pytest.mark.parametrize(
    ("proposed", "chosen"),
    [
        ((ImplicitVRLittleEndian, ExplicitVRLittleEndian), ExplicitVRLittleEndian),
        ((ExplicitVRLittleEndian, ImplicitVRLittleEndian), ExplicitVRLittleEndian),
        ((ExplicitVRBigEndian, ExplicitVRLittleEndian), ExplicitVRBigEndian),
        ((ImplicitVRLittleEndian, ExplicitVRBigEndian), ExplicitVRBigEndian),
        ((RLELossless, ExplicitVRLittleEndian), RLELossless),
        ((ExplicitVRLittleEndian, RLELossless), ExplicitVRLittleEndian),
        ((JPEGLSLossless, JPEG2000Lossless, ExplicitVRLittleEndian), JPEGLSLossless),
        ((ImplicitVRLittleEndian, JPEGBaseline8Bit), JPEGBaseline8Bit),
        ((ImplicitVRLittleEndian,), ImplicitVRLittleEndian),
        ((DeflatedExplicitVRLittleEndian,), DeflatedExplicitVRLittleEndian),
        ((HEVC, ExplicitVRLittleEndian), HEVC),
        (("1.2.840.113619.5.2", ExplicitVRLittleEndian), ExplicitVRLittleEndian),  # private
    ],
)
def test_senders_order_explicit_before_implicit(proposed: tuple[str, ...], chosen: str) -> None:
    outcome = one(CTImageStorage, *proposed)
    assert outcome.accepted and outcome.storage
    assert outcome.transfer_syntax == chosen


@pytest.mark.parametrize(
    ("proposed", "chosen"),
    [
        ((JPEGBaseline8Bit, ExplicitVRLittleEndian), ExplicitVRLittleEndian),
        ((RLELossless, ImplicitVRLittleEndian), ImplicitVRLittleEndian),
        ((DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian), ImplicitVRLittleEndian),
        ((ExplicitVRBigEndian, ExplicitVRLittleEndian), ExplicitVRBigEndian),
    ],
)
def test_without_compressed_images_only_uncompressed(
    proposed: tuple[str, ...], chosen: str
) -> None:
    assert one(CTImageStorage, *proposed, settings=DEFAULT).transfer_syntax == chosen


@pytest.mark.parametrize(
    ("settings", "proposed"),
    [
        (DEFAULT, (JPEGBaseline8Bit, JPEGLSLossless, RLELossless)),
        (DEFAULT, (DeflatedExplicitVRLittleEndian,)),  # storescp takes it only with +xa/+xd
        (COMPRESSED, (JPIP_DEFLATE,)),  # pydicom cannot read its dataset
        (COMPRESSED, ("1.2.840.113619.5.2",)),  # a private syntax
        (COMPRESSED, ()),
    ],
)
def test_no_acceptable_syntax_is_refused_with_its_reason(
    settings: NegotiationSettings, proposed: tuple[str, ...]
) -> None:
    outcome = one(CTImageStorage, *proposed, settings=settings)
    assert not outcome.accepted
    assert outcome.rejection == Rejection.TRANSFER_SYNTAXES_NOT_SUPPORTED


@pytest.mark.parametrize("abstract", [PRIVATE, RETIRED_NM, "1.2.840.10008.5.1.4.1.1.999"])
def test_unknown_private_and_retired_classes_are_storage(abstract: str) -> None:
    outcome = one(abstract, ExplicitVRLittleEndian)
    assert outcome.accepted and outcome.storage
    assert outcome.transfer_syntax == ExplicitVRLittleEndian


def test_known_services_not_served_are_refused() -> None:
    outcome = one(FIND, ExplicitVRLittleEndian)
    assert outcome.rejection == Rejection.ABSTRACT_SYNTAX_NOT_SUPPORTED
    assert not outcome.accepted


def test_served_services_take_their_own_syntaxes() -> None:
    settings = NegotiationSettings(
        accept_compressed_images=True,
        services={VERIFICATION: (ImplicitVRLittleEndian, ExplicitVRLittleEndian)},
    )
    accepted = one(VERIFICATION, JPEGBaseline8Bit, ImplicitVRLittleEndian, settings=settings)
    assert accepted.transfer_syntax == ImplicitVRLittleEndian and not accepted.storage
    refused = one(VERIFICATION, JPEGBaseline8Bit, settings=settings)
    assert refused.rejection == Rejection.TRANSFER_SYNTAXES_NOT_SUPPORTED


def test_invalid_abstract_syntax_is_refused() -> None:
    outcome = one("not a uid", ExplicitVRLittleEndian)
    assert outcome.rejection == Rejection.ABSTRACT_SYNTAX_NOT_SUPPORTED


def test_every_context_is_answered_in_order() -> None:
    proposed = [
        ProposedContext(1, CTImageStorage, (JPEGLSLossless,)),
        ProposedContext(3, CTImageStorage, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        ProposedContext(5, FIND, (ExplicitVRLittleEndian,)),
        ProposedContext(7, PRIVATE, (ImplicitVRLittleEndian,)),
    ]
    outcomes = negotiate(proposed, COMPRESSED)
    assert [(o.context_id, o.transfer_syntax, o.rejection) for o in outcomes] == [
        (1, JPEGLSLossless, None),
        (3, ExplicitVRLittleEndian, None),
        (5, None, Rejection.ABSTRACT_SYNTAX_NOT_SUPPORTED),
        (7, ImplicitVRLittleEndian, None),
    ]


def test_receivable_syntaxes() -> None:
    assert set(UNCOMPRESSED) < set(RECEIVABLE)
    assert JPIP_DEFLATE not in RECEIVABLE
    jpeg_xl, jpip = "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.94"
    for ts in (
        JPEGBaseline8Bit,
        JPEGLSLossless,
        JPEG2000Lossless,
        RLELossless,
        HEVC,
        jpeg_xl,
        jpip,
    ):
        assert ts in RECEIVABLE
    assert DeflatedExplicitVRLittleEndian not in UNCOMPRESSED


def test_choose_ignores_duplicates_and_padding() -> None:
    acceptable = frozenset(UNCOMPRESSED)
    proposed = [ImplicitVRLittleEndian + "\0", ImplicitVRLittleEndian, ExplicitVRBigEndian + " "]
    assert choose_transfer_syntax(proposed, acceptable) == ExplicitVRBigEndian
