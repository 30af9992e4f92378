"""The lean C-STORE sender: an association of its own, stored bytes written as P-DATA PDUs.

pynetdicom's ``send_c_store`` hands every PDU through two threads, queues and its state
machine; for 500 instances of 0.5 MB that costs 1.2-1.5 s where DCMTK's storescu needs 0.5 s.
This sender does what a C-STORE requestor needs on one thread and one blocking socket
(plain or TLS):

* negotiates the association itself (A-ASSOCIATE-RQ, its own parser of -AC/-RJ/A-ABORT),
  with the same failure messages as the pynetdicom path (:mod:`.failures`);
* writes each C-STORE-RQ command and the file's dataset bytes, as stored after the file meta
  information, straight from the file into P-DATA-TF PDUs of the peer's maximum length, a few
  hundred KiB per ``sendall``; a 1 GiB instance is sent with a buffer of about 1 MiB;
* reads each C-STORE-RSP and its status. With ``async_operations`` > 1 in the target it
  proposes an asynchronous operations window; if the peer's answer grants one, up to that
  many requests stay outstanding, otherwise (and by default) one at a time.

It uses no pynetdicom internals, only its status tables (:mod:`.status`). Instances whose
stored syntax the peer did not accept are not sent here: the caller sends them with
pynetdicom, which converts them as before. Switch it off per target with
``"lean_sender": false`` or for the process with ``MERCURE_LEAN_SENDER=0``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections import deque
from pathlib import Path

from mercure.logs import get_logger
from mercure.targets import TargetError
from pydicom.uid import UID

from mercure_target_dicom import wire
from mercure_target_dicom.failures import (
    Negotiation,
    abort_text,
    explain_failure,
    rejection_text,
)
from mercure_target_dicom.peer import Peer
from mercure_target_dicom.plan import (
    AS_STORED,
    CONVERT,
    Instance,
    SendOutcome,
    covered,
    how_to_send,
    plan_contexts,
)
from mercure_target_dicom.status import describe_status, is_delivered

log = get_logger("mercure.target.dicom")

ENV_SWITCH = "MERCURE_LEAN_SENDER"
#: About this many bytes are written per ``sendall``.
SEND_BLOCK = 256 * 1024
#: Largest PDU accepted from the peer when this side sets no limit (responses are small).
MAX_INCOMING_PDU = 64 * 1024 * 1024


def enabled(peer: Peer) -> bool:
    """Whether ``peer``'s C-STOREs go through the lean sender."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return peer.lean


class Ended(Exception):
    """The association ended (abort, closed connection, timeout); ``str`` says why."""


