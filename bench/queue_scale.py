"""Queue scale: does the cost per job stay flat when the queue is long?

* Dispatcher: N jobs of one small instance each wait in ``outgoing/`` for a ``dummy`` target;
  the dispatcher runs in this process until all are in ``success/``. Cost per job with 100
  and with 20,000 jobs queued; ``dispatcher_ratio`` = large / small (goal: at most 2).
* Router: N complete series of one instance each wait in ``incoming/``; the router routes them
  all to the dummy target. Cost per series with 10 and with 5,000 pending;
  ``router_ratio`` = large / small (goal: at most 2).

Usage: python bench/queue_scale.py [--jobs 100 20000] [--series 10 5000]
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

from common import report, settle_disk, workdir
from mercure.config import validate_config
from mercure.jobs.incoming import IncomingSpool
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.logs import configure_logging
from mercure.plugins import build_plugin_manager
from mercure.services.dispatcher import Dispatcher
from mercure.services.router import Router
from mercure.services.runtime import build_runtime
from mercure.testing import make_dataset


def runtime_for(base: Path):  # type: ignore[no-untyped-def]
    data = {
        f"{name}_folder": str(base / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    data.update(
        targets={"null": {"target_type": "dummy"}},
        rules={"all": {"rule": "True", "target": "null"}},
        series_complete_trigger=0,
        early_dispatch=False,
        dispatcher_scan_interval=1,
    )
    config, _ = validate_config(data, build_plugin_manager(autoload=False).registry)
    return build_runtime(config, build_plugin_manager(autoload=False))


def instance_file(base: Path) -> Path:
    ds = make_dataset("1.2.3.4", "1.2.3", 0, rows=8, columns=8)
    path = base / "instance.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def dispatcher_cost(base: Path, jobs: int) -> float:
    runtime = runtime_for(base)
    runtime.store.fsync = False  # setting up the queue is not what is measured
    src = instance_file(base)
    for _ in range(jobs):
        task = Task(
            id=str(uuid.uuid4()),
            info=TaskInfo(action="route", uid="1.2.3.4", mrn="", acc=""),
            dispatch=TaskDispatch(target_name="null", series_uid="1.2.3.4"),
        )
        runtime.store.create("outgoing", task, [src])
    runtime.store.fsync = True
    settle_disk()
    dispatcher = Dispatcher(runtime)
    outgoing = runtime.store.folders["outgoing"]
    start = time.perf_counter()
    while True:
        if dispatcher.run_once() == 0:
            if not dispatcher.in_flight and not any(os.scandir(outgoing)):
                break
            dispatcher.wake_event.wait(0.01)
            dispatcher.wake_event.clear()
    elapsed = time.perf_counter() - start
    dispatcher.stop()
    assert len(os.listdir(runtime.store.folders["success"])) == jobs
    return elapsed / jobs


def router_cost(base: Path, series: int) -> float:
    runtime = runtime_for(base)
    spool: IncomingSpool = runtime.spool
    spool.fsync = False
    src = instance_file(base).read_bytes()
    for i in range(series):
        uid = f"1.2.3.{i + 1}"
        spool.store(uid, f"{uid}.1", [src], {"SeriesInstanceUID": uid, "Modality": "CT"})
    spool.fsync = True
    settle_disk()
    router = Router(runtime)
    start = time.perf_counter()
    while router.run_once():
        pass
    elapsed = time.perf_counter() - start
    assert len(os.listdir(runtime.store.folders["outgoing"])) == series
    return elapsed / series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs=2, default=[100, 20000])
    parser.add_argument("--series", type=int, nargs=2, default=[10, 5000])
    args = parser.parse_args()
    configure_logging("WARNING")
    small_j, large_j = args.jobs
    with workdir("queue-small") as base:
        d_small = dispatcher_cost(base, small_j)
    with workdir("queue-large") as base:
        d_large = dispatcher_cost(base, large_j)
    small_s, large_s = args.series
    with workdir("router-small") as base:
        r_small = router_cost(base, small_s)
    with workdir("router-large") as base:
        r_large = router_cost(base, large_s)
    figures: dict[str, object] = {
        "dispatcher_jobs": [small_j, large_j],
        "dispatcher_ms_per_job": [round(d_small * 1000, 3), round(d_large * 1000, 3)],
        "dispatcher_ratio": round(d_large / d_small, 3),
        "router_series": [small_s, large_s],
        "router_ms_per_series": [round(r_small * 1000, 3), round(r_large * 1000, 3)],
        "router_ratio": round(r_large / r_small, 3),
    }
    report("queue_scale", figures)


if __name__ == "__main__":
    main()
