"""Fault injection: nothing is lost when processes die, the target goes away or the disk fills.

Three scenarios, each with real peers (DCMTK's storescu sends, DCMTK's storescp is the ``dicom``
target) and mercure's receiver, router and dispatcher as separate processes:

* ``kills``: instances flow while a driver SIGKILLs a randomly chosen service (receiver, router
  or dispatcher) at random (often aimed: mid-association, mid-routing, mid-sending) moments and
  restarts it;
* ``target-down``: the target is killed in the middle of the flow and comes back on the same
  port a few seconds later;
* ``disk-full``: the whole spool is a small tmpfs; more is sent than fits (the receiver must
  refuse with "Out of Resources"), and once space returns the refused instances are accepted.

Each test asserts the final accounting of ``chaos_support.account``: every instance at the
target byte for byte, nothing missing, no task file claiming a delivery the target lacks,
nothing in error/. Instances delivered more than once are counted and printed, not failed.

Here they run at a reduced size. The full size (2,000 instances and 20 kills; three outages;
1,000 instances into a 4 MB spool) runs with one command, which prints the same summaries::

    .venv/bin/python bench/chaos.py                 # all three scenarios
    .venv/bin/python bench/chaos.py kills           # one of them

Every run prints its seed; ``MERCURE_CHAOS_SEED=<seed>`` replays the same random schedule
(where a kill lands still depends on timing).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos_support import CI_SIZE, SCENARIOS, ScenarioSkipped, seed_from_env

pytestmark = [pytest.mark.slow, pytest.mark.peer, pytest.mark.timeout(150)]


@pytest.mark.parametrize("scenario", ["kills", "target-down", "disk-full"])
def test_nothing_is_lost_under_faults(tmp_path: Path, scenario: str) -> None:
    params = CI_SIZE[scenario]
    try:
        report = SCENARIOS[scenario](tmp_path, params, seed_from_env(), print)
    except ScenarioSkipped as exc:
        pytest.skip(str(exc))
    print(report.summary())
    assert report.problems == [], report.summary() + "\nkill log:\n" + report.kill_log()
    assert report.delivered == report.sent == params.total