class LeanAssociation:
    """One association as requestor, negotiated and used on the calling thread."""

    def __init__(self, peer: Peer, contexts: list[tuple[UID, list[UID]]]) -> None:
        self.peer = peer
        self.sock: socket.socket | None = None
        proposed = [
            wire.ProposedContext(2 * i + 1, str(sop), tuple(str(ts) for ts in syntaxes))
            for i, (sop, syntaxes) in enumerate(contexts)
        ]
        self._pdvs: deque[tuple[int, int, bytes]] = deque()
        self.context_ids: dict[tuple[UID, UID], int] = {}
        self.accepted: dict[UID, list[UID]] = {}
        what = Negotiation()
        try:
            ac = self._negotiate(proposed, what)
        except TargetError:
            self.close()
            raise
        for cx in proposed:
            result, syntax = ac.results.get(cx.context_id, (None, ""))
            if result == 0 and syntax:
                key = (UID(cx.abstract_syntax), UID(syntax))
                self.context_ids.setdefault(key, cx.context_id)
                self.accepted.setdefault(key[0], []).append(key[1])
        if not self.context_ids:
            self.abort()
            what.refused_contexts = [
                (cx.abstract_syntax, list(cx.transfer_syntaxes)) for cx in proposed
            ]
            raise TargetError(explain_failure(peer, what, "C-STORE"))
        limit = ac.max_pdu or wire.UNLIMITED_PDU
        self.fragment = max(min(limit, wire.UNLIMITED_PDU) - 6, 1)
        proposed_window = max(peer.async_window, 1)
        if ac.invoked is None or proposed_window == 1:
            self.window = 1  # the peer did not answer the proposal: synchronous
        else:
            self.window = proposed_window if ac.invoked == 0 else min(ac.invoked, proposed_window)
        size = max(SEND_BLOCK, self.fragment + wire.PDATA_OVERHEAD) + 2 * 1024
        self._buffer = bytearray(size + self.fragment + wire.PDATA_OVERHEAD)

    # -- negotiation ---------------------------------------------------------------------

    def _negotiate(self, proposed: list[wire.ProposedContext], what: Negotiation) -> wire.Accepted:
        peer = self.peer
        try:
            raw = socket.create_connection((peer.host, peer.port), timeout=peer.timeout)
        except OSError as exc:
            raise TargetError(explain_failure(peer, what, "C-STORE")) from exc
        what.connected = True
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = raw
        if peer.ssl_context is not None:
            try:
                self.sock = peer.ssl_context.wrap_socket(raw, server_hostname=peer.server_hostname)
            except (ssl.SSLError, OSError) as exc:
                raw.close()
                self.sock = None
                what.connected = False
                raise TargetError(explain_failure(peer, what, "C-STORE")) from exc
        self.sock.settimeout(peer.timeout)
        rq = wire.associate_rq(
            peer.called_aet, peer.calling_aet, proposed, peer.max_pdu, peer.async_window
        )
        try:
            self.sock.sendall(rq)
            kind, body = self._read_pdu()
        except TimeoutError as exc:
            raise TargetError(explain_failure(peer, what, "C-STORE")) from exc
        except Ended as exc:
            what.ended = str(exc)
            raise TargetError(explain_failure(peer, what, "C-STORE")) from exc
        except OSError as exc:
            what.ended = abort_text(None)
            raise TargetError(explain_failure(peer, what, "C-STORE")) from exc
        if kind == wire.ASSOCIATE_AC:
            return wire.parse_associate_ac(body)
        if kind == wire.ASSOCIATE_RJ and len(body) >= 4:
            what.rejection = rejection_text(*wire.parse_reject(body))
        elif kind == wire.ASSOCIATE_RJ:
            what.rejection = ""
        else:
            what.ended = f"the peer answered with PDU type 0x{kind:02X}"
        raise TargetError(explain_failure(peer, what, "C-STORE"))

    # -- reading -------------------------------------------------------------------------

    def _recv_exact(self, size: int) -> bytearray:
        assert self.sock is not None
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise Ended(abort_text(None))
            got += n
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        """The next PDU: ``Ended`` for an A-ABORT or a closed connection."""
        if self.sock is None:
            raise Ended("the association was aborted")
        kind, _, length = struct.unpack(">BBI", self._recv_exact(6))
        if kind not in wire.PDU_TYPES or length > max(self.peer.max_pdu, MAX_INCOMING_PDU):
            self.abort()
            raise Ended(f"the peer sent an invalid PDU (type 0x{kind:02X}, {length} bytes)")
        body = bytes(self._recv_exact(length))
        if kind == wire.ABORT:
            self.close()
            raise Ended(abort_text(wire.parse_abort(body)[0]))
        return kind, body

    def read_response(self) -> wire.Response:
        """The next complete DIMSE response (its dataset, if any, is read and dropped)."""
        command = bytearray()
        rsp: wire.Response | None = None
        while True:
            while not self._pdvs:
                kind, body = self._read_pdu()
                if kind == wire.RELEASE_RQ:
                    self.abort()
                    raise Ended("the peer asked to release the association during the transfer")
                if kind != wire.P_DATA_TF:
                    self.abort()
                    raise Ended(f"the peer sent PDU type 0x{kind:02X} instead of a response")
                try:
                    self._pdvs.extend(wire.iter_pdvs(body))
                except ValueError as exc:
                    self.abort()
                    raise Ended(f"the peer sent a malformed P-DATA-TF ({exc})") from exc
            _, mch, fragment = self._pdvs.popleft()
            if mch & wire.MCH_COMMAND:
                command += fragment
                if mch & wire.MCH_LAST:
                    try:
                        rsp = wire.parse_command(bytes(command))
                    except ValueError as exc:
                        self.abort()
                        raise Ended(f"the peer sent a malformed response ({exc})") from exc
                    command = bytearray()
                    if not rsp.has_dataset:
                        return rsp
            elif rsp is not None and mch & wire.MCH_LAST:
                return rsp

    # -- writing -------------------------------------------------------------------------

    def send_store(self, context_id: int, message_id: int, inst: Instance, source: _Source) -> None:
        """Write one C-STORE-RQ and its dataset; ``OSError`` from the socket propagates."""
        assert self.sock is not None
        sock, frag = self.sock, self.fragment
        buf = self._buffer
        view = memoryview(buf)
        limit = len(buf) - frag - wire.PDATA_OVERHEAD
        command = wire.c_store_rq(message_id, str(inst.sop_class), str(inst.sop_instance))
        fill = 0
        for start in range(0, len(command), frag):
            piece = command[start : start + frag]
            mch = wire.MCH_COMMAND | (wire.MCH_LAST if start + frag >= len(command) else 0)
            header = wire.pdata_header(context_id, mch, len(piece))
            view[fill : fill + 12] = header
            view[fill + 12 : fill + 12 + len(piece)] = piece
            fill += 12 + len(piece)
        remaining = source.size
        while True:
            n = min(frag, remaining)
            last = n == remaining
            view[fill : fill + 12] = wire.pdata_header(context_id, wire.MCH_LAST if last else 0, n)
            source.read_into(view[fill + 12 : fill + 12 + n])
            fill += 12 + n
            remaining -= n
            if last or fill > limit:
                sock.sendall(view[:fill])
                fill = 0
            if last:
                return

    # -- ending --------------------------------------------------------------------------

    def release(self) -> None:
        """A-RELEASE; on any trouble the connection is just closed."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(min(self.peer.timeout, 10))
            self.sock.sendall(wire.RELEASE_RQ_PDU)
            deadline = time.monotonic() + min(self.peer.timeout, 10)
            while time.monotonic() < deadline:
                kind, _ = self._read_pdu()
                if kind == wire.RELEASE_RP:
                    break
        except (OSError, Ended):
            pass
        self.close()

    def abort(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.settimeout(1)
                self.sock.sendall(wire.ABORT_PDU)
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    @property
    def is_open(self) -> bool:
        return self.sock is not None


class _Source:
    """The dataset bytes of a Part 10 file, read in place (opened before anything is sent)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            offset = wire.dataset_offset(self.fh)
            self.size = os.fstat(self.fh.fileno()).st_size - offset
            self.fh.seek(offset)
        except BaseException:
            self.fh.close()
            raise
        self.path = path

    def read_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.fh.readinto(view[got:])
            except OSError as exc:  # not the socket's error: the association cannot go on
                raise _FileError(f"cannot read {self.path.name}: {exc}") from exc
            if not n:
                raise _FileError(f"{self.path.name} ended {len(view) - got} bytes early")
            got += n

    def close(self) -> None:
        self.fh.close()


