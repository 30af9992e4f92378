"""The durable job store: incoming spool, claims, job folders, safe path components."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mercure.fsutil import is_valid_uid, safe_component
from mercure.jobs import incoming as incoming_module
from mercure.jobs.claims import claim_owner, is_claimed, try_claim
from mercure.jobs.incoming import (
    TAGS_FILE,
    IncomingSpool,
    instance_files,
    read_series_tags,
)
from mercure.jobs.store import STAGING_PREFIX, STATES, JobRef, JobStore
from mercure.jobs.task import Task, TaskDispatch, TaskInfo, read_task

SERIES = "1.2.840.113619.2.55.3.1"
TAGS = {"SeriesInstanceUID": SERIES, "Modality": "CT", "PatientName": "Müller^Jörg"}


@pytest.fixture
def spool(tmp_path: Path) -> IncomingSpool:
    return IncomingSpool(tmp_path / "incoming", fsync=True)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore({s: tmp_path / "jobs" / s for s in STATES}, fsync=True)


def make_task(task_id: str = "task-1", target: str = "t") -> Task:
    return Task(
        info=TaskInfo(action="route", uid=SERIES, mrn="MRN", acc="ACC"),
        id=task_id,
        dispatch=TaskDispatch(target_name=target, series_uid=SERIES),
        tags=dict(TAGS),
    )


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- incoming spool ----------------------------------------------------------------------------


def test_store_writes_instances_into_series_folder(spool: IncomingSpool) -> None:
    path = spool.store(SERIES, "1.2.3.4", [b"DICM", memoryview(b"-data-")], TAGS)
    assert path == spool.folder / SERIES / "1.2.3.4.dcm"
    assert path.read_bytes() == b"DICM-data-"
    spool.store(SERIES, "1.2.3.5", iter([b"second"]), {"SeriesInstanceUID": "other"})
    series_dir = spool.folder / SERIES
    assert visible(series_dir) == ["1.2.3.4.dcm", "1.2.3.5.dcm", TAGS_FILE]
    # The tags are those of the first instance, stored as UTF-8 JSON.
    assert json.loads((series_dir / TAGS_FILE).read_text(encoding="utf-8")) == TAGS
    assert read_series_tags(series_dir) == TAGS
    # No temporary file is left behind.
    assert os.listdir(spool.tmp) == []
    assert [s.path for s in spool.series()] == [series_dir]
    assert [p.name for p in instance_files(series_dir)] == ["1.2.3.4.dcm", "1.2.3.5.dcm"]


def test_store_failing_mid_write_leaves_nothing(spool: IncomingSpool) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        spool.store(SERIES, "1.2.3.4", chunks(), TAGS)
    assert os.listdir(spool.tmp) == []
    assert not (spool.folder / SERIES).exists()


def test_unsafe_uids_stay_inside_the_spool(spool: IncomingSpool) -> None:
    for series_uid, sop_uid in [("../../etc", "passwd"), ("a/b", "../x"), ("..", ".."), ("", "")]:
        path = spool.store(series_uid, sop_uid, [b"x"], {})
        assert path.resolve().parent.parent == spool.folder.resolve(), path
        assert path.parent.name not in ("", ".", "..")
    assert not (spool.folder.parent / "etc").exists()


def test_take_moves_the_series_once(spool: IncomingSpool) -> None:
    spool.store(SERIES, "1.1", [b"a"], TAGS)
    series = spool.folder / SERIES
    taken = spool.take(series)
    assert taken is not None
    assert taken.parent == spool.routing
    assert not series.exists()
    assert visible(taken) == ["1.1.dcm", TAGS_FILE]
    assert spool.take(series) is None
    assert spool.taken() == [taken]
    assert spool.series() == []


def test_concurrent_takes_only_one_wins(spool: IncomingSpool) -> None:
    spool.store(SERIES, "1.1", [b"a"], TAGS)
    series = spool.folder / SERIES
    barrier = threading.Barrier(8, timeout=10)
    results: list[Path | None] = []
    lock = threading.Lock()

    def take() -> None:
        barrier.wait()
        got = spool.take(series)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(results) == 8
    assert len(winners) == 1
    assert spool.taken() == winners


def test_store_after_take_starts_a_new_series_folder(spool: IncomingSpool) -> None:
    spool.store(SERIES, "1.1", [b"a"], TAGS)
    taken = spool.take(spool.folder / SERIES)
    assert taken is not None
    later = {**TAGS, "Modality": "MR"}
    path = spool.store(SERIES, "1.2", [b"b"], later)
    assert path == spool.folder / SERIES / "1.2.dcm"
    assert visible(spool.folder / SERIES) == ["1.2.dcm", TAGS_FILE]
    assert read_series_tags(spool.folder / SERIES) == later
    assert visible(taken) == ["1.1.dcm", TAGS_FILE]


def test_store_racing_a_take_still_succeeds(
    spool: IncomingSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router may take the series between the instance's rename and the folder fsync.

    The instance is then in the taken series and is routed with it: the store must succeed
    (answering a failure would make the sender resend it into a second series).
    """
    spool.store(SERIES, "1.1", [b"a"], TAGS)
    real_fsync_dir = incoming_module.fsync_dir
    taken: list[Path] = []

    def fsync_dir_after_take(path: str | os.PathLike[str]) -> None:
        if Path(path) == spool.folder / SERIES and not taken:
            got = spool.take(Path(path))
            assert got is not None
            taken.append(got)
        real_fsync_dir(path)

    monkeypatch.setattr(incoming_module, "fsync_dir", fsync_dir_after_take)
    spool.store(SERIES, "1.2", [b"b"], TAGS)
    assert len(taken) == 1
    assert visible(taken[0]) == ["1.1.dcm", "1.2.dcm", TAGS_FILE]
    assert not (spool.folder / SERIES).exists()
    assert os.listdir(spool.tmp) == []


