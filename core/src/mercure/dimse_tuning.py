"""Latency tuning for pynetdicom's polling reactors (used by the receiver and DICOM targets).

pynetdicom runs two threads per association that poll each other with ``time.sleep(0.001)``:
the association reactor waits for decoded DIMSE messages, the DUL reactor for primitives to
send. Each instance therefore waits a few milliseconds for nothing, which caps one association
at a few hundred instances per second. :func:`install` replaces those short sleeps with waits
on the queues the threads actually feed each other, so a thread wakes as soon as there is
work (and still wakes regularly to check timers, releases and aborts).

Set ``MERCURE_DIMSE_TUNING=0`` to run pynetdicom unchanged.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import types
from typing import Any

_installed = False
_real_sleep = time.sleep

# How long a reactor may wait for its queue before it re-checks timers and the socket.
ASSOCIATION_WAIT = 0.005
DUL_WAIT = 0.0002
REQUESTOR_STEP = 0.0001


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
    elif seconds <= 0.001 and isinstance(
        getattr(thread, "_reactor_checkpoint", None), threading.Event
    ):
        _requestor_sleep(thread, seconds)
    else:
        _real_sleep(seconds)


def _requestor_sleep(thread: Any, seconds: float) -> None:
    """A requestor's reactor pauses whenever a C-STORE is sent: reach the pause point at once.

    ``send_c_store`` clears the checkpoint and spins until the reactor reports itself paused;
    the reactor gets there only after its sleep, so each sent instance waited up to 1 ms.
    """
    checkpoint: threading.Event = thread._reactor_checkpoint
    deadline = time.monotonic() + seconds
    while checkpoint.is_set() and time.monotonic() < deadline:
        _real_sleep(REQUESTOR_STEP)


def _dul_sleep(seconds: float) -> None:
    thread = threading.current_thread()
    to_provider = getattr(thread, "to_provider_queue", None)
    if seconds <= 0.001 and isinstance(to_provider, queue.Queue):
        _wait_on(to_provider, DUL_WAIT)
    else:
        _real_sleep(seconds)


def _time_with_sleep(sleep: Any) -> types.SimpleNamespace:
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("__")}
    names["sleep"] = sleep
    return types.SimpleNamespace(**names)


def install() -> bool:
    """Install the tuning once per process; returns whether it is active."""
    global _installed
    if _installed:
        return True
    if os.environ.get("MERCURE_DIMSE_TUNING", "1").lower() in ("0", "false", "no"):
        return False
    import pynetdicom.association
    import pynetdicom.dul

    pynetdicom.association.time = _time_with_sleep(_association_sleep)  # type: ignore[assignment]
    pynetdicom.dul.time = _time_with_sleep(_dul_sleep)  # type: ignore[assignment]
    _installed = True
    return True
