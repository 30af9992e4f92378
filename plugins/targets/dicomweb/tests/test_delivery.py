"""Delivery against the DICOMweb test server: batches, per-instance answers, failures, retries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from dicomweb_helpers import job_for, scripted_more, target, uid
from dicomweb_stow_server import Canned
from mercure.targets import TargetError
from mercure.testing import make_series, wait_for


def web_config(url: str, **settings: Any) -> dict[str, Any]:
    return {"web": {"target_type": "dicomweb", "url": url, "timeout": 10, **settings}}


def names(files: list[Path]) -> list[str]:
    return sorted(f.name for f in files)


# -- batches and connections -----------------------------------------------------------------


def test_batches_are_bounded_by_count(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 23)
    web = target(stow_server.url, batch_max_instances=10)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names(files) and result.failed == {}
    assert [len(r.uids) for r in stow_server.requests] == [10, 10, 3]
    assert stow_server.sent_uids() == [uid(f) for f in files]
    assert stow_server.stored_uids() == {uid(f) for f in files}


def test_batches_are_bounded_by_bytes(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 6, rows=128, columns=128)  # about 33 kB each
    size = files[0].stat().st_size
    web = target(stow_server.url, batch_max_bytes=2 * size + 10)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names(files)
    assert [len(r.uids) for r in stow_server.requests] == [2, 2, 2]
    # An instance larger than the bound goes alone.
    big = make_series(tmp_path / "b", 2, rows=256, columns=256)
    stow_server.requests.clear()
    web = target(stow_server.url, batch_max_bytes=size)
    assert sorted(web.send(job_for(big)).delivered) == names(big)
    web.close()
    assert [len(r.uids) for r in stow_server.requests] == [1, 1]


def test_one_connection_serves_every_batch_and_job(tmp_path: Path, stow_server: Any) -> None:
    web = target(stow_server.url, batch_max_instances=5)
    first = make_series(tmp_path / "a", 12)
    second = make_series(tmp_path / "b", 7)
    assert len(web.send(job_for(first)).delivered) == 12
    assert len(web.send(job_for(second)).delivered) == 7
    web.close()
    assert len(stow_server.requests) == 5
    assert {r.connection for r in stow_server.requests} == {1}  # HTTP/1.1 keep-alive
    assert stow_server.connections == 1
    headers = stow_server.requests[0].headers
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert headers["Accept"] == "application/dicom+json"
    assert "Transfer-Encoding" not in headers


# -- what the answer says per instance --------------------------------------------------------


def test_a_failed_instance_stays_pending_and_is_retried_alone(
    tmp_path: Path, stow_server: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 8)
    refused = uid(files[3])
    stow_server.fail_once[refused] = 0xA700
    env = dispatch_env.start(web_config(stow_server.url))
    ref = env.job(files, "web")

    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch.retries == 1
    assert sorted(dispatch.delivered["web"]) == sorted(f.name for f in files if f != files[3])
    assert dispatch.failed["web"] == {
        files[3].name: (
            f"the server refused SOP Instance {refused}: 0xA700 (Refused: Out of Resources) "
            "(HTTP 202)"
        )
    }

    ref, task = env.deliver(ref)
    assert ref.state == "success"
    assert stow_server.requests[-1].uids == [refused]  # exactly that instance, alone
    assert stow_server.stored_uids() == {uid(f) for f in files}
    assert stow_server.sent_uids().count(refused) == 2
    assert len(stow_server.sent_uids()) == len(files) + 1


def test_an_instance_missing_from_the_answer_stays_pending(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 4)
    stow_server.omit.add(uid(files[1]))
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names([files[0], files[2], files[3]])
    assert result.failed == {
        files[1].name: f"the server's answer (HTTP 202) does not list SOP Instance "
        f"{uid(files[1])} as stored"
    }


def test_warnings_are_logged_and_the_instance_is_delivered(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 3)
    stow_server.warn[uid(files[2])] = 0xB000
    web = target(stow_server.url)
    with structlog.testing.capture_logs() as logs:
        result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names(files) and result.failed == {}
    warnings = [e for e in logs if e["event"] == "instance stored with a warning"]
    assert warnings == [
        {
            "event": "instance stored with a warning",
            "log_level": "warning",
            "target": "web",
            "task_id": "job-1",
            "file": files[2].name,
            "sop_instance_uid": uid(files[2]),
            "warning": "0xB000 (Coercion of data elements)",
        }
    ]


def test_an_answer_that_confirms_nothing_delivers_nothing(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 3)
    stow_server.script.append(Canned(200, b"OK", {"Content-Type": "text/plain"}))
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert result.delivered == []
    assert set(result.failed) == set(names(files))
    assert "without saying which instances it stored" in result.failed[files[0].name]


# -- conflicts ----------------------------------------------------------------------------------


def test_a_conflict_for_an_identical_instance_counts_as_delivered(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 4)
    web = target(stow_server.url)
    assert len(web.send(job_for(files[:2])).delivered) == 2
    stow_server.on_duplicate = "conflict"  # the server now answers 0x0111 / 409 for those
    result = web.send(job_for(files))
    assert sorted(result.delivered) == names(files) and result.failed == {}
    assert stow_server.requests[-1].answered == 202
    # All four held already: 409 for the whole request; still delivered, confirmed by WADO-RS.
    result = web.send(job_for(files))
    web.close()
    assert stow_server.requests[-1].answered == 409
    assert sorted(result.delivered) == names(files) and not result.permanent


def test_a_conflict_with_a_different_instance_is_permanent(
    tmp_path: Path, stow_server: Any, dispatch_env: Any
) -> None:
    (original,) = make_series(tmp_path / "a", 1)
    changed = tmp_path / "b" / original.name
    changed.parent.mkdir()
    import pydicom

    ds = pydicom.dcmread(original)
    ds.SeriesDescription = "edited after it was sent"
    ds.save_as(changed, enforce_file_format=True)
    web = target(stow_server.url)
    assert web.send(job_for([original])).delivered == [original.name]
    web.close()
    stow_server.on_duplicate = "conflict"
    env = dispatch_env.start(web_config(stow_server.url))
    ref, task = env.deliver(env.job([changed], "web"))
    assert ref.state == "error"  # at once, no retries
    assert task.dispatch_state.retries == 0
    reason = task.dispatch_state.failed["web"][changed.name]
    assert "0x0111 (Duplicate SOP Instance)" in reason
    assert "holds a different instance with this SOP Instance UID" in reason
    assert "not retried, cannot succeed" in task.error


def test_a_409_for_an_instance_the_server_lacks_stays_pending(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 2)
    for f in files:
        stow_server.fail[uid(f)] = 0x0122  # SOP class not supported: 409, nothing stored
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert stow_server.requests[-1].answered == 409
    assert result.delivered == [] and not result.permanent
    assert "0x0122 (Referenced SOP Class not supported)" in result.failed[files[0].name]
    assert (
        "not confirmed as already stored: WADO-RS does not find it" in result.failed[files[0].name]
    )


# -- failures of the whole request --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "server_side", "expected"),
    [
        ({"http_user": "router", "http_password": "wrong"}, {"basic": ("router", "right")}, 401),
        ({"access_token": "stale"}, {"token": "fresh"}, 401),
        ({}, {"script": [Canned(403, b'{"Message": "user may not store"}')]}, 403),
        ({"stow_url_prefix": "nowhere"}, {}, 404),
    ],
)
def test_requests_that_cannot_succeed_go_to_error_after_one_attempt(
    tmp_path: Path,
    stow_server: Any,
    dispatch_env: Any,
    settings: dict[str, Any],
    server_side: dict[str, Any],
    expected: int,
) -> None:
    for key, value in server_side.items():
        setattr(stow_server, key, value)
    files = make_series(tmp_path / "s", 5)
    env = dispatch_env.start(web_config(stow_server.url, batch_max_instances=2, **settings))
    ref, task = env.deliver(env.job(files, "web"))
    assert ref.state == "error"
    assert task.dispatch_state.retries == 0 and len(task.dispatch_state.attempts) == 1
    assert f"HTTP {expected}" in task.error and "not retried, cannot succeed" in task.error
    if expected == 401:
        assert "check http_user/http_password or access_token" in task.error
        assert "wrong user name or password" in task.error  # the server's own reason
    if expected == 404:
        assert "check url and stow_url_prefix" in task.error
    # One request, then no more (no retry storm, not even for the other batches).
    assert len(stow_server.requests) == (0 if expected == 404 else 1)


def test_bearer_token_and_basic_authentication_are_sent(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 2)
    stow_server.token = "tok-123"
    web = target(stow_server.url, access_token="tok-123")
    assert len(web.send(job_for(files[:1])).delivered) == 1
    assert "QIDO-RS" in web.test_connection() and "a bearer token" in web.test_connection()
    web.close()
    stow_server.token = None
    stow_server.basic = ("router", "pw")
    web = target(stow_server.url, http_user="router", http_password="pw", access_token="x")
    assert len(web.send(job_for(files[1:])).delivered) == 1
    assert "basic authentication" in web.test_connection()
    web.close()


def test_a_server_error_is_retried_and_nothing_confirmed_is_sent_again(
    tmp_path: Path, stow_server: Any, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 9)
    env = dispatch_env.start(web_config(stow_server.url, batch_max_instances=3))
    # First batch stored, second answered 500: the attempt stops there.
    stow_server.script = []
    original_store = stow_server.store
    calls = {"n": 0}

    def store_then_fail(parts: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            stow_server.script.append(Canned(500, b"database unavailable"))
        return original_store(parts)

    stow_server.store = store_then_fail
    ref = env.job(files, "web")
    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch.retries == 1
    assert len(dispatch.delivered["web"]) == 6
    assert "HTTP 500" in dispatch.attempts[-1].error and "database unavailable" in (
        dispatch.attempts[-1].error
    )
    first_round = list(stow_server.sent_uids())
    assert len(first_round) == 9  # three requests: stored, stored, 500
    confirmed = set(dispatch.delivered["web"])
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    resent = stow_server.sent_uids()[len(first_round) :]
    # Only the three not confirmed, none of the six confirmed.
    assert sorted(resent) == sorted(uid(f) for f in files if f.name not in confirmed)
    assert stow_server.stored_uids() == {uid(f) for f in files}


def test_retry_after_is_honoured_within_the_attempt(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 3)
    stow_server.script.append(Canned(429, b"slow down", {"Retry-After": "1"}))
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names(files)
    assert [r.answered for r in stow_server.requests] == [429, 200]


def test_a_long_retry_after_ends_the_attempt_and_holds_later_ones(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 3)
    stow_server.script.append(Canned(503, b"maintenance", {"Retry-After": "3600"}))
    web = target(stow_server.url, retry_after_max_wait=5)
    result = web.send(job_for(files))
    assert result.delivered == [] and not result.permanent
    assert "asked to wait 3600 s (Retry-After)" in (result.error or "")
    # The next attempt (the dispatcher's retry) makes no request before the time has come.
    result = web.send(job_for(files))
    web.close()
    assert len(stow_server.requests) == 1
    assert "Retry-After" in (result.error or "") and result.delivered == []


def test_network_failures_are_retryable_with_a_clear_reason(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 2)
    url = stow_server.url
    stow_server.stop()
    web = target(url)
    result = web.send(job_for(files))
    assert result.delivered == [] and not result.permanent
    assert result.error is not None and result.error.startswith(f"cannot connect to {url}/studies")
    with pytest.raises(TargetError, match=r"QIDO-RS .* cannot connect"):
        web.test_connection()
    web.close()


def test_a_slow_server_hits_the_timeout_and_is_retried(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 2)
    stow_server.script.append(Canned(200, b"{}", delay=3))
    web = target(stow_server.url, timeout=0.5)
    result = web.send(job_for(files))
    assert result.delivered == [] and not result.permanent
    assert "within 0.5 s (timeout)" in (result.error or "")
    assert sorted(web.send(job_for(files)).delivered) == names(files)
    web.close()


def test_a_batch_refused_whole_is_retried_one_instance_per_request(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 4)
    stow_server.malformed.add(uid(files[1]))
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names([files[0], files[2], files[3]])
    assert "refused as malformed" in result.failed[files[1].name]
    assert result.permanent  # the instance alone is refused: it will not succeed either
    assert [len(r.uids) for r in stow_server.requests] == [4, 1, 1, 1, 1]


def test_a_batch_too_large_for_the_server_is_split(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 3)
    stow_server.max_batch = 1
    web = target(stow_server.url)
    result = web.send(job_for(files))
    web.close()
    assert sorted(result.delivered) == names(files) and not result.permanent
    assert [r.answered for r in stow_server.requests] == [413, 200, 200, 200]


def test_test_connection_reports_wrong_credentials(stow_server: Any) -> None:
    stow_server.basic = ("router", "right")
    web = target(stow_server.url, http_user="router", http_password="wrong")
    with pytest.raises(TargetError, match=r"HTTP 401.*check http_user/http_password"):
        web.test_connection()
    web.close()


# -- streaming ---------------------------------------------------------------------------------


def test_an_arriving_series_goes_out_in_batches_over_one_connection(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 12)
    confirmed: list[list[str]] = []
    more, calls = scripted_more([files[2:5], files[5:9], [], files[9:12], None])
    web = target(stow_server.url, batch_max_instances=4)
    result = web.send(job_for(files[:2], more=more, confirm=confirmed.append))
    web.close()
    assert sorted(result.delivered) == names(files) and result.failed == {}
    # Full batches go at once; the partial one when nothing came for a moment, the rest at the end.
    assert [len(r.uids) for r in stow_server.requests] == [4, 4, 1, 3]
    assert stow_server.sent_uids() == [uid(f) for f in files]
    assert stow_server.connections == 1
    assert len(calls) == 5
    assert [len(c) for c in confirmed] == [4, 8, 9, 12]


def test_a_failure_mid_stream_stops_taking_more(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 6)
    stow_server.script.append(Canned(200, json.dumps({}).encode()))  # unreadable: not stored
    stow_server.script.append(Canned(502, b"bad gateway"))
    more, calls = scripted_more([files[2:4], files[4:6], None])
    web = target(stow_server.url, batch_max_instances=2)
    result = web.send(job_for(files[:2], more=more))
    web.close()
    assert result.delivered == []
    assert set(result.failed) == set(names(files[:4]))
    assert "HTTP 502" in (result.error or "")
    assert len(calls) == 1  # nothing more was taken that could not be sent


def test_a_slowly_arriving_series_does_not_wait_for_a_full_batch(
    tmp_path: Path, stow_server: Any
) -> None:
    files = make_series(tmp_path / "s", 12)
    handed = iter(files[1:])

    def more(timeout: float) -> list[Path] | None:
        time.sleep(0.3)  # one instance every 0.3 s: never a pause long enough to flush
        nxt = next(handed, None)
        return [nxt] if nxt is not None else None

    web = target(stow_server.url, batch_max_instances=50)
    result = web.send(job_for(files[:1], more=more))
    web.close()
    assert sorted(result.delivered) == names(files)
    # The first instances went out before the series ended (each waited at most about 2 s).
    assert len(stow_server.requests) >= 2
    assert stow_server.sent_uids() == [uid(f) for f in files]


def test_jobs_sent_from_several_threads_at_once(tmp_path: Path, stow_server: Any) -> None:
    jobs = [make_series(tmp_path / f"s{i}", 15) for i in range(4)]
    web = target(stow_server.url, batch_max_instances=4)
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        results[i] = web.send(job_for(jobs[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    web.close()
    for i, files in enumerate(jobs):
        assert sorted(results[i].delivered) == names(files) and results[i].failed == {}
    assert stow_server.stored_uids() == {uid(f) for files in jobs for f in files}
    assert stow_server.connections <= 4  # one pooled connection per sending thread at most


def test_closing_the_target_ends_a_retry_after_wait(tmp_path: Path, stow_server: Any) -> None:
    files = make_series(tmp_path / "s", 2)
    stow_server.script.append(Canned(429, b"", {"Retry-After": "25"}))
    web = target(stow_server.url, retry_after_max_wait=30)
    outcome: list[Any] = []
    sender = threading.Thread(target=lambda: outcome.append(web.send(job_for(files))))
    sender.start()
    wait_for(lambda: stow_server.requests, timeout=10, what="the first request")
    web.close()  # the router stops
    sender.join(20)
    assert not sender.is_alive()
    (result,) = outcome
    assert result.delivered == [] and "the router is stopping" in (result.error or "")


def test_mercure_targets_test_runs_a_qido_query(tmp_path: Path, stow_server: Any) -> None:
    stow_server.basic = ("router", "pw")
    folders = {
        f"{name}_folder": str(tmp_path / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }

    def run(password: str) -> subprocess.CompletedProcess[str]:
        entry = {"http_user": "router", "http_password": password}
        path = tmp_path / "mercure.json"
        path.write_text(json.dumps({**folders, "targets": web_config(stow_server.url, **entry)}))
        cli = "from mercure.cli import main; main()"
        return subprocess.run(
            [sys.executable, "-c", cli, "targets", "test", "web", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run("pw")
    assert ok.returncode == 0, ok.stderr
    assert f"web: OK: QIDO-RS {stow_server.url}/studies answered HTTP 200 OK" in ok.stdout
    bad = run("nope")
    assert bad.returncode != 0
    said = bad.stdout + bad.stderr
    assert "web: FAILED: QIDO-RS" in said and "HTTP 401" in said


def test_the_prefixes_are_honoured(tmp_path: Path) -> None:
    from dicomweb_stow_server import StowServer

    server = StowServer(root="/pacs/rs").start()
    try:
        base = server.url.removesuffix("/rs")  # http://127.0.0.1:PORT/pacs
        prefixes = {"qido_url_prefix": "rs", "wado_url_prefix": "rs", "stow_url_prefix": "/rs/"}
        files = make_series(tmp_path / "s", 3)
        web = target(base, **prefixes)
        assert web.test_connection().startswith(f"QIDO-RS {base}/rs/studies answered HTTP 200")
        assert sorted(web.send(job_for(files)).delivered) == names(files)
        server.on_duplicate = "conflict"  # confirmed through WADO-RS under its prefix
        assert sorted(web.send(job_for(files)).delivered) == names(files)
        web.close()
        assert {r.path for r in server.requests} == {"/pacs/rs/studies"}
        # Without the prefix nothing is found there: a permanent failure naming the setting.
        web = target(base)
        result = web.send(job_for(files))
        web.close()
        assert result.permanent and "check url and stow_url_prefix" in (result.error or "")
    finally:
        server.stop()
