"""Through the core's Dispatcher: failed instances stay pending and only they are resent."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from mercure.testing import make_series


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_failed_statuses_stay_pending_and_only_they_are_resent(
    tmp_path: Path, recording_scp, dispatch_env
) -> None:
    files = make_series(tmp_path / "series", 10)
    uids = {f.name: sop_uid(f) for f in files}
    refused = {uids[files[2].name]: 0xA700, uids[files[7].name]: 0xC000}
    scp = recording_scp(fail=dict(refused), **{})
    env = dispatch_env.start(
        {
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(scp.port),
                "aet_target": "RECORDER",
            }
        }
    )
    ref = env.job(files, "pacs")

    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.retries == 1
    failed = dispatch.failed["pacs"]
    assert set(failed) == {files[2].name, files[7].name}
    assert failed[files[2].name] == (
        f"status 0xA700 (Refused: Out of Resources) for SOP Instance {uids[files[2].name]}"
    )
    assert failed[files[7].name].startswith("status 0xC000 (")
    assert len(dispatch.delivered["pacs"]) == 8
    assert dispatch.attempts[-1].delivered == 8 and dispatch.attempts[-1].failed == 2

    # The peer recovers; the retry sends only the two that failed, on a new association.
    scp.fail.clear()
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    assert len(scp.associations) == 2
    assert sorted(scp.associations[1]) == sorted(refused)
    assert scp.stored() == set(uids.values())
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.failed == {}
    assert sorted(dispatch.delivered["pacs"]) == sorted(f.name for f in files)


@pytest.mark.parametrize(
    ("drop", "reason"),
    [("abort", "aborted the association"), ("close", "connection was closed")],
)
def test_peer_dropping_the_association_mid_transfer_loses_nothing(
    tmp_path: Path, recording_scp, dispatch_env, drop: str, reason: str
) -> None:
    files = make_series(tmp_path / "series", 10)
    uids = {f.name: sop_uid(f) for f in files}
    scp = recording_scp(abort_after=4, drop=drop)
    env = dispatch_env.start(
        {
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(scp.port),
                "aet_target": "RECORDER",
            }
        }
    )
    ref = env.job(files, "pacs")

    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.retries == 1
    first = scp.associations[0]
    assert len(first) == 4
    assert sorted(dispatch.delivered["pacs"]) == sorted(n for n, u in uids.items() if u in first)
    assert len(dispatch.failed["pacs"]) == 6
    reasons = set(dispatch.failed["pacs"].values())
    assert all(reason in r for r in reasons), reasons
    assert "will be retried" in (dispatch.attempts[-1].error or "")

    ref, task = env.deliver(ref)
    assert ref.state == "success"
    second = scp.associations[1]
    assert sorted(second) == sorted(u for u in uids.values() if u not in first)
    assert scp.stored() == set(uids.values())


def test_unreachable_peer_keeps_the_job_for_retry(tmp_path: Path, dispatch_env) -> None:
    from mercure.testing import free_port

    port = free_port()
    files = make_series(tmp_path / "series", 3)
    env = dispatch_env.start(
        {
            "pacs": {
                "target_type": "dicom",
                "ip": "127.0.0.1",
                "port": str(port),
                "aet_target": "PACS",
            }
        },
        retry_max=1,
    )
    ref = env.job(files, "pacs")
    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.retries == 1
    assert f"connection to 127.0.0.1:{port} refused" in (dispatch.attempts[-1].error or "")
    assert set(dispatch.failed["pacs"]) == {f.name for f in files}
    # After retry_max tries the job goes to error/ with the reason; its files are kept.
    ref, task = env.deliver(ref)
    assert ref.state == "error"
    assert task.error is not None and "refused" in task.error
    assert sorted(p.name for p in ref.path.glob("*.dcm")) == sorted(f.name for f in files)
