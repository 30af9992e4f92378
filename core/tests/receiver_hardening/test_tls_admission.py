"""The TLS port: connections that never finish a handshake hold no thread and no slot.

The gate shakes hands itself (without blocking), so a flood of idle TCP connections and
clients that are no TLS clients at all are refused there, while DCMTK's ``storescu`` with a
client certificate gets through.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from hostile import OTHER_HOST, IdleFlood, RawPeer, associate_rq, running_receiver, wait_until
from mercure.testing import DCMTK_BIN, make_series

trustme = pytest.importorskip("trustme", reason="trustme is not installed (a dev dependency)")

pytestmark = [
    pytest.mark.peer,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("modality.example")
    files = {
        "ca": ca.cert_pem,
        "srv_key": server.private_key_pem,
        "srv_crt": server.cert_chain_pems[0],
        "cli_key": client.private_key_pem,
        "cli_crt": client.cert_chain_pems[0],
    }
    for name, blob in files.items():
        blob.write_to_path(str(folder / name))
    return {name: folder / name for name in files}


def _tls_storescu(port: int, certs: dict[str, Path], files: list[Path]) -> None:
    exe = DCMTK_BIN / "storescu"
    if not exe.exists():
        pytest.skip("DCMTK is not installed (apt-get install dcmtk)")
    tls = ["+tls", str(certs["cli_key"]), str(certs["cli_crt"]), "-pw", "+cf", str(certs["ca"])]
    result = subprocess.run(
        [str(exe), "-aet", "MODALITY", "-aec", "MERCURE", *tls, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def _threads() -> int:
    return threading.active_count()


def test_tls_port_serves_a_modality_through_a_flood_and_refuses_non_tls_clients(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    tls = {
        "port": 0,
        "key": str(certs["srv_key"]),
        "cert": str(certs["srv_crt"]),
        "ca_cert": str(certs["ca"]),
        "require_client_cert": True,
    }
    with running_receiver(tmp_path, tls=tls, association_request_timeout=2) as receiver:
        tls_port = receiver.ports[1]
        before = _threads()
        with IdleFlood(tls_port, 200) as flood:
            wait_until(lambda: flood.reopened >= 200, 60, "the flood to be re-opened")
            # Idle TLS connections wait in the gate, not in threads of their own.
            assert _threads() <= before + 2
            _tls_storescu(tls_port, certs, make_series(tmp_path / "series", 5))
        # Plain DICOM on the TLS port fails its handshake in the gate and is closed.
        plain = RawPeer(tls_port, OTHER_HOST)
        plain.send(associate_rq())
        assert plain.is_closed_by_peer()
        # A connection that never starts its handshake is closed at the deadline.
        silent = RawPeer(tls_port, "127.0.0.3")
        assert silent.is_closed_by_peer()
        stats = receiver.stats.snapshot()
    assert stats["refused_pending_per_address"] >= 200
    assert stats["refused_tls_handshake"] >= 1
    assert stats["refused_request_timeout"] >= 1
    assert stats["associations_admitted"] >= 1
