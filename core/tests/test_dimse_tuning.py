"""The pynetdicom tuning keeps associations working and leaks nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mercure import dimse_tuning
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_echo_and_store_roundtrips_work_and_wake_pipes_are_closed() -> None:
    assert dimse_tuning.install()
    scp = AE()
    scp.add_supported_context(Verification)
    echoes: list[int] = []

    def on_echo(event: object) -> int:
        echoes.append(1)
        return 0x0000

    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)]
    )
    assert server is not None
    port = server.server_address[1]
    try:
        scu = AE()
        scu.add_requested_context(Verification)
        before = _open_fds()
        for _ in range(20):
            assoc = scu.associate("127.0.0.1", port)
            assert assoc.is_established
            dimse_tuning.keep_responses_from_reactor(assoc)  # pynetdicom's own race
            for _ in range(5):
                status = assoc.send_c_echo()
                assert status.Status == 0x0000
            assoc.release()
        deadline = time.monotonic() + 5
        while _open_fds() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(echoes) == 100
        assert _open_fds() <= before + 2, "finished associations leave file descriptors open"
    finally:
        server.shutdown()


def test_tuning_can_be_switched_off() -> None:
    code = (
        "from mercure import dimse_tuning; import pynetdicom.dul as d, time;"
        "assert dimse_tuning.install() is False; assert d.time is time"
    )
    env = {**os.environ, "MERCURE_DIMSE_TUNING": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