def test_complete_series_uses_the_quiet_time(spool: IncomingSpool) -> None:
    spool.store(SERIES, "1.1", [b"a"], TAGS)
    spool.store("9.9", "1.1", [b"a"], TAGS)
    old = time.time() - 120
    os.utime(spool.folder / SERIES, (old, old))
    assert [s.path.name for s in spool.complete_series(60)] == [SERIES]


def test_clean_tmp_removes_only_old_leftovers(spool: IncomingSpool) -> None:
    old = spool.tmp / ".tmp-old"
    new = spool.tmp / ".tmp-new"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.clean_tmp(3600) == 1
    assert visible(spool.tmp) == [".tmp-new"]


# -- claims ------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from mercure.jobs.claims import try_claim
claim = try_claim(Path(sys.argv[1]))
print("claimed" if claim is not None else "busy", flush=True)
time.sleep(120)
"""


def start_holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "claimed":
        proc.kill()
        proc.wait()
        pytest.fail(f"holder process could not claim {folder}: {line!r}")
    return proc


def test_claim_is_exclusive_within_a_process(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    first = try_claim(folder)
    assert first is not None
    assert try_claim(folder) is None
    assert is_claimed(folder)
    first.release()
    second = try_claim(folder)
    assert second is not None
    second.release()
    assert not is_claimed(folder)


def test_claim_of_missing_folder_is_none(tmp_path: Path) -> None:
    assert try_claim(tmp_path / "gone") is None
    assert not is_claimed(tmp_path / "gone")


@pytest.mark.slow
def test_claim_is_exclusive_across_processes_and_recovered_after_kill(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    proc = start_holder(folder)
    try:
        assert try_claim(folder) is None
        assert is_claimed(folder)
        owner = claim_owner(folder)
        assert owner is not None and owner["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        claim = try_claim(folder)
        assert claim is not None, "a killed holder's claim must be recovered"
        now_owner = claim_owner(folder)
        assert now_owner is not None and now_owner["pid"] == os.getpid()
        claim.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_claim_travels_with_a_renamed_folder(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    claim = try_claim(a)
    assert claim is not None
    os.rename(a, b)
    claim.moved_to(b)
    assert claim.folder == b
    assert try_claim(a) is None  # gone
    assert try_claim(b) is None  # still held
    claim.release()
    again = try_claim(b)
    assert again is not None
    again.release()


def test_claim_fails_when_the_folder_moved_during_the_claim(tmp_path: Path) -> None:
    """Opened the lock, then the owner renamed the folder: the claim must not succeed."""
    a = tmp_path / "a"
    a.mkdir()
    (a / ".lock").write_text("")
    fd = os.open(a / ".lock", os.O_RDWR)
    os.rename(a, tmp_path / "b")
    a.mkdir()  # a new folder under the old name
    try:
        claim = try_claim(a)
        # This claim is of the new folder, which is correct; the old lock file is elsewhere.
        assert claim is not None
        assert claim.folder == a
        claim.release()
    finally:
        os.close(fd)


# -- job store ---------------------------------------------------------------------------------


def series_files(tmp_path: Path, count: int = 3) -> list[Path]:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        f = folder / f"1.2.{i}.dcm"
        f.write_bytes(b"instance %d" % i)
        files.append(f)
    return files


def test_create_builds_a_complete_job(tmp_path: Path, store: JobStore) -> None:
    files = series_files(tmp_path)
    ref = store.create("outgoing", make_task(), files)
    assert ref == JobRef("task-1", "outgoing", store.folders["outgoing"] / "task-1")
    assert sorted(p.name for p in instance_files(ref.path)) == [f.name for f in files]
    assert read_task(ref.path).id == "task-1"
    assert read_task(ref.path).target_names == ["t"]
    # Instances are shared with the source (hard links), not copied.
    assert (ref.path / files[0].name).stat().st_ino == files[0].stat().st_ino
    assert [r.id for r in store.list()] == ["task-1"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in store.folders["outgoing"].iterdir())


def test_create_is_idempotent_per_task_id(tmp_path: Path, store: JobStore) -> None:
    files = series_files(tmp_path)
    ref = store.create("outgoing", make_task(), files)
    more = series_files(tmp_path, 5)
    again = store.create("outgoing", make_task(), more)
    assert again == ref
    assert len(instance_files(ref.path)) == 3
    # Also when the job has moved on: nothing is created in outgoing/ again.
    moved = store.move(ref, "success")
    third = store.create("outgoing", make_task(), files)
    assert third == moved
    assert [(r.id, r.state) for r in store.list()] == [("task-1", "success")]
    assert os.listdir(store.folders["outgoing"]) == []


def test_staging_folders_are_invisible(tmp_path: Path, store: JobStore) -> None:
    staging = store.folders["outgoing"] / f"{STAGING_PREFIX}half-built"
    staging.mkdir()
    (staging / "1.dcm").write_bytes(b"x")
    assert store.list() == []
    assert store.find("half-built") is None
    # A leftover staging folder of the same job (its builder died) does not get in the way.
    left = store.folders["outgoing"] / f"{STAGING_PREFIX}task-1"
    left.mkdir()
    (left / "junk.dcm").write_bytes(b"junk")
    ref = store.create("outgoing", make_task(), series_files(tmp_path))
    assert "junk.dcm" not in os.listdir(ref.path)
    assert len(instance_files(ref.path)) == 3
    assert not left.exists()  # the restarted builder reused it
    # clean_staging removes unclaimed leftovers.
    store.clean_staging()
    assert not staging.exists()
    assert sorted(os.listdir(store.folders["outgoing"])) == ["task-1"]


def test_clean_staging_keeps_a_folder_being_built(tmp_path: Path, store: JobStore) -> None:
    staging = store.folders["outgoing"] / f"{STAGING_PREFIX}busy"
    staging.mkdir()
    claim = try_claim(staging)
    assert claim is not None
    store.clean_staging()
    assert staging.exists()
    claim.release()


def test_move_changes_state(tmp_path: Path, store: JobStore) -> None:
    ref = store.create("outgoing", make_task(), series_files(tmp_path))
    old = time.time() - 1000
    os.utime(ref.path, (old, old))
    claim = store.claim(ref)
    assert claim is not None
    with claim:
        moved = store.move(ref, "error", claim)
        assert claim.folder == moved.path
        assert store.claim(moved) is None  # still held through the move
    assert moved.state == "error"
    assert not ref.path.exists()
    assert store.find("task-1") == moved
    assert store.find("task") == moved  # unique prefix
    assert store.age(moved) < 500  # the move stamps the time it entered the state
    assert len(instance_files(moved.path)) == 3


def test_find_with_ambiguous_prefix_is_none(tmp_path: Path, store: JobStore) -> None:
    files = series_files(tmp_path)
    store.create("outgoing", make_task("abc-1"), files)
    store.create("error", make_task("abc-2"), files)
    assert store.find("abc") is None
    ref = store.find("abc-2")
    assert ref is not None and ref.state == "error"
    assert store.exists("abc-1") and not store.exists("abc")


# -- safe path components ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["../../etc", "a/b", "..", "", ".", "/abs", "a\x00b", "..\\x"])
def test_safe_component_is_harmless(tmp_path: Path, value: str) -> None:
    name = safe_component(value)
    assert name not in ("", ".", "..")
    assert "/" not in name and "\x00" not in name and "\\" not in name
    assert not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_component_keeps_uids_and_limits_length() -> None:
    assert safe_component("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert safe_component("abc-DEF_1.2") == "abc-DEF_1.2"
    assert len(safe_component("1" * 500)) == 128
    assert safe_component("ü") == "_"


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.0.3", True),
        ("0", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("", False),
        ("..", False),
        ("1..2", False),
        ("1.2.", False),
        (".1.2", False),
        ("1.02.3", False),  # leading zero
        ("1.2.a", False),
        ("../../etc", False),
        ("a/b", False),
        ("1.2.٣", False),  # non-ASCII digit
        ("1.2 ", False),
    ],
)
def test_is_valid_uid(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_two_builders_of_one_job_never_publish_a_partial_job(
    tmp_path: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two routers (early dispatch runs without a claim) may build the same job at once.

    Builder A is about to write the task file when builder B starts building; A then
    finishes. Whatever the interleaving, the job that becomes visible holds every instance
    and its task file.
    """
    from mercure.jobs import store as store_module

    files = series_files(tmp_path, 4)
    real_write_task = store_module.write_task
    real_link = store_module.link_or_copy
    a_ready, b_building, a_done = threading.Event(), threading.Event(), threading.Event()

    def write_task(folder: Path, task: Task, *, fsync: bool = True) -> None:
        if threading.current_thread().name == "A":
            a_ready.set()
            b_building.wait(10)
        real_write_task(folder, task, fsync=fsync)

    def link_or_copy(src: Path, dst: Path) -> None:
        if threading.current_thread().name == "B" and not b_building.is_set():
            b_building.set()
            a_done.wait(10)
        real_link(src, dst)

    monkeypatch.setattr(store_module, "write_task", write_task)
    monkeypatch.setattr(store_module, "link_or_copy", link_or_copy)
    outcome: dict[str, object] = {}

    def build() -> None:
        name = threading.current_thread().name
        if name == "B":
            a_ready.wait(10)
        try:
            outcome[name] = store.create("outgoing", make_task(), files)
        except Exception as exc:
            outcome[name] = exc
        finally:
            if name == "A":
                a_done.set()
            b_building.set()

    threads = [threading.Thread(target=build, name=n) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(outcome) == {"A", "B"}
    refs = store.list()
    assert [r.id for r in refs] == ["task-1"]
    assert sorted(p.name for p in instance_files(refs[0].path)) == [f.name for f in files]
    assert read_task(refs[0].path).id == "task-1"
    store.clean_staging()
    assert sorted(os.listdir(store.folders["outgoing"])) == ["task-1"]