class _FileError(Exception):
    """The file could not be read to its end while it was sent: the association cannot go on."""


class LeanSession:
    """One lean association: what it negotiated, and the C-STOREs over it.

    The same interface as the pynetdicom session in :mod:`.sender`; instances that would need
    a conversion are collected in :attr:`to_convert` for the pynetdicom path.
    """

    def __init__(self, peer: Peer, instances: list[Instance]) -> None:
        self.peer = peer
        self.contexts = plan_contexts(instances)
        self.assoc = LeanAssociation(peer, self.contexts)
        self.accepted = self.assoc.accepted
        self.message_id = 0
        self.to_convert: list[Instance] = []

    def covers(self, inst: Instance) -> bool:
        return covered(self.contexts, inst)

    def store(self, instances: list[Instance], outcome: SendOutcome) -> bool:
        """C-STORE each instance; False once the association has ended (the rest failed)."""
        assoc, peer = self.assoc, self.peer
        open_requests: dict[int, Instance] = {}
        for position, inst in enumerate(instances):
            name = inst.path.name
            mode, problem = how_to_send(peer, inst, self.accepted.get(inst.sop_class, []))
            if mode is None:
                outcome.failed[name] = problem
                continue
            if mode == CONVERT:
                self.to_convert.append(inst)
                continue
            assert mode == AS_STORED
            try:
                source = _Source(inst.path)
            except (OSError, ValueError) as exc:
                outcome.failed[name] = f"cannot send {name}: {exc}"
                continue
            try:
                while len(open_requests) >= assoc.window:
                    self._answer(open_requests, outcome)
                if not assoc.is_open:
                    raise Ended("the association was aborted")
                self.message_id = self.message_id % 65535 + 1
                open_requests[self.message_id] = inst
                context_id = assoc.context_ids[(inst.sop_class, inst.transfer_syntax)]
                self._send(context_id, self.message_id, inst, source, open_requests, outcome)
            except Ended as exc:
                sent = inst in open_requests.values()
                self._ended(str(exc), open_requests, instances[position + 1 :], outcome)
                if not sent:
                    outcome.failed.setdefault(name, f"not sent: {exc}")
                return False
            finally:
                source.close()
        try:
            while open_requests:
                self._answer(open_requests, outcome)
        except Ended as exc:
            self._ended(str(exc), open_requests, [], outcome)
            return False
        return True

    def _send(
        self,
        context_id: int,
        message_id: int,
        inst: Instance,
        source: _Source,
        open_requests: dict[int, Instance],
        outcome: SendOutcome,
    ) -> None:
        try:
            self.assoc.send_store(context_id, message_id, inst, source)
        except TimeoutError as exc:
            self.assoc.abort()
            raise Ended(
                f"the peer took no data for {self.peer.timeout:g} s (network timeout); the "
                "association was aborted"
            ) from exc
        except _FileError as exc:
            self.assoc.abort()
            raise Ended(f"{exc}; the association was aborted") from exc
        except OSError as exc:
            # The peer is gone. Answers it sent before (and its A-ABORT) may still be readable.
            raise Ended(self._drain(open_requests, outcome)) from exc

    def _drain(self, open_requests: dict[int, Instance], outcome: SendOutcome) -> str:
        """After a failed write: take the answers and the A-ABORT the peer sent first."""
        try:
            if self.assoc.sock is not None:
                self.assoc.sock.settimeout(min(self.peer.timeout, 1.0))
            while True:
                self._record(self.assoc.read_response(), open_requests, outcome)
        except Ended as exc:
            return str(exc)
        except OSError:
            return abort_text(None)
        finally:
            self.assoc.close()

    def _answer(self, open_requests: dict[int, Instance], outcome: SendOutcome) -> None:
        """Wait for one response and record its instance as delivered or failed."""
        try:
            rsp = self.assoc.read_response()
        except TimeoutError as exc:
            self.assoc.abort()
            raise Ended(
                f"no response within {self.peer.timeout:g} s (DIMSE timeout); the association "
                "was aborted"
            ) from exc
        except OSError as exc:
            self.assoc.close()
            raise Ended(abort_text(None)) from exc
        self._record(rsp, open_requests, outcome)

    def _record(
        self, rsp: wire.Response, open_requests: dict[int, Instance], outcome: SendOutcome
    ) -> None:
        inst = open_requests.pop(rsp.responding_to, None) if rsp.command == 0x8001 else None
        if inst is None:
            log.warning(
                "unexpected DIMSE message ignored",
                peer=self.peer.label,
                command=rsp.command,
                message_id=rsp.responding_to,
            )
            return
        name, uid = inst.path.name, inst.sop_instance
        if rsp.status is None:
            outcome.failed[name] = f"a response without a status for SOP Instance {uid}"
        elif is_delivered(rsp.status):
            outcome.delivered.append(name)
        else:
            comment = rsp.comment.strip()
            outcome.failed[name] = f"{describe_status(rsp.status)} for SOP Instance {uid}" + (
                f": {comment}" if comment else ""
            )

    def _ended(
        self,
        why: str,
        open_requests: dict[int, Instance],
        rest: list[Instance],
        outcome: SendOutcome,
    ) -> None:
        self.assoc.close()
        outcome.error = (
            f"association to {self.peer.label} ended after {len(outcome.delivered)} "
            f"delivered instance(s): {why}; undelivered instances will be retried"
        )
        for inst in open_requests.values():
            outcome.failed[inst.path.name] = (
                f"no response for SOP Instance {inst.sop_instance}: {why}"
            )
        for inst in rest:
            outcome.failed.setdefault(inst.path.name, f"not sent: {why}")

    def close(self) -> None:
        if self.assoc.is_open:
            self.assoc.release()
