"""The receiver's negotiation policy (:mod:`~mercure.builtin.dicom_negotiation`) on pynetdicom.

pynetdicom answers each proposed context with the first of the acceptor's own transfer
syntaxes that the context lists, and refuses abstract syntaxes it was not given. An
``EVT_REQUESTED`` handler (a public event: the A-ASSOCIATE-RQ is decoded, nothing answered
yet) replaces the association's supported contexts by the policy's choices: for each accepted
abstract syntax only its chosen syntaxes, ordered so that pynetdicom's first match is the
chosen one for every context (:func:`supported_contexts`).

pynetdicom then serves each DIMSE request by the service of the message's SOP class; for a
class it does not know (private, retired, newer than pynetdicom, or a sender's garbled
Affected SOP Class UID) it logs an error and aborts the whole association. :func:`install`
replaces the one name ``pynetdicom.association.uid_to_service_class`` (looked up by
``Association._serve_request``) so that, in the associations of a receiving AE registered
here only, such a class is served as storage: the C-STORE reaches the receiver's handler,
which stores it or answers a failure status, and the association goes on. This is the only
pynetdicom internal used; it is installed on the versions it was checked on
(:data:`mercure.dimse_tuning.SUPPORTED_VERSIONS`, the pinned >=3.0,<3.1) and checked by
``core/tests/test_dicom_acceptance.py``.
"""

from __future__ import annotations

import graphlib
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pynetdicom.association
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass

from mercure import dimse_tuning
from mercure.builtin.dicom_negotiation import (
    NegotiationSettings,
    Outcome,
    ProposedContext,
    negotiate,
)
from mercure.logs import get_logger

log = get_logger("mercure.receiver")

#: The AEs whose associations serve every unknown SOP class as storage.
_receiving_aes: weakref.WeakSet[AE] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed: bool | None = None  # None: not decided yet


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

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_REQUESTED, self.on_requested)]

    def serve(self, ae: AE) -> None:
        """Serve unknown SOP classes as storage in ``ae``'s associations (see module doc)."""
        install()
        _receiving_aes.add(ae)


def _promiscuous(original: Callable[[str], type[ServiceClass]]) -> Callable[[str], Any]:
    def uid_to_service_class(uid: str) -> type[ServiceClass]:
        service = original(uid)
        if service is ServiceClass:  # pynetdicom knows no service for this class
            assoc = threading.current_thread()  # requests are served in the association
            if getattr(assoc, "ae", None) in _receiving_aes:
                return StorageServiceClass
        return service

    return uid_to_service_class


def install() -> bool:
    """Install the storage fallback once; False on a pynetdicom version it was not checked on."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = dimse_tuning.version_supported()
            if _installed:
                module: Any = pynetdicom.association
                module.uid_to_service_class = _promiscuous(module.uid_to_service_class)
            else:
                log.warning(
                    "pynetdicom version not checked: unknown SOP classes abort the association"
                )
        return _installed
