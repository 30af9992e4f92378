"""Memory: peak RSS of the router for a small and a large series.

A fresh ``mercure run`` subprocess (all services in one process) receives a series from DCMTK
storescu and forwards it to DCMTK storescp; its peak resident set size (``VmHWM``) is read
when the last instance has arrived at the target. ``ratio`` = peak(large) / peak(small)
(goal: at most 1.5).

Usage: python bench/memory.py [--small 50] [--large 5000] [--size 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    StoreSCP,
    free_port,
    make_ct_series,
    report,
    require_dcmtk,
    route_all_to,
    router,
    spool_config,
    storescu,
    workdir,
)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def measure(base: Path, count: int, size: int, scp: StoreSCP) -> int:
    files = make_ct_series(base / f"series-{count}", count, size=size)
    port = free_port()
    config = spool_config(
        base / f"spool-{count}",
        port=port,
        **route_all_to(scp),
    )
    scp.clear()
    with router(config, base) as proc:
        sender = storescu(files, port)
        sender.communicate(timeout=1800)
        scp.wait_for(count, timeout=600)
        peak = peak_rss_kib(proc.pid)
    for path in files:
        path.unlink()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    args = parser.parse_args()
    require_dcmtk()
    with workdir("memory") as base:
        scp = StoreSCP(base / "scp")
        try:
            small = measure(base, args.small, args.size, scp)
            large = measure(base, args.large, args.size, scp)
        finally:
            scp.stop()
    report(
        "memory",
        {
            "instances": [args.small, args.large],
            "image_size": args.size,
            "peak_rss_mib": [round(small / 1024, 1), round(large / 1024, 1)],
            "ratio": round(large / small, 3),
        },
    )


if __name__ == "__main__":
    main()
