"""The bookkeeper monitor against a test server standing in for mercure's bookkeeper.

A router runs in this process (receiver, router, dispatcher, ledger service) with mercure's
``bookkeeper`` and ``bookkeeper_api_key`` fields; series arrive over DICOM from pynetdicom.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mercure.config import Config
from mercure.events import TaskEvent, TaskEventType
from mercure.ledger.records import LedgerRecord, task_record
from mercure.lifecycle import PluginContext
from mercure.monitors import MonitorError, PermanentMonitorError
from mercure.testing import config_for, make_series, start_router, wait_for
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

sys.path.insert(0, str(Path(__file__).parent))
from bookkeeper_server import BookkeeperServer
from mercure_monitor_bookkeeper import BookkeeperMonitor, BookkeeperSettings

KEY = "bk-secret-key"


@pytest.fixture
def bookkeeper() -> Iterator[BookkeeperServer]:
    server = BookkeeperServer(KEY).up()
    try:
        yield server
    finally:
        server.down()


def router_config(tmp_path: Path, bookkeeper: BookkeeperServer, **extra: Any) -> Config:
    (tmp_path / "target").mkdir(exist_ok=True)
    return config_for(
        tmp_path,
        dicom_receiver={"bind_address": "127.0.0.1"},
        bookkeeper=bookkeeper.address,
        bookkeeper_api_key=KEY,
        targets={"archive": {"target_type": "folder", "folder": str(tmp_path / "target")}},
        rules={"ct": {"rule": "tags.Modality == 'CT'", "target": "archive"}},
        **extra,
    )


def send_series(port: int, folder: Path, count: int = 3, **tags: Any) -> list[Path]:
    files = make_series(folder, count, **tags)
    ae = AE()
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(dcmread(f)).Status == 0
    assoc.release()
    return files


def jobs(config: Config) -> list[str]:
    success = config.folder("success")
    return sorted(p.name for p in success.iterdir() if not p.name.startswith("."))


def test_every_event_arrives_with_mercures_fields_and_the_token(
    tmp_path: Path, bookkeeper: BookkeeperServer
) -> None:
    config = router_config(tmp_path, bookkeeper)
    gen = start_router(config)
    router = next(gen)
    try:
        files = send_series(router.port, tmp_path / "s", AccessionNumber="ACC-BK", PatientID="P-BK")
        wait_for(lambda: len(jobs(config)) == 1, 30, what="the job delivered")
        job = jobs(config)[0]
        wait_for(lambda: "COMPLETE" in bookkeeper.task_events(job), 30, what="COMPLETE posted")
    finally:
        next(gen, None)
    wait_for(lambda: any(p["event"] == "SHUTDOWN" for p in bookkeeper.of("mercure-event")), 10,
             what="the shutdown events")  # fmt: skip
    assert bookkeeper.received and all(r.token == KEY for r in bookkeeper.received)
    assert not bookkeeper.refused

    series_uid = str(dcmread(files[0]).SeriesInstanceUID)
    [series] = bookkeeper.of("register-series")
    assert series["SeriesInstanceUID"] == series_uid
    assert series["AccessionNumber"] == "ACC-BK" and series["PatientID"] == "P-BK"
    assert series["Modality"] == "CT" and series["StudyInstanceUID"]
    assert bookkeeper.of("register-task") == [
        {"id": job, "series_uid": series_uid, "parent_id": None}
    ]
    [task] = bookkeeper.of("update-task")
    assert task["id"] == job and task["info"]["uid"] == series_uid
    assert task["info"]["acc"] == "ACC-BK" and task["info"]["uid_type"] == "series"
    assert task["dispatch"]["target_name"] == "archive"

    assert bookkeeper.task_events(job) == ["REGISTER", "DISPATCH_COMPLETE", "COMPLETE"]
    events = [p for p in bookkeeper.of("task-event") if p["task_id"] == job]
    for payload in events:
        assert set(payload) == {
            "sender", "event", "file_count", "target", "info", "task_id", "timestamp", "time"
        }  # fmt: skip
        assert float(payload["timestamp"]) > 0 and payload["time"][:4].isdigit()
    register, dispatched, complete = events
    assert register["sender"] == "router.master" and "ct" in register["info"]
    assert dispatched["sender"] == "dispatcher.master"
    assert dispatched["target"] == "archive" and dispatched["file_count"] == "3"
    assert complete["file_count"] == "3"

    boots = [p for p in bookkeeper.of("mercure-event") if p["event"] == "BOOT"]
    assert {p["sender"] for p in boots} >= {"router.master", "dispatcher.master", "ledger.master"}
    assert all(set(p) == {"sender", "event", "severity", "description"} for p in boots)
    assert all(p["severity"] == "0" for p in boots)


def test_bookkeeper_down_for_a_while_gets_the_events_later(
    tmp_path: Path, bookkeeper: BookkeeperServer
) -> None:
    config = router_config(tmp_path, bookkeeper)
    bookkeeper.down()
    gen = start_router(config)
    router = next(gen)
    try:
        for i in range(2):
            send_series(router.port, tmp_path / f"s{i}")
        wait_for(lambda: len(jobs(config)) == 2, 30, what="both jobs delivered while it is down")
        assert bookkeeper.received == []
        bookkeeper.up()  # the same port again
        done = jobs(config)
        wait_for(
            lambda: all("COMPLETE" in bookkeeper.task_events(j) for j in done),
            90,
            what="the events of both jobs, later",
        )
    finally:
        next(gen, None)
    for job in done:  # each event once, in order
        assert bookkeeper.task_events(job) == ["REGISTER", "DISPATCH_COMPLETE", "COMPLETE"]
    assert len(bookkeeper.of("register-task")) == 2


def monitor(address: str, **settings: Any) -> BookkeeperMonitor:
    model = BookkeeperSettings(address=address, api_key=settings.pop("api_key", KEY), **settings)
    m = BookkeeperMonitor("bookkeeper", model, PluginContext("monitor", "bookkeeper", "site1"))
    m.start()
    return m


def test_processing_runs_post_logs_and_results(bookkeeper: BookkeeperServer) -> None:
    record = task_record(
        TaskEvent(
            TaskEventType.MODULE_FINISHED,
            "task-1",
            "1.2.3",
            "anonymizer",
            4,
            tags={"AccessionNumber": "A1", "PatientID": "M1"},
            extra={"step": 0, "exit_code": 0, "log": "all fine\n", "result": {"score": 0.9}},
        )
    )
    data = record.to_json()
    m = monitor(bookkeeper.address)
    try:
        m.send(LedgerRecord.from_json(data))
    finally:
        m.close()
    [logs] = bookkeeper.of("processor-logs")
    assert logs["task_id"] == "task-1" and logs["module_name"] == "anonymizer"
    assert logs["logs"] == "all fine\n" and logs["sender"] == "processor.site1"
    [output] = bookkeeper.of("store-processor-output")
    assert output == {
        "task_id": "task-1", "task_acc": "A1", "task_mrn": "M1", "module": "anonymizer",
        "index": 0, "settings": {}, "output": {"score": 0.9},
    }  # fmt: skip
    assert bookkeeper.task_events("task-1") == ["PROCESS_MODULE_COMPLETE"]


def test_failures_are_retryable_or_permanent(bookkeeper: BookkeeperServer) -> None:
    record = task_record(TaskEvent(TaskEventType.COMPLETED, "task-2", "1.2.3", "archive", 2))
    wrong = monitor(bookkeeper.address, api_key="wrong")
    try:
        with pytest.raises(MonitorError, match=r"HTTP 401.*bookkeeper_api_key"):
            wrong.send(record)
    finally:
        wrong.close()
    bookkeeper.reject["task-event"] = 422
    m = monitor(bookkeeper.address)
    try:
        with pytest.raises(PermanentMonitorError, match="HTTP 422"):
            m.send(record)
    finally:
        m.close()
    bookkeeper.down()
    gone = monitor(bookkeeper.address, timeout=2)
    try:
        with pytest.raises(MonitorError, match="did not answer /task-event") as info:
            gone.send(record)
        assert not isinstance(info.value, PermanentMonitorError)
    finally:
        gone.close()


def test_settings_from_mercures_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BK_KEY", "from-env")
    config = config_for(tmp_path, bookkeeper="10.0.0.5:8080", bookkeeper_api_key="${env:BK_KEY}")
    [inst] = config.plugin_instances("monitor")
    assert inst.type_name == "bookkeeper"
    assert isinstance(inst.settings, BookkeeperSettings)
    assert inst.settings.base_url == "http://10.0.0.5:8080"
    assert inst.settings.api_key == "from-env"
    # No API key: mercure posts nothing, and no monitor is made.
    assert config_for(tmp_path, bookkeeper="10.0.0.5:8080").plugin_instances("monitor") == []
    section = config_for(
        tmp_path,
        plugins={"monitors": {"bookkeeper": {"address": "https://bk.example.org", "api_key": "k"}}},
    )
    assert section.plugin_instances("monitor")[0].settings.base_url == "https://bk.example.org"
