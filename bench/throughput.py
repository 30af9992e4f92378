"""Throughput: DCMTK storescu -> router -> DCMTK storescp, against storescu -> storescp directly.

Timed from the start of the sending storescu(s) to the modification time of the last instance
written by the target storescp. The router is a ``mercure run`` subprocess with one rule that
routes everything to a ``dicom`` target; ``series_complete_trigger`` is 1 s. Measured in the
same run (medians of ``--repeat`` runs; ratio = reference time / measured time, so 1.0 is as
fast as the reference):

* ``ratio_1assoc``: one association of N instances through the router, against DCMTK direct
  with one association (goal >= 0.5). With early dispatch the last instance reaches the
  target before the series is even complete, so the quiet time is not subtracted;
  ``ratio_1assoc_less_quiet`` subtracts it, reported only when the router took longer than
  twice the quiet time (without early dispatch).
* ``ratio_4assoc``: four associations of N/4 in parallel through the router, against DCMTK
  direct with four parallel storescu (goal >= 0.5); ``scaling_4_vs_1``: the router's own
  throughput with four associations over its throughput with one (goal >= 1).
* ``floor_*``: the durable-write floor of this disk for N instances of the same size: per
  instance (write, ``fdatasync``, rename, folder ``fsync``) and group commit (append to one
  file, one ``fdatasync`` per ``--group`` instances); a durable router cannot beat these.
* ``orthanc_*``: Debian's Orthanc receiving the same series and forwarding each instance from
  a Lua ``OnStoredInstance`` (``SendToModality``) to the same storescp, against DCMTK direct.
* ``send_*``: send only, the same N files into storescp: the dicom target's sender (lean, and
  with pynetdicom's ``send_c_store`` for information) against storescu.

Usage: python bench/throughput.py [--count 500] [--repeat 3] [--no-early-dispatch]
       [--no-orthanc] [--group 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import (
    StoreSCP,
    durable_floor,
    free_port,
    journal_floor,
    make_ct_series,
    orthanc_forwarding_to,
    report,
    require_dcmtk,
    route_all_to,
    router,
    settle_disk,
    spool_config,
    storescu,
    workdir,
)

QUIET = 1


def send_and_wait(scp: StoreSCP, batches: list[list[Path]], port: int, total: int) -> float:
    scp.clear()
    settle_disk()
    start = time.time()
    senders = [storescu(batch, port) for batch in batches]
    for sender in senders:
        _, err = sender.communicate(timeout=600)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    last = scp.wait_for(total, timeout=120)
    return last - start


def send_only(scp: StoreSCP, files: list[Path], how: str) -> float:
    """Seconds for one sender to deliver ``files`` into ``scp`` (each answered after storing)."""
    from mercure_target_dicom.sender import Peer, Sender

    scp.clear()
    settle_disk()
    start = time.perf_counter()
    if how == "storescu":
        proc = storescu(files, scp.port, "STORESCP")
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    else:
        peer = Peer("127.0.0.1", scp.port, "STORESCP", "MERCURE", 60, lean=how == "lean")
        outcome = Sender(peer).send(files)
        if len(outcome.delivered) != len(files):
            raise RuntimeError(f"the sender failed: {list(outcome.failed.values())[:3]}")
    elapsed = time.perf_counter() - start
    if scp.count() != len(files):
        raise RuntimeError(f"only {scp.count()} of {len(files)} instances arrived")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-early-dispatch", action="store_true")
    parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc reference")
    parser.add_argument("--group", type=int, default=50, help="instances per group commit")
    parser.add_argument(
        "--receivers", type=int, default=1, help="dicom_receiver.processes (sharing the port)"
    )
    args = parser.parse_args()
    require_dcmtk()
    n = args.count
    median = statistics.median
    with workdir("throughput") as base:
        # A fresh series for every run: the router treats a resent instance of a series it is
        # still collecting as the same instance, so reusing UIDs would send nothing new.
        ones = [make_ct_series(base / f"one{i}", n) for i in range(args.repeat)]
        fours = []
        for i in range(args.repeat):
            four = make_ct_series(base / f"four{i}", n // 4, series=4)
            fours.append([four[j * (n // 4) : (j + 1) * (n // 4)] for j in range(4)])
        size = ones[0][0].stat().st_size
        scp = StoreSCP(base / "scp", parallel=True)
        runs: dict[str, list[float]] = {}
        try:
            runs["direct"] = [send_and_wait(scp, [one], scp.port, n) for one in ones]
            runs["direct4"] = [send_and_wait(scp, batches, scp.port, n) for batches in fours]
            for how in ("storescu", "lean", "pynetdicom"):
                runs[f"send_{how}"] = [send_only(scp, ones[0], how) for _ in ones]
            port = free_port()
            config = spool_config(
                base / "spool",
                port=port,
                series_complete_trigger=QUIET,
                early_dispatch=not args.no_early_dispatch,
                dicom_receiver={"processes": args.receivers},
                **route_all_to(scp),
            )
            with router(config, base):
                runs["router"] = [send_and_wait(scp, [one], port, n) for one in ones]
                runs["router4"] = [send_and_wait(scp, batches, port, n) for batches in fours]
            if not args.no_orthanc:
                with orthanc_forwarding_to(scp, base) as orthanc_port:
                    runs["orthanc"] = [send_and_wait(scp, [one], orthanc_port, n) for one in ones]
        finally:
            scp.stop()
        runs["floor_per_instance"] = [
            durable_floor(base / "floor", n, size) for _ in range(args.repeat)
        ]
        runs["floor_group"] = [
            durable_floor(base / "floor", n, size, args.group) for _ in range(args.repeat)
        ]
        runs["floor_journal"] = [journal_floor(base / "floor", n, size) for _ in range(args.repeat)]
    m = {name: median(values) for name, values in runs.items()}
    ref, ref4, r1, r4 = m["direct"], m["direct4"], m["router"], m["router4"]
    figures = {
        "instances": n,
        "instance_bytes": size,
        "early_dispatch": not args.no_early_dispatch,
        "receiver_processes": args.receivers,
        "direct_s": round(ref, 3),
        "direct_4assoc_s": round(ref4, 3),
        "router_1assoc_s": round(r1, 3),
        "router_4assoc_s": round(r4, 3),
        "quiet_s": QUIET,
        # Headline: the whole time, quiet time included (stricter than subtracting it).
        "ratio_1assoc": round(ref / r1, 3),
        "ratio_4assoc": round(ref4 / r4, 3),
        "scaling_4_vs_1": round(r1 / r4, 3),
        "ratio_4assoc_vs_direct_1assoc": round(ref / r4, 3),
        # The definition subtracts the quiet time; meaningful only when the last
        # instance arrived after it (without early dispatch).
        "ratio_1assoc_less_quiet": round(ref / (r1 - QUIET), 3) if r1 > 2 * QUIET else None,
        "ratio_4assoc_less_quiet": round(ref4 / (r4 - QUIET), 3) if r4 > 2 * QUIET else None,
        "floor_per_instance_s": round(m["floor_per_instance"], 3),
        "floor_group_s": round(m["floor_group"], 3),
        "floor_group_size": args.group,
        "floor_journal_s": round(m["floor_journal"], 3),
        "send_storescu_s": round(m["send_storescu"], 3),
        "send_lean_s": round(m["send_lean"], 3),
        "send_pynetdicom_s": round(m["send_pynetdicom"], 3),
        "ratio_send": round(m["send_storescu"] / m["send_lean"], 3),
        "ratio_send_pynetdicom": round(m["send_storescu"] / m["send_pynetdicom"], 3),
    }
    if "orthanc" in m:
        figures["orthanc_s"] = round(m["orthanc"], 3)
        figures["ratio_orthanc"] = round(ref / m["orthanc"], 3)
    f = figures
    lines = [
        f"DCMTK direct:    1 assoc {ref:.2f} s, 4 assocs {ref4:.2f} s",
        f"router:          1 assoc {r1:.2f} s (ratio {f['ratio_1assoc']:.2f}, goal 0.5), "
        f"4 assocs {r4:.2f} s (ratio {f['ratio_4assoc']:.2f}, goal 0.5); "
        f"4 vs 1: {f['scaling_4_vs_1']:.2f} (goal 1)",
        f"durable floor:   {f['floor_per_instance_s']:.2f} s per-instance sync, "
        f"{f['floor_group_s']:.2f} s group commit of {args.group}, "
        f"{f['floor_journal_s']:.2f} s receive journal ({n} x {size / 1e6:.2f} MB)",
        f"send only:       sender {f['send_lean_s']:.2f} s, storescu {f['send_storescu_s']:.2f} s "
        f"(ratio {f['ratio_send']:.2f}); pynetdicom send_c_store {f['send_pynetdicom_s']:.2f} s",
    ]
    if "orthanc" in m:
        lines.append(
            f"Orthanc forward: {f['orthanc_s']:.2f} s (ratio {f['ratio_orthanc']:.2f} of DCMTK)"
        )
    print("\n".join(lines))
    report("throughput", {**figures, "runs": runs})


if __name__ == "__main__":
    main()
