"""Latency: from the end of the sending association to the last instance at the target.

DCMTK storescu sends a series into the router (``mercure run`` subprocess, one rule routing
everything to a ``dicom`` target that is DCMTK storescp, ``series_complete_trigger`` = 1 s).
The latency is the time from storescu's exit to the modification time of the last instance
written by storescp. Measured with early dispatch (instances forwarded while the series
arrives) and without it (the whole series waits for the quiet time first).
``above_trigger_s`` = latency - series_complete_trigger (goal: at most 1.5 s).

Usage: python bench/latency.py [--count 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    require_dcmtk()
    figures: dict[str, object] = {"instances": args.count, "trigger_s": QUIET}
    with workdir("latency") as base:
        # A fresh series per run: a resent series the router still collects adds nothing new.
        series = iter(
            [make_ct_series(base / f"series{i}", args.count) for i in range(2 * args.repeat)]
        )
        scp = StoreSCP(base / "scp")
        try:
            for early in (True, False):
                port = free_port()
                config = spool_config(
                    base / f"spool-{early}",
                    port=port,
                    series_complete_trigger=QUIET,
                    early_dispatch=early,
                    **route_all_to(scp),
                )
                latencies = []
                with router(config, base):
                    for _ in range(args.repeat):
                        scp.clear()
                        settle_disk()
                        sender = storescu(next(series), port)
                        sender.communicate(timeout=300)
                        end = time.time()
                        last = scp.wait_for(args.count, timeout=60)
                        latencies.append(max(0.0, last - end))
                key = "early_dispatch" if early else "whole_series"
                median = statistics.median(latencies)
                figures[f"{key}_latency_s"] = round(median, 3)
                figures[f"{key}_above_trigger_s"] = round(median - QUIET, 3)
                figures[f"{key}_runs"] = [round(x, 3) for x in latencies]
        finally:
            scp.stop()
    report("latency", figures)


if __name__ == "__main__":
    main()
