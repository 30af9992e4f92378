"""Memory of the whole router for one large instance: 1 GiB against 4 MiB, end to end.

DCMTK's storescu sends one multi-frame instance to a fresh router, which routes it to DCMTK's
storescp (``--fork``); the router's peak resident memory (``VmHWM`` of its process) is read
once the instance has arrived, and the delivered dataset is compared with the sent one
(SHA-256). The growth is the large run's peak minus the small run's; the goal is at most
200 MiB for 1 GiB. The receiver streams a dataset larger than its in-memory limit into the
spool as it arrives and the dicom target's sender reads it in PDU-sized pieces.

Usage: python bench/large_object.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (
    StoreSCP,
    free_port,
    report,
    require_dcmtk,
    route_all_to,
    router,
    settle_disk,
    spool_config,
    storescu,
    workdir,
)
from memory import peak_rss_kib
from send_memory import dataset_digest, write_instance

GOAL_MIB = 200


def one_run(base: Path, scp: StoreSCP, path: Path, label: str) -> float:
    """Peak RSS (MiB) of a router that received and delivered ``path``."""
    scp.clear()
    settle_disk()
    port = free_port()
    config = spool_config(base / f"spool-{label}", port=port, series_complete_trigger=1,
                          **route_all_to(scp))  # fmt: skip
    with router(config, base) as proc:
        sender = storescu([path], port)
        _, err = sender.communicate(timeout=900)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        scp.wait_for(1, timeout=900)
        time.sleep(1.0)  # storescp renames the file when it is complete
        peak = peak_rss_kib(proc.pid) / 1024
    [got] = [p for p in scp.folder.iterdir() if not p.name.startswith(".")]
    if dataset_digest(got) != dataset_digest(path):
        raise RuntimeError(f"{path.name} arrived changed")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the large instance")
    args = parser.parse_args()
    require_dcmtk()
    with workdir("large-object") as base:
        small = write_instance(base / "small" / "small.dcm", frames=8)
        large = write_instance(base / "large" / "large.dcm", frames=args.mib * 2)
        scp = StoreSCP(base / "scp", parallel=True)
        try:
            small_peak = one_run(base, scp, small, "small")
            large_peak = one_run(base, scp, large, "large")
        finally:
            scp.stop()
    growth = large_peak - small_peak
    print(
        f"large object: router peak RSS {small_peak:.1f} MiB (4 MiB instance) vs "
        f"{large_peak:.1f} MiB ({args.mib} MiB instance): growth {growth:.1f} MiB "
        f"(goal <= {GOAL_MIB}); delivered intact"
    )
    report(
        "large_object",
        {"large_mib": args.mib, "small_peak_mib": round(small_peak, 1),
         "large_peak_mib": round(large_peak, 1), "growth_mib": round(growth, 1)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
