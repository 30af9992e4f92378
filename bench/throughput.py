"""Throughput: DCMTK storescu -> router -> DCMTK storescp, against storescu -> storescp directly.

Timed from the start of the sending storescu to the modification time of the last instance
written by the target storescp. The router is a ``mercure run`` subprocess with one rule that
routes everything to a ``dicom`` target; ``series_complete_trigger`` is 1 s.

Figures (ratio = direct time / router time, so 1.0 is as fast as DCMTK alone):

* ``ratio_1assoc``: one association of N instances, the router's whole time (with early
  dispatch the last instance reaches the target before the series is even complete, so the
  quiet time is not subtracted); ``ratio_1assoc_less_quiet`` subtracts it, reported only when
  the router took longer than twice the quiet time (without early dispatch).
* ``ratio_4assoc``: four associations of N/4 instances in parallel into the router, against the
  same one-association direct reference; ``direct_4assoc_s`` is DCMTK with four parallel
  senders into one storescp, for information.

Usage: python bench/throughput.py [--count 500] [--repeat 3] [--no-early-dispatch]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import (
    StoreSCP,
    free_port,
    make_ct_series,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-early-dispatch", action="store_true")
    parser.add_argument(
        "--receivers", type=int, default=1, help="dicom_receiver.processes (sharing the port)"
    )
    args = parser.parse_args()
    require_dcmtk()
    n = args.count
    with workdir("throughput") as base:
        # A fresh series for every run: the router treats a resent instance of a series it is
        # still collecting as the same instance, so reusing UIDs would send nothing new.
        ones = [make_ct_series(base / f"one{i}", n) for i in range(args.repeat)]
        fours = []
        for i in range(args.repeat):
            four = make_ct_series(base / f"four{i}", n // 4, series=4)
            fours.append([four[j * (n // 4) : (j + 1) * (n // 4)] for j in range(4)])
        scp = StoreSCP(base / "scp")
        try:
            direct = [send_and_wait(scp, [one], scp.port, n) for one in ones]
            direct4 = [send_and_wait(scp, batches, scp.port, n) for batches in fours]
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
                routed = [send_and_wait(scp, [one], port, n) for one in ones]
                routed4 = [send_and_wait(scp, batches, port, n) for batches in fours]
        finally:
            scp.stop()
    ref = statistics.median(direct)
    r1 = statistics.median(routed)
    r4 = statistics.median(routed4)
    report(
        "throughput",
        {
            "instances": n,
            "early_dispatch": not args.no_early_dispatch,
            "receiver_processes": args.receivers,
            "direct_s": round(ref, 3),
            "direct_4assoc_s": round(statistics.median(direct4), 3),
            "router_1assoc_s": round(r1, 3),
            "router_4assoc_s": round(r4, 3),
            "quiet_s": QUIET,
            # Headline: the whole time, quiet time included (stricter than subtracting it).
            "ratio_1assoc": round(ref / r1, 3),
            "ratio_4assoc": round(ref / r4, 3),
            # The definition subtracts the quiet time; meaningful only when the last
            # instance arrived after it (without early dispatch).
            "ratio_1assoc_less_quiet": round(ref / (r1 - QUIET), 3) if r1 > 2 * QUIET else None,
            "ratio_4assoc_less_quiet": round(ref / (r4 - QUIET), 3) if r4 > 2 * QUIET else None,
            "runs": {"direct": direct, "direct4": direct4, "router": routed, "router4": routed4},
        },
    )


if __name__ == "__main__":
    main()
