"""The receiver's negotiation policy (:mod:`~mercure.builtin.dicom_negotiation`) on pynetdicom.

pynetdicom answers each proposed context with the first of the acceptor's own transfer
syntaxes that the context lists, and refuses abstract syntaxes it was not given. Two handlers
of public pynetdicom events make it answer as the policy decides, per association:

* ``EVT_REQUESTED`` (the A-ASSOCIATE-RQ is decoded, nothing answered yet): the association's
  supported contexts are replaced by the policy's choices: for each accepted abstract syntax
  only its chosen syntaxes, ordered so that pynetdicom's first match is the chosen one for
  every context (:func:`supported_contexts`);
* ``EVT_SOP_COMMON`` (SOP class common extended negotiation, asked on every association):
  each accepted SOP class pynetdicom does not know is declared a member of the Storage Service
  Class, so that its C-STORE reaches the receiver's store handler. pynetdicom picks the service
  of a DIMSE request from this negotiation before its own tables (``Association._serve_request``
  in pynetdicom 3.0); without it an unknown SOP class aborts the association.

Both are bound by :func:`handlers`; ``core/tests/test_dicom_acceptance.py`` checks them on a
real association against the pinned pynetdicom (>=3.0,<3.1).
"""

from __future__ import annotations

import graphlib
from collections.abc import Sequence
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.pdu_primitives import SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass
from pynetdicom.sop_class import uid_to_service_class

from mercure.builtin.dicom_negotiation import (
    NegotiationSettings,
    Outcome,
    ProposedContext,
    negotiate,
)
from mercure.logs import get_logger

log = get_logger("mercure.receiver")

#: The Storage Service Class UID (PS3.4 B.4).
STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"


def proposed_contexts(assoc: Any) -> list[ProposedContext]:
    """The presentation contexts of the association's A-ASSOCIATE-RQ."""
    request = assoc.requestor.primitive
    return [
        ProposedContext(
            int(cx.context_id),
            str(cx.abstract_syntax),
            tuple(str(ts) for ts in cx.transfer_syntax),
        )
        for cx in request.presentation_context_definition_list
    ]


def _ordered(abstract: str, contexts: Sequence[tuple[tuple[str, ...], str]]) -> list[str]:
    """Chosen syntaxes of one abstract syntax in an order where, for each context, its chosen
    syntax comes before the other chosen syntaxes it lists (pynetdicom takes the first)."""
    graph: dict[str, set[str]] = {}
    first_seen: list[str] = []
    chosen_set = {chosen for _, chosen in contexts}
    for listed, chosen in contexts:
        graph.setdefault(chosen, set())
        if chosen not in first_seen:
            first_seen.append(chosen)
        for other in listed:
            if other != chosen and other in chosen_set:
                graph.setdefault(other, set()).add(chosen)  # chosen before other
    try:
        return list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        # The sender lists the same syntaxes in contradicting orders in two contexts: each
        # still gets one of its own proposed syntaxes, maybe not its first choice.
        log.info("contradicting transfer syntax orders proposed", abstract_syntax=abstract)
        return first_seen


def supported_contexts(
    outcomes: Sequence[Outcome],
    proposed: Sequence[ProposedContext],
    configured: Sequence[PresentationContext] = (),
) -> list[PresentationContext]:
    """pynetdicom acceptor contexts that make its negotiation give ``outcomes``.

    ``configured`` are the AE's own contexts: their SCP/SCU roles are kept.
    """
    listed = {cx.context_id: cx.transfer_syntaxes for cx in proposed}
    per_abstract: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for outcome in outcomes:
        if outcome.transfer_syntax is not None:
            per_abstract.setdefault(outcome.abstract_syntax, []).append(
                (listed.get(outcome.context_id, ()), outcome.transfer_syntax)
            )
    roles = {str(cx.abstract_syntax): cx for cx in configured}
    result: list[PresentationContext] = []
    for abstract, contexts in per_abstract.items():
        context = PresentationContext()
        context.abstract_syntax = abstract
        context.transfer_syntax = list[str | bytes | UID](_ordered(abstract, contexts))
        own = roles.get(abstract)
        if own is not None:
            context.scu_role = own.scu_role
            context.scp_role = own.scp_role
        result.append(context)
    return result


def unknown_storage_classes(outcomes: Sequence[Outcome]) -> list[str]:
    """Accepted storage SOP classes for which pynetdicom has no service."""
    return sorted(
        {
            o.abstract_syntax
            for o in outcomes
            if o.accepted and o.storage and uid_to_service_class(o.abstract_syntax) is ServiceClass
        }
    )


class Acceptance:
    """The event handlers that apply ``settings`` to each association of a receiving AE."""

    def __init__(self, settings: NegotiationSettings) -> None:
        self.settings = settings

    def _outcomes(self, assoc: Any) -> tuple[list[ProposedContext], list[Outcome]]:
        proposed = proposed_contexts(assoc)
        return proposed, negotiate(proposed, self.settings)

    def on_requested(self, event: Any) -> None:
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted or not assoc.acceptor.writeable:
            return  # refused by the admission gate
        proposed, outcomes = self._outcomes(assoc)
        assoc.acceptor.supported_contexts = supported_contexts(
            outcomes, proposed, assoc.acceptor.supported_contexts
        )

    def on_sop_common(self, event: Any) -> dict[str, SOPClassCommonExtendedNegotiation]:
        _, outcomes = self._outcomes(event.assoc)
        items: dict[str, SOPClassCommonExtendedNegotiation] = {}
        for uid in unknown_storage_classes(outcomes):
            item = SOPClassCommonExtendedNegotiation()
            item.sop_class_uid = uid
            item.service_class_uid = STORAGE_SERVICE_CLASS
            items[uid] = item
        return items

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_SOP_COMMON, self.on_sop_common),
        ]
