"""Latency tuning for pynetdicom's polling reactors (used by the receiver and DICOM targets).

pynetdicom runs two threads per association that poll each other with ``time.sleep(0.001)``:
the association reactor waits for decoded DIMSE messages, the DUL reactor for primitives to
send and for data on the socket. Each instance therefore waited a few milliseconds for
nothing, which capped one association at a few hundred instances per second. :func:`install`
replaces those short sleeps:

* an acceptor's association reactor waits on its DIMSE message queue;
* the DUL reactor blocks in ``select`` on its socket and on a wake-up pipe that is written
  whenever a primitive is queued for it, so it neither polls nor waits.

Every wait is bounded, so timers, releases and aborts are still noticed.
Set ``MERCURE_DIMSE_TUNING=0`` to run pynetdicom unchanged.

The tuning replaces pynetdicom internals, so it is only installed on the pynetdicom versions
it was checked against (:data:`SUPPORTED_VERSIONS`, the range ``core/pyproject.toml`` pins);
on any other version it turns itself off with one warning rather than fail or slow down.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import time
import types
from collections.abc import Callable
from typing import Any

_installed = False
_warned = False

#: ``[low, high)``: the pynetdicom versions whose internals the tuning was checked against.
SUPPORTED_VERSIONS: tuple[tuple[int, ...], tuple[int, ...]] = ((3, 0, 0), (3, 1, 0))


def _version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple([*parts, 0, 0][:3])


def version_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed pynetdicom) is one the tuning was checked on."""
    if version is None:
        import pynetdicom

        version = str(pynetdicom.__version__)
    low, high = SUPPORTED_VERSIONS
    return low <= _version(version) < high


def active() -> bool:
    """Whether the tuning is installed in this process."""
    return _installed


_real_sleep = time.sleep

# How long a reactor may wait for its queue before it re-checks timers and the socket.
ASSOCIATION_WAIT = 0.005
DUL_IDLE_WAIT = 0.05
_WAKE_ATTR = "_mercure_wake"


def _wait_on(q: Any, timeout: float) -> None:
    with q.not_empty:
        if not q._qsize():
            q.not_empty.wait(timeout)


def _association_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    msg_queue = getattr(getattr(thread, "dimse", None), "msg_queue", None)
    # Only an acceptor's reactor: a requestor's reactor shares its message queue with the thread
    # that sends and waits for responses, and waking it on every message would let it take them.
    if (
        seconds <= 0.001
        and getattr(thread, "is_acceptor", False)
        and isinstance(msg_queue, queue.Queue)
    ):
        _wait_on(msg_queue, ASSOCIATION_WAIT)
    else:
        _real_sleep(seconds)


def _dul_sleep(seconds: float) -> None:
    """Sleep until the socket has data or a primitive waits to be sent, whichever comes first.

    A wake-up pipe per DUL thread is written to whenever a primitive is queued for it
    (:func:`_send_pdu`), so the thread blocks in ``select`` instead of polling.
    """
    thread = threading.current_thread()
    to_provider = getattr(thread, "to_provider_queue", None)
    if seconds > 0.001 or not isinstance(to_provider, queue.Queue):
        _real_sleep(seconds)
        return
    wake = getattr(thread, _WAKE_ATTR, None)
    if wake is None:
        wake = socket.socketpair()
        for end in wake:
            end.setblocking(False)
        setattr(thread, _WAKE_ATTR, wake)
    if to_provider.qsize():
        return
    raw = getattr(getattr(thread, "socket", None), "socket", None)
    watched: list[Any] = [wake[0]]
    if raw is not None:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes wait in the TLS buffer; select cannot see them
        watched.append(raw)
    try:
        readable, _, _ = select.select(watched, [], [], DUL_IDLE_WAIT)
    except (OSError, ValueError):  # socket closed under us: let the reactor notice
        return
    if wake[0] in readable:
        with contextlib.suppress(OSError):
            wake[0].recv(4096)


def _send_pdu(original: Callable[..., Any]) -> Callable[..., Any]:
    def send_pdu(self: Any, primitive: Any) -> None:
        original(self, primitive)
        wake = getattr(self, _WAKE_ATTR, None)
        if wake is not None:
            with contextlib.suppress(OSError):
                wake[1].send(b"w")

    return send_pdu


def _run_reactor(original: Callable[..., Any]) -> Callable[..., Any]:
    def run_reactor(self: Any) -> None:
        try:
            original(self)
        finally:
            wake = self.__dict__.pop(_WAKE_ATTR, None)
            if wake is not None:
                for end in wake:
                    end.close()

    return run_reactor


def _time_with_sleep(sleep: Any) -> types.SimpleNamespace:
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    names["sleep"] = sleep
    return types.SimpleNamespace(**names)


def keep_responses_from_reactor(assoc: Any) -> None:
    """Stop pynetdicom's reactor thread from taking a requestor's responses off the queue.

    For associations that only send requests (C-STORE, C-ECHO): one that must serve requests
    from its peer on the same association (C-GET) needs its reactor and must not use this.

    ``send_c_store`` pauses the association's reactor while it waits for the response, but the
    pause has a gap: right after one send returns, the reactor may still be waking up when the
    next send starts, and its non-blocking ``dimse.get_msg()`` then takes the next response,
    so the send waits a whole DIMSE timeout for nothing (seen about once in 300 associations
    on loopback). Only the reactor polls without blocking, and on an association that only
    sends C-STORE/C-ECHO requests it has no DIMSE message of its own to serve, so its polls
    get nothing; the senders' blocking reads are unchanged.
    """
    dimse = assoc.dimse
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            return None, None
        return original(block=True)

    dimse.get_msg = get_msg


def install() -> bool:
    """Install the tuning once per process; returns whether it is active."""
    global _installed, _warned
    if _installed:
        return True
    if os.environ.get("MERCURE_DIMSE_TUNING", "1").lower() in ("0", "false", "no"):
        return False
    if not version_supported():
        if not _warned:
            import pynetdicom

            from mercure.logs import get_logger

            low, high = SUPPORTED_VERSIONS
            get_logger("mercure.dimse_tuning").warning(
                "DIMSE tuning off: it was not checked against this pynetdicom version; DICOM "
                "transfers run at pynetdicom's own speed",
                pynetdicom=str(pynetdicom.__version__),
                checked=f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}",
            )
            _warned = True
        return False
    import pynetdicom.association
    import pynetdicom.dul

    pynetdicom.association.time = _time_with_sleep(_association_sleep)  # type: ignore[assignment]
    pynetdicom.dul.time = _time_with_sleep(_dul_sleep)  # type: ignore[assignment]
    dul_class = pynetdicom.dul.DULServiceProvider
    dul_class.send_pdu = _send_pdu(dul_class.send_pdu)  # type: ignore[method-assign]
    dul_class.run_reactor = _run_reactor(dul_class.run_reactor)  # type: ignore[method-assign]
    _installed = True
    return True
