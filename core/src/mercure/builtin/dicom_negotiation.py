"""Which presentation contexts the receiver accepts, and with which transfer syntax.

The receiver stores what it is sent byte for byte, so it has no reason to make a sender
convert: for every proposed presentation context it takes the sender's own transfer syntax
when it can read it, in the sender's order of preference, except that an explicit VR syntax
is preferred over Implicit VR Little Endian (implicit VR drops the VR of private elements
downstream). With ``accept_compressed_images: false`` only the uncompressed syntaxes that
mercure's receiver (DCMTK ``storescp`` without ``+xa``) takes are accepted.

Every abstract syntax that is not a known non-storage service is taken as storage: unknown,
private and retired storage SOP classes are received, as mercure's receiver runs
``--promiscuous``. Known services (query/retrieve, worklist, ...) are refused unless the
receiver serves them (verification, MPPS: the ``services`` of :class:`NegotiationSettings`).

This module is pure (no I/O, no association): the pynetdicom acceptor applies it through
:mod:`mercure.builtin.dicom_acceptance`; another acceptor can use it as it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pydicom.uid import (
    RE_VALID_UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import ALL_TRANSFER_SYNTAXES

#: The syntaxes DCMTK's storescp accepts without ``+xa`` (mercure's default receiver).
UNCOMPRESSED: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

#: Known syntaxes whose dataset pydicom cannot read (deflated, but pydicom does not inflate
#: them): the receiver could not find the series of such an instance, so it does not take them.
UNREADABLE: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
        "1.2.840.10008.1.2.4.205",  # JPIP HTJ2K Referenced Deflate
    }
)

#: Every syntax the receiver can take with ``accept_compressed_images: true``: all that
#: pynetdicom knows (the dataset is stored as sent, so any encoding pydicom reads will do).
RECEIVABLE: tuple[str, ...] = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES if ts not in UNREADABLE)


class Rejection(enum.IntEnum):
    """Why a context is refused: the result codes of the A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context of an A-ASSOCIATE-RQ, transfer syntaxes in the sender's order."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """The answer for one proposed context: a transfer syntax, or why not."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str | None = None
    rejection: Rejection | None = None
    #: Accepted as storage (rather than as one of the ``services``).
    storage: bool = False

    @property
    def accepted(self) -> bool:
        return self.transfer_syntax is not None


def _valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and RE_VALID_UID.match(uid) is not None


def _known_non_storage(uid: str) -> bool:
    """Whether pynetdicom knows ``uid`` as a SOP class of a service other than storage."""
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    service = uid_to_service_class(uid)
    return service is not ServiceClass and not issubclass(service, StorageServiceClass)


@dataclass(frozen=True)
class NegotiationSettings:
    """What the receiver takes: mercure's ``accept_compressed_images`` and its services."""

    accept_compressed_images: bool = False
    #: Non-storage abstract syntaxes the receiver serves, with the syntaxes each takes.
    services: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Whether an abstract syntax is a known SOP class of another service (not storage).
    known_non_storage: Callable[[str], bool] = _known_non_storage

    @property
    def storage_syntaxes(self) -> frozenset[str]:
        return frozenset(RECEIVABLE if self.accept_compressed_images else UNCOMPRESSED)


def choose_transfer_syntax(proposed: Iterable[str], acceptable: frozenset[str]) -> str | None:
    """The sender's first acceptable syntax, explicit VR before Implicit VR Little Endian."""
    candidates = [ts for ts in dict.fromkeys(str(t).strip() for t in proposed) if ts in acceptable]
    explicit = [ts for ts in candidates if ts != ImplicitVRLittleEndian]
    if explicit:
        return explicit[0]
    return candidates[0] if candidates else None


def negotiate(proposed: Iterable[ProposedContext], settings: NegotiationSettings) -> list[Outcome]:
    """The outcome of every proposed context, in the order proposed."""
    storage = settings.storage_syntaxes
    services = {str(k): frozenset(v) for k, v in settings.services.items()}
    outcomes: list[Outcome] = []
    for context in proposed:
        abstract = str(context.abstract_syntax).strip()
        if abstract in services:
            acceptable, is_storage = services[abstract], False
        elif not _valid_uid(abstract) or settings.known_non_storage(abstract):
            outcomes.append(
                Outcome(
                    context.context_id,
                    abstract,
                    rejection=Rejection.ABSTRACT_SYNTAX_NOT_SUPPORTED,
                )
            )
            continue
        else:
            acceptable, is_storage = storage, True
        chosen = choose_transfer_syntax(context.transfer_syntaxes, acceptable)
        if chosen is None:
            outcomes.append(
                Outcome(
                    context.context_id,
                    abstract,
                    rejection=Rejection.TRANSFER_SYNTAXES_NOT_SUPPORTED,
                    storage=is_storage,
                )
            )
        else:
            outcomes.append(Outcome(context.context_id, abstract, chosen, storage=is_storage))
    return outcomes
