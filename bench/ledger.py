"""Ledger cost: the pipeline's throughput with the ledger (SQLite, digests) against without it.

The same router configuration runs twice per round, once with the default ledger (the queue
on the spool, SQLite in WAL mode, per-instance SHA-256 digests) and once with
``ledger_database: "off"`` (no queue, no digests), in alternating order. Each run sends S
series of N instances (256x256x16 bit) with 4 parallel DCMTK storescu into the router, which
routes everything to a DCMTK storescp; it is timed from the start of the sending until the
last job is in ``success/``. After the timed part, the run with the ledger waits (untimed)
until the ledger holds every job's completion, and reports how long that took.

Figures: ``ratio`` = median time without / median time with the ledger (1.0: no cost);
``cost_percent`` = (1 - ratio) * 100, the goal is at most 10. ``ratio_less_quiet`` subtracts
the series quiet time (``series_complete_trigger``) from both, which every run waits once.

Usage: python bench/ledger.py [--series 16] [--count 25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
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
SENDERS = 4


def jobs_in(folder: Path) -> int:
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def ledger_completions(path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM events WHERE type = 'complete'").fetchone()[0]
        )
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def one_run(
    base: Path, name: str, scp: StoreSCP, series: list[list[Path]], ledger: bool
) -> tuple[float, float | None]:
    """Seconds until every job is delivered, and (with the ledger) until it is all recorded."""
    spool = base / name
    spool.mkdir(parents=True)
    port = free_port()
    config = spool_config(
        spool,
        port=port,
        series_complete_trigger=QUIET,
        ledger_database="" if ledger else "off",
        **route_all_to(scp),
    )
    success = spool / "success"
    batches = [[f for s in series[i::SENDERS] for f in s] for i in range(SENDERS)]
    scp.clear()
    with router(config, spool):
        settle_disk()
        start = time.monotonic()
        senders = [storescu(batch, port) for batch in batches if batch]
        for sender in senders:
            _, err = sender.communicate(timeout=600)
            if sender.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        deadline = start + 600
        while jobs_in(success) < len(series):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {jobs_in(success)} of {len(series)} jobs delivered")
            time.sleep(0.01)
        elapsed = time.monotonic() - start
        recorded = None
        if ledger:
            db = spool / "ledger" / "ledger.sqlite3"
            while ledger_completions(db) < len(series):
                if time.monotonic() > deadline:
                    raise RuntimeError("the ledger did not record every job")
                time.sleep(0.05)
            recorded = time.monotonic() - start
    return elapsed, recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=16)
    parser.add_argument("--count", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    require_dcmtk()
    with workdir("ledger") as base:
        scp = StoreSCP(base / "scp")
        runs: dict[str, list[float]] = {"with": [], "without": []}
        recorded: list[float] = []
        try:
            for i in range(args.repeat):
                # Fresh series every run: the router treats re-sent UIDs of a series it still
                # collects as the same instances.
                order = [True, False] if i % 2 == 0 else [False, True]
                for ledger in order:
                    files = make_ct_series(
                        base / f"data{i}{int(ledger)}", args.count, size=256, series=args.series
                    )
                    series = [
                        files[j * args.count : (j + 1) * args.count] for j in range(args.series)
                    ]
                    elapsed, done = one_run(
                        base, f"run{i}-{'with' if ledger else 'without'}", scp, series, ledger
                    )
                    runs["with" if ledger else "without"].append(elapsed)
                    if done is not None:
                        recorded.append(done)
        finally:
            scp.stop()
    with_ledger = statistics.median(runs["with"])
    without = statistics.median(runs["without"])
    ratio = without / with_ledger
    report(
        "ledger",
        {
            "series": args.series,
            "instances_per_series": args.count,
            "senders": SENDERS,
            "without_ledger_s": round(without, 3),
            "with_ledger_s": round(with_ledger, 3),
            "ratio": round(ratio, 3),
            "cost_percent": round((1 - ratio) * 100, 1),
            "ratio_less_quiet": round((without - QUIET) / (with_ledger - QUIET), 3),
            "ledger_recorded_s": round(statistics.median(recorded), 3) if recorded else None,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
