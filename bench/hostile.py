"""Hostile peers: the receiver's peak memory while it is attacked, against a quiet transfer.

A fresh ``mercure run --only receiver`` subprocess first receives a series from DCMTK's
storescu (the reference); its peak resident set size (``VmHWM``) is read. Then, for
``--rounds`` rounds, while storescu sends the series again, it gets: 500 idle connections that
are re-opened whenever closed, a first PDU announcing 4 GiB and a P-DATA PDU announcing 4 GiB
(each followed by ``--stream`` MiB of data), requests with 5,000 and 10,000 presentation
contexts, a dataset whose element claims 4 GiB, 10,000 nested sequences and random bytes.
``ratio`` = peak after the attack / peak after the reference transfer (goal: at most 1.2);
the receiver's log lines of refusals are counted by reason (the log keeps at most one line
per reason and address every 10 s, so these are lines, not refusals).

Usage: python bench/hostile.py [--rounds 5] [--stream 64] [--instances 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from pathlib import Path

from common import (
    ROOT,
    free_port,
    make_ct_series,
    report,
    require_dcmtk,
    router,
    spool_config,
    storescu,
    workdir,
)

sys.path.insert(0, str(ROOT / "core" / "tests" / "receiver_hardening"))

from hostile import (
    OTHER_HOST,
    IdleFlood,
    RawPeer,
    dataset_header,
    deeply_nested,
    element,
    many_contexts_rq,
    random_bytes,
    store_pdus,
)
from mercure.builtin.dicom_admission import REFUSALS
from pydicom.uid import generate_uid


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def _quietly(action: object) -> None:
    with contextlib.suppress(OSError, AssertionError):
        action()  # type: ignore[operator]


def _stream(peer: RawPeer, header: bytes, mib: int) -> None:
    chunk = bytes(1 << 20)
    with contextlib.suppress(OSError):
        peer.send(header)
        for _ in range(mib):
            peer.send(chunk)
    peer.read_all()
    peer.close()


def attack(port: int, mib: int) -> None:
    """Every malformed input once, one after the other."""

    def first_pdu_4gib() -> None:
        _stream(RawPeer(port, OTHER_HOST), b"\x01\x00\xff\xff\xff\xff", mib)

    def p_data_4gib() -> None:
        peer = RawPeer(port, OTHER_HOST)
        peer.associate()
        _stream(peer, b"\x04\x00\xff\xff\xff\xff", mib)

    def contexts(count: int, realistic: bool) -> None:
        peer = RawPeer(port, OTHER_HOST)
        with contextlib.suppress(OSError):
            peer.send(many_contexts_rq(count, realistic=realistic))
        peer.read_all()
        peer.close()

    def bad_dataset(body: bytes) -> None:
        peer = RawPeer(port, OTHER_HOST)
        peer.associate()
        uid = generate_uid()
        for pdu in store_pdus(dataset_header(uid) + body, uid):
            peer.send(pdu)
        peer.store_status()
        peer.close()

    def garbage() -> None:
        peer = RawPeer(port, OTHER_HOST)
        peer.send(b"\xa5" + random_bytes(1, 65535))
        peer.read_all()
        peer.close()

    _quietly(first_pdu_4gib)
    _quietly(p_data_4gib)
    _quietly(lambda: contexts(5000, False))
    _quietly(lambda: contexts(10000, True))
    _quietly(lambda: bad_dataset(element(0x7FE0, 0x0010, b"OW", b"\1" * 100, length=0xFFFFFFF0)))
    _quietly(lambda: bad_dataset(deeply_nested(10000)))
    _quietly(garbage)


def refusal_lines(log: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("reason") in REFUSALS:
                counts[entry["reason"]] = counts.get(entry["reason"], 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream", type=int, default=64, help="MiB sent after a 4 GiB header")
    parser.add_argument("--instances", type=int, default=100)
    args = parser.parse_args()
    require_dcmtk()
    with workdir("hostile") as base:
        files = make_ct_series(base / "series", args.instances, size=256)
        port = free_port()
        config = spool_config(base / "spool", port=port)
        config["dicom_receiver"] = {"bind_address": "127.0.0.1"}
        with router(config, base, only="receiver") as proc:
            sender = storescu(files, port)
            _, err = sender.communicate(timeout=600)
            assert sender.returncode == 0, err.decode(errors="replace")
            reference = peak_rss_kib(proc.pid)
            failed = 0
            with IdleFlood(port, 500):
                for _ in range(args.rounds):
                    sender = storescu(files, port)
                    attacker = threading.Thread(target=attack, args=(port, args.stream))
                    attacker.start()
                    sender.communicate(timeout=600)
                    attacker.join(600)
                    failed += sender.returncode != 0
            attacked = peak_rss_kib(proc.pid)
        counts = refusal_lines(base / "router.log")
    report(
        "hostile",
        {
            "rounds": args.rounds,
            "streamed_mib_per_huge_pdu": args.stream,
            "peak_rss_mib": [round(reference / 1024, 1), round(attacked / 1024, 1)],
            "ratio": round(attacked / reference, 3),
            "real_sender_failures": failed,
            "refusal_log_lines": counts,
        },
    )


if __name__ == "__main__":
    main()
