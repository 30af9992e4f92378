"""The pynetdicom tuning keeps associations working and leaks nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pynetdicom
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


def _pinned_range() -> tuple[str, str]:
    """The pynetdicom range core/pyproject.toml declares (``>=low,<high``)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())
    spec = next(d for d in data["project"]["dependencies"] if d.startswith("pynetdicom"))
    found = re.fullmatch(r"pynetdicom>=([\d.]+),<([\d.]+)", spec.replace(" ", ""))
    assert found, f"pynetdicom must be pinned as >=low,<high in core/pyproject.toml, not {spec}"
    return found.group(1), found.group(2)


def test_the_checked_versions_are_the_pinned_ones_and_the_installed_one_is_checked() -> None:
    low, high = _pinned_range()
    assert (dimse_tuning._version(low), dimse_tuning._version(high)) == (
        dimse_tuning.SUPPORTED_VERSIONS
    )
    assert dimse_tuning.version_supported(), f"pynetdicom {pynetdicom.__version__} not in range"
    assert not dimse_tuning.version_supported("3.1.0")
    assert not dimse_tuning.version_supported("2.1.2")


_UNCHECKED = """
import json, sys, time
import pynetdicom, pynetdicom.dul
pynetdicom.__version__ = "3.1.0"  # a version the tuning was not checked against
from mercure import dimse_tuning
from mercure.logs import configure_logging
configure_logging("INFO", "json")
run_reactor = pynetdicom.dul.DULServiceProvider.run_reactor
results = [dimse_tuning.install() for _ in range(3)]
assert results == [False, False, False], results
assert pynetdicom.dul.time is time, "pynetdicom was patched anyway"
assert pynetdicom.dul.DULServiceProvider.run_reactor is run_reactor
assert not dimse_tuning.active()
print("RESULT ok", flush=True)
"""


def test_an_unchecked_pynetdicom_version_turns_the_tuning_off_with_one_warning() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _UNCHECKED],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MERCURE_LOG_FORMAT": "json"},
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "RESULT ok" in output, output
    warnings = [
        json.loads(line)
        for line in output.splitlines()
        if line.startswith("{") and '"warning"' in line
    ]
    assert len(warnings) == 1, output
    assert warnings[0]["pynetdicom"] == "3.1.0"
    assert warnings[0]["checked"] == ">=3.0.0,<3.1.0"
