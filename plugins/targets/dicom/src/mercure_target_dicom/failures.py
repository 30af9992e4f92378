"""Why an association could not be used, in words an operator can act on.

Both senders (pynetdicom's and the lean one in :mod:`.lean`) record what happened while
associating in a :class:`Negotiation` and share :func:`explain_failure`, so a job fails with
the same message whichever of them ran.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pydicom.uid import UID

from mercure_target_dicom.peer import Peer

_RESULTS = {1: "Rejected Permanent", 2: "Rejected Transient"}
_SOURCES = {1: "Service User", 2: "Service Provider (ACSE)", 3: "Service Provider (Presentation)"}
_REASONS = {
    1: {
        1: "No reason given",
        2: "Application context name not supported",
        3: "Calling AE title not recognised",
        7: "Called AE title not recognised",
    },
    2: {1: "No reason given", 2: "Protocol version not supported"},
    3: {1: "Temporary congestion", 2: "Local limit exceeded"},
}


def rejection_text(result: int, source: int, reason: int) -> str:
    """E.g. ``Rejected Permanent, source Service User, reason Called AE title not recognised``."""
    return (
        f"{_RESULTS.get(result, f'result {result}')}, source "
        f"{_SOURCES.get(source, f'{source}')}, reason "
        f"{_REASONS.get(source, {}).get(reason, f'{reason} (reserved)')}"
    )


def abort_text(source: int | None) -> str:
    """What an A-ABORT from the peer means (``None``: the connection closed or broke)."""
    if source is None:
        return "the connection was closed or broke (A-P-ABORT)"
    who = {0: "the peer (service user)", 2: "the peer's DICOM layer (service provider)"}.get(
        source, "the peer"
    )
    return f"{who} aborted the association (A-ABORT)"


@dataclass
class Negotiation:
    """What happened while associating, filled in by whichever sender ran."""

    connected: bool = False
    #: Set when the peer answered A-ASSOCIATE-RJ ("" when its reason is unknown).
    rejection: str | None = None
    #: Set when the peer accepted the association but none of these proposed contexts.
    refused_contexts: list[tuple[str, list[str]]] | None = None
    #: Set when the peer aborted or closed the connection during negotiation.
    ended: str | None = None


def explain_failure(peer: Peer, what: Negotiation, purpose: str) -> str:
    """Why the association for ``purpose`` (C-STORE, C-ECHO) was not established."""
    where = f"{purpose} to {peer.label}"
    if what.rejection:
        return (
            f"{where}: association rejected ({what.rejection}); check that the peer knows "
            f"calling AE title '{peer.calling_aet}' and answers to called AE title "
            f"'{peer.called_aet}' (aet_source / aet_target)"
        )
    if what.rejection is not None:
        return f"{where}: association rejected by the peer; check aet_source and aet_target"
    if what.refused_contexts is not None:
        refused = what.refused_contexts
        proposed = ", ".join(
            f"{UID(abstract).name} ({', '.join(UID(ts).name for ts in syntaxes)})"
            for abstract, syntaxes in refused[:4]
        )
        return (
            f"{where}: the peer accepted none of the proposed presentation contexts "
            f"({proposed}{', ...' if len(refused) > 4 else ''}); configure "
            "the peer to accept these SOP classes and transfer syntaxes"
        )
    # A TLS failure shows as a failed connect (handshake) or a broken negotiation (TLS 1.3
    # rejects a client certificate after the handshake): shake hands once more to say why.
    if peer.tls_probe is not None:
        detail = peer.tls_probe()
        if detail:
            return f"{where}: {detail}"
    if not what.connected:
        return f"{where}: {connect_failure(peer)}"
    if what.ended is not None:
        hint = (
            "the peer requires DICOM TLS: use target type 'dicomtls'"
            if peer.ssl_context is None and _speaks_tls(peer)
            else f"check that the peer accepts calling AE title '{peer.calling_aet}' from this "
            "address and is not overloaded"
        )
        return f"{where}: {what.ended} during association negotiation — {hint}"
    return (
        f"{where}: no answer to the association request within {peer.timeout:g} s; check that "
        "the port belongs to a DICOM service"
    )


def _speaks_tls(peer: Peer) -> bool:
    from mercure_target_dicom.tls import speaks_tls

    return speaks_tls(peer.host, peer.port, peer.timeout)


def connect_failure(peer: Peer) -> str:
    """Reproduce a failed TCP connection to say why it failed."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(peer.timeout, 10)):
            pass
    except ConnectionRefusedError:
        return (
            f"connection to {peer.address} refused: nothing listens there; check that the "
            "peer is running and the ip and port are right"
        )
    except socket.gaierror as exc:
        return f"cannot resolve host '{peer.host}': {exc.strerror}; check the ip setting"
    except TimeoutError:
        return (
            f"connecting to {peer.address} timed out; check the address and that no firewall "
            "blocks the port"
        )
    except OSError as exc:
        return f"cannot connect to {peer.address}: {exc.strerror or exc}"
    return (
        f"the connection to {peer.address} failed while opening (it works now: the peer may "
        "have been restarting)"
    )
