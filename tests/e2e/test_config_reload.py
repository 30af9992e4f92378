"""The configuration file re-read while ``mercure run`` runs, as mercure's ``read_config`` does.

A running router gets a changed ``mercure.json`` (a new rule and target): the next series
follows it, without a restart. Then the file is broken (invalid JSON, then a rule that does
not compile): each is logged with its errors and refused, and the router keeps routing with
the configuration it had.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from e2e_support import (
    ProcessFactory,
    spool_config,
    storescu,
    visible_entries,
    wait_until,
    write_config,
)
from mercure.testing import make_series

pytestmark = [pytest.mark.peer, pytest.mark.slow]


def delivered(folder: Path) -> set[str]:
    return {p.name for job in visible_entries(folder) for p in job.glob("*.dcm")}


def rewrite(path: Path, text: str) -> None:
    """Replace the file and make sure its modification time moves on."""
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_a_changed_configuration_is_picked_up_and_a_broken_one_refused(
    tmp_path: Path, mercure_processes: ProcessFactory
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    config = spool_config(
        tmp_path,
        targets={"first": {"target_type": "folder", "folder": str(first)}},
        rules={"all": {"rule": "True", "target": "first"}},
    )
    path = write_config(tmp_path / "mercure.json", config)
    router = mercure_processes.start("router", "run", "--config", str(path))

    one = make_series(tmp_path / "one", 2, modality="CT")
    storescu(one, config["port"])
    wait_until(lambda: delivered(first) >= {p.name for p in one}, 60, "the first series")

    # A new target and a rule that sends MR there: picked up without a restart.
    config["targets"]["second"] = {"target_type": "folder", "folder": str(second)}
    config["rules"]["all"]["rule"] = "tags.Modality != 'MR'"
    config["rules"]["mr"] = {"rule": "tags.Modality == 'MR'", "target": "second"}
    rewrite(path, json.dumps(config, indent=2))
    wait_until(lambda: "configuration reloaded" in router.output(), 30, "the reload")
    two = make_series(tmp_path / "two", 2, modality="MR")
    storescu(two, config["port"])
    wait_until(lambda: delivered(second) >= {p.name for p in two}, 60, "the MR series")
    assert not delivered(first) & {p.name for p in two}

    # Broken files are refused; the running configuration stays.
    rewrite(path, "{ not json")
    wait_until(lambda: "is invalid; the running configuration is kept" in router.output(),
               30, "the refusal of invalid JSON")  # fmt: skip
    config["rules"]["mr"]["rule"] = "tags.Modality == 'MR' and open('x')"
    rewrite(path, json.dumps(config, indent=2))
    wait_until(lambda: router.output().count("the running configuration is kept") >= 2,
               30, "the refusal of a rule that does not compile")  # fmt: skip
    refused = [e for e in router.events() if "running configuration is kept" in e.get("event", "")]
    assert any("not valid JSON" in " ".join(e.get("errors", [])) for e in refused)
    assert any("rules.mr.rule" in " ".join(e.get("errors", [])) for e in refused)
    three = make_series(tmp_path / "three", 2, modality="MR")
    storescu(three, config["port"])
    wait_until(lambda: delivered(second) >= {p.name for p in three}, 60, "routing as before")
    assert router.running()
    assert router.terminate() == 0
