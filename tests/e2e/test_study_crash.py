"""Crash safety of study jobs: ``kill -9`` the router while the series of studies arrive.

Receiver, router and dispatcher run as separate ``mercure run --only`` processes. DCMTK's
storescu sends the series of several studies (each complete only when its three series are
in); the driver kills the router at moments it aims at (a series taken, a study folder being
written or released) and restarts it. Afterwards every instance must be at the folder target
exactly once, each study in one study job holding all its series, and nothing left in
``studies/``, ``incoming/`` or ``outgoing/``. Replay a schedule with ``MERCURE_E2E_SEED``.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from e2e_support import (
    DCMTK_STORESCU,
    MercureProcess,
    ProcessFactory,
    dcmtk_env,
    folder_of,
    read_task,
    spool_config,
    target_instances,
    visible_entries,
    write_config,
)
from mercure.testing import make_series
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.slow, pytest.mark.peer]

STUDIES = 4
SERIES = ("S1 axial", "S2 sagittal", "S3 coronal")
INSTANCES = 6
KILLS = (8, 14)
SETTLE_TIMEOUT = 90.0


def busy(config: dict[str, object]) -> bool:
    """The router is in the middle of something: a series taken, a study being changed."""
    incoming = folder_of(config, "incoming")  # type: ignore[arg-type]
    studies = folder_of(config, "studies")  # type: ignore[arg-type]
    try:
        if visible_entries(incoming / ".routing"):
            return True
        return any(any(p.name.startswith(".tmp-") for p in s.iterdir())
                   for s in visible_entries(studies))  # fmt: skip
    except FileNotFoundError:
        return False


def test_kill_9_of_the_router_while_studies_are_collected(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    if not DCMTK_STORESCU.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    seed = int(os.environ.get("MERCURE_E2E_SEED") or random.SystemRandom().randrange(2**32))
    print(f"study crash seed: {seed}  (replay: MERCURE_E2E_SEED={seed})")
    rng = random.Random(seed)
    target = tmp_path / "target"
    target.mkdir()
    config = spool_config(
        tmp_path,
        retry_delay=1,
        retry_max=50,
        study_complete_trigger=3600,
        study_forcecomplete_trigger=3600,
        targets={"folder": {"target_type": "folder", "folder": str(target)}},
        rules={
            "study": {
                "rule": "True",
                "target": "folder",
                "action_trigger": "study",
                "study_trigger_condition": "received_series",
                "study_trigger_series": "'S1' and 'S2' and 'S3'",
            }
        },
    )
    config_path = str(write_config(tmp_path / "mercure.json", config))
    studies: dict[str, set[str]] = {}
    sends: list[list[Path]] = []
    for s in range(STUDIES):
        uid = generate_uid()
        studies[uid] = set()
        for description in SERIES:
            files = make_series(tmp_path / "in" / f"{s}-{description}", INSTANCES,
                                study_uid=uid, series_description=description)  # fmt: skip
            studies[uid] |= {f.name for f in files}
            sends.append(files)
    rng.shuffle(sends)  # the series of the studies interleaved
    sent = set().union(*studies.values())

    def service(name: str) -> MercureProcess:
        return mercure_processes.start(name, "run", "--config", config_path, "--only", name)

    others = [service("receiver"), service("dispatcher")]
    router = service("router")
    failures: list[str] = []
    done = threading.Event()

    def send() -> None:
        try:
            for files in sends:
                result = subprocess.run(
                    [str(DCMTK_STORESCU), "-aec", "MERCURE", "127.0.0.1", str(config["port"]),
                     *map(str, files)],
                    env=dcmtk_env(), capture_output=True, timeout=120, check=False,
                )  # fmt: skip
                if result.returncode != 0:
                    failures.append(result.stderr.decode(errors="replace"))
                time.sleep(rng.uniform(0.2, 1.2))
        finally:
            done.set()

    sender = threading.Thread(target=send, daemon=True)
    kills: list[str] = []
    sender.start()
    try:
        planned = rng.randint(*KILLS)
        while len(kills) < planned and not (done.is_set() and len(kills) >= KILLS[0]):
            if rng.random() < 0.7:
                limit = time.monotonic() + 2.0
                while not busy(config) and time.monotonic() < limit:
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0.05, 1.0))
            pid = router.pid
            router.kill()
            time.sleep(rng.uniform(0.0, 0.4))
            router.start()
            kills.append(f"kill -9 router {pid} -> {router.pid}")
        sender.join(180)
        assert done.is_set() and failures == [], failures

        incoming = folder_of(config, "incoming")
        outgoing, success = folder_of(config, "outgoing"), folder_of(config, "success")
        studies_folder = folder_of(config, "studies")

        def settled() -> bool:
            return (
                set(target_instances(target)) >= sent
                and visible_entries(incoming) == []
                and visible_entries(incoming / ".routing") == []
                and visible_entries(studies_folder) == []
                and visible_entries(outgoing) == []
            )

        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled():
            assert time.monotonic() < deadline, (
                f"not settled: {len(set(target_instances(target)) & sent)} of {len(sent)} "
                f"delivered; studies {visible_entries(studies_folder)}, routing "
                f"{visible_entries(incoming / '.routing')}, outgoing {visible_entries(outgoing)}"
            )
            time.sleep(0.2)

        found = target_instances(target)
        assert set(found) == sent
        assert {n: t for n, t in found.items() if len(t) != 1} == {}, "delivered twice"
        # Each study is one job holding every instance of its three series.
        jobs = {p.name: read_task(p) for p in visible_entries(success)}
        assert len(jobs) == STUDIES
        for job_id, task in jobs.items():
            assert task is not None and task["info"]["uid_type"] == "study"
            held = {p.name for p in (target / job_id).glob("*.dcm")}
            assert held == studies[task["info"]["uid"]]
            assert sorted(task["study"]["received_series"]) == sorted(SERIES)
        for name in ("error", "discard"):
            assert visible_entries(folder_of(config, name)) == [], f"{name}/ is not empty"
        for proc in [router, *others]:
            assert proc.terminate() == 0
    except BaseException:
        print(f"study crash seed: {seed}; kills:")
        for line in kills:
            print(f"  {line}")
        for proc in [router, *others]:
            for event in [e for e in proc.events() if e.get("level") in ("error", "critical")][:20]:
                print(f"  {proc.log_path.name}: {event}")
        raise
