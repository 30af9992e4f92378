"""Crash safety: SIGKILL the router and the dispatcher at random moments while series arrive.

Receiver, router, dispatcher and cleaner run as four ``mercure run --only ...`` processes, as
they can in production. DCMTK's storescu sends series in a background thread while the driver
kills the router or the dispatcher (``kill -9``: no handler, no cleanup) and restarts it
after a short pause. Most kills are aimed: the driver watches the spool and kills as soon as
the victim is in the middle of its work (a router with a taken series or a job being built,
a dispatcher with a job whose copy to the target has begun). When everything has settled,
every instance sent must be at the folder target exactly once, every job in success/, and
nothing left on the way.

The seed of the random schedule is printed with the kill log; replay the same schedule with
``MERCURE_E2E_SEED=<seed>`` (the moments the aimed kills land still depend on timing).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import (
    DCMTK_STORESCU,
    MercureProcess,
    ProcessFactory,
    dcmtk_env,
    folder_of,
    spool_config,
    target_instances,
    visible_entries,
    write_config,
)
from mercure.testing import dataset_bytes, make_series

pytestmark = [pytest.mark.slow, pytest.mark.peer]

SERIES = 10
INSTANCES = 20
SETTLE_TIMEOUT = 90.0
MIN_KILLS, MAX_KILLS = 10, 20


@dataclass
class Kill:
    at: float
    victim: str
    pid: int
    pause: float
    busy: str  # what was waiting in the spool when the kill happened
    new_pid: int = 0

    def __str__(self) -> str:
        return (
            f"t={self.at:6.2f}s  kill -9 {self.victim:<10} pid {self.pid:<7} [{self.busy}] "
            f"restart after {self.pause:.2f}s -> pid {self.new_pid}"
        )


@dataclass
class Spool:
    incoming: Path
    outgoing: Path
    target: Path

    def describe(self) -> str:
        return (
            f"incoming {len(visible_entries(self.incoming))} "
            f"routing {len(visible_entries(self.incoming / '.routing'))} "
            f"outgoing {len(visible_entries(self.outgoing))} "
            f"sending {len(self.sending())}"
        )

    def sending(self) -> list[str]:
        """Jobs still in outgoing/ whose copy to the target has begun."""
        try:
            jobs = {p.name for p in visible_entries(self.outgoing)}
            return [n for n in jobs if (self.target / n).exists()]
        except FileNotFoundError:
            return []

    def routing(self) -> bool:
        """A router has taken a series, or is building a job."""
        try:
            return bool(visible_entries(self.incoming / ".routing")) or any(
                p.name.startswith(".new-") for p in self.outgoing.iterdir()
            )
        except FileNotFoundError:
            return False

    def busy(self, victim: str) -> bool:
        return bool(self.sending()) if victim == "dispatcher" else self.routing()


class Sender(threading.Thread):
    """Sends each series over its own association, with random gaps between series."""

    def __init__(self, series: list[list[Path]], port: int, rng: random.Random) -> None:
        super().__init__(name="storescu-sender", daemon=True)
        self.series = series
        self.port = port
        self.rng = rng
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for files in self.series:
                sent = subprocess.run(
                    [str(DCMTK_STORESCU), "-aec", "MERCURE", "127.0.0.1", str(self.port)]
                    + [str(f) for f in files],
                    env=dcmtk_env(),
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                if sent.returncode != 0:
                    self.failures.append(sent.stderr.decode(errors="replace"))
                time.sleep(self.rng.uniform(0.3, 2.0))
        except Exception as exc:  # reported by the test
            self.failures.append(repr(exc))
        finally:
            self.done.set()


def test_kill_9_of_router_and_dispatcher_loses_and_duplicates_nothing(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    seed = int(os.environ.get("MERCURE_E2E_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash-safety seed: {seed}  (replay: MERCURE_E2E_SEED={seed})")
    rng = random.Random(seed)

    target = tmp_path / "target"
    target.mkdir()
    config = spool_config(
        tmp_path,
        retry_delay=1,
        retry_max=50,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={"all": {"rule": "True", "target": "folder"}},
    )
    config_path = str(write_config(tmp_path / "mercure.json", config))
    series = [
        make_series(tmp_path / "series" / f"s{i:02d}", INSTANCES, rows=512, columns=512)
        for i in range(SERIES)
    ]
    sent = {p.name: p for files in series for p in files}

    def service(name: str) -> MercureProcess:
        return mercure_processes.start(name, "run", "--config", config_path, "--only", name)

    receiver = service("receiver")
    # The cleaner removes what killed builders leave behind (hidden staging folders).
    cleaner = service("cleaner")
    procs = {"router": service("router"), "dispatcher": service("dispatcher")}

    spool = Spool(folder_of(config, "incoming"), folder_of(config, "outgoing"), target)
    sender = Sender(series, int(config["port"]), random.Random(rng.getrandbits(32)))
    kills: list[Kill] = []
    t0 = time.monotonic()
    sender.start()
    try:
        planned = rng.randint(MIN_KILLS, MAX_KILLS)
        while len(kills) < planned and not (sender.done.is_set() and len(kills) >= MIN_KILLS):
            victim = rng.choice(sorted(procs))
            if rng.random() < 0.7:
                # Aim: wait (a bounded time) until the victim is in the middle of its work.
                limit = time.monotonic() + 2.0
                while not spool.busy(victim) and time.monotonic() < limit:
                    time.sleep(0.001)
                time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.02)]))
            else:
                time.sleep(rng.uniform(0.05, 1.0))
            proc = procs[victim]
            busy = spool.describe()
            kill = Kill(time.monotonic() - t0, victim, proc.pid, rng.uniform(0.0, 0.5), busy)
            proc.kill()
            time.sleep(kill.pause)
            proc.start()
            kill.new_pid = proc.pid
            kills.append(kill)
            print(kill)
        sender.join(180)
        assert sender.done.is_set(), "the sender did not finish"
        assert sender.failures == [], f"storescu failed: {sender.failures}"

        incoming = folder_of(config, "incoming")
        states = {n: folder_of(config, n) for n in ("outgoing", "success", "error", "discard")}

        def settled() -> bool:
            found = target_instances(target)
            return (
                set(found) >= set(sent)
                and visible_entries(incoming) == []
                and list((incoming / ".routing").iterdir()) == []
                and list(states["outgoing"].iterdir()) == []
            )

        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled():
            assert time.monotonic() < deadline, (
                f"not settled {SETTLE_TIMEOUT:.0f} s after the last kill: "
                f"{len(set(target_instances(target)) & set(sent))} of {len(sent)} delivered, "
                f"incoming {visible_entries(incoming)}, "
                f"routing {list((incoming / '.routing').iterdir())}, "
                f"outgoing {list(states['outgoing'].iterdir())}, "
                f"error {visible_entries(states['error'])}"
            )
            time.sleep(0.2)

        # Every instance exactly once at the target, byte for byte as sent.
        found = target_instances(target)
        assert set(found) == set(sent), f"unexpected at the target: {set(found) - set(sent)}"
        twice = {name: tasks for name, tasks in found.items() if len(tasks) != 1}
        assert twice == {}, f"instances delivered into several task folders: {twice}"
        for name, path in sent.items():
            (task_id,) = found[name]
            assert dataset_bytes(target / task_id / name) == dataset_bytes(path), name

        # Every job is in success/, one per task folder at the target; nothing else anywhere.
        task_ids = {tasks[0] for tasks in found.values()}
        assert {p.name for p in visible_entries(states["success"])} == task_ids
        for name in ("outgoing", "error", "discard"):
            assert list(states[name].iterdir()) == [], f"{name}/ is not empty"
        # The receive journal's folder stays: its segments are reused.
        names = sorted(p.name for p in incoming.iterdir() if p.name != ".journal")
        assert names == [".routing", ".tmp"]
        assert list((incoming / ".tmp").iterdir()) == [], "temporary files left in incoming/.tmp"
        assert list((incoming / ".routing").iterdir()) == [], "series left in incoming/.routing"
        leftovers = [p for p in target.rglob("*") if p.is_file() and p.name.startswith(".")]
        print(
            f"{len(task_ids)} jobs for {SERIES} series; temporary files at the target: "
            f"{len(leftovers)}"
        )

        for name, proc in [("receiver", receiver), ("cleaner", cleaner), *procs.items()]:
            assert proc.terminate() == 0, f"{name} did not stop cleanly"
    except BaseException:
        print(f"crash-safety seed: {seed}; kill log:")
        for kill in kills:
            print(f"  {kill}")
        for proc in (receiver, cleaner, *procs.values()):
            problems = [
                e for e in proc.events() if e.get("level") in ("error", "critical", "exception")
            ]
            for event in problems[:20]:
                print(f"  {proc.log_path.name}: {event}")
        raise
