"""Delivery to a real Orthanc with its DICOMweb plugin, checked with QIDO-RS and WADO-RS."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_helpers import (
    digest_of,
    job_for,
    recording_posts,
    split_multipart,
    target,
    transfer_syntax_of,
    uid,
)
from mercure.config import Config
from mercure.testing import (
    Orthanc,
    config_for,
    dcmtk_storescu,
    make_dataset,
    make_series,
    require_orthanc,
    start_router,
    wait_for,
)
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

pytestmark = [pytest.mark.peer, pytest.mark.slow]

WADO_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def web_target(orthanc: Orthanc, **settings: Any) -> dict[str, Any]:
    return {"target_type": "dicomweb", "url": orthanc.dicomweb_url, "timeout": 30, **settings}


def qido_instances(orthanc: Orthanc, study: str, series: str) -> set[str]:
    path = f"/dicom-web/studies/{study}/series/{series}/instances?limit=10000"
    status, _, body = orthanc.request("GET", path, headers={"Accept": "application/dicom+json"})
    assert status == 200, body[:300]
    return {item["00080018"]["Value"][0] for item in json.loads(body)}


def wado_series(orthanc: Orthanc, study: str, series: str) -> dict[str, bytes]:
    """SOP Instance UID -> the instance as Orthanc returns it, in its stored syntax."""
    path = f"/dicom-web/studies/{study}/series/{series}"
    status, headers, body = orthanc.request("GET", path, headers={"Accept": WADO_AS_STORED})
    assert status == 200, body[:300]
    ctype = next(v for k, v in headers.items() if k.lower() == "content-type")
    found = {}
    for part in split_multipart(body, ctype):
        ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
        found[str(ds.SOPInstanceUID)] = part
    return found


def successful_jobs(config: Config) -> list[Path]:
    folder = Path(config.success_folder)
    return [p for p in folder.iterdir() if p.is_dir()] if folder.exists() else []


@contextlib.contextmanager
def router(config: Config) -> Iterator[Any]:
    with contextlib.contextmanager(start_router)(config) as running:
        yield running


def test_a_300_instance_series_through_the_router_arrives_complete(
    tmp_path: Path, orthanc_web: Orthanc
) -> None:
    study, series = generate_uid(), generate_uid()
    files = make_series(tmp_path / "series", 300, study_uid=study, series_uid=series)
    config = config_for(
        tmp_path,
        targets={"web": web_target(orthanc_web)},
        rules={"all": {"rule": "True", "target": "web"}},
    )
    with router(config) as running:
        dcmtk_storescu(files, running.port)
        wait_for(lambda: successful_jobs(config), timeout=120, what="the job in success/")
    (job,) = successful_jobs(config)
    task = json.loads((job / "task.json").read_text())
    assert len(task["dispatch"]["delivered"]["web"]) == 300
    # QIDO-RS lists every instance, WADO-RS returns each one byte for byte.
    assert qido_instances(orthanc_web, study, series) == {uid(f) for f in files}
    retrieved = wado_series(orthanc_web, study, series)
    assert len(retrieved) == 300
    for path in files:
        assert digest_of(retrieved[uid(path)]) == digest_of(path), path.name
    # The router sent the files it received, unchanged: Orthanc keeps them as they came.
    for path in job.glob("*.dcm"):
        assert retrieved[uid(path)] == path.read_bytes()


def compressed_series(folder: Path, study: str) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for syntax in (JPEG2000Lossless, RLELossless):
        series = generate_uid()
        for index in range(3):
            ds = make_dataset(series, study, index, rows=64, columns=64)
            ds.compress(syntax)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def test_compressed_instances_arrive_in_their_own_syntax(
    tmp_path: Path, orthanc_web: Orthanc
) -> None:
    study = generate_uid()
    files = compressed_series(tmp_path / "compressed", study)
    config = config_for(
        tmp_path,
        targets={"web": web_target(orthanc_web)},
        rules={"all": {"rule": "True", "target": "web"}},
        accept_compressed_images=True,
    )
    with router(config) as running:
        # storescu proposes one compressed syntax per association: one call per series.
        dcmtk_storescu(files[:3], running.port, extra=("-xv",))  # JPEG 2000 lossless
        dcmtk_storescu(files[3:], running.port, extra=("-xr",))  # RLE lossless
        wait_for(lambda: len(successful_jobs(config)) == 2, timeout=120, what="two jobs")
    by_series: dict[str, list[Path]] = {}
    for path in files:
        by_series.setdefault(str(pydicom.dcmread(path).SeriesInstanceUID), []).append(path)
    for series, paths in by_series.items():
        retrieved = wado_series(orthanc_web, study, series)
        for path in paths:
            stored = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            assert stored in (JPEG2000Lossless, RLELossless)
            assert transfer_syntax_of(retrieved[uid(path)]) == stored
            assert digest_of(retrieved[uid(path)]) == digest_of(path)


def test_wrong_credentials_go_to_error_after_one_attempt(
    tmp_path: Path, orthanc_auth: Orthanc, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 6)
    env = dispatch_env.start(
        {"web": web_target(orthanc_auth, http_user="router", http_password="wrong")}
    )
    with pytest.raises(Exception, match="HTTP 401"):
        env.runtime.target("web").test_connection()
    ref, task = env.deliver(env.job(files, "web"))
    assert ref.state == "error"
    assert len(task.dispatch_state.attempts) == 1 and task.dispatch_state.retries == 0
    assert "HTTP 401 Unauthorized: the server rejected the credentials" in task.error
    assert "not retried, cannot succeed" in task.error

    # The operator fixes the password and retries the job (as `mercure job retry` does).
    env = dispatch_env.start(
        {"web": web_target(orthanc_auth, http_user="router", http_password="s3cret")}
    )
    assert "basic authentication" in env.runtime.target("web").test_connection()
    task.error = None
    task.dispatch_state.retries = 0
    env.runtime.store.write(ref, task)
    ref, task = env.deliver(env.runtime.store.move(ref, "outgoing"))
    assert ref.state == "success"
    assert {uid(f) for f in files} <= orthanc_auth.sop_instance_uids()


class KillingBody:
    """A request body that kills the server after its first part has gone out."""

    def __init__(self, body: Any, orthanc: Orthanc) -> None:
        self.body, self.orthanc = body, orthanc
        self.parts, self.headers = body.parts, body.headers

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.body):
            if index == 2 and self.orthanc.proc is not None:
                self.orthanc.proc.kill()
                self.orthanc.proc.wait()
            yield chunk


def test_orthanc_killed_mid_job_and_started_again(tmp_path: Path, dispatch_env: Any) -> None:
    require_orthanc(dicomweb=True)
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=True).start()
    try:
        files = make_series(tmp_path / "s", 100)
        env = dispatch_env.start({"web": web_target(orthanc, batch_max_instances=10)})
        web = env.runtime.target("web")
        sent = recording_posts(web)
        recorded_post = web.post_stow
        requests = [0]

        def post(body: Any) -> Any:
            requests[0] += 1
            if requests[0] == 4:  # the fourth request: Orthanc dies while it arrives
                body = KillingBody(body, orthanc)
            return recorded_post(body)

        web.post_stow = post
        ref = env.job(files, "web")
        ref, task = env.deliver(ref)
        assert ref.state == "outgoing"
        dispatch = task.dispatch_state
        confirmed = set(dispatch.delivered["web"])
        assert len(confirmed) == 30 and dispatch.retries == 1
        assert "instances not confirmed stay pending" in dispatch.attempts[-1].error
        first_attempt = [name for batch in sent for name in batch]
        assert len(first_attempt) == 40

        orthanc.start()  # same ports, same storage
        del sent[:]
        ref, task = env.deliver(ref)
        assert ref.state == "success"
        second_attempt = [name for batch in sent for name in batch]
        assert not confirmed & set(second_attempt)  # nothing confirmed was sent again
        assert sorted(confirmed | set(second_attempt)) == sorted(f.name for f in files)
        assert len(second_attempt) == 70
        assert orthanc.sop_instance_uids() >= {uid(f) for f in files}
        assert len(orthanc.sop_instance_uids()) == 100
    finally:
        orthanc.stop()


def test_an_instance_orthanc_refuses_is_retried_alone(
    tmp_path: Path, orthanc_web: Orthanc, dispatch_env: Any
) -> None:
    files = make_series(tmp_path / "s", 5)
    env = dispatch_env.start({"web": web_target(orthanc_web)})
    ref = env.job(files, "web")
    # Damage one instance in the job (its header is intact; Orthanc cannot parse the rest).
    damaged = ref.path / files[2].name
    good = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(good[:-300])
    web = env.runtime.target("web")
    sent = recording_posts(web)

    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    failed = task.dispatch_state.failed["web"]
    assert list(failed) == [damaged.name]
    assert (
        "does not list SOP Instance" in failed[damaged.name] and "HTTP 400" in failed[damaged.name]
    )
    assert len(task.dispatch_state.delivered["web"]) == 4

    damaged.write_bytes(good)  # repaired: the retry sends exactly that instance
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    assert sent[-1] == [damaged.name]
    assert {uid(f) for f in files} <= orthanc_web.sop_instance_uids()


def test_https_with_a_ca_bundle_and_a_client_certificate(
    tmp_path: Path, orthanc_https: Orthanc, certs: Any
) -> None:
    files = make_series(tmp_path / "s", 4)
    tls = {"ca_bundle": str(certs.ca), "client_cert": str(certs.client_crt)}
    web = target(orthanc_https.dicomweb_url, client_key=str(certs.client_key), **tls)
    assert web.test_connection().startswith(f"QIDO-RS {orthanc_https.dicomweb_url}/studies")
    assert sorted(web.send(job_for(files)).delivered) == sorted(f.name for f in files)
    web.close()
    assert {uid(f) for f in files} <= orthanc_https.sop_instance_uids()

    # Not trusting the server's CA, or no client certificate: permanent, saying what to set.
    web = target(orthanc_https.dicomweb_url, ca_bundle=str(certs.other_ca))
    result = web.send(job_for(files))
    web.close()
    assert result.delivered == [] and result.permanent
    assert "the server's certificate is not trusted: set ca_bundle" in (result.error or "")
    web = target(orthanc_https.dicomweb_url, ca_bundle=str(certs.ca))
    result = web.send(job_for(files))
    web.close()
    assert result.delivered == [] and result.permanent
    assert "requires a client certificate: set client_cert" in (result.error or "")
