"""DICOM over TLS: mutual TLS to DCMTK's storescp, clear failures, and the core's TLS receiver."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trustme
from mercure.jobs.task import Task, TaskDispatch, TaskInfo
from mercure.targets import DeliveryJob, TargetError
from mercure.testing import (
    DCMTK_BIN,
    DcmtkStoreSCP,
    config_for,
    dataset_bytes,
    make_series,
    start_router,
    wait_for,
)
from mercure_target_dicom import DicomTLSTarget
from mercure_target_dicom.config import DicomTLSTargetConfig

pytestmark = pytest.mark.peer


def job_for(files: list[Path]) -> DeliveryJob:
    task = Task(
        info=TaskInfo(action="route", uid="1.2.3"),
        id="job-1",
        dispatch=TaskDispatch(target_name="secure"),
    )
    return DeliveryJob("job-1", files[0].parent, files, {}, task)


def tls_entry(certs: Any, port: int, **overrides: Any) -> dict[str, Any]:
    """A mercure ``dicomtls`` target entry with our client certificate."""
    entry: dict[str, Any] = {
        "target_type": "dicomtls",
        "ip": "127.0.0.1",
        "port": str(port),
        "aet_target": "STORESCP",
        "aet_source": "MERCURE",
        "tls_key": str(certs.cli_key),
        "tls_cert": str(certs.cli_crt),
        "ca_cert": str(certs.ca),
        "timeout": 10,
    }
    entry.update(overrides)
    return entry


def tls_target(certs: Any, port: int, **overrides: Any) -> DicomTLSTarget:
    entry = tls_entry(certs, port, **overrides)
    entry.pop("target_type")
    return DicomTLSTarget("secure", DicomTLSTargetConfig(**entry))


def assert_identical(sent: list[Path], scp: DcmtkStoreSCP) -> None:
    received = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.received()
    }
    assert len(received) == len(sent)
    for path in sent:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(received[uid]) == dataset_bytes(path)


# -- sending ----------------------------------------------------------------------------------


def test_mutual_tls_delivers_series(
    tmp_path: Path, certs: Any, tls_storescp: DcmtkStoreSCP
) -> None:
    files = make_series(tmp_path / "series", 20)
    result = tls_target(certs, tls_storescp.port).send(job_for(files))
    assert sorted(result.delivered) == sorted(f.name for f in files)
    assert result.failed == {}
    assert_identical(files, tls_storescp)


def test_c_echo_over_tls(certs: Any, tls_storescp: DcmtkStoreSCP) -> None:
    line = tls_target(certs, tls_storescp.port).test_connection()
    assert line.startswith(
        f"C-ECHO over TLS to STORESCP@127.0.0.1:{tls_storescp.port} succeeded in "
    )


FAILURES = {
    "no client certificate": (
        {"tls_key": "", "tls_cert": ""},
        ["TLS handshake with 127.0.0.1:{port} failed", "requires a client certificate"],
    ),
    "wrong CA": (
        {"ca_cert": "{other_ca}"},
        [
            "TLS handshake with 127.0.0.1:{port} failed: certificate verify failed",
            "check ca_cert ({other_ca})",
        ],
    ),
    "client certificate from an untrusted CA": (
        {"tls_key": "{other_cli_key}", "tls_cert": "{other_cli_crt}"},
        ["TLS handshake with 127.0.0.1:{port} failed", "does not accept our client certificate"],
    ),
    "plain DICOM to the TLS port": (
        {"target_type": "dicom"},
        ["the peer requires DICOM TLS: use target type 'dicomtls'"],
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_tls_failures_are_explained_and_the_job_is_retried(
    case: str, tmp_path: Path, certs: Any, tls_storescp: DcmtkStoreSCP, dispatch_env: Any
) -> None:
    overrides, expected = FAILURES[case]
    names = {
        "port": str(tls_storescp.port),
        "other_ca": str(certs.other_ca),
        "other_cli_key": str(certs.other_cli_key),
        "other_cli_crt": str(certs.other_cli_crt),
    }
    overrides = {k: v.format(**names) for k, v in overrides.items()}
    entry = tls_entry(certs, tls_storescp.port, **overrides)
    if entry["target_type"] == "dicom":
        for key in ("tls_key", "tls_cert", "ca_cert"):
            entry.pop(key)
    files = make_series(tmp_path / "series", 5)
    env = dispatch_env.start({"secure": entry})
    ref = env.job(files, "secure")

    ref, task = env.deliver(ref)
    assert ref.state == "outgoing"
    dispatch = task.dispatch_state
    assert dispatch is not None and dispatch.retries == 1
    error = dispatch.attempts[-1].error or ""
    for text in expected:
        assert text.format(**names) in error, error
    assert set(dispatch.failed["secure"]) == {f.name for f in files}
    assert tls_storescp.received() == []

    # Once the configuration is fixed, the retry delivers everything: nothing was lost.
    env.start({"secure": tls_entry(certs, tls_storescp.port)})
    ref, task = env.deliver(ref)
    assert ref.state == "success"
    assert_identical(files, tls_storescp)


def test_hostname_check_is_optional(tmp_path: Path, certs: Any, recording_scp: Any) -> None:
    # A peer whose certificate names only "pacs.example", reached by IP address.
    ca = trustme.CA()
    server = ca.issue_cert("pacs.example")
    ca_file = tmp_path / "named-ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    context.verify_mode = ssl.CERT_NONE
    scp = recording_scp(ssl_context=context)
    files = make_series(tmp_path / "series", 2)

    default = tls_target(certs, scp.port, aet_target="RECORDER", ca_cert=str(ca_file))
    assert len(default.send(job_for(files)).delivered) == 2  # CA verified, host not checked

    strict = tls_target(
        certs, scp.port, aet_target="RECORDER", ca_cert=str(ca_file), tls_check_hostname=True
    )
    with pytest.raises(TargetError) as info:
        strict.send(job_for(files))
    assert "certificate verify failed" in str(info.value)
    assert "the certificate does not name this address" in str(info.value)


# -- the core's receiver with TLS --------------------------------------------------------------


def dcmtk_send(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            str(DCMTK_BIN / "storescu"),
            "-aet",
            "MODALITY",
            "-aec",
            "MERCURE",
            *tls,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def tls_router(tmp_path: Path, certs: Any, tls_storescp: DcmtkStoreSCP) -> Iterator[Any]:
    """A router whose receiver has a TLS port and routes everything to a dicomtls target."""
    config = config_for(
        tmp_path,
        dicom_receiver={
            "tls": {
                "port": 0,
                "key": str(certs.srv_key),
                "cert": str(certs.srv_crt),
                "ca_cert": str(certs.ca),
                "require_client_cert": True,
            }
        },
        targets={"secure": tls_entry(certs, tls_storescp.port)},
        rules={"all": {"rule": "True", "target": "secure"}},
    )
    runs = start_router(config)
    router = next(runs)
    try:
        yield router
    finally:
        runs.close()


def incoming_instances(config: Any) -> list[Path]:
    return sorted(Path(config.incoming_folder).rglob("*.dcm"))


def test_receiver_accepts_tls_with_a_client_certificate_end_to_end(
    tmp_path: Path, certs: Any, tls_router: Any, tls_storescp: DcmtkStoreSCP
) -> None:
    receiver = tls_router.supervisor.receivers[0]
    tls_port = receiver.ports[1]
    files = make_series(tmp_path / "series", 5)
    # A client that connects and sends nothing must not hold up the TLS port.
    with socket.create_connection(("127.0.0.1", tls_port)):
        sent = dcmtk_send(
            tls_port,
            files,
            "+tls",
            str(certs.cli_key),
            str(certs.cli_crt),
            "-pw",
            "+cf",
            str(certs.ca),
        )
    assert sent.returncode == 0, sent.stderr.decode()
    # In over TLS, routed, out over TLS: storescp gets every instance unchanged.
    wait_for(lambda: len(tls_storescp.received()) == 5, timeout=60, what="5 instances at storescp")
    assert_identical(files, tls_storescp)


def test_receiver_refuses_tls_clients_without_certificate_and_plain_dicom(
    tmp_path: Path, certs: Any, tls_router: Any
) -> None:
    tls_port = tls_router.supervisor.receivers[0].ports[1]
    files = make_series(tmp_path / "series", 2)
    anonymous = dcmtk_send(tls_port, files, "+tla", "+cf", str(certs.ca))
    assert anonymous.returncode != 0
    plain = dcmtk_send(tls_port, files)
    assert plain.returncode != 0
    stranger = dcmtk_send(
        tls_port,
        files,
        "+tls",
        str(certs.other_cli_key),
        str(certs.other_cli_crt),
        "-pw",
        "+cf",
        str(certs.ca),
    )
    assert stranger.returncode != 0
    assert incoming_instances(tls_router.config) == []
    # The port still serves a client with a valid certificate afterwards.
    good = dcmtk_send(
        tls_port,
        files,
        "+tls",
        str(certs.cli_key),
        str(certs.cli_crt),
        "-pw",
        "+cf",
        str(certs.ca),
    )
    assert good.returncode == 0, good.stderr.decode()


def test_receiver_with_missing_certificate_file_fails_to_start(tmp_path: Path, certs: Any) -> None:
    from mercure.builtin.dicom_receiver import ReceiverStartError, dicom_receiver_for
    from mercure.jobs.incoming import IncomingSpool

    config = config_for(
        tmp_path,
        dicom_receiver={
            "tls": {
                "port": 0,
                "key": str(tmp_path / "missing.key"),
                "cert": str(certs.srv_crt),
                "ca_cert": str(certs.ca),
            }
        },
    )
    receiver = dicom_receiver_for(config, IncomingSpool(Path(config.incoming_folder), fsync=False))
    with pytest.raises(ReceiverStartError, match=r"dicom_receiver\.tls\.key file .*missing\.key"):
        receiver.start()
    receiver.stop()
